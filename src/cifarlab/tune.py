"""`cifarlab tune`: Optuna search shared by every process pointed at the same `--storage` (by
default `<--out>/study.db`). Trials are pruned on validation accuracy per epoch (median rule);
a killed trial's heartbeat goes stale and it is retried."""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from cifarlab.config import (
    LENGTH_KEYS,
    TrainConfig,
    apply_overrides,
    config_changes,
    read_yaml_mapping,
    recipe_path,
    resolve_base,
    run_settings,
    validate_config,
    with_epochs,
)
from cifarlab.data.sources import check_outside_images
from cifarlab.data.splits import check_sizes, default_split, load_splits
from cifarlab.errors import Interrupted, TrainingFailed, UserError, first_line, import_extra
from cifarlab.rundir import (
    RunDirTaken,
    abandoned,
    check_not_a_run,
    prepare_run_dir,
    removed_if_unstarted,
    replaced_when_complete,
)


@dataclass
class TuneOptions:
    recipe: str  # the recipe searched around (its name goes into best-recipe.yaml)
    base: TrainConfig  # that recipe with the command line applied
    overrides: dict[str, Any]  # what the command line set: best-recipe.yaml keeps it
    trials: int
    storage: str | None  # None: `default_storage(out)`
    out: Path
    study: str = ""
    search_epochs: bool = True  # False: --epochs/--budget fixed the length, every trial runs it


