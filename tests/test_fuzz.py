"""Random configs and random bytes through the validators and loaders: only documented errors."""

import string
from typing import get_type_hints

import numpy as np
import yaml
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
    assert config.lr > 0 and config.batch_size >= 1 and config.epochs >= 1


def _in_range(key: str) -> st.SearchStrategy:
    """Values field `key` documents as valid: its choices, or its type within its limits."""
    kind, meta = get_type_hints(TrainConfig)[key], FIELDS[key].metadata
    lo, hi, lo_open = meta.get("min"), meta.get("max"), meta.get("lo_open", False)
    if kind is bool:
        return st.booleans()
    if kind is int:
        return st.integers(-(10**6) if lo is None else lo + lo_open, 10**6 if hi is None else hi)
    if kind is float:
        return st.floats(-1e6 if lo is None else lo, 1e6 if hi is None else hi, exclude_min=lo_open)
    if "choices" in meta:
        return st.sampled_from(meta["choices"])
    if kind is str:
        return st.text(string.printable, max_size=12)
    if meta.get("pairs"):
        pair = st.from_regex(r"[a-z]{1,6}=(0\.5|2|1e-3)", fullmatch=True)
        return st.lists(pair, max_size=3, unique_by=lambda p: p.partition("=")[0])  # one each
    return st.lists(st.text(string.ascii_letters, min_size=1, max_size=4), max_size=3)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(sorted(FIELDS)).flatmap(lambda k: st.tuples(st.just(k), _in_range(k))),
                max_size=8).map(dict))  # fmt: skip
def test_valid_values_are_taken_as_given_and_a_saved_config_reloads_the_same(overrides):
    config = apply_overrides(TrainConfig(), overrides, where="fuzz")
    assert {k: getattr(config, k) for k in overrides} == overrides
    saved = yaml.safe_load(yaml.safe_dump(config.to_dict()))  # a run's config.yaml, read back
    assert apply_overrides(TrainConfig(), saved, where="fuzz") == config


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(max_size=2048),
    st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM"]),
)
def test_random_bytes_as_images_decode_or_raise_bad_image(blob, magic):
    try:
        out = decode_image(magic + blob, 32)
    except BadImage as exc:
        assert any(w in str(exc) for w in ("not a readable image", "too large", "is empty"))
        return
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
