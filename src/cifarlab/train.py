"""`train(config, run_dir) -> Result`: resolve the config, build the run (`training_run.py`),
restore it when resuming, then each epoch train, validate, log and save; at the end the final
TTA pass, the temperature fits and the selected checkpoint's test accuracy."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cifarlab import phases
from cifarlab.budget import Plan, fit_to_budget
from cifarlab.calibration import ValSet, calibrate_run
from cifarlab.checkpoint import Checkpointer, load_checkpoint
from cifarlab.config import (
    TrainConfig,
    apply_overrides,
    config_changes,
    model_width,
    read_yaml_mapping,
    run_settings,
    save_config,
    validate_config,
)
from cifarlab.data.sources import check_outside_images
from cifarlab.distributed import all_sum, barrier, init_distributed
from cifarlab.errors import (
    ConfigChanged,
    Interrupted,
    TooFewImages,
    TrainingFailed,
    UnreadableFile,
    UserError,
    data_changed,
    handling,
)
from cifarlab.hardware import synchronize
from cifarlab.inference import load_model, predict_logits
from cifarlab.rundir import (
    RunLock,
    append_metrics,
    checkpoint_room,
    claim_run_dir,
    json_text,
    prepare_run_dir,
    read_metrics,
    read_result,
    removed_if_unstarted,
    replaced_when_complete,
    truncate_metrics,
)
from cifarlab.step import optimizer_step, train_step
from cifarlab.tracking import open_trackers
from cifarlab.training_run import (
    TrainingRun,
    apply_freeze,
    build_run,
    checkpoint_state,
    epoch_steps,
    restore,
    retarget,
    total_steps,
)

RESUME_WAY_OUT = "restore the data, or train a new --out"


@dataclass
class Result:
    run_dir: Path
    best_val_acc: float | None  # None without a validation split (val_size 0), as in result.json
    final_val_acc: float | None
    epochs: int
    seconds: float  # wall time of the training epochs, evaluation included
    images_per_s: float  # training throughput of the last epoch
    history: list[dict] = field(default_factory=list)
    tta_val_acc: float | None = None  # final weights with the config's TTA (None: tta none)
    test_acc: float | None = None  # the selected checkpoint on the data's test split
    test_tta_acc: float | None = None
    # without a validation split (val_size 0, the lesson's protocol): the best epoch's test
    # accuracy, chosen on test itself, so optimistic; None with a validation split
    best_test_acc: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            k: v for k, v in dataclasses.asdict(self).items() if k not in ("run_dir", "history")
        }

    @property
    def checkpoint(self) -> Path:
        """The selected weights (`best.pt`), what `load_model` and `evaluate` read by default."""
        return self.run_dir / "best.pt"


@dataclass
class EpochStats:
    """One epoch's running totals; stored in mid-epoch checkpoints ("accumulators")."""

    loss_sum: float = 0.0
    correct: float = 0.0
    seen: int = 0
    seconds: float = 0.0
    nan_skipped: int = 0
    lr: float | None = None  # the schedule's lr when the epoch started (its metrics row)
    first_step: float = 0.0  # seconds the epoch's first step took (warm-up, compilation)


@contextlib.contextmanager
def _stop_signals():
    """SIGINT/SIGTERM set `received` and `exit_code` (130/143): the loop saves, then exits."""
    stop = SimpleNamespace(received=None, exit_code=0)

    def handle(signum, _frame):
        if stop.received is not None:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        stop.received, stop.exit_code = signum, 130 if signum == signal.SIGINT else 143

    with handling(handle, signal.SIGINT, signal.SIGTERM):
        yield stop


