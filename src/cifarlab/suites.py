"""Experiment suites: named sets of runs (suites/*.yaml) trained one after another, resumable,
summarised as a table, a plot and an index page.

A suite YAML holds `description`, `reference` (the run gains are measured against) and `runs`,
each a `recipe` plus `set` overrides and a one-line `changes`. With `cumulative: true` every run
inherits the previous run's recipe and overrides (the ablation ladder). A run that `requires`
something cifarlab does not have yet is listed as not started, with the reason.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifarlab.config import TrainConfig, apply_overrides, load_recipe, named_yaml, read_yaml_mapping
from cifarlab.errors import UserError
from cifarlab.rundir import read_metrics

SUITE_DIR = Path(__file__).parent / "suites"
_RUN_KEYS = {"name", "recipe", "changes", "set", "requires"}


@dataclass
class SuiteRun:
    name: str
    config: TrainConfig
    changes: str
    requires: str = ""


@dataclass
class Suite:
    name: str
    description: str
    reference: str
    runs: list[SuiteRun]
    examples: str = ""


@dataclass
class SuiteOptions:
    data: str
    out: Path
    epochs: int | None = None
    subset: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    only: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


def list_suites() -> dict[str, str]:
    return {
        p.stem: read_yaml_mapping(p).get("description", "")
        for p in sorted(SUITE_DIR.glob("*.yaml"))
    }


def _suite_path(name: str) -> Path:
    return named_yaml(name, SUITE_DIR, "suite", list_suites)


def load_suite(name: str, base: dict[str, Any]) -> Suite:
    """Parse and validate a suite; every run's config is built (and checked) before anything trains."""
    path = _suite_path(name)
    spec = read_yaml_mapping(path)
    unknown = set(spec) - {"description", "reference", "runs", "cumulative", "examples"}
    if unknown:
        raise UserError(
            f"{path}: unknown suite keys {sorted(unknown)}; valid: description, reference, runs, cumulative, examples"
        )
    runs_spec = spec.get("runs")
    if (
        not isinstance(runs_spec, list)
        or not runs_spec
        or not all(isinstance(r, dict) for r in runs_spec)
    ):
        raise UserError(
            f"{path}: 'runs' must be a non-empty list of mappings (name, recipe, changes, set)"
        )
    runs, recipe, carried = [], None, {}
    for i, r in enumerate(runs_spec):
        where = f"{path} run {i + 1}"
        bad = set(r) - _RUN_KEYS
        if bad or "name" not in r:
            raise UserError(f"{where}: needs 'name' and only {sorted(_RUN_KEYS)}; got {sorted(r)}")
        sets = r.get("set") or {}
        if not isinstance(sets, dict):
            raise UserError(f"{where}: 'set' must be a mapping of config keys")
        if spec.get("cumulative"):
            recipe = r.get("recipe", recipe)
            carried = {**carried, **sets}
        else:
            recipe, carried = r.get("recipe"), dict(sets)
        if not recipe:
            raise UserError(f"{where}: no 'recipe' given")
        config = apply_overrides(load_recipe(recipe), carried, where=where)
        config = apply_overrides(config, base, where="command line")
        runs.append(
            SuiteRun(str(r["name"]), config, str(r.get("changes", "")), str(r.get("requires", "")))
        )
    names = [r.name for r in runs]
    reference = str(spec.get("reference", names[0]))
    if reference not in names:
        raise UserError(f"{path}: reference '{reference}' is not one of the runs {names}")
    return Suite(
        path.stem, str(spec.get("description", "")), reference, runs, str(spec.get("examples", ""))
    )


def _run_dir(out: Path, run: SuiteRun, seed: int, seeds: list[int]) -> Path:
    return out / (run.name if len(seeds) == 1 else f"{run.name}-seed{seed}")


