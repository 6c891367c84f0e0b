"""Fixed costs of `cifarlab train --recipe fast`: seconds from the command's start to its first
training step, and from its last step to the command's end (issue 25's targets: <= 3 s and <= 2 s
on a 2-core CPU with cached data at --val-size 5000). Prints both and the --profile table.

    python benchmarks/startup.py --data /path/to/cifar10 [--epochs 1] [--subset N] [-- extra flags]

Run it twice (the first run fills the data cache) and read the second. Times are wall-clock."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--epochs", default="1")
    p.add_argument("--val-size", default="5000")
    p.add_argument("extra", nargs="*", help="more `cifarlab train` flags (after --)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "cifarlab", "train", "--recipe", "fast", "--data", a.data,
               "--epochs", a.epochs, "--val-size", a.val_size, "--out", out, "--no-progress",
               "--profile", *a.extra]  # fmt: skip
        t = time.perf_counter()
        text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        wall = time.perf_counter() - t
    marks = {}
    for line in text[text.index("since the command started:") :].splitlines()[1:]:
        name, seconds = line.rsplit(None, 1)
        marks[name.strip()] = float(seconds)
    offset = wall - marks["command done"]  # the interpreter's start, before cifarlab's clock
    print(text[text.index("profile (seconds):") :])
    print(f"first step done after   {marks['first step done'] + offset:6.2f} s (target <= 3)")
    print(f"after the last step     {wall - marks['last step done'] - offset:6.2f} s (target <= 2)")
    print(f"whole command           {wall:6.2f} s")


if __name__ == "__main__":
    main()