def train(
    config: TrainConfig | None, run_dir: Path | str, resume: bool = False, log=print,
    on_epoch=None, changes: dict[str, Any] | None = None, started: float | None = None,
) -> Result:  # fmt: skip
    """Train `config` into `run_dir`. With `resume`, continue exactly from `run_dir/last.pt`:
    `config` (or, when None, the saved config, with config.yaml's runtime keys, and `changes`)
    must be the same run as the saved one (`config.differences`). `on_epoch(row)` is called
    after each epoch's row is saved (tune prunes). A time budget counts from `started` (a
    `time.perf_counter()` reading; default: now)."""
    started = time.perf_counter() if started is None else started
    run_dir, d = Path(run_dir), init_distributed()
    if not d.main:
        log = lambda s: None  # noqa: E731 - only rank 0 talks and writes
    claim_run_dir(run_dir, resume)
    created = prepare_run_dir(run_dir, checkpoint_room(run_dir)) if d.main else []
    barrier(d)
    with contextlib.ExitStack() as held:
        if d.main:  # before the run is read: one another process trains is only "in use"
            held.enter_context(RunLock(run_dir))
        held.enter_context(removed_if_unstarted(run_dir, created))  # a refusal: no empty --out
        config, ckpt = _resolve(config, run_dir, resume, changes or {}, log)
        config = validate_config(config, "config", d.world)
        finished = ckpt is not None and ckpt["next_step"] == 0 and ckpt["epoch"] >= config.epochs
        saved = read_result(run_dir) if finished else None  # a damaged one: the end runs again
        if saved is not None:
            return _finished_result(run_dir, ckpt, saved, log)
        spent = time.perf_counter() - started
        if config.time_budget and ckpt is None and spent >= config.time_budget:
            raise UserError(  # before any data loads: nothing at all fits
                f"--time-budget {config.time_budget:g}s was spent before training could start "
                f"({spent:.1f} s of start-up); give a budget of minutes, e.g. 15m"
            )
        check_outside_images(run_dir, config.data)
        stop = held.enter_context(_stop_signals())
        tracker = held.enter_context(open_trackers(config, run_dir, d.main))
        run, plan = _build(config, log, d, run_dir if ckpt else None), None
        if config.time_budget and ckpt is None:  # choose the length
            with phases.phase("budget probe"):
                run, plan = _fit_to_budget(run, config, started, log, stop)
        if stop.received is not None:  # Ctrl-C while the data loaded or the budget's probe ran
            raise Interrupted(
                f"stopped before training {'resumed' if ckpt else 'started'}; nothing was saved",
                stop.exit_code,
            )
        saver = Checkpointer(run_dir, enabled=d.main)
        epoch, step, stats = _start(run, ckpt, saver, log)
        history = read_metrics(run_dir / "metrics.csv") if d.main else []
        tracker.start(run.config, history)  # resolved: input size, precision, length
        while epoch < run.config.epochs:  # a time budget's correction may change the count
            t_epoch = time.perf_counter()
            stats = train_one_epoch(run, epoch, step, stats, stop, saver, log, plan)
            row = _end_epoch(run, epoch, stats, saver, log)
            if plan is not None:
                ended = (row["seconds"], time.perf_counter() - t_epoch)
                steps = epoch_steps(run.config, len(run.batches), epoch)
                _correct_plan(run, plan, epoch, steps, stats, saver, log, ended)
            history.append(row)
            tracker.log_epoch(row)
            step, stats, epoch = 0, EpochStats(), epoch + 1
            if on_epoch is not None:
                on_epoch(row)
            _stop_if_asked(stop, saver, f"after epoch {epoch}")  # one that came while it validated
        result = _finish(run, history, saver, log, stop)
        tracker.finish(result)
        barrier(d)
    return result


def _build(config: TrainConfig, log, d, resumed: Path | None) -> TrainingRun:
    """`build_run`; too few images for a resumed run's own config, or an unreadable file (which
    it may not skip now), mean that its data changed."""
    try:
        return build_run(config, log, d)
    except TooFewImages as exc:
        if resumed is None:
            raise
        raise data_changed(
            f"--resume {resumed}", f"{config.data}: {exc.detail}", RESUME_WAY_OUT
        ) from None
    except UnreadableFile as exc:
        if resumed is None:
            raise
        way_out = "restore that file (or remove one the data did not hold), or train a new --out"
        raise data_changed(f"--resume {resumed}", exc.detail, way_out) from None


