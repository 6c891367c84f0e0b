"""Random configs and random bytes through the validators and loaders: only documented errors."""

import string

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cifarlab.config import FIELDS, TrainConfig, apply_overrides
from cifarlab.data.images import BadImage, decode_image
from cifarlab.errors import UserError

values = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(string.printable, max_size=12), st.lists(st.text(max_size=4), max_size=3),
)  # fmt: skip
keys = st.one_of(
    st.sampled_from(sorted(FIELDS)), st.text(string.ascii_lowercase + "_", min_size=1, max_size=15)
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, values, max_size=6))
def test_random_config_dicts_give_a_config_or_a_user_error(overrides):
    try:
        config = apply_overrides(TrainConfig(), overrides, where="fuzz")
    except UserError as exc:
        assert str(exc).startswith("fuzz: ") and "\n" not in str(exc)
        return
    assert isinstance(config, TrainConfig)
    assert config.lr > 0 and config.batch_size >= 1 and config.epochs >= 1


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(max_size=2048),
    st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM"]),
)
def test_random_bytes_as_images_decode_or_raise_bad_image(blob, magic):
    try:
        out = decode_image(magic + blob, 32)
    except BadImage as exc:
        assert "not a readable image" in str(exc) or "too large" in str(exc)
        return
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
