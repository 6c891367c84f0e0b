"""Decoding one image file to a square uint8 RGB array, the same way for training and prediction."""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path, PurePath

import numpy as np
from PIL import Image, UnidentifiedImageError

from cifarlab.errors import first_line

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
# what a file left out of a folder is, for training's and predict's messages alike
NOT_AN_IMAGE_NAME = "not ending in " + "/".join(sorted(IMAGE_SUFFIXES))


class BadImage(Exception):
    """A file that is not a readable image; the message names the file and the reason."""


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


JUNK_NAMES = {"__macosx", "thumbs.db", "desktop.ini"}  # macOS zips', Windows Explorer's files


def is_junk(relative: PurePath) -> bool:
    """Never data: anything hidden (.DS_Store, .ipynb_checkpoints/, macOS's AppleDouble `._x.jpg`),
    a zip's `__MACOSX/` or Windows' `Thumbs.db` and `desktop.ini`, at any level of `relative`
    (a path below the folder walked)."""
    return any(
        part.lower() in JUNK_NAMES or (part.startswith(".") and part not in (".", ".."))
        for part in relative.parts
    )


def visible_entries(folder: Path) -> list[Path]:
    """Everything below `folder` (files, folders, links) that `is_junk` keeps, in a stable order."""
    return sorted(p for p in folder.rglob("*") if not is_junk(p.relative_to(folder)))


_IN_MEMORY = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def decode_image(source: Path | bytes, size: int) -> np.ndarray:
    """(size, size, 3) uint8 RGB. Grayscale, palette and RGBA become RGB (alpha on white)."""
    name = "the given bytes" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes) and not Path(source).is_file():  # opening a pipe would wait
        if not os.path.lexists(source):
            raise BadImage(f"{name}: no such file")
        raise BadImage(f"{name}: not a regular file (a dangling link, pipe or device?)")
    if not (source if isinstance(source, bytes) else Path(source).stat().st_size):
        raise BadImage(f"{name}: the file is empty (0 bytes)")
    try:
        with (  # a large photo is shrunk like any other; Pillow still refuses a bomb
            warnings.catch_warnings(action="ignore", category=Image.DecompressionBombWarning),
            Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img,
        ):
            img.load()  # decode now, so a truncated file fails here and not later
            return image_array(img, size)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        said = _IN_MEMORY.sub("", first_line(exc))  # Pillow names bytes by the BytesIO's repr
        raise BadImage(f"{name}: not a readable image ({said})") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(f"{name}: image too large ({exc})") from None


def image_array(img: Image.Image, size: int) -> np.ndarray:
    """An opened image as `decode_image` returns it."""
    if img.mode.startswith("I"):  # 16/32-bit gray: convert("RGB") would clip it at 255
        wide = np.clip(np.asarray(img).astype(np.float32), 0, 65535)
        img = Image.fromarray(np.rint(wide / 257.0).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    elif img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8).copy()