def _fit_to_budget(
    run, config: TrainConfig, started: float, log, stop
) -> tuple[TrainingRun, Plan | None]:
    """`fit_to_budget`; with `fit_width`, while under half of `config.epochs` fit, rebuilt at half
    the width (at most twice) on the same splits: a narrower net that runs nearly all of its
    schedule beats a wider one cut short (docs/benchmarks.md, `fast-cpu`). Not when timing the
    narrower net would take over half the time left, nor for a config already planned; refused
    when nothing fits and the time left is shorter than the last timing took."""
    while True:
        halvings = run.config.width_halvings
        narrower = config.fit_width and not config.train_steps and halvings < 2
        t = time.perf_counter()
        at_least = config.epochs / 2 if narrower else 0.0
        plan = fit_to_budget(run, started, log, at_least, lambda: stop.received is not None)
        fitted = run.config.train_steps / len(run.batches)
        if stop.received is not None or (plan and (not narrower or 2 * fitted >= config.epochs)):
            return run, plan
        fit = f"{fitted:.2f} of" if plan is not None else "under half of"
        width, now = model_width(run.config), time.perf_counter()
        probe, left = now - t, config.time_budget - (now - started)
        if plan is None and probe > left:  # nothing fits here, and the time left cannot tell
            raise UserError(
                f"--time-budget {config.time_budget:g}s is too short for this run here: under half "
                f"of its {config.epochs} epochs fit at width {width:g}, and the {max(0, left):.0f} s "
                f"left cannot time a narrower one (timing this one took {probe:.0f} s); give "
                f"--time-budget {math.ceil(4 * (now - started))}s or more"
            )
        if plan is not None and 2 * probe > left:
            log(
                f"time budget: {fit} {config.epochs} epochs fit at width {width:g}; kept, as "
                f"timing a narrower one ({probe:.0f} s) would take over half of the {left:.0f} s left"
            )
            return run, plan
        log(
            f"time budget: {fit} {config.epochs} epochs fit at width {width:g}; trying {width / 2:g}"
        )
        narrow = dataclasses.replace(config, width_halvings=halvings + 1)
        run = build_run(narrow, lambda s: None, run.dist, splits=run.splits)


def _correct_plan(
    run, plan, epoch: int, steps: int, stats: EpochStats, saver, log,
    ended: tuple[float, float] | None = None, pace: float | None = None,
) -> None:  # fmt: skip
    """`Plan.correct` after `steps` steps of `epoch`: at its end, `ended` = (seconds when its
    evaluation ended, when it was saved) after it started, or within the run's last epoch at
    `pace` seconds a step (the probe's evaluation cost). A changed length goes to the run,
    last.pt and config.yaml.
    Beside a last.pt the old config.yaml is removed first: a crash before the new one is written
    leaves none, which `--resume` reads as last.pt's config, not a stale one it would take for
    an edit. Before the first last.pt (a correction within epoch 1) config.yaml is all the run
    has: the new one replaces it first, so that a crash while last.pt is written leaves a run
    `--resume` starts over, not a folder holding no run."""
    if steps < 3 or run.config.compile:  # too few steps to time; compilation is not the pace
        return
    if pace is None:
        pace = (stats.seconds - stats.first_step) / (steps - 1)  # the first step warms up
    scored = len(run.val_labels) + plan.n_test  # each epoch scores validation and test
    val_image, per_epoch = plan.val_image, plan.val_image * scored
    if ended is not None:
        per_epoch = ended[1] - stats.seconds
        val_image = max(0.0, ended[0] - stats.seconds) / scored if scored else 0.0  # rounded
    done = epoch * len(run.batches) + steps
    corrected = plan.correct(run, done, pace, val_image, per_epoch, log)
    if corrected is None:
        return
    retarget(run, corrected)
    first, written = not saver.last.exists(), saver.run_dir / "config.yaml"
    if run.dist.main and first:
        save_config(run.config, written)
    elif run.dist.main:
        written.unlink(missing_ok=True)
    at = (epoch + 1, 0, None) if ended is not None else (epoch, steps, dataclasses.asdict(stats))
    saver.save(checkpoint_state(run, *at), end_of_epoch=False)
    if run.dist.main and not first:
        save_config(run.config, written)


def _resolve(config, run_dir: Path, resume: bool, changes: dict, log):
    """The config this call trains, and the checkpoint it continues (or None); see `train`.
    Before the first checkpoint a resumed run starts over."""
    if not resume:
        return config, None
    saved, ckpt = saved_config(run_dir)
    if saved is None:
        return _nothing_to_resume(config, run_dir, log), None
    if ckpt is None:
        _refuse_over_results(run_dir)
    edited = _edited_config(run_dir, saved) if ckpt else saved
    wanted = config if config is not None else apply_overrides(edited, changes, where="--resume")
    differ = ", ".join(config_changes(saved, wanted)[:6])
    if differ:
        raise ConfigChanged(
            f"--resume {run_dir}: a run continues with the config it started with, and this asks "
            f"to change {differ}; drop those flags, or train a new --out"
            + (f" (--init-from {run_dir})" if ckpt else "")
        )
    if ckpt is None:
        log(f"resume: {run_dir} has no last.pt yet; starting it over with its config")
        return wanted, None
    return dataclasses.replace(wanted, **run_settings(saved)), ckpt


