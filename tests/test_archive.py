"""Archives are extracted safely: bounded in size, without links, and cleaned up on failure."""

import errno
import io
import os
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifarlab.data import archive as archive_mod
from cifarlab.data import load_source
from cifarlab.errors import UserError


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tf.addfile(info, io.BytesIO(payload))


def _leftovers(data_root: Path) -> list[Path]:
    extracted = data_root / "extracted"
    return list(extracted.iterdir()) if extracted.exists() else []


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_archive_bomb_is_refused_from_its_headers_and_nothing_is_left(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(archive_mod, "MIN_TOTAL_BYTES", 1 << 20)  # 1 MiB instead of 64 MiB
    bomb = tmp_path / f"bomb.{kind}"
    zeros = bytes(600_000)  # ~0.6 MB each, a few hundred bytes compressed
    if kind == "zip":
        with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
            for i in range(4):
                zf.writestr(f"cat/{i}.png", zeros)
            zf.writestr("dog/0.png", _png(0))
    else:
        with tarfile.open(bomb, "w:gz") as tf:
            for i in range(4):
                _add(tf, f"cat/{i}.png", zeros)
            _add(tf, "dog/0.png", _png(0))
    assert bomb.stat().st_size < 20_000
    data_root = tmp_path / "root"
    with pytest.raises(UserError, match="possible archive bomb"):
        load_source(str(bomb), data_root, 8)
    assert _leftovers(data_root) == []


def test_extraction_is_counted_while_writing_not_only_from_the_headers(tmp_path, monkeypatch):
    monkeypatch.setattr(archive_mod, "MIN_TOTAL_BYTES", 1 << 20)
    archive = tmp_path / "small.zip"
    archive.write_bytes(b"x")
    budget = archive_mod._Budget(archive)  # as if the headers had claimed a few bytes
    with pytest.raises(UserError, match="possible archive bomb"):
        budget.copy("big.png", io.BytesIO(bytes(2 << 20)), tmp_path / "big.png")


def test_one_oversized_member_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(archive_mod, "MAX_MEMBER_BYTES", 100_000)
    big = tmp_path / "big.tar"
    with tarfile.open(big, "w") as tf:
        _add(tf, "cat/0.png", bytes(200_000))
        _add(tf, "dog/0.png", _png(0))
    with pytest.raises(UserError, match="limit 0 MB per file"):
        load_source(str(big), tmp_path / "root", 8)


@pytest.mark.parametrize("link", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_a_tar_holding_a_link_is_refused_so_no_image_counts_twice(tmp_path, link):
    path = tmp_path / "linked.tar"
    with tarfile.open(path, "w") as tf:
        _add(tf, "cat/0.png", _png(0))
        _add(tf, "dog/1.png", _png(1))
        info = tarfile.TarInfo("dog/0.png")
        info.type = link
        info.linkname = "../cat/0.png" if link == tarfile.SYMTYPE else "cat/0.png"
        tf.addfile(info)
    data_root = tmp_path / "root"
    with pytest.raises(UserError, match="'dog/0.png' is a link; links are not extracted"):
        load_source(str(path), data_root, 8)
    assert _leftovers(data_root) == []


def test_a_zip_holding_a_symlink_is_refused(tmp_path):
    path = tmp_path / "linked.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("cat/0.png", _png(0))
        zf.writestr("dog/1.png", _png(1))
        info = zipfile.ZipInfo("dog/0.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "../cat/0.png")
    with pytest.raises(UserError, match="'dog/0.png' is a link"):
        load_source(str(path), tmp_path / "root", 8)


def test_a_clean_archive_still_loads_after_the_checks(tmp_path):
    path = tmp_path / "ok.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for i in range(2):
            _add(tf, f"data/train/cat/{i}.png", _png(i))
            _add(tf, f"data/train/dog/{i}.png", _png(10 + i))
    data = load_source(str(path), tmp_path / "root", 8)
    assert data.train.classes == ["cat", "dog"] and np.bincount(data.train.labels).tolist() == [
        2,
        2,
    ]


def test_a_tar_cut_short_at_a_members_edge_is_refused_not_loaded_with_images_missing(tmp_path):
    """tarfile reads a file cut where a member's header would start as a whole archive: a copy
    stopped there trained on the classes it held (an interrupted download stops at such a
    multiple of 512 bytes as often as not)."""
    path = tmp_path / "whole.tar"
    with tarfile.open(path, "w") as tf:
        for cls in ("cat", "dog", "frog"):
            for i in range(2):
                _add(tf, f"{cls}/{i}.png", _png(i))
    with tarfile.open(path) as tf:
        edges = [m.offset for m in tf.getmembers()[1:]] + [tf.offset]
    assert len(load_source(str(path), tmp_path / "root", 8).train) == 6
    for i, edge in enumerate(edges):
        cut = tmp_path / f"cut{i}.tar"
        cut.write_bytes(path.read_bytes()[:edge])
        with pytest.raises(UserError, match=r"cut\d+\.tar: cut short after \d+ members"):
            load_source(str(cut), tmp_path / "root", 8)
    assert len(_leftovers(tmp_path / "root")) == 1  # whole.tar's copy, no partial one


def test_a_zip_of_utf8_names_without_the_utf8_flag_keeps_its_class_names(tmp_path):
    """Info-ZIP's `zip` and macOS write UTF-8 names without the flag; zipfile reads them as
    cp437, and the classes were `chat_├⌐t├⌐` and `τè¼` (a folder of them gives `chat_été`, `犬`)."""
    path = tmp_path / "pets.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i, cls in enumerate(("chat_été", "犬")):
            zf.writestr(f"{cls}/{i}.png", _png(i))
    blob = bytearray(path.read_bytes())
    for signature, flags in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = blob.find(signature)
        while at >= 0:
            blob[at + flags + 1] &= 0xF7  # bit 11 of the flags: the name is UTF-8
            at = blob.find(signature, at + 4)
    path.write_bytes(bytes(blob))
    assert not any(info.flag_bits & 0x800 for info in zipfile.ZipFile(path).infolist())
    assert load_source(str(path), tmp_path / "root", 8).train.classes == ["chat_été", "犬"]


def _macos_zip(path: Path, empty_class: bool = False) -> Path:
    """As Finder's "Compress" writes it: one wrapper folder, AppleDouble `._*` files beside each
    file, and a `__MACOSX/` tree holding more of them."""
    junk = b"\x00\x05\x16\x07" + bytes(60)  # an AppleDouble header: not an image
    with zipfile.ZipFile(path, "w") as zf:
        for cls in ("cat", "dog"):
            zf.writestr(f"pets/{cls}/", "")
            if empty_class and cls == "dog":
                continue
            for i in range(2):
                zf.writestr(f"pets/{cls}/{i}.png", _png(i + (10 if cls == "dog" else 0)))
                zf.writestr(f"__MACOSX/pets/{cls}/._{i}.png", junk)
            zf.writestr(f"__MACOSX/pets/._{cls}", junk)
        zf.writestr("pets/.DS_Store", junk)
        zf.writestr("pets/cat/._0.png", junk)
    return path


@pytest.mark.parametrize("on_bad", ["error", "skip"])
def test_a_zip_made_on_macos_loads_its_classes_through_the_wrapper(tmp_path, on_bad):
    path = _macos_zip(tmp_path / "pets.zip")
    data = load_source(str(path), tmp_path / "root", 8, on_bad=on_bad)
    assert data.train.classes == ["cat", "dog"] and data.skipped == []
    assert np.bincount(data.train.labels).tolist() == [2, 2]
    extracted = [p.name for p in (tmp_path / "root" / "extracted").rglob("*")]
    assert "__MACOSX" not in extracted and not any(n.startswith("._") for n in extracted)


def test_a_refused_archive_names_its_members_not_the_cache_folder(tmp_path):
    path = _macos_zip(tmp_path / "pets.zip", empty_class=True)
    with pytest.raises(UserError, match="class folder holds no images") as err:
        load_source(str(path), tmp_path / "root", 8)
    assert f"{path}: pets/dog:" in str(err.value) and "extracted" not in str(err.value)


def _extraction_killed_midway(dest: Path) -> None:
    """A process that starts extracting into `dest` and is SIGKILLed: its part folder stays."""
    code = (
        "import os, sys; from pathlib import Path; from cifarlab.data.archive import _new_part\n"
        "tmp, _ = _new_part(Path(sys.argv[1])); (tmp / 'x.png').write_bytes(b'half')\n"
        "os.kill(os.getpid(), 9)"
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code, str(dest)], check=False)


def test_a_later_extraction_removes_parts_left_by_killed_ones_but_not_live_ones(tmp_path):
    extracted = tmp_path / "root" / "extracted"
    _extraction_killed_midway(extracted / "a")
    (stale,) = extracted.glob("a.part-*")
    live, held = archive_mod._new_part(extracted / "b")  # another process's, still extracting
    try:
        path = tmp_path / "ok.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(2):
                _add(tf, f"cat/{i}.png", _png(i))
                _add(tf, f"dog/{i}.png", _png(10 + i))
        assert len(load_source(str(path), tmp_path / "root", 8).train) == 4
        assert not stale.exists() and live.is_dir()
    finally:
        os.close(held)


def test_an_extraction_finished_first_by_another_process_is_used(tmp_path, monkeypatch):
    path = tmp_path / "ok.tar"
    with tarfile.open(path, "w") as tf:
        _add(tf, "cat/0.png", _png(0))
    dest = tmp_path / "root" / "extracted" / "k"
    real = archive_mod._extract

    def raced(archive, tmp, budget):  # the other process renames its copy into place meanwhile
        real(archive, tmp, budget)
        (dest / "cat").mkdir(parents=True)
        (dest / "cat" / "0.png").write_bytes(_png(0))

    monkeypatch.setattr(archive_mod, "_extract", raced)
    assert archive_mod.extract_archive(path, dest) == dest
    assert sorted(p.name for p in dest.parent.iterdir()) == ["k"]  # its own part removed


@pytest.mark.parametrize("fails", ["open", "flock", "folder open"])
def test_a_part_that_cannot_be_locked_is_extracted_into_unlocked_and_none_is_left(
    tmp_path, monkeypatch, fails
):
    path = tmp_path / "ok.tar"
    with tarfile.open(path, "w") as tf:
        _add(tf, "cat/0.png", _png(0))
    dest = tmp_path / "root" / "extracted" / "k"
    real_open, real_flock = os.open, archive_mod.fcntl.flock

    def refused(*args):  # as a file system without locks answers
        raise OSError(errno.ENOLCK, "No locks available")

    def part_open(p, *args):
        return refused() if archive_mod.PART in str(p) else real_open(p, *args)

    def part_flock(fd, op):  # the folder's lock is taken; the new part's (non-blocking) is not
        return refused() if op & archive_mod.fcntl.LOCK_NB else real_flock(fd, op)

    def folder_open(p, *args):  # the folder's own lock cannot be taken either
        return refused() if Path(p) == dest.parent else real_open(p, *args)

    if fails != "flock":
        monkeypatch.setattr(os, "open", part_open if fails == "open" else folder_open)
    else:
        monkeypatch.setattr(archive_mod.fcntl, "flock", part_flock)
    fds = len(os.listdir("/proc/self/fd"))
    assert archive_mod.extract_archive(path, dest) == dest
    assert sorted(p.name for p in dest.parent.iterdir()) == ["k"]  # no empty part beside it
    assert len(os.listdir("/proc/self/fd")) == fds  # the part's descriptor closed


def test_a_file_that_is_no_archive_of_any_kind_is_one_line(tmp_path):
    fake = tmp_path / "fake.tar.gz"
    fake.write_text("not a tar")
    with pytest.raises(
        UserError, match=r"fake\.tar\.gz: cannot extract \(.*\); is the file complete"
    ) as e:
        load_source(str(fake), tmp_path / "root", 8)
    assert "\n" not in str(e.value)  # tarfile's message lists every method on lines of its own


@pytest.mark.parametrize(("made", "named"), [("zip", "tar.gz"), ("w:gz", "zip"), ("w", "zip")])
def test_an_archive_named_for_another_format_is_read_as_what_it_is(tmp_path, made, named):
    """A zip named .tar.gz (or the reverse) was refused: "cannot extract; is the file complete?"."""
    path = tmp_path / f"data.{named}"
    pngs = {f"{c}/{i}.png": _png(i) for c in ("cat", "dog") for i in range(2)}
    if made == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            for name, png in pngs.items():
                zf.writestr(name, png)
    else:
        with tarfile.open(path, made) as tf:
            for name, png in pngs.items():
                _add(tf, name, png)
    data = load_source(str(path), tmp_path / "root", 8)
    assert data.train.classes == ["cat", "dog"] and len(data.train.labels) == 4
