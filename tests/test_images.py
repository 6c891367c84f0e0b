"""Decoding image files to uint8 RGB."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from cifarlab.data.images import BadImage, decode_image


def _encoded(mode: str, value: int, fmt: str) -> bytes:
    if mode == "I":
        img = Image.fromarray(np.full((4, 4), value, dtype=np.int32))
    else:
        dtype = ">u2" if mode == "I;16B" else "<u2"
        img = Image.frombytes(mode, (4, 4), np.full((4, 4), value, dtype=dtype).tobytes())
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("mode", "fmt"), [("I;16", "PNG"), ("I;16B", "PNG"), ("I;16B", "TIFF"), ("I", "TIFF")]
)
def test_sixteen_bit_gray_is_scaled_to_eight_bits_not_clipped_to_white(mode, fmt):
    mid_grey = decode_image(_encoded(mode, 30000, fmt), 4)
    assert mid_grey.dtype == np.uint8 and mid_grey.shape == (4, 4, 3)
    assert np.all(mid_grey == 117)  # 30000 / 65535 * 255 = 116.7
    assert np.all(decode_image(_encoded(mode, 65535, fmt), 4) == 255)
    assert np.all(decode_image(_encoded(mode, 0, fmt), 4) == 0)


def test_a_pipe_or_a_dangling_link_is_a_bad_image_not_a_wait(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")  # opened, it would wait for a writer for good
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    for name in ("pipe.png", "gone.png"):  # for every caller: predict, the API, training
        with pytest.raises(BadImage, match=f"{name}: not a regular file"):
            decode_image(tmp_path / name, 32)


def test_an_empty_file_is_said_to_be_empty(tmp_path):
    """Pillow's "cannot identify image file" does not say that the file holds nothing."""
    (tmp_path / "empty.png").touch()
    with pytest.raises(BadImage, match=r"empty\.png: the file is empty \(0 bytes\)$"):
        decode_image(tmp_path / "empty.png", 32)
    with pytest.raises(BadImage, match="the file is empty"):
        decode_image(b"", 32)