def saved_config(run_dir: Path) -> tuple[TrainConfig | None, dict | None]:
    """(config, last.pt) of the run in `run_dir`: last.pt's own, or before its first checkpoint
    config.yaml's and None; (None, None) where it has neither."""
    last, started = run_dir / "last.pt", run_dir / "config.yaml"
    if last.is_file():
        ckpt = load_checkpoint(last)
        return apply_overrides(TrainConfig(), ckpt["config"], where=f"{last} config"), ckpt
    if started.is_file():
        return apply_overrides(TrainConfig(), read_yaml_mapping(started), where=str(started)), None
    return None, None


def _edited_config(run_dir: Path, saved: TrainConfig) -> TrainConfig:
    """`run_dir/config.yaml`'s config (`saved`, last.pt's, when it was deleted): a user may edit
    it as --resume's flags may change the run, in runtime keys only."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return saved
    edited = apply_overrides(TrainConfig(), read_yaml_mapping(path), where=str(path))
    differ = ", ".join(config_changes(saved, edited)[:6])
    if differ:
        raise ConfigChanged(
            f"--resume {run_dir}: config.yaml was edited ({differ}), but a run continues with the "
            f"config it started with; restore config.yaml, or train a new --out (--init-from {run_dir})"
        )
    return edited


def _nothing_to_resume(config, run_dir: Path, log) -> TrainConfig:
    """--resume into a folder without a run: a given config starts there, if it holds no files."""
    if config is None:
        raise UserError(f"--resume: {run_dir} holds no run to continue; drop --resume to start one")
    if run_dir.is_dir() and any(not p.name.startswith(".") for p in run_dir.iterdir()):
        raise UserError(
            f"--resume: {run_dir} holds no run to continue, only other files; pick an empty --out"
        )
    log(f"resume: {run_dir} has no last.pt yet; starting from the beginning")
    return config


def _refuse_over_results(run_dir: Path) -> None:
    """last.pt removed from a run that trained: starting over would replace what it left."""
    kept = [n for n in ("result.json", "best.pt") if (run_dir / n).is_file()]
    if kept:
        raise UserError(
            f"--resume: {run_dir} has {' and '.join(kept)} but no last.pt "
            f"({'a finished run' if kept[0] == 'result.json' else 'it was removed'}): it cannot be "
            "continued, and starting over would replace them; train a new --out to train it again"
        )


def _finished_result(run_dir: Path, ckpt: dict, saved: dict, log) -> Result:
    """A finished run resumed: nothing to train; its own figures, read back from its files."""
    n = ckpt["epoch"]
    log(
        f"resume: {run_dir} already finished {'all ' * (n != 1)}{n} epoch{'s' * (n != 1)}; nothing to train"
    )
    known = {k: v for k, v in saved.items() if k in Result.__dataclass_fields__}
    return Result(run_dir=run_dir, history=read_metrics(run_dir / "metrics.csv"), **known)


def _start(run: TrainingRun, ckpt: dict | None, saver: Checkpointer, log):
    """(epoch, step, stats) to start from: zero, or the checkpoint's position after restoring
    it; the run's config and metrics files brought to that point."""
    first, step, stats = 0, 0, EpochStats()
    if ckpt is not None:
        _restore_checked(run, ckpt, saver)
        log(f"resume: from epoch {ckpt['epoch'] + 1} step {ckpt['next_step']} of {saver.last}")
        first, step = ckpt["epoch"], ckpt["next_step"]
        known = EpochStats.__dataclass_fields__
        stats = EpochStats(**{k: v for k, v in ckpt["accumulators"].items() if k in known})
    if run.dist.main:
        save_config(run.config, saver.run_dir / "config.yaml")
        if lost := truncate_metrics(saver.run_dir / "metrics.csv", first):
            shown = ", ".join(map(str, lost[:5])) + (" ..." if len(lost) > 5 else "")
            log(
                f"warning: metrics.csv lacks epoch(s) {shown} of the {first} trained so far: the "
                "curves and the run's total time leave them out"
            )
        if run.splits.skipped:  # on_bad_image: skip
            with replaced_when_complete(saver.run_dir / "skipped_images.txt") as tmp:
                tmp.write_text("\n".join(run.splits.skipped) + "\n")
    c = run.config
    params = sum(p.numel() for p in run.model.parameters())
    log(f"model: {c.model} ({params / 1e6:.2f}M params) on {run.hw.describe()}, recipe {c.recipe}")
    return first, step, stats


