"""`cifarlab calibrate RUN` racing `cifarlab train --out RUN --resume`, repeated with random delays.

A check, not a test (each trial starts two processes). A 2-epoch run of a tiny CNN is stopped
after epoch 1; each trial copies it, starts `calibrate`, waits 0-2 s, starts the resume, and
checks that `last.pt` is not older than `metrics.csv`'s last epoch (calibrate used to write back
the epoch-1 copy it had read over the epoch 2 the resume saved). Whichever command comes second
is refused ("in use by process N") while the other holds the run's lock.

    python benchmarks/calibrate_race.py [--trials 20] [--work /tmp/calibrate-race]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cifarlab.checkpoint import load_checkpoint
from cifarlab.config import TrainConfig, apply_overrides
from cifarlab.rundir import read_metrics
from cifarlab.train import train


class _Stop(Exception):
    pass


def stopped_run(work: Path) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(("red", "green", "blue")):
        (work / "data" / "train" / name).mkdir(parents=True, exist_ok=True)
        for i in range(12):
            pixels = rng.integers(0, 90, (32, 32, 3))
            pixels[..., c] += 150
            Image.fromarray(pixels.astype("uint8")).save(
                work / "data" / "train" / name / f"{i}.png"
            )
    config = apply_overrides(TrainConfig(), {
        "data": str(work / "data"), "data_root": str(work / "cache"), "model": "cnn", "width": 0.25,
        "epochs": 2, "batch_size": 8, "val_size": 9, "warmup_epochs": 0.0, "tta": "none",
        "progress": False, "device": "cpu", "threads": 1,
    }, where="calibrate_race")  # fmt: skip

    def stop(row):
        raise _Stop

    with contextlib.suppress(_Stop):
        train(config, work / "base", log=lambda s: None, on_epoch=stop)
    return work / "base"


def trial(base: Path, run: Path, delay: float) -> tuple[int, int, str]:
    shutil.copytree(base, run)
    cli = [sys.executable, "-m", "cifarlab"]
    calibrate = subprocess.Popen([*cli, "calibrate", str(run), "--device", "cpu"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(delay)
    resume = subprocess.run([*cli, "train", "--out", str(run), "--resume"],
                            capture_output=True, text=True)  # fmt: skip
    calibrate.wait()
    refused = "calibrate" if calibrate.returncode else "resume" if resume.returncode else "neither"
    saved = load_checkpoint(run / "last.pt")["epoch"]
    return saved, int(read_metrics(run / "metrics.csv")[-1]["epoch"]), refused


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--work", type=Path, default=Path("/tmp/calibrate-race"))
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    base, bad = stopped_run(args.work), 0
    for i in range(args.trials):
        delay = random.uniform(0.0, 2.0)
        saved, metrics, refused = trial(base, args.work / f"t{i}", delay)
        bad += saved < metrics
        print(f"trial {i}: delay {delay:.2f} s, last.pt epoch {saved}, metrics.csv epoch "
              f"{metrics}, refused: {refused}{'  ROLLED BACK' if saved < metrics else ''}")  # fmt: skip
    print(f"{bad} of {args.trials} trials left last.pt older than metrics.csv")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
