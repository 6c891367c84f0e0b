"""Experiment suites (suites/*.yaml): runs trained one after another, resumable, summarised as
a table, a plot and an index page. Each run is a `recipe`, `set` overrides and a one-line
`changes` (with `cumulative: true`, on top of the run before); gains are over the `reference`.
A config key in braces in `changes` (`{epochs} epochs`) reads the run's value as it trains.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from cifarlab.config import (
    FIELDS,
    TrainConfig,
    apply_overrides,
    config_changes,
    data_root,
    load_recipe,
    named_yaml,
    read_yaml_mapping,
    resolve_base,
    validate_config,
    with_length,
)
from cifarlab.errors import Interrupted, TrainingFailed, UserError
from cifarlab.report import REPORT_FILES
from cifarlab.rundir import (
    RUN_FILES,
    RunDirTaken,
    RunLock,
    check_not_a_run,
    check_out,
    claim_run_dir,
    is_number,
    prepare_run_dir,
    read_metrics,
    read_result,
    replaced_when_complete,
)

SUITE_DIR = Path(__file__).parent / "suites"
_RUN_KEYS = {"name", "recipe", "changes", "set", "requires"}
_SUITE_TYPES = {
    "description": (str, "a string"),
    "reference": (str, "a run's name"),
    "cumulative": (bool, "true or false (unquoted)"),
    "examples": (str, "a string (mixup)"),
}
_RUN_TYPES = {k: (str, "a string") for k in ("recipe", "changes", "requires")}
MAX_NAME = 100  # a run's folder, with its -seed<N>, stays far below a file system's 255
DIVERGED = "diverged.txt"  # in a run's folder: training stopped on a non-finite or exploding loss


@dataclass
class SuiteRun:
    name: str
    config: TrainConfig
    changes: str
    requires: str
    # its name in the suite file (a run named after its recipe takes --recipe's name): a folder
    # trained under that name is found and moved (`_adopt_renamed`)
    was: str

    def __post_init__(self):  # "{epochs} epochs": the length --epochs/--budget left, not the file's
        self.changes = re.sub(r"\{(\w+)\}", self._value, self.changes)

    def _value(self, key: re.Match) -> str:
        value = getattr(self.config, key[1]) if key[1] in FIELDS else key[0]
        return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class Suite:
    name: str
    description: str
    reference: str
    runs: list[SuiteRun]
    examples: str = ""


@dataclass
class SuiteOptions:
    out: Path
    seeds: list[int] = field(default_factory=lambda: [0])
    only: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # for every run (data, --set, ...)
    epochs: int | None = None  # every run this long, its epoch-based settings in proportion
    budget: float | None = None  # every run at this fraction of its own epochs, likewise
    recipe: str | None = None  # every run starts from this recipe instead of its own


def list_suites() -> dict[str, str]:
    return {
        p.stem: read_yaml_mapping(p).get("description", "")
        for p in sorted(SUITE_DIR.glob("*.yaml"))
    }


def load_suite(
    name: str,
    base: dict[str, Any],
    epochs: int | None = None,
    budget: float | None = None,
    recipe_for_all: str | None = None,
) -> Suite:
    """Parse a suite and check every run's config before anything trains. `recipe_for_all`
    replaces every run's recipe (its `set` on top); `base`'s `weights` goes to pretrained runs only."""
    base = dict(base)
    weights = base.pop("weights", "")
    path = named_yaml(name, SUITE_DIR, "suite", list_suites)
    spec = read_yaml_mapping(path)
    unknown = set(spec) - {"runs", *_SUITE_TYPES}
    if unknown:
        raise UserError(
            f"{path}: unknown suite keys {sorted(unknown)}; valid: runs, {', '.join(_SUITE_TYPES)}"
        )
    spec = _typed(spec, _SUITE_TYPES, str(path))
    runs_spec = spec.get("runs")
    if not (
        isinstance(runs_spec, list) and runs_spec and all(isinstance(r, dict) for r in runs_spec)
    ):
        raise UserError(
            f"{path}: 'runs' must be a non-empty list of mappings (name, recipe, changes, set)"
        )
    runs, recipe, carried = [], None, {}
    for i, r in enumerate(runs_spec):
        where = f"{path} run {i + 1}"
        if not set(r) <= _RUN_KEYS or "name" not in r:
            raise UserError(f"{where}: needs 'name' and only {sorted(_RUN_KEYS)}; got {sorted(r)}")
        name = _run_name(r["name"], where)
        r = _typed(r, _RUN_TYPES, where)
        sets = r.get("set") or {}
        if not isinstance(sets, dict):
            raise UserError(f"{where}: 'set' must be a mapping of config keys")
        if "seed" in {**base, **sets}:  # each run's seed is one of --seeds: this one was dropped
            raise UserError(
                f"{where}: a suite's seeds come from --seeds (e.g. --seeds 0,1,2), not a 'seed' "
                "in 'set' or --set"
            )
        if spec.get("cumulative"):
            recipe = r.get("recipe", recipe)
            carried = {**carried, **sets}
        else:
            recipe, carried = r.get("recipe"), dict(sets)
        if not recipe:
            raise UserError(f"{where}: no 'recipe' given")
        start = _recipe(recipe_for_all or recipe, where, None if recipe_for_all else path)
        renamed = _run_name(start.recipe, "--recipe") if recipe_for_all and name == recipe else name
        config = with_length(apply_overrides(start, carried, where=where), epochs, budget)
        config = apply_overrides(config, base, where="command line")
        if weights and config.pretrained:
            config = apply_overrides(config, {"weights": weights}, where="--weights")
        validate_config(config, where=f"{where} ({renamed})")
        runs.append(SuiteRun(renamed, config, r.get("changes", ""), r.get("requires", ""), name))
    if weights and not any(r.config.pretrained for r in runs):
        raise UserError(
            f"--weights: no run of suite {path.stem} starts from pretrained weights; drop --weights"
        )
    names = [r.name for r in runs]
    _check_run_names(runs, path)
    reference = spec.get("reference", names[0])
    reference = {r.was: r.name for r in runs}.get(reference, reference)
    if reference not in names:
        raise UserError(f"{path}: reference '{reference}' is not one of the runs {names}")
    return Suite(path.stem, spec.get("description", ""), reference, runs, spec.get("examples", ""))


def _recipe(name: str, where: str, suite: Path | None) -> TrainConfig:
    """`load_recipe`, a refusal naming the run that asked for it (`suite` None: --recipe's). A
    suite's run reads a recipe file beside the suite first (as a recipe's `base:`), else the cwd's."""
    beside = resolve_base(suite, name) if suite else name
    try:
        return load_recipe(beside if Path(beside).is_file() else name)
    except UserError as exc:
        raise UserError(f"{where if suite else '--recipe'}: {exc}") from None


