"""Named wall-clock phases of a run (`cifarlab train --profile`): where start-up and the end go."""

from __future__ import annotations

import contextlib
import time

_phases: list[tuple[str, float]] | None = None  # None: not profiling, phase() costs nothing
_marks: list[tuple[str, float]] = []  # (event, seconds since the command started)
_origin = 0.0


def enable(origin: float) -> None:
    """Start profiling; `origin` is the command's start (a `time.perf_counter()` reading)."""
    global _phases, _origin
    _phases, _origin = [], origin
    _marks.clear()


def mark(event: str) -> None:
    """Note when `event` happened, in seconds since the command started."""
    if _phases is not None:
        _marks.append((event, time.perf_counter() - _origin))


@contextlib.contextmanager
def phase(name: str):
    """Time the block as `name` when profiling is on (repeated names add up)."""
    if _phases is None:
        yield
        return
    t = time.perf_counter()
    try:
        yield
    finally:
        _phases.append((name, time.perf_counter() - t))


def record(name: str, seconds: float) -> None:
    if _phases is not None:
        _phases.append((name, seconds))


def table() -> str:
    """One line per phase in first-seen order, seconds summed over repeats."""
    totals: dict[str, float] = {}
    for name, s in _phases or []:
        totals[name] = totals.get(name, 0.0) + s
    width = max((len(n) for n in [*totals, *dict(_marks)]), default=5) + 2
    lines = ["profile (seconds):"] + [f"  {n:<{width}}{s:7.3f}" for n, s in totals.items()]
    lines += ["since the command started:"] + [f"  {n:<{width}}{s:7.3f}" for n, s in _marks]
    return "\n".join(lines)
