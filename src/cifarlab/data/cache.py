"""The decoded-array cache: one .npz per (source, size, mtime), checked by sha256 before use.

Decoding 50,000 JPEGs takes ~20 s here; reading the cached arrays takes well under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

FORMAT = 2  # bump when the cached layout or decoding changes (2: val/ folders, test/-only folders)


def source_key(path: Path, size: int, on_bad: str) -> str:
    """Depends on the source's path, size and mtime (for a folder: of every file in it)."""
    path = path.resolve()
    if path.is_dir():
        count = total = newest = 0
        for dirpath, _dirs, files in os.walk(path):
            for name in files:
                st = os.stat(os.path.join(dirpath, name))
                count, total, newest = count + 1, total + st.st_size, max(newest, st.st_mtime_ns)
        stamp = [count, total, newest]
    else:
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns]
    blob = json.dumps([FORMAT, str(path), stamp, size, on_bad])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path, key: str) -> tuple[Path, Path]:
    folder = root / "arrays"
    return folder / f"{key}.npz", folder / f"{key}.sha256"


def load(root: Path, key: str):
    """The cached SourceData, or None when absent or damaged (then it is rebuilt)."""
    from cifarlab.data.sources import ImageSet, SourceData

    npz, checksum = _files(root, key)
    if not (npz.is_file() and checksum.is_file()):
        return None
    if _digest(npz) != checksum.read_text().strip():
        print(
            f"warning: cache file {npz} is damaged (checksum mismatch); rebuilding it",
            file=sys.stderr,
        )
        return None
    with np.load(npz, allow_pickle=False) as z:

        def split(name: str):
            if f"{name}_images" not in z:
                return None
            paths = [str(p) for p in z[f"{name}_paths"]]
            classes = [str(c) for c in z[f"{name}_classes"]]
            return ImageSet(z[f"{name}_images"], z[f"{name}_labels"], classes, paths)

        skipped = [str(s) for s in z["skipped"]]
        return SourceData(split("train"), split("test"), skipped, split("val"))


def save(root: Path, key: str, data) -> None:
    npz, checksum = _files(root, key)
    npz.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"skipped": np.asarray(data.skipped, dtype=str)}
    for name, ds in (("train", data.train), ("test", data.test), ("val", data.val)):
        if ds is None:
            continue
        arrays[f"{name}_images"] = ds.images
        arrays[f"{name}_labels"] = ds.labels
        arrays[f"{name}_classes"] = np.asarray(ds.classes, dtype=str)
        arrays[f"{name}_paths"] = np.asarray(ds.paths, dtype=str)
    tmp = npz.with_suffix(f".tmp{os.getpid()}.npz")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    digest = _digest(tmp)
    os.replace(tmp, npz)
    checksum.write_text(digest + "\n")