def _check_run_names(runs: list[SuiteRun], path: Path) -> None:
    """Each run has a folder of its own in --out, under one seed and under several."""
    names = [r.name for r in runs]
    twice = sorted({n for n in names if names.count(n) > 1})
    seeded = [
        (n, m) for n in names for m in names if re.fullmatch(rf"{re.escape(m)}-seed[0-9]+", n)
    ]
    clash = {*twice, *(seeded[0] if seeded else ())}
    renamed = [_called(r) for r in runs if r.name != r.was and r.name in clash]
    fix = (  # not the suite file's names: --recipe's rename clashed
        f" ({renamed[0]}); copy the suite file, rename one of those runs and pass the copy"
        if renamed
        else ""
    )
    if twice:
        raise UserError(f"{path}: run names must be unique; repeated: {', '.join(twice)}{fix}")
    if seeded:  # under several --seeds, run m trains into m-seed<N>/: that run's folder
        n, m = seeded[0]
        raise UserError(
            f"{path}: run name {n!r} is the folder of run {m!r} under several --seeds{fix or '; pick another name'}"
        )


def _called(run: SuiteRun) -> str:
    """A run as messages name it: with its name in the suite file where --recipe renamed it."""
    return run.name if run.name == run.was else f"run {run.was} is {run.name} under --recipe"


def _run_name(name: Any, where: str) -> str:
    """`name` (a number as its text) if it is one folder inside --out and one clean line."""
    name = str(name) if is_number(name) else name
    plain = (
        isinstance(name, str)
        and 0 < len(name) <= MAX_NAME
        and name.isprintable()
        and name == name.strip()
        and not ({"/", "\\"} & set(name) or name.startswith("."))
    )
    if not plain:
        shown = repr(name)[:50] + ("..." if len(repr(name)) > 50 else "")  # one short line
        raise UserError(
            f"{where}: run name {shown} must be a plain folder name inside --out: 1 to "
            f"{MAX_NAME} printable characters, no '/' or '\\', not starting with '.'"
        )
    if name in {*REPORT_FILES, *RUN_FILES}:  # its folder would stand where a file goes
        raise UserError(
            f"{where}: run name {name!r} is a file the suite or a run writes; pick another name"
        )
    return name


