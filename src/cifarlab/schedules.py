"""Learning-rate schedules by name, as multipliers of the peak lr per optimiser step."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from cifarlab.errors import UserError


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _onecycle(step: int, total: int, warmup: int) -> float:
    """Linear up over the warm-up (default 20% of steps), then linear down to zero (airbench's shape)."""
    warmup = warmup or max(1, round(0.2 * total))
    if step < warmup:
        return 0.1 + 0.9 * step / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _linear(step: int, total: int, warmup: int) -> float:
    """Straight down from the peak to zero, after an optional linear warm-up (airbench94_muon)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _constant(step: int, total: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


SCHEDULES: dict[str, Callable[[int, int, int], float]] = {
    "cosine": _cosine,
    "onecycle": _onecycle,
    "linear": _linear,
    "constant": _constant,
}


def make_scheduler(
    name: str, optimizer, total_steps: int, warmup_steps: int, steps_per_epoch: int = 1
):
    """A per-step LambdaLR; with `steps_per_epoch` > 1 the lr holds for each epoch, at the value
    of its first step (the lesson's `scheduler.step()` once per epoch)."""
    if name not in SCHEDULES:
        raise UserError(f"unknown schedule '{name}'; valid: {', '.join(SCHEDULES)}")
    fn, k = SCHEDULES[name], steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: fn(s // k * k, total_steps, warmup_steps)
    )
