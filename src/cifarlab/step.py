"""The one training step of the loop and of every timing of a step (on a `TrainingRun` or
`bare_run`'s stand-in): forward and backward (`train_step`), then the update (`optimizer_step`)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from cifarlab.augment import mix_batch
from cifarlab.config import TrainConfig


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """The one place the loss is decided: cross-entropy on class indices or Mixup/CutMix
    probabilities, with label smoothing applied here exactly once."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)


def train_step(run, x: torch.Tensor, y: torch.Tensor, rand) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward one batch, in `micro_batch` chunks when set: (mean loss, logits).
    Mixup/CutMix make soft targets over the whole batch; the loss is `loss_fn`."""
    c = run.config
    if run.hw.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    targets = y
    if c.mixup_alpha or c.cutmix_alpha:
        x, targets = mix_batch(x, F.one_hot(y, len(run.splits.classes)).float(), c, rand.rng)
    run.optimizer.zero_grad(set_to_none=True)
    size = c.micro_batch or len(x)
    chunks = list(zip(x.split(size), targets.split(size), strict=True))
    losses, logits = [], []
    # dropout draws from torch's generators: seeded for the step (`rand`: a `StepRandom`)
    with rand.global_draws() if rand is not None else contextlib.nullcontext():
        for i, (xc, tc) in enumerate(chunks):
            # under DDP the gradients are reduced once, on the last chunk's backward
            with _no_sync(run.step_model, i < len(chunks) - 1):
                with run.hw.autocast():
                    out = run.step_model(xc)
                loss = loss_fn(out, tc, c.label_smoothing) * (len(xc) / len(x))
                run.scaler.scale(loss).backward()
            losses.append(loss.detach())
            logits.append(out.detach())
    return torch.stack(losses).sum(), torch.cat(logits)


def _no_sync(model: torch.nn.Module, skip: bool):
    ddp = getattr(model, "_orig_mod", model)  # under torch.compile
    if skip and isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        return ddp.no_sync()
    return contextlib.nullcontext()


def optimizer_step(run, global_step: int) -> None:
    """The update on the batch's gradients: SGD/Muon (through the AMP scaler), schedule,
    lookahead, EMA."""
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    if run.lookahead is not None:
        run.lookahead.after_step(run.model, global_step)
    if run.ema is not None:
        run.ema.update_parameters(run.model)


def bare_run(model: torch.nn.Module, hw, config: TrainConfig | None = None):
    """What `train_step` reads of a run, around `model` alone: for timing a step in isolation.
    `hw` is a `hardware.Hardware` (None: set `run.hw` before stepping); swap `run.hw` or
    `run.config` between steps to compare settings."""
    return SimpleNamespace(
        config=config or TrainConfig(), hw=hw, model=model, step_model=model,
        optimizer=torch.optim.SGD(model.parameters()),
        scaler=torch.amp.GradScaler(next(model.parameters()).device.type, enabled=False),
        splits=SimpleNamespace(classes=list(range(10))),
    )  # fmt: skip
