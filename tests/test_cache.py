"""The decoded-array cache is never served for a source that has changed since it was written."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cifarlab.data import cache, load_source

CLASS_NAMES = ["ant", "bee", "cow", "doe", "eel"]


def _write_image(path: Path, ident: int) -> None:
    """A 4x4 PNG whose red channel names the image, so a loaded array says which file it was."""
    arr = np.zeros((4, 4, 3), dtype=np.uint8)
    arr[..., 0] = 20 + 10 * ident
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _labels_on_disk(root: Path) -> dict[int, str]:
    """Image id -> the class folder that holds it now."""
    return {
        (int(np.asarray(Image.open(p))[0, 0, 0]) - 20) // 10: p.parent.name
        for p in root.glob("*/*.png")
    }


def _apply(root: Path, op: tuple, counter: list[int]) -> None:
    files = sorted(root.glob("*/*.png"))
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    kind, a, b = op
    counter[0] += 1
    if kind == "move":  # mv keeps size and mtime
        src = files[a % len(files)]
        dest = folders[b % len(folders)] / src.name
        if not dest.exists():
            src.rename(dest)
    elif kind == "rename":
        src = files[a % len(files)]
        src.rename(src.with_name(f"r{counter[0]}.png"))
    elif kind == "swap":  # two files exchange names (and so perhaps classes)
        x, y = files[a % len(files)], files[b % len(files)]
        if x != y:
            tmp = x.with_name("swap.tmp")
            x.rename(tmp)
            y.rename(x)
            tmp.rename(y)
    elif kind == "rename_class":
        free = [c for c in CLASS_NAMES if not (root / c).exists()]
        folders[a % len(folders)].rename(root / free[b % len(free)])


OPS = st.tuples(
    st.sampled_from(["move", "rename", "swap", "rename_class"]),
    st.integers(0, 20),
    st.integers(0, 20),
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, min_size=1, max_size=5))
def test_loaded_labels_always_match_the_folders_after_moves_renames_and_swaps(ops):
    with tempfile.TemporaryDirectory() as tmp:
        src, data_root = Path(tmp) / "d", Path(tmp) / "cache"
        for ident in range(6):
            _write_image(src / CLASS_NAMES[ident % 3] / f"{ident}.png", ident)
        load_source(str(src), data_root, 4, on_bad="skip")
        counter = [0]
        for op in ops:
            _apply(src, op, counter)
            truth = _labels_on_disk(src)
            if len(set(truth.values())) < 2:
                return  # fewer than two classes is refused; tested in test_sources.py
            for folder in src.iterdir():
                if folder.is_dir() and not any(folder.iterdir()):
                    shutil.rmtree(folder)
            data = load_source(str(src), data_root, 4, on_bad="skip")
            got = {
                (int(img[0, 0, 0]) - 20) // 10: data.train.classes[label]
                for img, label in zip(data.train.images, data.train.labels, strict=True)
            }
            assert got == truth, f"after {op}"


def test_folder_key_changes_when_a_file_moves_keeping_size_and_mtime(tmp_path):
    _write_image(tmp_path / "cat" / "a.png", 1)
    _write_image(tmp_path / "dog" / "b.png", 1)
    before = cache.source_key(tmp_path, 32, "error")
    (tmp_path / "cat" / "a.png").rename(tmp_path / "dog" / "a.png")
    assert cache.source_key(tmp_path, 32, "error") != before


def test_archive_key_changes_when_replaced_by_one_of_the_same_size_and_mtime(tmp_path):
    archive = tmp_path / "data.tar"
    archive.write_bytes(b"a" * 100)
    before = cache.source_key(archive, 32, "error")
    st = archive.stat()
    replacement = tmp_path / "new.tar"
    replacement.write_bytes(b"b" * 100)
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(replacement, archive)  # same path, size and mtime; another inode
    assert cache.source_key(archive, 32, "error") != before


def test_an_image_rewritten_inside_a_linked_class_folder_is_read_again(tmp_path):
    """The key stamped the link, not the files behind it: an image rewritten in place there
    (its folder's mtime unchanged) was served from the cache as it had been."""
    root, elsewhere = tmp_path / "data", tmp_path / "dogs"
    _write_image(root / "cat" / "a.png", 1)
    _write_image(elsewhere / "b.png", 2)
    (root / "dog").symlink_to(elsewhere)
    (elsewhere / "up").symlink_to(root)  # a loop: the walk still ends
    assert load_source(str(root), tmp_path / "cache", 4).train.images[1, 0, 0, 0] == 40
    stamp = os.stat(elsewhere).st_mtime_ns
    _write_image(elsewhere / "b.png", 3)
    assert os.stat(elsewhere).st_mtime_ns == stamp
    assert load_source(str(root), tmp_path / "cache", 4).train.images[1, 0, 0, 0] == 50


def test_folder_key_survives_a_dangling_symlink(tmp_path):
    _write_image(tmp_path / "cat" / "a.png", 1)
    (tmp_path / "cat" / "gone.png").symlink_to(tmp_path / "missing.png")
    assert re.fullmatch(r"v\d+-[0-9a-f]{16}-[0-9a-f]{16}", cache.source_key(tmp_path, 32, "error"))


def test_a_new_version_of_a_source_replaces_its_old_cache_and_others_stay(tmp_path):
    """Each change to a folder (or FORMAT) left a data-set-sized cache file behind for good."""
    root, a, b = tmp_path / "root", tmp_path / "a", tmp_path / "b"
    for src in (a, b):
        _write_image(src / "cat" / "1.png", 1)
        _write_image(src / "dog" / "2.png", 2)
        load_source(str(src), root, 8)
    legacy = [root / "arrays" / f"{'0' * 20}{s}" for s in (".npz", ".sha256")]
    unused = [*legacy, root / "extracted" / ("1" * 20), root / "arrays" / "v1-ab-cd.npz"]
    for p in [*unused, root / "arrays" / "v99-ab-cd.npz"]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("another FORMAT's")
    month_ago = time.time() - cache.UNUSED_S - 60
    for p in unused:  # read by no install for longer than UNUSED_S; v99 was, just now
        os.utime(p, (month_ago, month_ago))
    old_key = cache.source_key(a, 8, "error")  # a writer killed while caching it left this:
    killed = root / "arrays" / f".{old_key}.{_dead_pid()}-1.tmp.npz"
    killed.write_bytes(b"half of an .npz")
    os.utime(killed, (time.time() - 3600, time.time() - 3600))
    _write_image(a / "dog" / "3.png", 3)  # a's new version
    assert len(load_source(str(a), root, 8).train) == 3
    left = sorted(p.name for p in (root / "arrays").iterdir())
    keys = [f"{cache.source_key(src, 8, 'error')}.npz" for src in (a, b)]
    assert left == sorted([*keys, "v99-ab-cd.npz"])  # another install's, read a minute ago
    assert not (root / "extracted" / ("1" * 20)).exists()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_a_temporary_another_process_is_writing_is_left_alone(tmp_path):
    """Caching a source's new version removed the temporary file (and the part folder) of a
    process caching (extracting) another version of it at that moment, failing its write."""
    root, src = tmp_path / "root", tmp_path / "d"
    _write_image(src / "cat" / "1.png", 1)
    _write_image(src / "dog" / "2.png", 2)
    old_key = cache.source_key(src, 8, "error")
    live = [
        root / "arrays" / f".{old_key}.{os.getpid()}-{threading.get_native_id()}.tmp.npz",
        root / "extracted" / f"{old_key}.part-x1y2",
    ]
    for p in live:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"being written")
    _write_image(src / "dog" / "3.png", 3)  # the new version, cached now
    assert len(load_source(str(src), root, 8).train) == 3
    assert all(p.exists() for p in live)


