"""Learning-rate schedules by name, as multipliers of the peak lr per optimiser step."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def _cosine(step: float, total: int, warmup: int) -> float:
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _linear(step: float, total: int, warmup: int) -> float:
    """Straight down from the peak to zero (airbench94_muon)."""
    return max(0.0, (total - step) / max(1, total - warmup))


def _onecycle(step: float, total: int, warmup: int) -> float:
    """Linear up over its own warm-up (default 20% of steps), then linear down (airbench's shape)."""
    warmup = warmup or max(1, round(0.2 * total))
    if step < warmup:
        return 0.1 + 0.9 * step / warmup
    return _linear(step, total, warmup)


def _warmed(shape: Callable[[float, int, int], float]) -> Callable[[float, int, int], float]:
    """`shape` after a linear warm-up over `warmup` steps, capped at 1: a stretched schedule
    reads between the last two warm-up steps."""

    def schedule(step: float, total: int, warmup: int) -> float:
        return min(1.0, (step + 1) / warmup) if step < warmup else shape(step, total, warmup)

    return schedule


SCHEDULES: dict[str, Callable[[float, int, int], float]] = {
    "cosine": _warmed(_cosine),
    "onecycle": _onecycle,  # its own warm-up, from 0.1 of the peak
    "linear": _warmed(_linear),
    "constant": _warmed(lambda step, total, warmup: 1.0),
}


class StepSchedule:
    """The lr multiplier at optimiser step `step`: `name`'s shape over `total` steps (`warmup`
    of them warming up), held for each epoch of `hold` steps. A callable object, not a lambda,
    so that its numbers travel in the scheduler's state_dict (LambdaLR saves an object's
    `__dict__`) and a resumed run continues a stretched schedule exactly."""

    def __init__(self, name: str, total: int, warmup: int, hold: int = 1):
        self.name, self.total, self.warmup, self.hold = name, total, warmup, hold
        # where step `from_step` sits on the shape, and shape steps per real step after it
        self.from_step, self.from_at, self.rate = 0, 0.0, 1.0

    def position(self, step: int) -> float:
        return self.from_at + (step - self.from_step) * self.rate

    def __call__(self, step: int) -> float:
        at = self.position(step // self.hold * self.hold)
        return SCHEDULES[self.name](at, self.total, self.warmup)

    def stretch(self, done: int, new_total: int) -> None:
        """Make the run end at step `new_total` after `done` steps taken: the rest of the shape
        is spread over the steps left, from the multiplier it has now (re-planning from
        scratch would jump: a longer run's decay is earlier in its course, so its lr is higher)."""
        at = self.position(done)
        self.from_step, self.from_at = done, at
        self.rate = (self.total - at) / (new_total - done) if new_total > done else 1.0


def make_scheduler(
    name: str, optimizer, total_steps: int, warmup_steps: int, steps_per_epoch: int = 1
):
    """A per-step LambdaLR; with `steps_per_epoch` > 1 the lr holds for each epoch, at the value
    of its first step (the lesson's `scheduler.step()` once per epoch)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, StepSchedule(name, total_steps, warmup_steps, steps_per_epoch)
    )


def stretch(scheduler, new_total: int) -> None:
    """Re-plan a live run's schedule to end at step `new_total`, continuing from its current lr."""
    for fn in {id(f): f for f in scheduler.lr_lambdas}.values():
        fn.stretch(scheduler.last_epoch, new_total)