def _typed(spec: dict, types: dict[str, tuple[type, str]], where: str) -> dict:
    """`spec`, each key present holding its kind of value (`cumulative: "false"` is a string,
    not false); an unquoted number where text goes is read as its text."""
    for key, (kind, words) in types.items():
        if key in spec and not (
            isinstance(spec[key], kind) or (kind is str and is_number(spec[key]))
        ):
            raise UserError(f"{where}: '{key}' must be {words}, got {spec[key]!r}")
    return {k: str(v) if k in types and is_number(v) else v for k, v in spec.items()}


def _run_dir(out: Path, run: SuiteRun, seed: int, seeds: list[int]) -> Path:
    return out / (run.name if len(seeds) == 1 else f"{run.name}-seed{seed}")


def run_suite(name: str, opts: SuiteOptions, log=print) -> list[dict]:
    from cifarlab.data.sources import check_outside_images
    from cifarlab.evaluate import EvalOptions, evaluate
    from cifarlab.report.suite import write_suite_report
    from cifarlab.train import train

    suite = load_suite(name, opts.overrides, opts.epochs, opts.budget, opts.recipe)
    only = _only(suite, opts.only)
    every = []  # (run, its folder, its config) per seed; a bad seed is said before --out is made
    for run in suite.runs:
        for seed in opts.seeds:  # MLflow files every run under the suite's name
            named = {"seed": seed, "experiment": run.config.experiment or suite.name}
            config = apply_overrides(run.config, named, where="--seeds")
            every.append((run, _run_dir(opts.out, run, seed, opts.seeds), config))
    jobs = [job for job in every if not only or job[0].name == only]
    for data in {config.data for _, _, config in jobs}:  # every run's folder would be refused
        check_outside_images(opts.out, data)
    for root, data in {(data_root(config), config.data) for _, _, config in jobs}:
        check_outside_images(root, data, "--data-root")  # every run's cache too
    check_not_a_run(opts.out, "a suite writes its runs and tables", f"{opts.out.resolve()}-suite")
    _refuse_another_suite(opts.out, suite.name)
    _refuse_stale(every)  # all of them: the table shows every run found in --out, not only --only's
    check_out(opts.out)  # a file where --out goes: said before the data is read
    _adopt_renamed(every, opts.out)
    _refuse_bad_data(jobs)
    prepare_run_dir(opts.out, need_bytes=0)  # one line for a file, or a place it cannot write
    log(f"suite {suite.name}: {suite.description}")
    failed: dict[str, str] = {}
    once: set[str] = set()
    trained = False  # no run trains now: the figure drawn from the data is kept
    for run, run_dir, config in jobs:
        skipped = _skipped(run, run_dir)
        if skipped:
            log(f"[{run_dir.name}] {skipped}")
            continue
        say, trained = partial(_say, log, f"  [{run_dir.name}] ", once), True
        resuming = (run_dir / "last.pt").is_file()
        log(f"[{run_dir.name}] {'resuming' if resuming else 'training'}: {run.changes}")
        try:
            train(config, run_dir, resume=resuming or (run_dir / "config.yaml").is_file(), log=say)
        except Interrupted as exc:  # train's own hint (--resume the run) skips its evaluation
            said = str(exc).split(" Resume with:")[0].rstrip(" .;")
            raise Interrupted(
                f"{run_dir.name}: {said}; run the same suite command to continue (finished runs "
                "are skipped)",
                exc.exit_code,
            ) from None
        except TrainingFailed as exc:  # a finding, not an error: the table says "diverged"
            with replaced_when_complete(run_dir / DIVERGED) as tmp:  # whole, or absent: rerun
                tmp.write_text(str(exc).split(";")[0] + "\n")
            log(f"[{run_dir.name}] {exc}")
            continue
        except UserError as exc:  # e.g. ImageNet weights offline: the other runs still go ahead
            log(f"[{run_dir.name}] cannot start: {exc}")
            failed[run.name] = str(exc)
            continue
        try:  # the run's report, eval-<split>/
            evaluate(EvalOptions(str(run_dir), tta=config.tta), log=say)
        except UserError as exc:
            say(f"no report: {exc}")
    rows = summarise(suite, opts, failed)
    write_suite_report(suite, rows, opts.out, redraw=trained)
    log(f"results: {opts.out / 'results.md'}")
    return rows


def _say(log, prefix: str, once: set[str], line: str) -> None:
    """A run's line, under its name; the precision decision (`amp: ...`) is the suite's, said
    once, the first run's; a run that decides otherwise says its own, under its name."""
    if not line.startswith("amp: "):
        log(prefix + line)
    elif not once:
        once.add(line)
        log(line)
    elif line not in once:
        log(prefix + line)


