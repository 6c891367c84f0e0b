"""The decoded-array cache: one .npz per (source files, image size), checked as it is read;
reading it back is tens of times faster than decoding the images again. Its names begin with
the FORMAT (`v9-...`), so installs of different cifarlab versions sharing one --data-root each
keep their own files beside the other's instead of rebuilding them over each other in turn."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from cifarlab.data.archive import PART
from cifarlab.data.imageset import ImageSet, SourceData
from cifarlab.errors import UserError
from cifarlab.rundir import remove_dead_temps, replaced_when_complete

FORMAT = 9  # raised whenever the cached layout, the decoding (which folders are splits) or the key changes
UNUSED_S = 30 * 86400  # another FORMAT's file read by no install for this long is removed


def _folder_stamp(root: Path) -> str:
    """A digest of every (relative path, mode, size, mtime) below `root`, folders included, so
    that a file moved to another class folder (mv keeps size and mtime), two files swapping names
    or a renamed class folder each change the key. Folder links are followed (a linked class
    folder's images are read), each real folder once: a link loop ends."""
    h, seen = hashlib.sha256(), set()
    for dirpath, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        dirs.sort()
        for name in [*sorted(files), *dirs]:
            full = os.path.join(dirpath, name)
            # a dangling link by its own stat, so that a later fix changes the key
            st = os.stat(full) if os.path.exists(full) else os.lstat(full)
            rel = os.fsencode(os.path.relpath(full, root))
            h.update(b"%s\0%d\0%d\0%d\n" % (rel, st.st_mode, st.st_size, st.st_mtime_ns))
    return h.hexdigest()


def source_key(path: Path, size: int, on_bad: str) -> str:
    """`v<FORMAT>-<source>-<version>`: the source is the path, image size and `on_bad`; the
    version changes whenever the source may have (a folder's any file path, size or mtime; an
    archive's size, mtime, inode or ctime: a replaced archive with the same size and mtime)."""
    path = path.resolve()
    if path.is_dir():
        stamp = _folder_stamp(path)
    else:
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
    return f"v{FORMAT}-{_digest([os.fsencode(path).hex(), size, on_bad])}-{_digest(stamp)}"


def _digest(parts: list) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _remove_stale(root: Path, key: str) -> None:
    """Once a source's new version is cached, its older versions' arrays and extracted copies
    (each the size of the data set) go. Another FORMAT's files (another install's, or this one's
    before an upgrade) go once unused for UNUSED_S: `load` marks each file it reads as used.
    A temporary file or part folder may be another process's at work now (on another version of
    the source): it goes once unused for UNUSED_S, or as a dead writer's (`remove_dead_temps`;
    `archive` sweeps the part folders no process holds locked)."""
    fmt, source = key.split("-")[:2]
    for old in [*root.glob("arrays/*"), *root.glob("extracted/*")]:
        temporary = old.name.startswith(".") or PART in old.name
        if old.name.startswith("."):  # .<key>.<pid>-<tid>.tmp.npz
            remove_dead_temps(old.with_name(old.name[1:].split(".")[0] + ".npz"))
        with contextlib.suppress(OSError):  # gone meanwhile: another process removed it
            if old.name.startswith(f"{fmt}-") and not temporary:
                stale = old.name.startswith(f"{fmt}-{source}-") and old.name.split(".")[0] != key
            else:
                stale = time.time() - old.lstat().st_mtime > UNUSED_S
            if stale:
                shutil.rmtree(old) if old.is_dir() else old.unlink()


def ensure_writable(root: Path) -> None:
    """Checked before decoding, so a bad --data-root fails at once and not after the decode:
    the root and the folders under it that a decode writes (`extracted/`, `arrays/`)."""
    for folder in (root, root / "extracted", root / "arrays"):
        if folder != root and folder.exists() and not folder.is_dir():
            raise UserError(
                f"--data-root {root}: {folder} is a file where the image cache keeps a folder; "
                f"remove or move {folder}"
            )
        if folder != root and not folder.exists():
            continue  # made by the decode that writes it
        try:
            folder.mkdir(parents=True, exist_ok=True)
            why = "" if os.access(folder, os.W_OK) else "permission denied"
        except OSError as exc:
            why = "it is a file" if folder.is_file() else exc.strerror or type(exc).__name__
        if why:
            where = f"{root}:" if folder == root else f"{root}: {folder} is"
            raise UserError(
                f"--data-root {where} not a writable folder ({why}); point --data-root "
                "(or $CIFARLAB_DATA) at a folder you can write"
            )


def _file(root: Path, key: str) -> Path:
    return root / "arrays" / f"{key}.npz"


def _as_saved(ds: ImageSet) -> bool:
    """`ds` as `save` writes it: (N, H, W, 3) uint8 images, N int64 labels indexing its classes
    (text) and N paths. A file rewritten with valid CRCs can still break any of these."""
    images, labels = ds.images, ds.labels
    return (
        images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] == 3
        and labels.dtype == np.int64 and labels.shape == (len(images),) == (len(ds.paths),)
        and isinstance(ds.classes, list) and all(isinstance(c, str) for c in ds.classes)
        and bool(np.isin(labels, np.arange(len(ds.classes))).all())
    )  # fmt: skip


def load(root: Path, key: str) -> SourceData | None:
    """The cached SourceData, or None when absent or damaged (then it is rebuilt): numpy checks
    each array's CRC-32 as it reads it, and `_as_saved` their shapes, types and labels."""
    npz = _file(root, key)
    if not npz.is_file():
        return None
    try:
        with np.load(npz, allow_pickle=False) as z:

            def split(name: str):
                if f"{name}_images" not in z:
                    return None
                classes, paths = z[f"{name}_classes"].tolist(), z[f"{name}_paths"].tolist()
                ds = ImageSet(z[f"{name}_images"], z[f"{name}_labels"], classes, paths)
                if not _as_saved(ds):
                    raise ValueError(f"its {name} arrays do not fit together")
                return ds

            skipped, plain = z["skipped"].tolist(), bool(z["plain"])
            data = SourceData(split("train"), split("test"), skipped, split("val"), plain)
        with contextlib.suppress(OSError):  # used now: kept while any install reads it
            os.utime(npz)
        return data
    except (OSError, ValueError, KeyError, EOFError, MemoryError, zipfile.BadZipFile) as exc:
        print(f"warning: cache file {npz} is damaged ({exc}); rebuilding it", file=sys.stderr)
        return None


def save(root: Path, key: str, data: SourceData) -> None:
    npz = _file(root, key)
    arrays = {"skipped": np.asarray(data.skipped, dtype=str), "plain": np.asarray(data.plain)}
    for name, ds in data.splits().items():
        arrays[f"{name}_images"] = ds.images
        arrays[f"{name}_labels"] = ds.labels
        arrays[f"{name}_classes"] = np.asarray(ds.classes, dtype=str)
        arrays[f"{name}_paths"] = np.asarray(ds.paths, dtype=str)
    try:
        npz.parent.mkdir(parents=True, exist_ok=True)
        with replaced_when_complete(npz) as tmp, open(tmp, "wb") as f:  # no partial file left
            np.savez(f, **arrays)
    except OSError as exc:  # the folders were writable before the decode (`ensure_writable`)
        raise UserError(
            f"--data-root {root}: cannot write the image cache at {npz} "
            f"({exc.strerror or type(exc).__name__}); free it (a folder of that name, a full "
            "disk), or point --data-root elsewhere"
        ) from None
    _remove_stale(root, key)
