"""A run directory's bookkeeping: claiming it, the one-writer lock, the per-epoch metrics CSV, and
files replaced whole (a crash leaves the old file or the complete new one)."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from cifarlab.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: the `filelock` package instead
    fcntl = None


def expand(path: str | Path) -> Path:
    """`path` with `~` expanded; `~nosuchuser` stays as written (`Path.expanduser` raises)."""
    return Path(os.path.expanduser(path))


METRICS_FIELDS = [
    "epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "images_per_s",
    "test_loss", "test_acc",  # NaN when the data has no test split; never used to select
]  # fmt: skip


RECORD_FILES = ("metrics.csv", "config.yaml", "result.json")  # what a tracker mirrors
RUN_FILES = ("last.pt", "best.pt", *RECORD_FILES)


def _written_pid(lock: Path) -> int | None:
    """The pid written in `lock`, read without locking it; None before its holder wrote it."""
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


def _holder(lock: Path) -> int | None:
    """The process holding `lock`'s `flock`, other than this one: the pid it wrote there (0
    before it did); None when none holds it, whatever pid the file names (a dead or recycled
    one). None without `fcntl` or `flock` support: `RunLock` itself refuses then."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # taken, then dropped by the close
    except BlockingIOError:
        pid = _written_pid(lock)
        return None if pid == os.getpid() else pid or 0
    except OSError:
        pass
    finally:
        os.close(fd)
    return None


def abandoned(run_dir: Path) -> bool:
    """Whether `run_dir` holds the lock file of a process that died training it (no process
    holds its `flock`; one that ended otherwise removed it)."""
    return (run_dir / ".lock").is_file() and _holder(run_dir / ".lock") is None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


class RunLock:
    """`RUN_DIR/.lock`, held with `flock` for the run's life: the kernel drops it when its holder
    dies, so a crash's lock file is simply taken. The pid inside only names the holder."""

    # the locks this process holds (a pid in the file may be recycled)
    held: ClassVar[set[Path]] = set()

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self._fd: int | None = None
        self._fallback = None
        self._held: Path | None = None

    def _busy(self, pid: int | None) -> UserError:
        who = f"process {pid}" if pid else "another process"
        return UserError(
            f"{self.path.parent} is in use by {who}; wait for it to finish, or use another folder"
        )

    def __enter__(self) -> RunLock:
        if fcntl is None:
            return self._enter_filelock()
        while True:
            fd = None
            try:  # opening fails in a read-only run directory (calibrate writes into one)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if fd is not None:
                    os.close(fd)
                if isinstance(exc, BlockingIOError):
                    raise self._busy(_written_pid(self.path)) from None
                raise UserError(
                    f"{self.path}: cannot lock the run directory ({exc.strerror}); "
                    f"make {self.path.parent} writable"
                ) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed the file as we opened it; lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        self._held = self.path.absolute()
        RunLock.held.add(self._held)
        return self

    def _enter_filelock(self) -> RunLock:
        from filelock import FileLock, Timeout

        self._fallback = FileLock(str(self.path) + ".os")
        try:
            self._fallback.acquire(timeout=0)
        except Timeout:
            raise self._busy(None) from None
        self._held = self.path.absolute()
        RunLock.held.add(self._held)
        return self

    def __exit__(self, *exc) -> None:
        RunLock.held.discard(self._held)  # the path it was taken at, though the folder moved
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiter then sees a new inode
            os.close(self._fd)
            self._fd = None
        if self._fallback is not None:
            self._fallback.release()
            self._fallback = None


def rewrite_lock(run_dir: Path):
    """The run's lock for a command that rewrites its files, unless this process holds it."""
    held = (run_dir / ".lock").absolute() in RunLock.held
    return contextlib.nullcontext() if held else RunLock(run_dir)


