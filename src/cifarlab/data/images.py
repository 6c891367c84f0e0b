"""Decoding one image file to a square uint8 RGB array, the same way for training and prediction."""

from __future__ import annotations

import io
from pathlib import Path, PurePath

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
# 16-bit grayscale PNGs open as I;16 (older Pillow: I); Pillow's convert("RGB") clips them, so a
# mid-grey 30000/65535 became 255 (white).
_WIDE_GRAY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class BadImage(Exception):
    """A file that is not a readable image; the message names the file and the reason."""


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def is_junk(relative: PurePath) -> bool:
    """Never data, in any command: hidden files and folders (.DS_Store, .ipynb_checkpoints/, the
    AppleDouble `._x.jpg` macOS writes beside every file on other disks and into archives) and
    the `__MACOSX/` folder of zips made on macOS. `relative` is a path below the folder walked,
    so a file in a hidden folder is junk too."""
    return any(
        part == "__MACOSX" or (part.startswith(".") and part not in (".", ".."))
        for part in relative.parts
    )


def visible_entries(folder: Path) -> list[Path]:
    """Everything below `folder` (files, folders, links) that `is_junk` keeps, in a stable order."""
    return sorted(p for p in folder.rglob("*") if not is_junk(p.relative_to(folder)))


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer) grayscale image scaled from 0..65535 to 0..255 ("L")."""
    wide = np.asarray(img).astype(np.float32)
    return Image.fromarray(np.rint(np.clip(wide, 0, 65535) / 257.0).astype(np.uint8), "L")


def decode_image(source: Path | bytes, size: int) -> np.ndarray:
    """(size, size, 3) uint8 RGB. Grayscale, palette and RGBA become RGB (alpha on white)."""
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.load()  # decode now, so a truncated file fails here and not later
            return image_array(img, size)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        reason = str(exc).split("\n")[0] or type(exc).__name__
        raise BadImage(f"{name}: not a readable image ({reason})") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(f"{name}: image too large ({exc})") from None


def image_array(img: Image.Image, size: int) -> np.ndarray:
    """An opened image as (size, size, 3) uint8 RGB: the conversion and resize of `decode_image`."""
    if img.mode in _WIDE_GRAY:
        img = _to_8bit_gray(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    elif img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8).copy()
