"""Train to a time budget: time the run's first steps (then put the run back as built) and
choose how many steps fit, so that training, every validation pass, the final TTA pass and the
test pass end within the budget. The schedule (warm-up included) is shaped to that length."""

from __future__ import annotations

import bisect
import copy
import dataclasses
import itertools
import math
import statistics
import time
from dataclasses import dataclass

import torch

from cifarlab.config import TrainConfig, model_width, with_steps
from cifarlab.data.loaders import to_device_uint8
from cifarlab.errors import UserError
from cifarlab.hardware import synchronize
from cifarlab.inference import TTA_VIEWS, predict_logits
from cifarlab.step import optimizer_step, train_step
from cifarlab.training_run import (
    checkpoint_state,
    restore,
    retarget,
    set_trainable,
    settling_epoch,
    total_steps,
)


@dataclass(frozen=True)
class Timings:
    step: float  # seconds per training step (augmentation, forward, backward, update)
    val_image: float  # seconds per image and view of an evaluation pass
    settled: float = 0.0  # seconds per step from `settling_epoch` on (0: as `step`), e.g.
    # fastnet's steps are ~10% cheaper once its whitening bias stops; a frozen backbone's dearer


def measure(run, steps: int = 3, warmup: int = 1, too_slow=None, timed: float = 2.0,
            most: int = 10, stopped=None, within: float = math.inf) -> Timings | None:  # fmt: skip
    """Median seconds of the run's own step in its first epoch and, when that changes
    (`settling_epoch`), from then on; and the evaluation cost. At least `steps` steps per phase
    after `warmup`, and more, up to `most`, until each phase has `timed` seconds timed: a cheap
    step's median of three is at the mercy of one step still warming up; but one timed step
    each once the probe's steps took `within` seconds (a short budget of dear steps would go
    to the probe). `run` and the global random state are put back as they were after. None as
    soon as `too_slow(seconds)` holds for a first-epoch step (half a warm-up step's seconds):
    a pace that rules the run out needs no more steps to know it; and as soon as `stopped()`
    holds after a step (Ctrl-C: the probe's steps would be thrown away)."""
    built, rng = copy.deepcopy(checkpoint_state(run, 0)), torch.get_rng_state()
    step_model, flags = run.step_model, [p.requires_grad for p in run.model.parameters()]
    run.step_model = run.model  # eager: compiling here would time the compilation
    # batches without end (a tiny data set is walked again)
    batches = itertools.chain.from_iterable(map(run.batches.epoch, itertools.repeat(0)))
    settle = settling_epoch(run.config)
    phases = [0, settle] if settle else [0]
    times, k, slow, spent = {epoch: [] for epoch in phases}, 0, False, 0.0

    def enough() -> bool:
        n = len(times[0])
        if n and spent >= within:
            return True
        return n >= steps and (n >= most or min(map(sum, times.values())) >= timed)

    while not (slow or enough()):  # the phases alternate, so that drift hits both alike
        for epoch in phases:
            _set_flags(run, flags)
            run.model.train()
            set_trainable(run.model, run.config, run.fixed, epoch)
            k += 1
            seconds = _step_seconds(run, batches, k)
            spent += seconds
            if stopped is not None and stopped():
                slow = True
                break
            warming = k <= warmup * len(phases)
            if not warming:
                times[epoch].append(seconds)
            # a warm-up step costs more than the rest: it rules out only a pace twice as slow
            if (
                epoch == 0
                and too_slow is not None
                and too_slow(seconds / 2 if warming else seconds)
            ):
                slow = True
                break
    val_image = None if slow else _val_image_seconds(run)
    restore(run, built)
    run.step_model = step_model
    _set_flags(run, flags)
    torch.set_rng_state(rng)
    if val_image is None:
        return None
    settled = statistics.median(times[settle]) if settle else 0.0
    return Timings(statistics.median(times[0]), val_image, settled)


def _val_image_seconds(run) -> float:
    """Seconds per image of an evaluation pass over two of the run's evaluation batches."""
    batch = run.config.eval_batch_size
    images = run.val_images[: 2 * batch]
    if len(images) == 0:  # no validation split: time a training batch instead
        images = to_device_uint8(run.splits.train.images[:batch], run.hw.device)
    t0 = time.perf_counter()
    predict_logits(run.eval_model, images, run.normalize, batch, hardware=run.hw)
    synchronize(run.hw.device)
    return (time.perf_counter() - t0) / max(1, len(images))


def _set_flags(run, flags: list[bool]) -> None:
    for p, flag in zip(run.model.parameters(), flags, strict=True):
        p.requires_grad_(flag)