def _restore_checked(run: TrainingRun, ckpt: dict, saver: Checkpointer) -> None:
    """The checkpoint into `run`, refused when the data changed or it does not fit."""
    for key, detail in (
        ("data_fingerprint", "images, labels or classes differ, so would its split"),
        ("test_fingerprint", "its test split differs: its epochs would be scored on two test sets"),
    ):
        theirs = ckpt.get(key)  # None: a checkpoint from before the key; "": no test split then
        if theirs and theirs != getattr(run, key):
            raise data_changed(f"--resume {saver.run_dir}", detail, RESUME_WAY_OUT)
    try:
        restore(run, ckpt)
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise UserError(
            f"--resume {saver.last}: the checkpoint does not fit this run ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:120]}); it is damaged or from another version: train a new --out"
        ) from None
    saver.best = ckpt["best_val_acc"]


class _Pace:
    """When steps ended, for a time budget's check within an epoch: marked where the loss is
    read (each step on the CPU, each `check_every` on CUDA), so that a mark is when the device
    finished that step, not how far ahead the host has queued steps."""

    def __init__(self):
        self.marks, self.fresh = [], True  # fresh: from the epoch's start

    def mark(self, step: int) -> None:  # after step `step`, counted from 1
        self.marks.append((step, time.perf_counter()))

    def ready(self) -> bool:  # two steps timed at least, the epoch's warm-up half left out
        return len(self.marks) >= (5 if self.fresh else 3)

    def seconds(self) -> float:
        """Per step since the last check, or over the later half of the epoch's steps so far
        while fresh (its first ones still warm up)."""
        (s0, t0), (s1, t1) = self.marks[len(self.marks) // 2 if self.fresh else 0], self.marks[-1]
        return (t1 - t0) / (s1 - s0)

    def restart(self, step: int) -> None:  # after a check: its checkpoint is no step's cost
        self.marks, self.fresh = [], False
        self.mark(step)


def _progress_bar(c: TrainConfig, epoch: int, start_step: int, last_step: int) -> tqdm:
    return tqdm(
        total=last_step, initial=start_step, desc=f"epoch {epoch + 1}/{c.epochs}",
        disable=True if not c.progress else None, leave=False, unit="step", mininterval=1,
        file=sys.stderr,
    )  # fmt: skip


def train_one_epoch(
    run, epoch: int, start_step: int, stats: EpochStats, stop, saver, log, plan=None
) -> EpochStats:
    c, n = run.config, len(run.batches)
    last_step = epoch_steps(c, n, epoch)  # a step-limited run ends mid-epoch
    run.model.train()
    apply_freeze(run, epoch, log)
    if stats.lr is None:  # the schedule's lr, whatever the first group's multiplier
        group = run.optimizer.param_groups[0]
        stats.lr = group["lr"] / group["lr_mult"]
    # how often the loss is checked: each check waits for the device (a cost on CUDA)
    check_every = 1 if run.hw.device.type == "cpu" or c.on_nan == "skip" else 50
    bar = _progress_bar(c, epoch, start_step, last_step)
    t0, cpu0 = time.perf_counter() - stats.seconds, time.process_time()
    loss_sum = torch.tensor(stats.loss_sum, device=run.hw.device)
    correct = torch.tensor(stats.correct, device=run.hw.device)
    eta = _Eta(run, epoch, start_step, log)
    batches = run.batches.epoch(epoch, start_step)
    pace = _Pace()
    for step in itertools.count(start_step):
        if step >= last_step:  # a time budget's correction may move it
            break
        x, y, rand = next(batches)
        loss, logits = train_step(run, x, y, rand)
        checked = (step + 1) % check_every == 0 or step == last_step - 1
        why = _diverging(run, loss) if checked else ""
        if why:
            _non_finite(run, stats, f"{why} at epoch {epoch + 1} step {step + 1}", saver)
            continue
        optimizer_step(run, epoch * n + step + 1)
        if step == start_step == 0:
            stats.first_step = time.perf_counter() - t0
            if epoch == 0:
                phases.record("first step", stats.first_step, time.process_time() - cpu0)
                phases.mark("first step done")
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        stats.seen += len(y)
        bar.update(1)
        eta.tick(step + 1)
        if c.progress and (step % 10 == 0 or step == last_step - 1):
            bar.set_postfix(
                loss=f"{loss_sum.item() / stats.seen:.3f}", acc=f"{correct.item() / stats.seen:.1%}"
            )
        save_now = (
            c.save_every_steps and (step + 1) % c.save_every_steps == 0 and step + 1 < last_step
        )
        if stop.received is not None or save_now:
            _sync(stats, loss_sum, correct, t0)
            _save_mid_epoch(run, epoch, step + 1, stats, saver, stop, bar)
        if plan is not None and checked:
            pace.mark(step + 1)
        if plan is not None and pace.ready() and plan.due(run, epoch * n + step + 1):
            _sync(stats, loss_sum, correct, t0)
            _correct_plan(run, plan, epoch, step + 1, stats, saver, log, pace=pace.seconds())
            pace.restart(step + 1)
            last_step = epoch_steps(run.config, n, epoch)
            bar.total = last_step
            bar.set_description(f"epoch {epoch + 1}/{run.config.epochs}")
    bar.close()
    if epoch == run.config.epochs - 1:
        phases.mark("last step done")
    _sync(stats, loss_sum, correct, t0)
    stats.loss_sum, stats.correct, stats.seen = all_sum(
        [stats.loss_sum, stats.correct, stats.seen], run.dist, run.hw.device
    )  # every rank's share of the epoch
    return stats


# A batch loss this many times a uniform guess's (ln classes: 115 for 10 classes) is no early
# spike: ResNet-18 at lr 0.1 with no warm-up peaks near 6x in its first steps, and tiny runs of
# a few classes near 25x, and both learn.
EXPLODED = 50


def _diverging(run: TrainingRun, loss: torch.Tensor) -> str:
    """Why training diverges at this batch ("" when it does not): a non-finite loss or one past
    EXPLODED times a uniform guess's, on any rank (so that every rank skips or stops together)."""
    value, limit = loss.item(), EXPLODED * math.log(max(2, len(run.splits.classes)))
    why = ""
    if not math.isfinite(value):
        why = "non-finite loss"
    elif value > limit:
        why = f"loss {value:.4g} (over {limit:.0f}, {EXPLODED}x a uniform guess's)"
    if all_sum([float(bool(why))], run.dist, run.hw.device)[0] > 0:
        return why or "a diverging loss on another rank"
    return ""


def _non_finite(run: TrainingRun, stats: EpochStats, where: str, saver) -> None:
    """A diverging batch: stop (`on_nan: stop`), or skip it, the schedule moving on."""
    if run.config.on_nan != "skip":
        advice = "lower --lr or add a warm-up, or --set on_nan=skip to skip such batches"
        raise _diverged(where, saver, advice)
    stats.nan_skipped += 1
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()


def _diverged(why: str, saver, advice: str) -> TrainingFailed:
    """The stop of a diverging run: why, what it kept, what to change."""
    kept = f"the last good checkpoint is {saver.last}"
    if not saver.last.exists():
        kept = "no checkpoint saved yet"
    return TrainingFailed(f"diverged: {why}; {kept} ({advice})")


def _stop_if_asked(stop, saver, when: str) -> None:
    """Exit 130/143 on a stop signal that came after `last.pt` was saved; --resume goes on."""
    if stop.received is not None:
        raise Interrupted(
            f"stopped {when}; saved {saver.last}. "
            f"Resume with: cifarlab train --out {saver.run_dir} --resume",
            stop.exit_code,
        )


def _save_mid_epoch(run, epoch: int, next_step: int, stats: EpochStats, saver, stop, bar) -> None:
    """`last.pt` mid-epoch (every `save_every_steps`, or on a stop signal, then exit 130/143)."""
    saver.save(
        checkpoint_state(run, epoch, next_step, dataclasses.asdict(stats)), end_of_epoch=False
    )
    if stop.received is not None:
        bar.close()
        _stop_if_asked(stop, saver, f"at epoch {epoch + 1} step {next_step}")


def _sync(stats: EpochStats, loss_sum, correct, t0: float) -> None:
    stats.loss_sum, stats.correct = loss_sum.item(), correct.item()
    stats.seconds = time.perf_counter() - t0


class _Eta:
    """Once a run's first steps are timed, say how long it should take; a backbone frozen for
    the first epochs has cheaper steps, so each stage is estimated from its own first steps."""

    AFTER = 10  # steps timed before the estimate, after the first

    def __init__(self, run: TrainingRun, epoch: int, start_step: int, log):
        self.run, self.log, c = run, log, run.config
        starts = [0]
        if c.freeze == "backbone" and 0 < c.freeze_epochs < c.epochs:
            starts.append(c.freeze_epochs)
        # from a stage's first step; a time budget has said its own estimate
        self.done = epoch not in starts or start_step != 0 or c.time_budget > 0
        self.first, self.end = epoch, next((e for e in starts if e > epoch), c.epochs)
        self.t0 = time.perf_counter()

    def tick(self, step: int) -> None:  # after step `step`, counted from 1
        timed = step - 1  # the first step warms up: allocations, cuDNN's autotuning
        if self.done or 0 < timed < self.AFTER:
            return
        synchronize(self.run.hw.device)
        if timed == 0:  # the warm-up step can cost hundreds of steps' time on a GPU: left out
            self.t0 = time.perf_counter()
            return
        self.done = True
        per_step = (time.perf_counter() - self.t0) / timed
        n, c, epochs = len(self.run.batches), self.run.config, self.end - self.first
        # validation reads each image once, without a backward pass: about a third of a train step's cost
        scored = len(self.run.val_labels) + len(self.run.splits.test or ())
        val_steps = scored / max(1, c.batch_size) / 3
        steps = min(total_steps(c, n), self.end * n) - self.first * n
        total = per_step * (steps + val_steps * epochs)
        took = f"{total / 60:.0f} min" if total >= 120 else f"{total:.0f} s"
        what = f"{epochs} epoch{'s' * (epochs != 1)}"
        if epochs != c.epochs:  # a staged run: its frozen epochs, or the fine-tune ones
            stage = "the backbone frozen" if self.first == 0 else "all layers training"
            what += f" of {c.epochs}, {stage}"
        self.log(f"expected: about {took} for {what} ({per_step:.2f} s/step, {n} steps per epoch)")


def validate(run: TrainingRun, tta: str = "none", split: str = "val") -> tuple:
    """(loss, accuracy) of the evaluated weights on the val (or test) split; (None, None) without."""
    images, labels = (
        (run.val_images, run.val_labels) if split == "val" else (run.test_images, run.test_labels)
    )
    if labels is None or len(labels) == 0:
        return None, None
    plain = run.val_logits if split == "val" and tta != "none" else None
    logits = predict_logits(
        run.eval_model, images, run.normalize, run.config.eval_batch_size, tta, run.hw, plain
    )
    if split == "val" and tta == "none":
        run.val_logits = logits
    loss = F.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(1) == labels).float().mean().item()