def run_suite(name: str, opts: SuiteOptions, log=print) -> list[dict]:
    from cifarlab.evaluate import EvalOptions, evaluate
    from cifarlab.train import train

    base: dict[str, Any] = {"data": opts.data, **opts.overrides}
    if opts.epochs is not None:
        base["epochs"] = opts.epochs
    if opts.subset is not None:
        base["subset"] = opts.subset
    suite = load_suite(name, base)
    if opts.only and opts.only not in [r.name for r in suite.runs]:
        raise UserError(
            f"--only {opts.only}: no such run in suite {suite.name}; runs: {', '.join(r.name for r in suite.runs)}"
        )
    opts.out.mkdir(parents=True, exist_ok=True)
    log(f"suite {suite.name}: {suite.description}")
    failed: dict[str, str] = {}
    for run in suite.runs:
        if opts.only and run.name != opts.only:
            continue
        if run.requires:
            log(f"[{run.name}] cannot start: needs {run.requires}")
            continue
        for seed in opts.seeds:
            run_dir = _run_dir(opts.out, run, seed, opts.seeds)
            done = run_dir / "result.json"
            if done.is_file():
                log(f"[{run_dir.name}] finished earlier, skipped")
                continue
            resume = (run_dir / "last.pt").is_file()
            log(f"[{run_dir.name}] {'resuming' if resume else 'training'}: {run.changes}")
            config = apply_overrides(run.config, {"seed": seed}, where="--seeds")
            try:
                result = train(
                    config,
                    run_dir,
                    resume=resume,
                    log=lambda s, n=run_dir.name: log(f"  [{n}] {s}"),
                )
            except UserError as exc:  # e.g. ImageNet weights offline: the other runs still go ahead
                log(f"[{run_dir.name}] cannot start: {exc}")
                failed[run.name] = str(exc)
                continue
            evaluate(
                EvalOptions(str(run_dir), tta=config.tta),
                log=lambda s, n=run_dir.name: log(f"  [{n}] {s}"),
            )
            done.write_text(
                json.dumps(
                    {
                        "best_val_acc": result.best_val_acc,
                        "final_val_acc": result.final_val_acc,
                        "tta_val_acc": result.tta_val_acc,
                    }
                )
            )
    if suite.examples == "mixup":
        _mixup_examples(suite.runs[0].config, opts.out / "mixup_examples.png")
    rows = summarise(suite, opts)
    for row in rows:
        if row["run"] in failed and "best_val_acc" not in row:
            row["status"] = f"cannot start: {failed[row['run']]}"
    from cifarlab.report.suite import write_suite_report

    write_suite_report(suite, rows, opts.out)
    log(f"results: {opts.out / 'results.md'}")
    return rows


def summarise(suite: Suite, opts: SuiteOptions) -> list[dict]:
    """One row per run: accuracies as mean ± std over seeds, time, speed, gain over the reference."""
    rows = []
    for run in suite.runs:
        histories = [
            read_metrics(_run_dir(opts.out, run, s, opts.seeds) / "metrics.csv") for s in opts.seeds
        ]
        histories = [h for h in histories if h]
        row: dict[str, Any] = {
            "run": run.name,
            "changes": run.changes,
            "seeds": len(histories),
            "histories": histories,
        }
        if run.requires and not histories:
            row["status"] = f"not started: needs {run.requires}"
        if histories:
            best = [max(r["val_acc"] for r in h) for h in histories]
            final = [h[-1]["val_acc"] for h in histories]
            row.update(
                best_val_acc=statistics.mean(best),
                best_val_acc_std=statistics.stdev(best) if len(best) > 1 else 0.0,
                final_val_acc=statistics.mean(final),
                epochs=len(histories[0]),
                seconds=statistics.mean(sum(r["seconds"] for r in h) for h in histories),
                images_per_s=statistics.median(r["images_per_s"] for h in histories for r in h),
            )
            tta = [_result(opts.out, run, s, opts.seeds).get("tta_val_acc") for s in opts.seeds]
            if tta and all(t is not None for t in tta):
                row["tta_val_acc"] = statistics.mean(tta)
        rows.append(row)
    ref = next((r for r in rows if r["run"] == suite.reference and "best_val_acc" in r), None)
    for row in rows:
        if ref is not None and "best_val_acc" in row:
            row["gain"] = row["best_val_acc"] - ref["best_val_acc"]
    return rows


def _result(out: Path, run: SuiteRun, seed: int, seeds: list[int]) -> dict:
    path = _run_dir(out, run, seed, seeds) / "result.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _mixup_examples(config: TrainConfig, path: Path) -> None:
    """Four training images mixed at alpha 0.2, titled with both labels and lambda."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from cifarlab.data import load_splits

    splits = load_splits(config)
    rng = np.random.default_rng(0)
    idx = rng.choice(len(splits.train), size=8, replace=False)
    images = splits.train.images[idx].astype(np.float32) / 255
    fig, axes = plt.subplots(1, 4, figsize=(11, 3.4))
    for i, ax in enumerate(axes):
        lam = float(rng.beta(0.2, 0.2))
        a, b = images[2 * i], images[2 * i + 1]
        mixed = lam * a + (1 - lam) * b
        la, lb = (splits.classes[splits.train.labels[j]] for j in idx[2 * i : 2 * i + 2])
        ax.imshow(torch.tensor(mixed).numpy(), interpolation="nearest")
        ax.set_title(f"{la} {lam:.2f}\n{lb} {1 - lam:.2f}", fontsize=10)
        ax.axis("off")
    fig.suptitle("Mixup, alpha 0.2: label weights = lambda, 1 - lambda")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