def _step_seconds(run, batches, global_step: int) -> float:
    """One training step of `run` as its loop takes it, timed from drawing the batch."""
    t0 = time.perf_counter()
    x, y, rand = next(batches)
    train_step(run, x, y, rand)
    optimizer_step(run, global_step)
    synchronize(run.hw.device)
    return time.perf_counter() - t0


# the least a step is taken to cost: a coarse timer reads 0 s, which divided by zero or planned
# without end; a step's forward, backward and update launch dozens of kernels, each microseconds
MIN_STEP_SECONDS = 1e-4


def plan_steps(
    step: float, per_epoch: float, seconds_left: float, steps_per_epoch: int, final: float,
    later: float | None = None, first_steps=None,
) -> int:  # fmt: skip
    """The most training steps whose training, `per_epoch` seconds for every started epoch
    (validation, saving) and the `final` passes fit in `seconds_left`; at least one. A step
    takes `step` seconds, or `later` seconds after the first `first_steps(epochs)` steps of a
    run of that many epochs (by default all steps take `step`)."""
    step, later = max(step, MIN_STEP_SECONDS), max(later or step, MIN_STEP_SECONDS)

    def fit(epochs: int) -> int:  # the most steps of a run `epochs` long that fit, up to its all
        room = seconds_left - final - epochs * per_epoch
        early = epochs * steps_per_epoch if first_steps is None else first_steps(epochs)
        if room <= early * step:
            steps = int(max(0.0, room) // step)
        else:
            steps = early + int((room - early * step) // later)
        return min(epochs * steps_per_epoch, steps)

    # the most whole epochs that fit, by bisection: a week's budget of sub-second epochs is
    # millions of epochs, too many to count one by one; none past `most`, at the fastest pace
    most = int(seconds_left / (steps_per_epoch * min(step, later) + per_epoch)) + 1
    short = bisect.bisect_left(range(most + 1), True, key=lambda e: fit(e) < e * steps_per_epoch)
    best = 0
    for epochs in itertools.count(max(1, short - 2)):  # then a last, partial epoch
        if fit(epochs) <= (epochs - 1) * steps_per_epoch:
            break
        best = fit(epochs)
    return max(1, best)


def early_steps(shape: TrainConfig, steps_per_epoch: int):
    """`first_steps` for `plan_steps`: a run of `shape` made `epochs` long steps at its first
    pace until `settling_epoch`."""

    def first(epochs: int) -> int:
        shaped = with_steps(shape, epochs * steps_per_epoch, steps_per_epoch)
        return settling_epoch(shaped) * steps_per_epoch

    return first


def final_images(c: TrainConfig, n_val: int, n_test: int) -> int:
    """Image-views evaluated after the last epoch: the TTA pass, the temperature fits and the
    test pass (plain and with TTA). The fits pass over the validation split once per weights
    that the last validation did not score: best.pt's, where it is not last.pt's (without EMA),
    and a checkpoint's weights and EMA weights (with EMA; last.pt's are best.pt's as a run with
    a decaying schedule usually ends)."""
    views = TTA_VIEWS[c.tta] if c.tta != "none" else 0
    calibration = (2 if c.ema else 1) * n_val
    return n_val * views + calibration + n_test * (1 + views)


RECHECK = 1 / 8  # of the budget between checks of the pace after the first
OFF = 0.05  # of the budget a projected end may miss by before a later check changes the length


@dataclass
class Plan:
    """A budgeted run's length, corrected to the pace of the first epoch that ends past half
    the budget or half the planned run, whichever comes first, and runs at the pace the rest
    will (`settling_epoch` or later): a machine's pace drifts over a long run, and a probe
    slowed by other work plans a run that would end long before the budget. A run whose last
    epoch starts before that point is corrected within it, on the steps it has taken. After
    that the pace is checked again each `RECHECK` of the budget, and the length changed only
    when the end it projects is more than `OFF` of the budget away: a machine that other work
    slows (or frees) later in the run is followed without re-planning on noise. Each check
    comes `RECHECK` after the one before, wherever that fell: one that comes late (at the end
    of a long epoch) is not followed by checks every few steps, each on a few steps' noise."""

    time_budget: float  # seconds
    started: float  # time.perf_counter() when the run started
    n_test: int
    planned_end: float = math.inf  # seconds after `started` the plan expects the run to end
    checks: int = 0  # corrections considered so far
    val_image: float = 0.0  # the probe's seconds per evaluated image, for a mid-epoch correction
    checked: float = 0.0  # seconds after `started` of the last correction considered

    def due(self, run, done: int) -> bool:
        """Whether to correct after `done` steps in the middle of an epoch: the run ends in
        this epoch, a check is due (`next_check`), at the settled pace, not compiled
        (compilation is not the pace)."""
        c, n = run.config, len(run.batches)
        return (
            not c.compile and done % n >= 3
            and total_steps(c, n) <= done - done % n + n and done // n >= settling_epoch(c)
            and time.perf_counter() - self.started >= self.next_check()
        )  # fmt: skip

    def next_check(self) -> float:
        """Seconds after `started` from which the next correction is considered."""
        if not self.checks:
            return min(self.time_budget, self.planned_end) / 2
        return self.checked + RECHECK * self.time_budget

    def correct(self, run, done: int, step: float, val_image: float, per_epoch: float,
                log) -> TrainConfig | None:  # fmt: skip
        """When a check is due (`next_check`), after `done` steps at `step` seconds each, the
        config whose remaining steps fit the time left (each epoch's end costing `per_epoch`
        seconds, an evaluated image `val_image`); else None (the plan stands within a step, or
        after the first check within `OFF` of the budget, or the run ends)."""
        spent = time.perf_counter() - self.started
        if spent < self.next_check():
            return None
        c, n = run.config, len(run.batches)
        if (done - 1) // n < settling_epoch(c):  # its steps cost other than the rest will
            return None
        first, self.checks, self.checked = self.checks == 0, self.checks + 1, spent
        epoch, into = divmod(done, n)
        total, n_val = total_steps(c, n), len(run.val_labels)
        if total <= done:
            return None
        final = val_image * final_images(c, n_val, self.n_test)
        left = self.time_budget - spent + into * step  # from the start of the current epoch
        new_total = max(done, done - into + plan_steps(step, per_epoch, left, n, final))
        if abs(new_total - total) <= 1 or (
            not first and abs(new_total - total) * step <= OFF * self.time_budget
        ):
            return None
        ran = f"epoch {epoch}" if into == 0 else f"{into} steps of epoch {epoch + 1}"
        log(
            f"time budget: {ran} ran at {step:.3f} s/step; {new_total} steps instead "
            f"of {total} ({new_total / n:.2f} epochs) end the run on time"
        )
        return dataclasses.replace(c, train_steps=new_total, epochs=math.ceil(new_total / n))


def fit_to_budget(run, started: float, log, at_least: float = 0.0, stopped=None) -> Plan | None:
    """Give `run` the `train_steps` that end it within `time_budget` seconds of `started` (a
    `time.perf_counter()` reading), timed on its own first steps; the `Plan` that corrects it.
    None, the run unchanged, when a first step shows that fewer than `at_least` epochs would
    fit even with no evaluation at all, or `stopped()` holds (`measure`)."""
    c, n = run.config, len(run.batches)

    def too_slow(step: float) -> bool:  # one step's pace, with room for its noise
        return step * n * at_least > 1.25 * (c.time_budget - (time.perf_counter() - started))

    timings = measure(
        run, too_slow=too_slow if at_least else None, stopped=stopped, within=c.time_budget / 10
    )
    if timings is None:
        return None
    n_val, n_test = len(run.val_labels), len(run.splits.test or ())
    per_epoch = (n_val + n_test) * timings.val_image  # each epoch scores val and test
    final = timings.val_image * final_images(c, n_val, n_test)
    left = c.time_budget - (time.perf_counter() - started)
    first, later = early_steps(c, n), timings.settled or timings.step
    steps = plan_steps(timings.step, per_epoch, left, n, final, later, first)
    planned = with_steps(c, steps, n)
    early = min(steps, first(planned.epochs))
    expected = early * timings.step + (steps - early) * later
    expected += planned.epochs * per_epoch + final
    if expected > left:  # not even one step fits: a run that ends late is not what was asked
        need = c.time_budget - left + expected
        narrowed = f" at width {model_width(c):g}" if c.width_halvings else ""
        raise UserError(
            f"--time-budget {c.time_budget:g}s is too short for this run here{narrowed}: start-up, "
            f"one step and the final passes take about {need:.0f} s; give --time-budget "
            f"{math.ceil(need * 1.25)}s or more"
        )
    at = settling_epoch(planned) + 1
    settled = f" ({timings.settled:.3f} from epoch {at})" if timings.settled else ""
    log(
        f"time budget {c.time_budget / 60:.1f} min: {timings.step:.3f} s/step{settled}, "
        f"{timings.val_image * 1e3:.2f} ms per evaluated image; {steps} step{'s' * (steps != 1)} "
        f"({steps / n:.2f} epochs) fit, training ends about {expected / 60:.1f} min from now"
    )
    retarget(run, planned)
    return Plan(c.time_budget, started, n_test, c.time_budget - left + expected, 0,
                timings.val_image)  # fmt: skip