def suggest(trial, base: TrainConfig, search_epochs: bool = True) -> dict[str, Any]:
    wd = (base.weight_decay / 10, base.weight_decay * 3) if base.weight_decay else (1e-5, 1e-3)
    values = {
        "lr": trial.suggest_float("lr", base.lr / 10, base.lr * 3, log=True),
        "weight_decay": trial.suggest_float("weight_decay", *wd, log=True),
        "mixup_alpha": trial.suggest_categorical("mixup_alpha", [0.0, 0.2, 0.5, 1.0]),
        "cutmix_alpha": trial.suggest_categorical("cutmix_alpha", [0.0, 1.0]),
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.2),
    }
    if search_epochs:
        values["epochs"] = trial.suggest_int("epochs", max(1, base.epochs // 2), base.epochs)
    if base.optimizer == "muon":  # `lr` then moves only the head and biases; filters follow this
        values["muon_lr"] = trial.suggest_float(
            "muon_lr", base.muon_lr / 3, base.muon_lr * 3, log=True
        )
    return values


def default_storage(out: Path) -> str:
    """The study's database inside --out, so another --out is another study. SQLAlchemy ends a
    URL's path at `?` and decodes `%XX` in it, so those are escaped (`#` too)."""
    path = str(out / "study.db")
    for char, code in (("%", "%25"), ("?", "%3F"), ("#", "%23")):  # `%` first: the others add it
        path = path.replace(char, code)
    return f"sqlite:///{path}"


def run_tune(opts: TuneOptions, log=print):
    import_extra("optuna", "tune", "tune (Optuna)")
    default = opts.storage is None
    opts = dataclasses.replace(opts, storage=opts.storage or default_storage(opts.out))
    base, created = _checked_base(opts)
    name = opts.study or f"{base.recipe}-{Path(base.data).name}"
    with removed_if_unstarted(opts.out, created):  # a study that cannot open leaves no --out
        study = _open_study(name, opts.storage, opts.out / "study.db" if default else None)
        _same_settings(study, base, opts)
    _fail_stopped_trials(study, log)
    done = [t for t in study.trials if t.state.name in FINISHED]
    counted = _counted(study)
    running = f" ({counted - len(done)} running in another tune)" if counted > len(done) else ""
    log(f"study '{name}' in {opts.storage}: {len(done)} of {opts.trials} trials finished{running}")
    _say_elsewhere(done, opts, log)
    _say_search(base, opts, log)
    upcoming = _trial_dir(opts, len(study.trials))
    if upcoming.exists():  # another study's: refused before a trial
        raise _taken(opts, upcoming)
    if counted < opts.trials:

        def enough(study, _trial) -> None:  # checked as each trial ends, before the next starts
            _fail_stopped_trials(study, log)  # a tune killed meanwhile: its trial counts no more
            if _counted(study) >= opts.trials:
                study.stop()

        study.optimize(partial(_trial, base=base, opts=opts, log=log), callbacks=[enough])
    if not any(t.state.name == "COMPLETE" for t in study.trials):
        raise TrainingFailed(
            f"study '{name}': no trial completed (of {len(study.trials)}: diverged or pruned), so "
            "there is no best recipe; search around a lower --lr or muon_lr, or run more --trials"
        )
    best = study.best_trial
    out = write_best_recipe(opts, base, best, name)
    ran = best.user_attrs.get(RUN_DIR)
    here = _trial_dir(opts, best.number).resolve()
    where = f" (its run in {ran})" if ran and Path(ran) != here else ""
    log(f"best: trial {best.number}{where}, val acc {best.value:.2%}; recipe written to {out}")
    return study


FINISHED = ("COMPLETE", "PRUNED")  # the states of a trial that counts as done
RUN_DIR = "run_dir"  # a trial's user attribute: the folder it trained in
GRACE_SECONDS = 90  # a RUNNING trial without a heartbeat for this long is a stopped tune's


def _fail_stopped_trials(study, log) -> None:
    """Mark failed the trials a killed tune left RUNNING, so that others run in their place:
    those whose heartbeat is older than GRACE_SECONDS (optuna's check, which queues their
    settings again; it runs only as a trial starts), and those that never stored their RUN_DIR,
    killed as optuna made them: optuna keeps a trial that never beat RUNNING for good."""
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    running = {t.number: t for t in study.get_trials(states=(TrialState.RUNNING,))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        fail_stale_trials(study)
    cutoff = datetime.now() - timedelta(seconds=GRACE_SECONDS)
    for t in running.values():
        if RUN_DIR not in t.user_attrs and t.datetime_start < cutoff:
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    failed = [t.number for t in study.get_trials(states=(TrialState.FAIL,)) if t.number in running]
    if failed:
        trials, its = ("trials", "their") if len(failed) > 1 else ("trial", "its")
        log(f"note: {trials} {', '.join(map(str, failed))} left running by a tune that was "
            f"killed: marked failed, others run in {its} place")  # fmt: skip


def _counted(study) -> int:
    """The trials that count toward --trials: finished, or running in a tune that lives (this
    or another process sharing the storage), so that tunes running side by side stop at
    --trials between them. A running trial whose folder holds a lock no process holds was
    left by a killed tune: it does not count (`_fail_stopped_trials` fails it in time and its
    settings run again)."""

    def counts(t) -> bool:
        if t.state.name != "RUNNING":
            return t.state.name in FINISHED
        return RUN_DIR not in t.user_attrs or not abandoned(Path(t.user_attrs[RUN_DIR]))

    return sum(map(counts, study.get_trials(deepcopy=False)))


def _trial_dir(opts: TuneOptions, number: int) -> Path:
    return opts.out / f"trial-{number:03d}"


def _taken(opts: TuneOptions, run_dir: Path) -> UserError:
    return UserError(
        f"--out {opts.out} already holds {run_dir.name}, from another study or --storage; "
        f"pick a new --out for this study, or move {run_dir} away"
    )


def _say_elsewhere(done: list, opts: TuneOptions, log) -> None:
    """A note when finished trials of a shared --storage trained under another --out."""
    away = [t.user_attrs[RUN_DIR] for t in done
            if RUN_DIR in t.user_attrs and Path(t.user_attrs[RUN_DIR]).parent != opts.out.resolve()]  # fmt: skip
    if away:
        folders = sorted({str(Path(p).parent) for p in away})
        log(f"note: {len(away)} of the study's finished trials ran under another --out "
            f"({', '.join(folders[:3])}): their run directories are there; a new --storage "
            "(or none: <--out>/study.db) starts a study of this --out's own")  # fmt: skip


def _checked_base(opts: TuneOptions) -> tuple[TrainConfig, list[Path]]:
    """The config trials search around, checked before anything is stored; the folders made."""
    if opts.base.time_budget:
        raise UserError(
            "tune runs every trial for a number of epochs (searched, or fixed by --epochs/--budget): "
            "give --epochs or --budget instead of a time budget"
        )
    if opts.trials < 1:
        raise UserError("--trials must be >= 1")
    base = validate_config(opts.base, "command line")
    splits = load_splits(base)
    if default_split(base, splits.val_folder) == "test":  # val_size 0, no val/: no selection
        raise UserError(
            f"tune selects trials on validation accuracy: {base.data} has no val/ folder, "
            "so --val-size must be > 0"
        )
    check_sizes(base, splits)
    if base.init_from:  # every trial would be refused
        from cifarlab.training_run import init_from_checkpoint

        init_from_checkpoint(base, splits)
    check_outside_images(opts.out, base.data)  # every trial's folder would be refused there
    check_not_a_run(opts.out, "tune writes its trials and study", f"{opts.out.resolve()}-tune")
    return base, prepare_run_dir(opts.out, need_bytes=0)


def _open_study(name: str, url: str, default: Path | None = None):
    """The study `name` in `url`, made if new; `default`: the file of --out's own study.db."""
    import optuna
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from sqlalchemy.engine import make_url

    # our lines say what its [I ...] lines do, and a failed trial's error is ours to say, once
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            if parsed.database in (None, "", ":memory:"):  # SQLite without a file: in memory
                raise ValueError(
                    "in memory: lost when the command ends; name a file, e.g. sqlite:///study.db"
                )
            db = Path(parsed.database)  # SQLite opens it read-only, then every write fails;
            for path in (db, db.parent):  # its journal goes into the folder
                if path.exists() and not os.access(path, os.W_OK):
                    raise PermissionError(f"{path} is read-only")
        with warnings.catch_warnings():  # the heartbeat's retry callback is marked experimental
            warnings.simplefilter("ignore", ExperimentalWarning)
            retry = RetryHeartbeatStaleTrialCallback(max_retry=2)
            storage = RDBStorage(url, heartbeat_interval=30, grace_period=GRACE_SECONDS,
                                 heartbeat_stale_trial_callback=retry)  # fmt: skip
        study = optuna.create_study(
            study_name=name, storage=storage, direction="maximize", load_if_exists=True,
            pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
        )  # fmt: skip
        study.get_trials(deepcopy=False)  # read once: SQLite finds damage past the header here
    except Exception as exc:  # optuna's, SQLAlchemy's and the driver's errors alike
        while exc.__cause__ is not None:  # optuna's wrapper says only "during the commit"
            exc = exc.__cause__
        why = first_line(exc)
        if isinstance(exc, PermissionError) or "readonly" in why:  # SQLite's "...readonly database"
            what = f"--out: its study database {default}" if default else f"--storage {url}: it"
            raise UserError(
                f"{what} cannot be written ({why}); make it writable, or choose another "
                + ("--out" if default else "--storage")
            ) from None
        if default:  # no --storage was given: the file is --out's, damaged or not a database
            raise UserError(
                f"--out: its study database {default} cannot be opened ({why}); restore it, or "
                "move it away to start a new study"
            ) from None
        raise UserError(
            f"--storage {url}: cannot open the study database ({why})"
            + ("; a file is named as sqlite:///path/study.db" if "://" not in url else "")
        ) from None
    return study


def _say_search(base: TrainConfig, opts: TuneOptions, log) -> None:
    """What is searched and for how long; a note on command-line values it replaces."""
    searched = ["lr", "weight_decay", "mixup_alpha", "cutmix_alpha", "label_smoothing"]
    searched += ["muon_lr"] if base.optimizer == "muon" else []  # as `suggest` searches
    low = max(1, base.epochs // 2)
    length = (
        f"epochs {low}-{base.epochs}"
        if opts.search_epochs and low < base.epochs
        else f"{base.epochs} epoch{'s' if base.epochs > 1 else ''} a trial"
        + ("" if opts.search_epochs else " (fixed by --epochs/--budget)")
    )
    log(f"searching {', '.join(searched)}; {length}")
    replaced = [k for k in searched if k in opts.overrides]
    if replaced:
        log(f"note: {', '.join(replaced)} set on the command line: each trial replaces it "
            "(lr, weight_decay and muon_lr are searched around it)")  # fmt: skip


def _trial(trial, base: TrainConfig, opts: TuneOptions, log) -> float:
    """One trial: its config trained into `trial-NNN`, pruned on validation accuracy per epoch."""
    import optuna

    from cifarlab.train import train

    config = trial_config(base, suggest(trial, base, opts.search_epochs), f"trial {trial.number}")
    validate_config(config, f"trial {trial.number}")
    run_dir = _trial_dir(opts, trial.number)  # a continued study numbers trials anew
    trial.set_user_attr(RUN_DIR, str(run_dir.resolve()))

    def report(row: dict) -> None:
        trial.report(row["val_acc"], int(row["epoch"]))
        if trial.should_prune():
            raise optuna.TrialPruned()

    log(f"trial {trial.number}: " + ", ".join(f"{k}={v:.4g}" for k, v in trial.params.items()))
    try:
        say = lambda s: log(f"  [trial {trial.number}] {s}")  # noqa: E731
        return train(config, run_dir, log=say, on_epoch=report).best_val_acc
    except (Interrupted, SystemExit) as exc:  # SystemExit: SIGTERM before training took it
        # its settings go first when the study continues (train's --resume hint does not); an
        # Interrupted fails the trial (a SystemExit passed optuna by and left it RUNNING)
        trial.study.enqueue_trial(trial.params)
        kept = f" ({run_dir} kept)" if run_dir.exists() else ""
        raise Interrupted(
            f"stopped during trial {trial.number}{kept}; run the same tune command to continue "
            "the study: the stopped trial runs again under a new number",
            getattr(exc, "exit_code", 143),
        ) from None
    except RunDirTaken:  # not resumable: a trial continues under a new number
        raise _taken(opts, run_dir) from None
    except TrainingFailed as exc:  # diverged (an lr too high, say): the study goes on
        log(f"trial {trial.number}: {str(exc).split(';')[0]}; pruned")
        raise optuna.TrialPruned() from None


SETTINGS = "cifarlab_settings"  # the study's user attribute: what every trial searched around
PATHS = ("data", "weights", "init_from")  # compared by name: machines sharing a study mount apart
EPOCHS_SEARCHED = "search_epochs"


def _same_settings(study, base: TrainConfig, opts: TuneOptions) -> None:
    """Store a new study's settings; refuse to continue one with others (`config_changes`),
    unless none of its trials finished or runs: then it takes the new ones."""
    named = dataclasses.replace(base, **{k: Path(getattr(base, k)).name for k in PATHS})
    saved = study.user_attrs.get(SETTINGS)
    held = {"COMPLETE", "PRUNED", "RUNNING"}
    if saved is None or not any(t.state.name in held for t in study.trials):
        study.set_user_attr(SETTINGS, {**run_settings(named), EPOCHS_SEARCHED: opts.search_epochs})
        return
    stored = {k: saved[k] for k in run_settings(named) if k in saved}
    changed = config_changes(
        apply_overrides(named, stored, where=f"study {study.study_name}"), named
    )
    if saved.get(EPOCHS_SEARCHED, opts.search_epochs) != opts.search_epochs:
        changed.append(f"epochs searched (--epochs/--budget fix them): {saved[EPOCHS_SEARCHED]!r} "
                       f"-> {opts.search_epochs!r}")  # fmt: skip
    if changed:
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise UserError(
            f"study '{study.study_name}' in {opts.storage} was started with other settings "
            f"({', '.join(changed[:4])}{more}); run it with those, or name a new --study"
        )


def trial_config(base: TrainConfig, values: dict[str, Any], where: str = "trial") -> TrainConfig:
    """`base` with a trial's `values`; a searched `epochs` reshapes the epoch-based settings as
    `--epochs` does."""
    values = dict(values)
    epochs = values.pop("epochs", base.epochs)
    shaped = base if epochs == base.epochs else with_epochs(base, epochs)
    return apply_overrides(shaped, values, where=where)


def write_best_recipe(opts: TuneOptions, base: TrainConfig, best, study: str) -> Path:
    """`--out/best-recipe.yaml`: the recipe's keys, the command line's (but data and progress),
    the length as trials ran them, then the best trial's values."""
    typed = trial_config(base, best.params).to_dict()
    keys = [k for k in opts.overrides if k not in ("data", "data_root", "progress")]
    source, path = recipe_path(opts.recipe), opts.out / "best-recipe.yaml"
    values = {**read_yaml_mapping(source), **{k: typed[k] for k in [*keys, *LENGTH_KEYS]}}
    values.update(best.params)
    if isinstance(values.get("base"), str):  # the new file lives elsewhere
        values["base"] = resolve_base(source, values["base"])
    values.pop("recipe", None)  # the file's name names it
    header = (
        f"# Best trial of study '{study}' (val acc {best.value:.4f}), from recipe {opts.recipe}\n"
    )
    with replaced_when_complete(path) as tmp:  # a failed write leaves the last one whole
        tmp.write_text(header + yaml.safe_dump(values, sort_keys=False))
    return path