def test_two_versions_sharing_a_data_root_keep_their_caches_side_by_side(tmp_path, monkeypatch):
    """Each install's FORMAT removed the other's cache file as stale, so two versions sharing
    $CIFARLAB_DATA rebuilt the cache over each other on every run."""
    root, src = tmp_path / "root", tmp_path / "d"
    _write_image(src / "cat" / "1.png", 1)
    _write_image(src / "dog" / "2.png", 2)
    load_source(str(src), root, 8)
    month_ago = time.time() - cache.UNUSED_S - 60
    os.utime(next((root / "arrays").glob("*.npz")), (month_ago, month_ago))
    load_source(str(src), root, 8)  # read now: still in use, so kept
    monkeypatch.setattr(cache, "FORMAT", cache.FORMAT + 1)  # the other install
    load_source(str(src), root, 8)
    assert len(list((root / "arrays").glob("*.npz"))) == 2
    rebuilt = []
    monkeypatch.setattr(cache, "save", lambda *args: rebuilt.append(args))
    for fmt in (cache.FORMAT - 1, cache.FORMAT, cache.FORMAT - 1):
        monkeypatch.setattr(cache, "FORMAT", fmt)
        assert len(load_source(str(src), root, 8).train) == 2
    assert rebuilt == []  # each read its own cache file
