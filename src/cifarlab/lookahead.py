"""Lookahead as airbench uses it: every k steps the slow copy of the weights steps toward the
live weights, which are reset onto it (unlike an EMA, this changes the trajectory). The pull
ramps in as progress^3 and the last step lands on the average itself; torch has no such wrapper."""

from __future__ import annotations

import torch


class Lookahead:
    def __init__(self, model: torch.nn.Module, every: int, decay: float, total_steps: int):
        self.every, self.decay, self.total = every, decay, total_steps
        self.slow = {
            k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()
        }

    @torch.no_grad()
    def after_step(self, model: torch.nn.Module, step: int) -> None:
        """After global step `step` (1-based): every `every` steps, and at the last, the slow copy
        keeps `keep` of itself and takes the rest from the live weights, which are reset onto it."""
        if step < self.total and step % self.every:
            return
        keep = 1.0 if step >= self.total else self.decay**self.every * (step / self.total) ** 3
        for name, value in model.state_dict().items():
            if name in self.slow:
                self.slow[name].lerp_(value, 1.0 - keep)
                value.copy_(self.slow[name])

    def state_dict(self) -> dict:
        return dict(self.slow)

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            self.slow[name].copy_(value)
