"""Train to a time budget: time the run's first steps on a throwaway copy of the model, then
choose how many steps fit, so that training, every validation pass, the final TTA pass and the
test pass end within the budget. The schedule (warm-up included) is shaped to that length."""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cifarlab.config import TrainConfig, with_steps
from cifarlab.data.loaders import to_device_uint8
from cifarlab.inference import predict_logits

TTA_VIEWS = {"none": 1, "flip": 2, "flip-translate": 4}


@dataclass(frozen=True)
class Timings:
    step: float  # seconds per training step (augmentation, forward, backward, update)
    val_image: float  # seconds per image and view of an evaluation pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(run, steps: int = 3, warmup: int = 1) -> Timings:
    """Median step time of a copy of the model (lr 0: nothing learns) and the evaluation cost,
    leaving the run and the global random state as they were. Few steps: they are spent out of
    the budget (on a 2-core CPU, 4 fastnet steps of 1,024 images take ~20 s)."""
    rng = torch.get_rng_state()
    model = copy.deepcopy(run.model).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    batches, times = run.batches.epoch(0), []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        try:
            x, y, _rand = next(batches)
        except StopIteration:  # a tiny data set: walk it again
            batches = run.batches.epoch(0)
            x, y, _rand = next(batches)
        if run.hw.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with run.hw.autocast():
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(run.hw.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    images = run.val_images[: 2 * run.config.eval_batch_size]
    if len(images) == 0:  # no validation split: time a training batch instead
        images = to_device_uint8(
            run.splits.train.images[: run.config.eval_batch_size], run.hw.device
        )
    t0 = time.perf_counter()
    predict_logits(model, images, run.normalize, run.config.eval_batch_size, hardware=run.hw)
    _sync(run.hw.device)
    val_image = (time.perf_counter() - t0) / max(1, len(images))
    torch.set_rng_state(rng)
    return Timings(statistics.median(times), val_image)


def plan_steps(
    t: Timings, seconds_left: float, steps_per_epoch: int, n_val: int, final: float
) -> int:
    """The most training steps whose training, one validation pass per (started) epoch and the
    `final` passes fit in `seconds_left`; at least one."""
    best = 0
    for epochs in range(1, 100_000):
        room = seconds_left - final - epochs * n_val * t.val_image
        steps = min(epochs * steps_per_epoch, int(room // t.step))
        if steps <= (epochs - 1) * steps_per_epoch:
            break
        best = steps
    return max(1, best)


def fit_to_budget(run, started: float, build_seconds: float, log) -> TrainConfig:
    """The run's config with `train_steps` (and its epoch-based settings) chosen to end within
    `time_budget` seconds of `started` (a `time.perf_counter()` reading); the run is built once
    more for that length, which costs about `build_seconds` again."""
    c, n = run.config, len(run.batches)
    timings = measure(run)
    rebuild = build_seconds
    n_val, n_test = len(run.val_labels), len(run.splits.test) if run.splits.test is not None else 0
    views = TTA_VIEWS[c.tta]
    final = timings.val_image * (
        n_val * views * (c.tta != "none") + n_test * (1 + (views > 1) * views)
    )
    left = c.time_budget - (time.perf_counter() - started) - rebuild
    steps = plan_steps(timings, left, n, n_val, final)
    planned = with_steps(c, steps, n)
    expected = steps * timings.step + planned.epochs * n_val * timings.val_image + final
    log(
        f"time budget {c.time_budget / 60:.1f} min: {timings.step:.3f} s/step, "
        f"{timings.val_image * 1e3:.2f} ms per evaluated image; {steps} steps "
        f"({steps / n:.2f} epochs) fit, training ends about {expected / 60:.1f} min from now"
    )
    return planned