def claim_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse a `--out` holding anything but hidden entries (`.lock`), unless `resume`; and one
    with a folder where a run file goes (writing that file would fail mid-run)."""
    if not run_dir.is_dir():
        return
    folders = [n for n in RUN_FILES if (run_dir / n).is_dir()]
    if folders:
        raise UserError(
            f"{run_dir / folders[0]} is a folder where the run keeps a file; move it away, or "
            "pick another --out"
        )
    if resume:
        return
    names = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))
    if not names:
        return
    run_files = [n for n in names if n in RUN_FILES]
    holder = _holder(run_dir / ".lock") if run_files else None
    if holder is not None:  # being trained: say so, not "add --resume", which would be refused
        raise RunLock(run_dir)._busy(holder)
    found, what = (run_files, "a run") if run_files else (names, "other files")
    shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    raise RunDirTaken(run_dir, what, shown)


class RunDirTaken(UserError):
    """`claim_run_dir`'s refusal; `worded` words its fix for the caller (CLI flags, or the API)."""

    def __init__(self, run_dir: Path, what: str, shown: str):
        self.run_dir, self.what, self.shown = run_dir, what, shown
        super().__init__(self.worded())

    def worded(self, resume: str = "add --resume", out: str = "--out") -> str:
        fix = (  # other files are no run: there is nothing to resume
            f"{resume} to continue it or pick a new {out}"
            if self.what == "a run"
            else f"pick a new {out}, or remove them"
        )
        return f"{out} {self.run_dir} already holds {self.what} ({self.shown}); {fix}"


