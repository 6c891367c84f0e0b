"""Safe, once-only extraction of .tar/.tar.gz/.zip datasets into the cache."""

from __future__ import annotations

import functools
import io
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import IO

from cifarlab.data.images import is_junk
from cifarlab.errors import UserError, first_line

try:
    import fcntl
except ImportError:  # Windows: no flock to tell a live extraction's folder from a stale one
    fcntl = None

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")

# Extracted bytes allowed per archive byte: images are compressed already (CIFAR-10's JPEGs
# extract 2.8x), while a zip of zeros extracts ~1000x.
MAX_RATIO = 50
MIN_TOTAL_BYTES = 64 << 20  # small archives may always extract this much
MAX_MEMBER_BYTES = 64 << 20  # no training image comes near this
PART = ".part-"  # `<key>.part-XXXX`: an extraction in progress beside its destination


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


class _Budget:
    """Counts extracted bytes against the limits, from the headers first and again while writing."""

    def __init__(self, archive: Path):
        self.archive, self.used = archive, 0
        self.limit = max(MIN_TOTAL_BYTES, MAX_RATIO * archive.stat().st_size)

    def check_member(self, name: str, size: int) -> None:
        if size > MAX_MEMBER_BYTES:
            raise UserError(
                f"{self.archive}: member '{name}' would extract {size / 1e6:.0f} MB "
                f"(limit {MAX_MEMBER_BYTES / 1e6:.0f} MB per file); refused as a possible archive bomb"
            )

    def check_total(self, total: int) -> None:
        if total > self.limit:
            raise UserError(
                f"{self.archive}: would extract {total / 1e6:.0f} MB, more than the "
                f"{self.limit / 1e6:.0f} MB allowed for an archive of its size; refused as a possible archive bomb"
            )

    def copy(self, name: str, src: IO[bytes], dest: Path) -> None:
        written = 0
        with open(dest, "wb") as out:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                written += len(chunk)
                self.used += len(chunk)
                self.check_member(name, written)
                self.check_total(self.used)
                out.write(chunk)


def _link_refused(archive: Path, name: str, how: str = "") -> UserError:
    # Even a link inside the folder is refused: one image would count twice, maybe under two labels.
    return UserError(
        f"{archive}: member '{name}' is a link; links are not extracted "
        f"(archive the files themselves{how})"
    )


def _zip_name(info: zipfile.ZipInfo) -> str:
    """The member's name: zipfile reads a name without the UTF-8 flag as cp437, but Info-ZIP and
    macOS write UTF-8 names without it (read as cp437, `chat_été/` is `chat_├⌐t├⌐`)."""
    if info.flag_bits & 0x800:
        return info.filename
    try:
        return info.filename.encode("cp437").decode("utf-8")
    except UnicodeError:  # a name in a DOS code page: as zipfile read it
        return info.filename


def _zip_members(zf: zipfile.ZipFile, archive: Path):
    for info in zf.infolist():
        text = _zip_name(info)
        name = PurePosixPath(text)
        if name.is_absolute() or ".." in name.parts or ":" in text:
            raise UserError(f"{archive}: member '{text}' would land outside its folder")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise _link_refused(archive, text)
        size = None if info.is_dir() else info.file_size
        yield text, size, functools.partial(zf.open, info)


def _tar_members(tf: tarfile.TarFile, archive: Path, tmp: Path):
    members = tf.getmembers()
    # tarfile takes a plain tar cut at a member's edge as whole (a compressed one cut short fails
    # in its decompressor; seeking back in one would decompress it all again)
    if isinstance(tf.fileobj, io.BufferedReader):
        tf.fileobj.seek(tf.offset)
        if tf.fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
            raise UserError(
                f"{archive}: cut short after {len(members)} members (no end-of-archive marker); "
                "copy or download it again"
            )
    for member in members:
        if member.issym() or member.islnk():  # the 'data' filter would let inner links through
            raise _link_refused(archive, member.name, ", e.g. tar --dereference")
        # Refuses absolute paths, '..' and devices; also drops unsafe permission bits.
        m = tarfile.data_filter(member, str(tmp))
        if m.isdir() or m.isfile():
            yield m.name, None if m.isdir() else m.size, functools.partial(tf.extractfile, m)


def _write_members(members, tmp: Path, budget: _Budget) -> None:
    """(name, size or None for a folder, opener) each, junk left out; the headers' sizes are
    checked first and counted again while writing, as headers may lie."""
    members = [m for m in members if not is_junk(PurePosixPath(m[0]))]
    for name, size, _ in members:
        budget.check_member(name, size or 0)
    budget.check_total(sum(size or 0 for _, size, _ in members))
    for name, size, opener in members:
        target = tmp / name
        if size is None:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with opener() as src:
            budget.copy(name, src, target)


def _extract(archive: Path, tmp: Path, budget: _Budget) -> None:
    # by content, not name (a zip named .tar.gz, a tar named .zip); a tar may end in a zip member
    if zipfile.is_zipfile(archive) and not tarfile.is_tarfile(archive):
        with zipfile.ZipFile(archive) as zf:
            _write_members(_zip_members(zf, archive), tmp, budget)
    else:
        with tarfile.open(archive) as tf:
            _write_members(_tar_members(tf, archive, tmp), tmp, budget)


def _sweep_stale_parts(folder: Path) -> None:
    """Remove the part folders no process holds locked: left by extractions killed midway."""
    for part in folder.glob("*" + PART + "*"):
        try:
            fd = os.open(part, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(part, ignore_errors=True)
        except OSError:
            pass  # held: a live extraction's
        finally:
            os.close(fd)


def _new_part(dest: Path) -> tuple[Path, int | None]:
    """A new part folder beside `dest` and the descriptor holding its `flock` (None without
    flock). Stale parts are swept first under a lock on their folder, so no sweep takes a new
    part before it is locked."""
    make = functools.partial(tempfile.mkdtemp, prefix=dest.name + PART, dir=dest.parent)
    if fcntl is None:
        return Path(make()), None
    guard, tmp, held = None, None, None
    try:
        guard = os.open(dest.parent, os.O_RDONLY)
        fcntl.flock(guard, fcntl.LOCK_EX)
        _sweep_stale_parts(dest.parent)
        tmp = Path(make())
        held = os.open(tmp, os.O_RDONLY)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return tmp, held
    except OSError:  # a file system without flock: extract unlocked into one part, sweep nothing
        if held is not None:
            os.close(held)
        return tmp or Path(make()), None
    finally:
        if guard is not None:
            os.close(guard)


def extract_archive(archive: Path, dest: Path) -> Path:
    """Extract `archive` into `dest` once, through a part folder renamed into place when done,
    so no interrupted extraction leaves a half-filled `dest` that later runs would trust."""
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp, held = _new_part(dest)
    budget = _Budget(archive)
    try:
        _extract(archive, tmp, budget)
        tmp.rename(dest)
    except tarfile.FilterError as exc:
        raise UserError(f"{archive}: unsafe member refused ({exc})") from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, RuntimeError) as exc:
        if isinstance(exc, OSError) and dest.is_dir():
            return dest  # another process extracted the same archive first
        # RuntimeError: zipfile's encrypted members and (NotImplementedError) unknown compression
        why = first_line(exc).rstrip(":")  # tarfile lists each method it tried on lines below
        raise UserError(f"{archive}: cannot extract ({why}); is the file complete?") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if held is not None:
            os.close(held)
    return dest
