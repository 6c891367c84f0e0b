"""Safe, once-only extraction of .tar/.tar.gz/.zip datasets into the cache."""

from __future__ import annotations

import shutil
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from cifarlab.errors import UserError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _check_zip_member(info: zipfile.ZipInfo, archive: Path) -> None:
    name = PurePosixPath(info.filename)
    mode = info.external_attr >> 16
    if name.is_absolute() or ".." in name.parts or ":" in info.filename:
        raise UserError(f"{archive}: member '{info.filename}' would land outside its folder")
    if stat.S_ISLNK(mode):
        raise UserError(f"{archive}: member '{info.filename}' is a link; links are not extracted")


def extract_archive(archive: Path, dest: Path) -> Path:
    """Extract `archive` into `dest` (once; an existing complete `dest` is reused).

    Extraction goes to a temporary sibling folder renamed into place when done, so an
    interrupted extraction never leaves a half-filled `dest` that later runs would trust.
    """
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".part-", dir=dest.parent))
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    _check_zip_member(info, archive)
                zf.extractall(tmp)
        else:
            with tarfile.open(archive) as tf:
                # The 'data' filter refuses absolute paths, '..', links leaving the folder and devices.
                tf.extractall(tmp, filter="data")
        tmp.rename(dest)
    except tarfile.FilterError as exc:
        raise UserError(f"{archive}: unsafe member refused ({exc})") from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise UserError(f"{archive}: cannot extract ({exc}); is the file complete?") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
