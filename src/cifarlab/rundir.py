"""A run directory's bookkeeping: the one-writer lock and the per-epoch metrics CSV."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

from cifarlab.errors import UserError

METRICS_FIELDS = [
    "epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "images_per_s",
]  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`RUN_DIR/.lock` holding the owner's pid; a lock left by a dead process is taken over."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"

    def __enter__(self) -> RunLock:
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise UserError(
                        f"{self.path.parent} is in use by process {pid}; wait for it or choose another --out"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def prepare_run_dir(run_dir: Path, need_bytes: int) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"--out {run_dir}: cannot create the run directory ({exc.strerror})"
        ) from None
    if not os.access(run_dir, os.W_OK):
        raise UserError(f"--out {run_dir}: the run directory is not writable")
    free = shutil.disk_usage(run_dir).free
    if free < need_bytes:
        raise UserError(
            f"--out {run_dir}: {free / 1e6:.0f} MB free, checkpoints need about {need_bytes / 1e6:.0f} MB"
        )


def append_metrics(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: row[k] for k in METRICS_FIELDS})


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Keep rows up to `last_epoch` (1-based): a resumed run rewrites what the checkpoint lacks."""
    rows = [r for r in read_metrics(path) if r["epoch"] <= last_epoch]
    if not path.exists():
        return
    path.unlink()
    for r in rows:
        r["epoch"] = int(r["epoch"])
        append_metrics(path, r)


RUN_FILES = ("last.pt", "best.pt", "metrics.csv", "config.yaml", "result.json")


def claim_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to start a run in a directory that holds anything (a run's files or other) unless
    resuming; an empty or missing directory is fine."""
    if resume or not run_dir.is_dir():
        return
    held = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))
    if held:
        kind = "a run" if set(held) & set(RUN_FILES) else "other files"
        raise UserError(
            f"--out {run_dir} already holds {kind} ({', '.join(held[:4])}); add --resume to "
            "continue it or pick a new --out"
        )