def _nan_or(value: float | None) -> float:
    return float("nan") if value is None else round(value, 5)


def _end_epoch(run: TrainingRun, epoch: int, stats: EpochStats, saver: Checkpointer, log) -> dict:
    """Validate, append the metrics row, save last.pt (and best.pt when it improved), log a line."""
    c = run.config
    t_val = time.perf_counter()
    with phases.phase("validation (each epoch)"):
        val_loss, val_acc = validate(run)
        test_loss, test_acc = validate(run, split="test")  # the lesson's record; never selects
    if val_loss is not None and not math.isfinite(val_loss):  # before it reaches a checkpoint
        why = f"the validation loss after epoch {epoch + 1} is {val_loss} (outputs not finite)"
        raise _diverged(why, saver, "lower --lr or add a warm-up")
    seconds = stats.seconds + time.perf_counter() - t_val
    seen = max(stats.seen, 1)
    row = {
        "epoch": epoch + 1, "lr": round(stats.lr, 8), "train_loss": round(stats.loss_sum / seen, 5),
        "train_acc": round(stats.correct / seen, 5),
        "val_loss": _nan_or(val_loss), "val_acc": _nan_or(val_acc),
        "seconds": round(seconds, 2), "images_per_s": round(stats.seen / max(stats.seconds, 1e-9), 1),
        "test_loss": _nan_or(test_loss), "test_acc": _nan_or(test_acc),
    }  # fmt: skip
    if run.dist.main:
        append_metrics(saver.run_dir / "metrics.csv", row)
    with phases.phase("checkpoint writes (each epoch)"):
        improved = saver.save(checkpoint_state(run, epoch + 1), val_acc)
    star = " *" if improved else ""
    val = "no validation" if val_acc is None else f"val loss {val_loss:.3f} acc {val_acc:.1%}{star}"
    if test_acc is not None:
        val += f"  test loss {test_loss:.3f} acc {test_acc:.1%}"
    skipped = f"  ({stats.nan_skipped} diverging batches skipped)" if stats.nan_skipped else ""
    log(
        f"epoch {epoch + 1}/{c.epochs}  lr {stats.lr:.4g}  train loss {row['train_loss']:.3f} "
        f"acc {row['train_acc']:.1%}  {val}  {seconds:.0f}s  {row['images_per_s']:.0f} img/s{skipped}"
    )
    return row