def _only(suite: Suite, only: str | None) -> str | None:
    """The run `--only` names: by its name, or by its name in the suite file where --recipe
    renamed it (`seed-cnn`, run as `lesson-cnn`)."""
    if only is None:
        return None
    for run in sorted(suite.runs, key=lambda r: r.name != only):  # a run of that name first
        if only in (run.name, run.was):
            return run.name
    names = [r.name if r.name == r.was else f"{r.name} (or {r.was})" for r in suite.runs]
    raise UserError(f"--only {only}: no such run in suite {suite.name}; runs: {', '.join(names)}")


def _refuse_bad_data(jobs: list) -> None:
    """Bad data on the command line (a missing --data, a --val-size or --subset larger than the
    data, a batch larger than the training split) is refused before --out is made: when no run's
    data would load, the suite is bad input, not a table of runs that "cannot start" (exit 1).
    A problem of some runs only (a `classes` in one run's `set`) is said in their rows. Runs
    without a validation split are compared on test, so their data must have one. Only the data
    of runs that train now is read: that of a run that finished or diverged earlier counts as
    good (it trained on it), so a rerun of a finished suite writes its tables without it."""
    from cifarlab.data import load_splits
    from cifarlab.data.splits import check_sizes

    loaded, trained = {}, set()  # sizes do not depend on seeds: one load per `_data_key`
    for run, run_dir, config in jobs:
        if not _skipped(run, run_dir):
            loaded.setdefault(_data_key(config), config)
        elif not run.requires:
            trained.add(_data_key(config))
    errors = []
    for config in loaded.values():
        try:
            splits = load_splits(config)
        except UserError as exc:
            errors.append(exc)
            continue
        if not len(splits.val) and splits.test is None:
            raise UserError(
                f"--val-size 0: {config.data} has no test split, so the runs would have no "
                "accuracy to compare; give --val-size N (e.g. 5000), or --data with a "
                "test/<class>/ folder beside train/"
            )
        try:
            check_sizes(config, splits)
        except UserError as exc:
            errors.append(exc)
    if errors and len(errors) == len(loaded) and trained <= loaded.keys():
        raise errors[0]


def _data_key(config: TrainConfig) -> tuple:
    """What `load_splits` and `check_sizes` read of a config, but the seed: a stratified split's
    class counts are the same under every seed."""
    classes = tuple(config.classes or ())
    return (config.data, str(data_root(config)), config.image_size, config.on_bad_image, classes,
            config.subset, config.val_size, config.batch_size)  # fmt: skip


def _skipped(run: SuiteRun, run_dir: Path) -> str:
    """Why a job does not train now ("" when it does). A finished run is scored on val where it
    had a validation split (its result holds a val accuracy), else on test, as `evaluate`
    chooses: no data is read to tell."""
    if run.requires:
        return f"cannot start: needs {run.requires}"
    if (run_dir / DIVERGED).is_file():  # the same config and seed would diverge again
        return f"diverged earlier ({run_dir / DIVERGED}), skipped"
    result = read_result(run_dir)
    if result is None:
        return ""
    split = "test" if result["best_val_acc"] is None else "val"
    report = run_dir / f"eval-{split}" / "report.json"  # written last: complete
    # a report older than the run's end scored weights from before it (an evaluate mid-run)
    if report.is_file() and report.stat().st_mtime >= (run_dir / "result.json").stat().st_mtime:
        return "finished earlier with this config, skipped"
    return ""


def _adopt_renamed(jobs: list, out: Path) -> None:
    """A run trained under another folder name (the other seed naming, `a` with one seed and
    `a-seed0` with several; the suite file's name of a run --recipe renames) is moved to the
    name it has now, when it holds this very run: not trained a second time."""
    from cifarlab.train import saved_config

    for run, run_dir, wanted in jobs:
        names = dict.fromkeys([run.name, run.was])
        for other in [out / f"{n}{seed}" for n in names for seed in ("", f"-seed{wanted.seed}")]:
            if run_dir.exists() or other == run_dir or not other.is_dir():
                continue
            try:
                saved, _ = saved_config(other)
            except UserError:  # a damaged run the suite does not use stays put
                continue
            if saved is not None and not config_changes(saved, wanted):
                try:
                    with RunLock(other) as lock:  # not while another process trains it
                        other.rename(run_dir)
                        lock.path = run_dir / ".lock"  # the lock file moved with its folder
                except UserError:
                    if other.is_dir():
                        raise  # in use (it would be trained twice); else another suite moved it


