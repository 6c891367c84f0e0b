"""Named wall-clock phases of a run (`cifarlab train --profile`): where start-up and the end go."""

from __future__ import annotations

import contextlib
import math
import time

# (name, wall seconds, CPU seconds of this process); None: not profiling, phase() costs nothing.
# CPU time is the column to compare across runs on a shared machine: other processes' load
# stretches wall time, much less a phase's own CPU time (with 2 threads it may exceed the wall).
_phases: list[tuple[str, float, float]] | None = None
_marks: list[tuple[str, float]] = []  # (event, seconds since the command started)
_open: list[list[float]] = []  # per phase being timed: wall and CPU seconds of phases inside it
_origin = 0.0


def enable(origin: float) -> None:
    """Start profiling; `origin` is the command's start (a `time.perf_counter()` reading)."""
    global _phases, _origin
    _phases, _origin = [], origin
    _marks.clear()
    _open.clear()


def mark(event: str) -> None:
    """Note when `event` happened, in seconds since the command started."""
    if _phases is not None:
        _marks.append((event, time.perf_counter() - _origin))


@contextlib.contextmanager
def phase(name: str):
    """Time the block as `name` when profiling is on (repeated names add up). A phase inside
    another counts only in its own row, so that the rows add up to the time they cover."""
    if _phases is None:
        yield
        return
    t, cpu = time.perf_counter(), time.process_time()
    _open.append([0.0, 0.0])
    try:
        yield
    finally:
        inner_wall, inner_cpu = _open.pop()
        record(name, time.perf_counter() - t, time.process_time() - cpu, inner_wall, inner_cpu)


def record(
    name: str, seconds: float, cpu_seconds: float = float("nan"), inner: float = 0.0,
    inner_cpu: float = 0.0,
) -> None:  # fmt: skip
    """Add `seconds` to `name`, less the `inner` seconds that phases inside it recorded."""
    if _phases is None:
        return
    _phases.append((name, seconds - inner, cpu_seconds - inner_cpu))
    if _open:  # the phase around this one leaves these seconds out of its own row
        _open[-1][0] += seconds
        _open[-1][1] += 0.0 if math.isnan(cpu_seconds) else cpu_seconds


def table() -> str:
    """One line per phase in first-seen order (wall and CPU seconds summed over repeats), then
    the marks."""
    totals: dict[str, tuple[float, float]] = {}
    for name, s, cpu in _phases or []:
        w, c = totals.get(name, (0.0, 0.0))
        totals[name] = (w + s, c + cpu)
    width = max((len(n) for n in [*totals, *dict(_marks)]), default=5) + 2
    lines = ["profile (seconds):", f"  {'phase':<{width}}{'wall':>7} {'cpu':>7}"]
    lines += [f"  {n:<{width}}{w:7.3f} {c:7.3f}" for n, (w, c) in totals.items()]
    lines += ["since the command started:"] + [f"  {n:<{width}}{s:7.3f}" for n, s in _marks]
    return "\n".join(lines)
