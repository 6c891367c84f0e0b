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
from cifarlab.inference import TTA_VIEWS, predict_logits
from cifarlab.training_run import micro_batches, total_steps


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
        opt.zero_grad(set_to_none=True)
        for xc, yc in micro_batches(run.config, x, y):  # as the run steps: in its chunks
            with run.hw.autocast():
                loss = F.cross_entropy(model(xc).float(), yc)
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
    step: float, per_epoch: float, seconds_left: float, steps_per_epoch: int, final: float
) -> int:
    """The most training steps (of `step` seconds) whose training, `per_epoch` seconds for every
    started epoch (validation, saving) and the `final` passes fit in `seconds_left`; at least one."""
    best = 0
    for epochs in range(1, 100_000):
        room = seconds_left - final - epochs * per_epoch
        steps = min(epochs * steps_per_epoch, int(room // step))
        if steps <= (epochs - 1) * steps_per_epoch:
            break
        best = steps
    return max(1, best)


def final_images(c: TrainConfig, n_val: int, n_test: int) -> int:
    """Image-views evaluated after the last epoch: the TTA pass, the temperature fits (best.pt
    and last.pt, twice with EMA) and the test pass (plain and with TTA)."""
    views = TTA_VIEWS[c.tta] if c.tta != "none" else 0
    calibration = 2 * (2 if c.ema else 1) * n_val
    return n_val * views + calibration + n_test * (1 + views)


@dataclass
class Plan:
    """A budgeted run's length: chosen from a probe before training, corrected once from the
    measured first epoch (a probe's few steps are not a whole epoch's pace)."""

    shape: TrainConfig  # the recipe's config before planning: its `epochs` shape the schedule
    started: float  # time.perf_counter() when the run started
    n_test: int

    def correct(self, run, steps: int, step: float, val_seconds: float, per_epoch: float,
                log) -> TrainConfig | None:  # fmt: skip
        """After the first epoch (`steps` steps at `step` seconds each once warm, its
        validation in `val_seconds`, `per_epoch` seconds of validation and saving): the config
        whose remaining steps fit the time left, or None when the plan stands (within a step)
        or the run ends in its first epoch."""
        c, n = run.config, len(run.batches)
        total, n_val = total_steps(c, n), len(run.val_labels)
        if total <= steps:
            return None
        val_image = val_seconds / n_val if n_val else 0.0
        final = val_image * final_images(c, n_val, self.n_test)
        left = self.shape.time_budget - (time.perf_counter() - self.started)
        new_total = steps + plan_steps(step, per_epoch, left, n, final)
        if abs(new_total - total) <= 1:
            return None
        log(
            f"time budget: the first epoch ran at {step:.3f} s/step; {new_total} steps instead "
            f"of {total} ({new_total / n:.2f} epochs) end the run on time"
        )
        return with_steps(self.shape, new_total, n)


def fit_to_budget(run, started: float, build_seconds: float, log) -> tuple[TrainConfig, Plan]:
    """The run's config with `train_steps` (and its epoch-based settings) chosen to end within
    `time_budget` seconds of `started` (a `time.perf_counter()` reading), and the plan that
    corrects it after the first epoch; the run is built once more for that length, which costs
    about `build_seconds` again."""
    c, n = run.config, len(run.batches)
    timings = measure(run)
    n_val, n_test = len(run.val_labels), len(run.splits.test) if run.splits.test is not None else 0
    per_epoch = n_val * timings.val_image
    final = timings.val_image * final_images(c, n_val, n_test)
    left = c.time_budget - (time.perf_counter() - started) - build_seconds
    steps = plan_steps(timings.step, per_epoch, left, n, final)
    planned = with_steps(c, steps, n)
    expected = steps * timings.step + planned.epochs * per_epoch + final
    if expected > left:
        log(
            f"warning: a {c.time_budget:.0f} s budget is too short for this run: one step and "
            f"the final passes take about {expected:.0f} s of the {max(0.0, left):.0f} s left"
        )
    log(
        f"time budget {c.time_budget / 60:.1f} min: {timings.step:.3f} s/step, "
        f"{timings.val_image * 1e3:.2f} ms per evaluated image; {steps} steps "
        f"({steps / n:.2f} epochs) fit, training ends about {expected / 60:.1f} min from now"
    )
    return planned, Plan(c, started, n_test)
