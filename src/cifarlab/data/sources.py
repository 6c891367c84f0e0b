"""Data sources -> uint8 image arrays (cached by `cache.py`): CIFAR pickles, folders, archives."""

from __future__ import annotations

import os
import pickle
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePath
from typing import ClassVar

import numpy as np
from PIL import Image
from tqdm.auto import tqdm  # widgets in notebooks, text in terminals

import cifarlab.data.cache as cache
from cifarlab.config import DATASETS, expand
from cifarlab.data.archive import extract_archive, is_archive
from cifarlab.data.images import (
    NOT_AN_IMAGE_NAME,
    BadImage,
    decode_image,
    image_array,
    is_image_name,
    is_junk,
    visible_entries,
)
from cifarlab.data.imageset import ImageSet, SourceData
from cifarlab.errors import UnreadableFile, UserError

# how each command skips them: train/suite/tune take config keys, evaluate a flag
SKIP_HINT = "--set on_bad_image=skip, or evaluate's --on-bad-image skip, leaves out"

# --- torchvision's CIFAR pickles -------------------------------------------------------------


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR batches hold only dicts, lists, bytes, str, ints and numpy arrays; refuse the rest."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _latin1_bytes(text, encoding="utf-8"):
    """Protocol-2 pickles store bytes as `_codecs.encode(<text>, 'latin1')`; other codecs refused."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with the {encoding!r} codec")
    return text.encode("latin1")


def _read_batch(path: Path) -> dict:
    if not path.is_file():  # batches.meta too: open() would be a traceback
        raise UserError(
            f"{path} is missing; its folder is incomplete: put the file back, or remove "
            f"{path.parent} to download it again"
        )
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: not a CIFAR pickle batch ({exc})") from None


def _load_cifar(name: str, root: Path, size: int) -> SourceData:
    """torchvision's `cifar-10-batches-py/`, downloaded when missing; read here, as
    `datasets.CIFAR10` insists on the official files' md5 and unpickles without limits."""
    from torchvision import datasets
    from torchvision.datasets.utils import download_and_extract_archive

    ds = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    folder = root / ds.base_folder
    if not folder.is_dir() and (root.parent / ds.base_folder).is_dir():
        folder = root.parent / ds.base_folder  # torchvision's own layout: <data-root>/<folder>
    if not folder.is_dir():
        missing = [d for d in (root, *root.parents) if not d.exists()]  # what a download makes
        cache.ensure_writable(root.parent)  # a file as --data-root: not "could not be downloaded"
        try:
            download_and_extract_archive(ds.url, str(root), filename=ds.filename, md5=ds.tgz_md5)
        except Exception as exc:
            for made in missing:  # the folders the failed download made, while empty
                if not made.is_dir() or any(made.iterdir()):
                    break
                made.rmdir()
            raise UserError(
                f"{name} is not in {folder} and could not be downloaded ({type(exc).__name__}); "
                f"put torchvision's '{ds.base_folder}' folder under {root} (--data-root), "
                "or pass a local folder or archive with --data"
            ) from None
    meta_path = folder / ds.meta["filename"]
    classes = [_text(c) for c in _field(_read_batch(meta_path), ds.meta["key"], meta_path)]
    if twice := sorted({c for c in classes if classes.count(c) > 1}):
        raise UserError(
            f"{meta_path}: names {', '.join(twice)} more than once (each label needs a class "
            f"name of its own); fix it, or remove {folder} to download it again"
        )
    label_key = "labels" if name == "cifar10" else "fine_labels"

    def read(files: list) -> ImageSet:
        images, labels = [], []
        for fname, _md5 in files:
            path = folder / fname
            batch = _read_batch(path)
            data = np.asarray(_field(batch, "data", path))
            found = np.asarray(_field(batch, label_key, path))
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype.kind not in "ui":
                raise UserError(
                    f"{path}: 'data' is {data.dtype} of shape {data.shape}, not one row of "
                    "3,072 bytes (32x32 RGB, channel-major) per image"
                )
            if not len(data):  # an edited or cut batch; torchvision's hold 10,000 images each
                raise UserError(
                    f"{path}: holds no images; the {name} folder is damaged: remove {folder} "
                    "to download it again"
                )
            if found.shape != (len(data),) or found.dtype.kind not in "ui":
                raise UserError(f"{path}: {found.size} '{label_key}' for {len(data)} images")
            if not 0 <= found.min() <= found.max() < len(classes):
                raise UserError(
                    f"{path}: labels run from {found.min()} to {found.max()}, but {meta_path.name} "
                    f"names {len(classes)} classes"
                )
            images.append(data.astype(np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(found.tolist())
        hwc = np.concatenate(images).transpose(0, 2, 3, 1).copy()
        if size != 32:
            hwc = np.stack([image_array(Image.fromarray(im), size) for im in hwc])
        return ImageSet(hwc, np.asarray(labels, dtype=np.int64), classes)

    return SourceData(read(ds.train_list), read(ds.test_list))


def _field(batch: dict, key: str, path: Path):
    """`batch[key]`, or `batch[b'key']` as Python 3 code often writes them."""
    for k in (key, key.encode()):
        if k in batch:
            return batch[k]
    raise UserError(f"{path}: no '{key}' entry; not a CIFAR batch in torchvision's layout")


def _text(name) -> str:
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


# --- class folders and archives --------------------------------------------------------------


SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
# Named like a split folder but none of them: beside train/ nothing read them, and `Training/`
# with `Testing/` alone trained a two-class model. Each maps to the name to give it.
NEAR_SPLITS = {"training": "train/", "testing": "test/", "tests": "test/", "eval": "val/ or test/",
               "evaluation": "val/ or test/", "validate": "val/"}  # fmt: skip
DOCS = {"README", "LICENSE", "LICENCE"}
DOC_SUFFIXES = {".txt", ".md", ".rst", ".csv", ".tsv", ".json", ".yaml", ".yml"}


def _split_folders(root: Path) -> dict[str, Path]:
    """`root`'s split folders, named in any case (`Test/`, as Windows or macOS may spell it: read
    as a class called Test beside Train, or not at all beside train/); a folder named like a
    split but none of them (`testing/`) beside a split folder or another such is refused, naming
    the name to give it (alone it is a class, `eval`, or a wrapper around the class folders).
    None where every folder so named holds images and no folders, beside other folders: classes
    of a plain layout (`cat/`, `test/`; CIFAR-100 has a class called train). `train/` and `test/`
    alone of loose images are splits without their class folders, not a two-class model."""
    folders = sorted(p for p in _visible(root) if p.is_dir())
    near = [p for p in folders if p.name.lower() in NEAR_SPLITS]
    splits = [p for p in folders if _split_of(p.name)]
    if len(near + splits) < len(folders) and all(map(_class_folder, near + splits)):
        return {}
    if near and (splits or len(near) > 1):
        raise UserError(
            f"{near[0]}: not a split folder cifarlab reads; rename it "
            f"{NEAR_SPLITS[near[0].name.lower()]} (split folders: train/, val/ or valid/ or "
            "validation/, test/; any case)"
        )
    found = {}
    for split, names in SPLIT_FOLDERS.items():
        dirs = [p for p in splits if p.name.lower() in names]
        if len(dirs) > 1:
            raise UserError(
                f"{root}: both {' and '.join(d.name + '/' for d in dirs)} hold {split} images; keep one"
            )
        if dirs:
            found[split] = dirs[0]
    return found


def _split_of(name: str) -> str | None:
    return next((split for split, names in SPLIT_FOLDERS.items() if name.lower() in names), None)


def _class_folder(folder: Path) -> bool:
    """A folder holding images and no folders: a class's, whatever its name."""
    entries = _visible(folder)
    return not any(p.is_dir() for p in entries) and any(
        p.is_file() and is_image_name(p) for p in entries
    )


def _visible(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if not is_junk(PurePath(p.name))]


def _walk_layout(root: Path) -> tuple[dict[str, Path], bool, list[tuple[Path, Path]]]:
    """The split folders of `root/{train,val|valid,test}/<class>`, whether the layout is plain
    (`root/<class>`: one labelled set), and each (folder, the one wrapper folder looked through
    in it). A lone folder holding images is a class (only dog/ to score), not a wrapper."""
    wrappers: list[tuple[Path, Path]] = []
    for _ in range(2):
        if found := _split_folders(root):
            return found, False, wrappers
        entries = _visible(root)
        if len(entries) != 1 or not entries[0].is_dir():
            break
        if any(p.is_file() and is_image_name(p) for p in _visible(entries[0])):
            break  # a class folder, not a wrapper
        wrappers.append((root, entries[0]))
        root = entries[0]  # an archive often wraps everything in one top folder
    return {"train": root}, True, wrappers


def check_outside_images(out: Path, src: str, flag: str = "--out") -> None:
    """Refuse `out` (a run directory, or with `flag` --data-root the image cache) where `src`'s
    classes are read from, or beside the wrapper folder looked through: it would be read as a
    class. One below a hidden folder (`.cache/`) or a file is never read."""
    data = expand(src)
    if src in DATASETS or not data.is_dir():
        return
    target = out.resolve()
    layout, _plain, wrappers = _walk_layout(data)
    for folder, wrapper in [*wrappers, *((f, None) for f in layout.values())]:
        root, within = folder.resolve(), wrapper and target.is_relative_to(wrapper.resolve())
        if not target.is_relative_to(root) or within:
            continue  # outside it, or inside the wrapper, which the next folder checks
        inside = target.relative_to(root).parts  # below a hidden folder: never read
        if not (inside and ((root / inside[0]).is_file() or is_junk(PurePath(*inside)))):
            also = " (or $CIFARLAB_DATA)" if flag == "--data-root" else ""
            raise UserError(
                f"{flag} {out} is inside {folder}, whose folders are read as classes; pick "
                f"{flag}{also} outside it"
            )


def printable(name: str | os.PathLike) -> str:
    """`name` as valid UTF-8 text: bytes that are not UTF-8 (b'caf\\xe9') shown as \\xe9, not
    as the lone surrogates that CSV, YAML and HTML writers refuse."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _documents(p: Path) -> bool:
    """A file that may sit beside the class folders: a README, a licence or notes (labels.csv)."""
    return p.stem.upper() in DOCS or p.suffix.lower() in DOC_SUFFIXES


def _list_class_folder(
    folder: Path, on_bad: str
) -> tuple[list[str], list[Path], list[int], list[str]]:
    """(classes kept, image files, their labels, "path: reason" of what was left out). A file
    beside the class folders is left out like a non-image in one (a class folder replaced by a
    file drops that class), unless it documents the data (README, LICENSE, labels.csv)."""
    entries = _visible(folder)
    names = sorted(p.name for p in entries if p.is_dir())
    if not names:  # one class is fine to score; training needs two (`splits.load_splits`)
        raise UserError(_no_class_folders(folder, entries))
    files, labels, kept = [], [], []
    skipped = [f"{printable(p)}: a file, not a class folder; make it a folder of images or remove it"
               for p in sorted(entries) if not (p.is_dir() or _documents(p))]  # fmt: skip
    for name in names:
        images = []
        for p in visible_entries(folder / name):
            if p.is_symlink() and not p.exists():
                skipped.append(f"{printable(p)}: a symbolic link to a missing file")
            elif p.is_file() and is_image_name(p):
                images.append(p)
            elif p.is_file():
                skipped.append(f"{printable(p)}: {NOT_AN_IMAGE_NAME}")
        if not images:
            if on_bad == "error":
                raise UserError(
                    f"{printable(folder / name)}: class folder holds no images; add images or remove it"
                )
            skipped.append(f"{printable(folder / name)}: empty class folder, class dropped")
            continue
        kept.append(printable(name))
        files += images
        labels += [len(kept) - 1] * len(images)
    if skipped and on_bad == "error":
        raise UnreadableFile(skipped[0], f"{SKIP_HINT} such files")
    return kept, files, labels, skipped


def _no_class_folders(folder: Path, entries: list[Path]) -> str:
    """Why `folder`, holding no folders, gives no classes, and what to do about it."""
    if {"batches.meta", "meta"} & {p.name for p in entries}:  # cifar-10-batches-py/, 100's
        return (
            f"{folder}: torchvision's CIFAR batches, not class folders; give --data cifar10 (or "
            f"cifar100) with --data-root the folder holding {folder.name}/ (an archive: extracted)"
        )
    if _split_of(folder.name) and _class_folder(folder):
        return (
            f"{folder}: holds images, not <class>/ folders; move them into "
            f"{folder.name}/<class>/ folders, one per class"
        )
    if _split_of(folder.name):
        return (
            f"{folder}: a split folder without <class>/ folders; fill it "
            f"({folder.name}/<class>/*.jpg) or remove it"
        )
    return f"{folder}: no class folders found; expected <root>/train/<class>/*.jpg or <root>/<class>/*.jpg"


def _decode_all(
    files: list[Path], size: int, on_bad: str, desc: str
) -> tuple[np.ndarray, list[int], list[str]]:
    """(images, indices of those decoded, "path: reason" of the others)."""
    out = np.zeros((len(files), size, size, 3), dtype=np.uint8)
    good, skipped = [], []

    def work(i: int) -> str | None:
        try:
            out[i] = decode_image(files[i], size)
        except BadImage as exc:
            return printable(str(exc))
        return None

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        errors = pool.map(work, range(len(files)))
        bar = {"desc": desc, "unit": "img", "leave": False, "mininterval": 1, "disable": None}
        for i, err in enumerate(tqdm(errors, total=len(files), **bar)):
            if err is None:
                good.append(i)
            elif on_bad == "error":
                raise UnreadableFile(err, f"{SKIP_HINT} unreadable images")
            else:
                skipped.append(err)
    return out, good, skipped


def _load_folder(root: Path, size: int, on_bad: str) -> SourceData:
    splits: dict[str, ImageSet] = {}
    skipped: list[str] = []
    layout, plain, _wrappers = _walk_layout(root)
    for name, folder in layout.items():  # train, val, test: in that order
        classes, files, labels, left_out = _list_class_folder(folder, on_bad)
        images, good, bad = _decode_all(files, size, on_bad, f"decoding {name}")
        if not good:
            raise UserError(f"{folder}: none of its {len(files)} images could be read")
        paths = [printable(files[i].relative_to(folder.parent)) for i in good]
        labels = np.asarray(labels, dtype=np.int64)[good]
        splits[name] = ImageSet(images[good], labels, classes, paths)
        skipped += left_out + bad
    return SourceData(splits.get("train"), splits.get("test"), skipped, splits.get("val"), plain)


def _check_class_names(src: str, data: SourceData) -> None:
    """Class names go into one-line outputs (predict, logs, errors, figure labels): a newline, tab
    or escape code in one would break the line or drive the terminal, so it is refused. How the
    splits' classes relate is checked where it matters: training takes val/ and test/ holding
    some of train/'s (`splits.load_splits`), evaluate data holding some of the model's
    (`splits.onto_classes`)."""
    for name in (name for ds in data.splits().values() for name in ds.classes):
        if any(unicodedata.category(c) == "Cc" for c in name):
            raise UserError(
                f"--data {src}: class folder {name!r} has a control character (newline, tab) "
                "in its name; rename the folder"
            )


def load_source(src: str, root: Path, size: int, on_bad: str = "error") -> SourceData:
    """Resolve `--data SRC` and return its splits as uint8 arrays (cached after the first decode),
    each split labelled with its own folders' classes."""
    if src in DATASETS:
        return _load_cifar(src, root / src, size)
    path = expand(src)
    if not path.exists():
        raise UserError(f"--data {src}: no such file or folder (and not {'/'.join(DATASETS)})")
    check_outside_images(root, src, "--data-root")  # its arrays/ would be read as a class
    key = cache.source_key(path, size, on_bad)
    data = cache.load(root, key)  # a complete cache reads from a read-only --data-root too
    if data is None:
        cache.ensure_writable(root)
        data = _decode_folder(path, root, key, size, on_bad)
    _check_class_names(src, data)
    return data


def _decode_folder(path: Path, root: Path, key: str, size: int, on_bad: str) -> SourceData:
    """A folder, or an archive's copy extracted under `root/extracted/`, decoded and cached."""
    if path.is_dir():
        folder = path
    elif is_archive(path):
        folder = extract_archive(path, root / "extracted" / key)
    else:
        raise UserError(
            f"--data {path}: expected a folder, a .tar/.tar.gz/.zip archive, {' or '.join(DATASETS)}"
        )
    try:
        data = _load_folder(folder, size, on_bad)
    except UserError as exc:
        if folder == path:
            raise
        raise UserError(_as_members(str(exc), folder, path)) from None
    if folder != path:
        data.skipped = [_as_members(line, folder, path) for line in data.skipped]
    cache.save(root, key, data)
    return data


def _as_members(text: str, extracted: Path, archive: Path) -> str:
    """`text` naming archive members (`pets.zip: pets/cat/1.jpg`), not the cache folder."""
    for inside in {str(extracted), printable(extracted)}:
        text = text.replace(inside + os.sep, f"{archive}: ").replace(inside, str(archive))
    return text