def _finish(run: TrainingRun, history: list[dict], saver: Checkpointer, log, stop) -> Result:
    """The final TTA pass (as airbench: once, on the final weights), a temperature fitted on the
    validation split into the checkpoints, the selected checkpoint's test accuracy when the data
    has a test split, and `result.json`. A stop signal between them exits without result.json:
    --resume does the end again."""
    ending = "while the run ended (TTA, temperature, test pass)"
    c, run_dir = run.config, saver.run_dir
    seconds = sum(r["seconds"] for r in history)
    tta_acc = None
    if c.tta != "none" and len(run.val_labels):
        t = time.perf_counter()
        with phases.phase("final TTA pass"):
            tta_acc = validate(run, c.tta)[1]
        seconds += time.perf_counter() - t
        log(f"final val acc with {c.tta} TTA: {tta_acc:.2%}")
    _stop_if_asked(stop, saver, ending)
    if not len(run.val_labels):
        log(
            "no validation split (val_size 0): no model selection, best.pt is the last epoch's weights"
        )
    elif run.dist.main:  # probabilities a user can trust (see calibration.py)
        # the latest validation's logits, when they are those of `run.model` (with EMA: the EMA's)
        mine = run.ema is None and run.val_logits is not None
        known = (run.model.state_dict(), run.val_logits) if mine else None
        val = ValSet(run.val_images, run.val_labels, run.hw, c.eval_batch_size, known)
        with phases.phase("temperature fits"):
            calibrate_run(run_dir, log=log, device=str(run.hw.device), val=val)
    _stop_if_asked(stop, saver, ending)
    with phases.phase("test pass"):
        test_acc, test_tta = _test_accuracy(run, run_dir / "best.pt", log)
    _stop_if_asked(stop, saver, ending)
    finals = [r["val_acc"] for r in history if not math.isnan(r["val_acc"])]
    result = Result(
        run_dir, saver.best if finals else None, finals[-1] if finals else None,
        c.epochs, round(seconds, 2), history[-1]["images_per_s"] if history else 0.0, history, tta_acc, test_acc, test_tta,
        None if finals else _best_test(history, log),
    )  # fmt: skip
    if run.dist.main:
        with replaced_when_complete(run_dir / "result.json") as tmp:
            tmp.write_text(json_text(result.to_dict()) + "\n")
    return result


