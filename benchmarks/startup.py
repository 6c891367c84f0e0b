"""Fixed costs of `cifarlab train --recipe fast`: seconds from the command's start to its first
training step, and from its last step to the command's end (issue 25's targets: <= 3 s and <= 2 s
on a 2-core CPU with cached data at --val-size 5000). Prints both and the --profile table.

    python benchmarks/startup.py --data /path/to/cifar10 [--subset N] [--epochs 1] \\
        [--compare OTHER_CHECKOUT] [--rounds 2] [-- extra flags]

Run it once first (that run fills the data cache) and read the next. `--compare` runs the same
command from another checkout's src/ (e.g. main's), alternating with this one, and prints each
phase's wall and CPU seconds side by side: on a shared machine wall time follows the load, the
CPU seconds of a phase much less, so the ratio of CPU seconds is the comparison to read."""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def run_once(a, src: Path) -> dict:
    """One `cifarlab train --profile` from `src`: its phases {name: (wall, cpu)}, marks, wall."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "cifarlab", "train", "--recipe", "fast", "--data", a.data,
               "--epochs", a.epochs, "--val-size", a.val_size, "--out", out, "--no-progress",
               "--profile", *(["--subset", a.subset] if a.subset else []), *a.extra]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(src)}
        t, cpu = time.perf_counter(), os.times()
        text = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        wall, after = time.perf_counter() - t, os.times()
    table = text[text.index("profile (seconds):") :]
    phases, marks = {}, {}
    head, tail = table.split("since the command started:")
    for line in head.splitlines()[1:]:  # "name  wall  cpu", or "name  wall" from an older main
        m = re.fullmatch(r"\s*(.*?)\s+(-?[\d.]+|nan)(?:\s+(-?[\d.]+|nan))?\s*", line)
        if m:
            phases[m[1]] = tuple(float(n) for n in m.groups()[1:] if n is not None)
    for line in tail.splitlines()[1:]:
        name, seconds = line.rsplit(None, 1)
        marks[name.strip()] = float(seconds)
    child_cpu = (after.children_user - cpu.children_user) + (
        after.children_system - cpu.children_system
    )
    offset = wall - marks["command done"]  # the interpreter's start, before cifarlab's clock
    first = marks["first step done"] + offset
    return {
        "table": table, "phases": phases, "wall": wall, "cpu": child_cpu,
        "to first step": first - phases.get("first step", (0.0,))[0], "first step done": first,
        "after last step": wall - marks["last step done"] - offset,
    }  # fmt: skip


def report(r: dict) -> None:
    print(r["table"])
    print(f"first step starts after {r['to first step']:6.2f} s (target <= 3 s to the first step)")
    print(f"first step done after   {r['first step done']:6.2f} s")
    print(f"after the last step     {r['after last step']:6.2f} s (target <= 2)")
    print(f"whole command           {r['wall']:6.2f} s wall, {r['cpu']:6.2f} s CPU")


def compare(mine: list[dict], theirs: list[dict], other: str) -> None:
    """Per phase: this checkout's and the other's wall and CPU seconds (means over rounds)."""
    names = list(dict.fromkeys([*mine[0]["phases"], *theirs[0]["phases"]]))

    def mean(runs, name, i):  # the median: one round disturbed by the machine moves it least
        values = [r["phases"][name][i] for r in runs if len(r["phases"].get(name, ())) > i]
        return statistics.median(values) if values else float("nan")

    print(f"\nper phase, medians of {len(mine)} rounds: this checkout against {other}")
    print(f"  {'phase':<34}{'wall':>8}{'theirs':>8}{'cpu':>8}{'theirs':>8}{'cpu ratio':>10}")
    for n in names:
        w, tw, c, tc = mean(mine, n, 0), mean(theirs, n, 0), mean(mine, n, 1), mean(theirs, n, 1)
        print(f"  {n:<34}{w:8.2f}{tw:8.2f}{c:8.2f}{tc:8.2f}{c / tc if tc else float('nan'):10.2f}")
    for key in ("to first step", "after last step", "wall", "cpu"):
        m = statistics.median(r[key] for r in mine)
        t = statistics.median(r[key] for r in theirs)
        print(f"  {key:<34}{m:8.2f}{t:8.2f}{'':16}{m / t:10.2f}")
    for key in ("to first step", "after last step"):
        for who, runs in (("this checkout", mine), (other, theirs)):
            print(f"  {key}, {who}: {', '.join(f'{r[key]:.2f}' for r in runs)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--epochs", default="1")
    p.add_argument("--val-size", default="5000")
    p.add_argument("--subset", default="", help="training images before the val split")
    p.add_argument("--compare", help="another checkout (its src/ is run), e.g. main's")
    p.add_argument("--rounds", type=int, default=1, help="alternating runs of each, with --compare")
    p.add_argument("extra", nargs="*", help="more `cifarlab train` flags (after --)")
    a = p.parse_args()
    if not a.compare:
        report(run_once(a, SRC))
        return
    other = Path(a.compare).resolve() / "src"
    mine, theirs = [], []
    for _ in range(a.rounds):
        mine.append(run_once(a, SRC))
        theirs.append(run_once(a, other))
    report(mine[-1])
    compare(mine, theirs, a.compare)


if __name__ == "__main__":
    main()