def check_out(out: Path, folder: bool = True) -> None:
    """One line, before any work, for an --out that cannot be written: a file where a folder
    goes (or the reverse, not `folder`), a file above it, or no permission."""
    if out.exists() and out.is_dir() != folder:
        raise UserError(
            f"--out {out}: is a file, not a folder; pick another --out"
            if folder
            else f"--out {out} is a folder; give a file name, e.g. {out / 'model.onnx'}"
        )
    existing = next(p for p in ([out] if folder else []) + list(out.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is a file, not a folder; pick another --out")
    if not os.access(existing, os.W_OK):
        raise UserError(f"--out {out}: {existing} is not writable; pick a writable --out")


def check_not_a_run(out: Path, writes: str, instead: str | Path) -> None:
    """One line for an --out that holds a training run: what `writes` would go among its files
    (an evaluate report's curves.png would replace the run's own); `instead` is the example."""
    held = [n for n in RUN_FILES if (out / n).exists()]
    if held:
        raise UserError(
            f"--out {out} holds a training run ({', '.join(held[:3])}); {writes} into a folder of "
            f"its own, e.g. --out {instead}"
        )


def prepare_run_dir(run_dir: Path, need_bytes: int) -> list[Path]:
    """Create `run_dir` and the folders above it, checking it can hold `need_bytes`; returns the
    folders this call made (by `mkdir`, so one of two racing processes), outermost first, and
    `run_dir` when it held only a stale `.lock`."""
    check_out(run_dir)
    missing = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    created = []
    try:
        for folder in reversed(missing):  # outermost first
            with contextlib.suppress(FileExistsError):
                folder.mkdir()
                created.append(folder)
    except OSError as exc:
        raise UserError(
            f"--out {run_dir}: cannot create the run directory ({exc.strerror})"
        ) from None
    only_lock = [p.name for p in run_dir.iterdir()] == [".lock"]
    if not created and only_lock and _holder(run_dir / ".lock") is None:
        created = [run_dir]  # a run killed before it saved anything: as good as new
    free = shutil.disk_usage(run_dir).free
    if free < need_bytes:
        with removed_if_unstarted(run_dir, created):
            raise UserError(
                f"--out {run_dir}: {free / 1e6:.0f} MB free, checkpoints need about "
                f"{need_bytes / 1e6:.0f} MB"
            )
    return created


def checkpoint_room(run_dir: Path, estimate: int = 70_000_000) -> int:
    """Bytes still needed for `last.pt`, `best.pt` and a temporary copy: three checkpoints the
    size of its largest one (else `estimate`), less what those already hold."""
    held = [p.stat().st_size for p in (run_dir / "last.pt", run_dir / "best.pt") if p.is_file()]
    return max(0, 3 * max(held, default=estimate) - sum(held))


@contextmanager
def removed_if_unstarted(run_dir: Path, created: list[Path]):
    """When the body fails before `config.yaml` (or `last.pt`) is saved, remove the folders
    `prepare_run_dir` `created` (those above `run_dir` only if empty), so a retry is not
    refused. Hold the lock."""
    try:
        yield
    except BaseException:
        if created and not any((run_dir / n).exists() for n in ("config.yaml", "last.pt")):
            for folder in reversed(created):
                if folder == run_dir:
                    shutil.rmtree(folder, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        folder.rmdir()
        raise


def append_metrics(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, float("nan")) for k in METRICS_FIELDS})


def read_metrics(path: Path) -> list[dict]:
    """The rows of `path`, but one that does not parse (torn by a crash mid-write, or edited);
    a resumed run writes its epoch again."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="", errors="replace") as f:  # bytes that are not text: rows dropped
        for row in csv.DictReader(f):
            with contextlib.suppress(TypeError, ValueError):  # a missing or non-number field
                epoch = float(row.get("epoch"))  # an epoch is a whole number from 1
                if epoch.is_integer() and epoch >= 1:
                    rows.append({k: float(v) for k, v in row.items()})
    return rows


def metrics_unread(path: Path) -> str:
    """Why `read_metrics(path)` gave no rows, in a few words for a report's note: the file is
    missing, or there but holding no row that parses (empty, no epoch column, or none a number)."""
    if not path.exists():
        return f"no {path.name} beside the checkpoint"
    try:
        with open(path, newline="", errors="replace") as f:
            header = next(csv.reader(f), None)
        why = ("it is empty" if not header else "it has no epoch column" if "epoch" not in header
               else "no row of numbers with an epoch from 1")  # fmt: skip
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
    return f"{path.name} beside the checkpoint could not be read ({why})"


# result.json's entries, those of `train.Result` it holds: a number each (NaN written as null,
# strict JSON having no NaN), or, for the optional ones, also null where there is none (the
# val accuracies without a validation split)
RESULT_NUMBERS = ("seconds", "images_per_s")
RESULT_ALWAYS = ("best_val_acc", "final_val_acc")  # written by every run, null without validation
RESULT_OPTIONAL = (*RESULT_ALWAYS, "tta_val_acc", "test_acc", "test_tta_acc", "best_test_acc")


def json_text(value: Any, indent: int | None = 1) -> str:
    """Strict JSON of `value`: a NaN or infinite float is written as null (what JSON.parse and
    other strict readers accept), in mappings and lists at any depth."""
    return json.dumps(_finite_or_none(value), indent=indent, allow_nan=False)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def is_number(v: Any) -> bool:
    """An int or a float, not a bool (which Python counts as an int)."""
    return isinstance(v, int | float) and not isinstance(v, bool)


def read_result(run_dir: Path) -> dict | None:
    """`run_dir/result.json`, or None where it is missing, does not parse (cut short) or holds
    other than `train.Result`'s entries (edited, or another file): all count as damaged."""
    try:
        saved = json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    if not isinstance(saved, dict):
        return None
    fits = (
        all(is_number(saved.get(k)) for k in RESULT_NUMBERS)
        and isinstance(saved.get("epochs"), int)
        and not isinstance(saved["epochs"], bool)
        and saved["epochs"] >= 0
        and all(saved.get(k) is None or is_number(saved[k]) for k in RESULT_OPTIONAL)
        and all(k in saved for k in RESULT_ALWAYS)
    )
    return saved if fits else None


def truncate_metrics(path: Path, last_epoch: int) -> list[int]:
    """Keep rows up to `last_epoch` (1-based): a resumed run rewrites what the checkpoint lacks.
    Returns the epochs of 1..`last_epoch` that have no row (a deleted or edited file)."""
    rows = [r for r in read_metrics(path) if r["epoch"] <= last_epoch]
    path.unlink(missing_ok=True)
    for r in rows:
        append_metrics(path, {**r, "epoch": int(r["epoch"])})
    return sorted(set(range(1, last_epoch + 1)) - {int(r["epoch"]) for r in rows})


@contextmanager
def replaced_when_complete(path: Path, exclusive: bool = False) -> Iterator[Path]:
    """A temporary path beside `path`, renamed onto it (durably) only if the write succeeded;
    `exclusive`: FileExistsError instead where `path` exists by then (another writer's)."""
    tmp = _temp_path(path)
    remove_dead_temps(path)
    try:
        yield tmp
        fsync_file(tmp)  # its data on disk before the name points at it
        if exclusive:
            _link(tmp, path)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _temp_path(path: Path) -> Path:
    # suffix last (torch.export.save wants .pt2); stem cut to stay within the name length limit;
    # the thread's id too: two threads of one process (API calls) writing one target must not
    # share (or remove) one temporary
    ids = f"{os.getpid()}-{threading.get_native_id()}"
    return path.with_name(f".{path.stem[:64]}.{ids}.tmp{path.suffix[:16]}")


# A temporary file or folder untouched this long has no writer at work on it, on this machine or
# on another one sharing the folder (whose pids mean nothing here)
STALE_TEMP_SECONDS = 600


def temp_folder(path: Path) -> Path:
    """An empty folder beside `path` to build it in, named as `replaced_when_complete`'s
    temporary files, so that one a killed process left is removed by a later build of `path`."""
    remove_dead_temps(path)
    tmp = _temp_path(path)
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier process (or thread) of these ids
    tmp.mkdir()
    return tmp


@contextmanager
def moved_in_when_complete(
    part: Path, out: Path, last: str, remove: Iterable[str] = ()
) -> Iterator[Path]:
    """`part` (a `temp_folder`) to write files into; once all are written, `last` and the names
    in `remove` are deleted from `out`, then the new files moved in, `last` at the end: `out`
    never shows `last` beside another write's files. `part` goes in any case."""
    try:
        yield part
        out.mkdir(exist_ok=True)
        for name in (last, *remove):
            (out / name).unlink(missing_ok=True)
        fsync_dir(out)  # no new file named before every old one is gone
        for f in sorted(part.iterdir(), key=lambda f: f.name == last):
            fsync_file(f)  # on disk before `last` can name the set complete
            os.replace(f, out / f.name)
        fsync_dir(out)
    finally:
        shutil.rmtree(part, ignore_errors=True)


def remove_dead_temps(path: Path) -> None:
    """Remove the temporary files and folders of `path` (`_temp_path`'s names, another pid) that
    a killed writer left: its process gone here and untouched for STALE_TEMP_SECONDS. Without
    this, each kill mid-write left one for good, a checkpoint's size for `last.pt`."""
    if os.name == "nt":  # os.kill(pid, 0) would end the process there
        return
    ids = r"(\d{1,7})(?:-\d{1,10})?"  # the pid, then the thread's id
    name = re.compile(re.escape(f".{path.stem[:64]}.") + ids + re.escape(f".tmp{path.suffix[:16]}"))
    try:
        found = [(e, m) for e in path.parent.iterdir() if (m := name.fullmatch(e.name))]
    except OSError:
        return
    for entry, match in found:
        with contextlib.suppress(OSError):
            if _alive(int(match[1])) or time.time() - entry.lstat().st_mtime < STALE_TEMP_SECONDS:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        pass
    return True


def _link(tmp: Path, path: Path) -> None:
    """`tmp` named `path` too, unless `path` exists: one step, where the file system has links."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links (FAT): claim the name, then replace the empty file
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        os.replace(tmp, path)


def fsync_file(path: Path) -> None:
    """Put `path`'s data on disk (before a rename makes it count)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (Windows cannot open a folder, nor needs to)."""
    if os.name != "nt":
        fsync_file(folder)