def _best_test(history: list[dict], log) -> float | None:
    """Without a validation split, the epoch best on test (as the lesson keeps; optimistic)."""
    scored = [r for r in history if not math.isnan(r.get("test_acc", float("nan")))]
    if not scored:
        return None
    top = max(scored, key=lambda r: r["test_acc"])
    log(
        f"best test acc over epochs (chosen on test: optimistic): {top['test_acc']:.2%} "
        f"at epoch {int(top['epoch'])}; final test acc: {scored[-1]['test_acc']:.2%}"
    )
    return top["test_acc"]


def _test_accuracy(run: TrainingRun, best: Path, log) -> tuple[float | None, float | None]:
    """The selected checkpoint (`best.pt`, rebuilt by the one constructor) on the test split."""
    images, labels = run.test_images, run.test_labels
    if labels is None or not run.dist.main or not best.is_file():
        return None, None
    loaded = load_model(load_checkpoint(best), run.hw.device, use_ema=run.ema is not None)
    accs = []
    for tta in ["none"] + ([run.config.tta] if run.config.tta != "none" else []):
        logits = predict_logits(
            loaded.model, images, loaded.normalize, run.config.eval_batch_size, tta, run.hw
        )
        accs.append((logits.argmax(1) == labels).float().mean().item())
    with_tta = f" ({accs[1]:.2%} with {run.config.tta} TTA)" if len(accs) > 1 else ""
    log(f"test acc of {best.name}: {accs[0]:.2%}{with_tta} on {len(labels)} images")
    return accs[0], accs[1] if len(accs) > 1 else None