def _refuse_another_suite(out: Path, name: str) -> None:
    """An --out holding another suite's tables (its results.md names it): this suite's tables
    would replace them, and its runs would sit among the other's."""
    try:
        first = (out / "results.md").read_text(encoding="utf-8").partition("\n")[0]
    except (OSError, ValueError):  # none yet (or unreadable: nothing of a suite's to keep)
        return
    other = re.fullmatch(r"# Suite `(.+)`", first)
    if other and other[1] != name:
        raise UserError(
            f"--out {out} holds suite {other[1]}'s runs and tables; give suite {name} a folder "
            f"of its own, e.g. --out {out.resolve().parent / name}"
        )


def _refuse_stale(jobs: list) -> None:
    """A run directory already in --out must hold this very run (the same resolved config), or
    nothing that `train` would refuse (other files)."""
    from cifarlab.train import saved_config

    for run, run_dir, wanted in jobs:
        saved, _ = saved_config(run_dir)
        differ = saved and config_changes(saved, wanted)
        why = "" if run.name == run.was else f"{_called(run)}, and "
        if differ:
            raise UserError(
                f"{why}{run_dir} holds a run with another config ({', '.join(differ[:4])}); "
                "choose a new --out, or delete that run directory to retrain it"
            )
        try:
            if saved is None:
                claim_run_dir(run_dir, resume=False)
        except RunDirTaken as exc:  # its wording says --resume, which a suite does not take
            raise UserError(
                f"{why}{run_dir} already holds {exc.what} ({exc.shown}); move them away, or "
                "choose a new --out"
            ) from None
        except UserError:  # being trained: said when its turn comes, as for a run with a config
            pass


def summarise(suite: Suite, opts: SuiteOptions, failed: dict[str, str]) -> list[dict]:
    """One row per run: accuracies as mean ± std over seeds, time, speed, gain over the reference;
    a run without results says why (`failed`: the error of a run that could not start)."""
    from cifarlab.report.suite import gain_basis  # matplotlib

    rows = []
    for run in suite.runs:
        dirs = {seed: _run_dir(opts.out, run, seed, opts.seeds) for seed in opts.seeds}
        histories = [h for h in (read_metrics(d / "metrics.csv") for d in dirs.values()) if h]
        row: dict[str, Any] = {
            "run": run.name,
            "changes": run.changes,
            "seeds": len(histories),
            "histories": histories,
        }
        if run.requires and not histories:
            row["status"] = f"not started: needs {run.requires}"
        elif run.name in failed:  # a history it has is no result (another process trains it)
            row["status"] = f"cannot start: {failed[run.name]}"
        diverged = [(seed, d / DIVERGED) for seed, d in dirs.items() if (d / DIVERGED).is_file()]
        if diverged:  # no accuracy of a diverged run: its first diverged seed's words instead
            seed, path = diverged[0]
            row["status"] = path.read_text().strip() + (f" (seed {seed})" if len(dirs) > 1 else "")
        elif histories and run.name not in failed:
            row.update(
                _over_epochs(histories, "val_acc", "val"),
                **_over_epochs(histories, "test_acc", "test"),
                epochs=len(histories[0]),
                seconds=statistics.mean(sum(r["seconds"] for r in h) for h in histories),
                images_per_s=statistics.median(r["images_per_s"] for h in histories for r in h),
            )
            results = [read_result(d) or {} for d in dirs.values()]
            for key in ("tta_val_acc", "test_acc", "test_tta_acc"):
                values = [r.get(key) for r in results]
                if all(v is not None for v in values):
                    row[key] = statistics.mean(values)
        rows.append(row)
    key = gain_basis(rows)  # each gain: over the reference, and over the scored run above
    scored = [r for r in rows if key in r]
    ref = next((r for r in scored if r["run"] == suite.reference), None)
    for above, row in zip([None, *scored], scored, strict=False):
        if ref is not None:
            row["gain"] = row[key] - ref[key]
        if above is not None:
            row["step_gain"] = row[key] - above[key]
    return rows


def _over_epochs(histories: list[list[dict]], column: str, split: str) -> dict[str, float]:
    """best_<split>_acc (mean and std over seeds) and final_<split>_acc; {} without the split."""
    kept = [[r[column] for r in h if not math.isnan(r.get(column, math.nan))] for h in histories]
    if not all(kept):
        return {}
    best = [max(v) for v in kept]
    return {
        f"best_{split}_acc": statistics.mean(best),
        f"best_{split}_acc_std": statistics.stdev(best) if len(best) > 1 else 0.0,
        f"final_{split}_acc": statistics.mean(v[-1] for v in kept),
    }
