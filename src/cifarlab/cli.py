"""The `cifarlab` command: parse, validate, call. Exit codes: 0 done, 1 failed, 2 bad input, 130/143 stopped."""

from __future__ import annotations

import argparse
import os
import re
import signal
import stat
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import cifarlab
from cifarlab import config as cfg
from cifarlab import phases
from cifarlab.errors import (
    ConfigChanged,
    Interrupted,
    TrainingFailed,
    UserError,
    handling,
    one_line,
)


class _Help(argparse.HelpFormatter):
    """Every flag's line says its default, where it has one worth saying."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like every other bad input
        raise UserError(f"{self.prog}: {message} (see --help)")


def _given(text: str) -> str:
    """A path or recipe flag's value; an empty one (`--data "$DATA"`, DATA unset) would mean the
    cwd, or the default recipe."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; give a value (is a shell variable unset?)")
    return text


def _path(text: str) -> Path:
    """A path flag's value, `~` expanded as --data's is (a quoted `~/runs` is not a `./~`)."""
    return cfg.expand(_given(text))


# The flags train, suite and tune share, each setting the config key of its name (--set any).
_RUN_FLAGS = [
    ("--data", _given, "cifar10, cifar100, a class folder, or a .tar/.tar.gz/.zip of one"),
    ("--data-root", _given, "datasets and caches (default $CIFARLAB_DATA or ~/.cache/cifarlab)"),
    ("--model", str, "model name (see `cifarlab models`) instead of the recipe's"),
    ("--epochs", int, "epochs; warm-up and other epoch-based settings scale with it"),
    ("--budget", float, "a fraction of the recipe's epochs, e.g. 0.1, scaled as --epochs"),
    ("--time-budget", str, "fit the run in this time (900, 90s, 15m), timing its first steps"),
    ("--batch-size", int, "images per optimiser step (default: the recipe's)"),
    ("--lr", float, "peak learning rate (default: the recipe's)"),
    ("--seed", int, "seed of the split (unless split_seed is set), the init and the batches"),
    ("--subset", int, "keep a stratified subset of N training images"),
    (
        "--val-size",
        int,
        "validation images held out from train (0: train on all; unused where "
        "the data has a val/ folder)",
    ),
    ("--classes", str, 'train on these classes only, comma-separated (as in CSV: "a,b" is one)'),
]


def _run_flags(p: argparse.ArgumentParser, recipe_help: str) -> None:
    p.add_argument("--recipe", type=_given, help=recipe_help)
    for flag, kind, text in _RUN_FLAGS:
        p.add_argument(flag, type=kind, help=text)
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a config key (repeatable)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar, epoch lines only")


def run_overrides(args) -> dict[str, Any]:
    """The config keys the shared flags set (but --recipe, and --epochs, which `with_length`
    applies), --time-budget parsed, --no-progress, and --set last: an explicit value wins."""
    out = {
        k: v for k, v in vars(args).items()
        if k in cfg.FIELDS and k not in ("recipe", "epochs") and v is not None
    }  # fmt: skip
    if "time_budget" in out:  # a bad value is said before the conflict
        out["time_budget"] = cfg.parse_duration(out["time_budget"])
        if args.epochs is not None or args.budget is not None:
            raise UserError(
                "--time-budget chooses the run's length: drop --epochs/--budget or --time-budget"
            )
    if args.no_progress:
        out["progress"] = False
    out.update(cfg.parse_set_options(args.set))
    return out


def _config_from_args(args):
    overrides = run_overrides(args)
    config = cfg.with_length(cfg.load_recipe(args.recipe or "seed-cnn"), args.epochs, args.budget)
    return cfg.apply_overrides(config, overrides, where="command line")


def _recipe_settings(recipe: str) -> dict[str, Any]:
    """What `--recipe` asks of a resumed run: every key the recipe sets away from the defaults (a
    file of the same name with other contents is not taken for it), but its length."""
    default = cfg.TrainConfig()
    return {
        k: v
        for k, v in cfg.run_settings(cfg.load_recipe(recipe)).items()
        if k not in cfg.LENGTH_KEYS and (k == "recipe" or v != getattr(default, k))
    }


def cmd_train(args) -> int:
    if args.profile:
        phases.enable(args.started)
    with phases.phase("import (torch, cifarlab.train)"):
        from cifarlab.train import train

    has_run = (args.out / "last.pt").is_file() or (args.out / "config.yaml").is_file()
    if args.resume and has_run:  # the run's own config, plus what is asked
        changes = run_overrides(args)
        if args.epochs is not None:  # a length the run must already have
            changes = {"epochs": args.epochs, **changes}
        if args.recipe:
            changes = {**_recipe_settings(args.recipe), **changes}
        if args.budget is not None:
            raise UserError("--budget: a resumed run keeps its length; drop --budget")
        try:
            result = train(None, args.out, resume=True, changes=changes, started=args.started)
        except ConfigChanged as exc:
            if not args.recipe:
                raise
            raise ConfigChanged(
                f"{exc} (--recipe {args.recipe} sets these; give the same --set flags the run "
                "started with, or drop --recipe: the run keeps its own)"
            ) from None
    elif args.resume and not (args.recipe or args.data):  # a mistyped --out: not the defaults
        raise UserError(
            f"--resume: {args.out} holds no run to continue; drop --resume and give --recipe "
            "or --data to start one there"
        )
    else:
        try:
            result = train(
                _config_from_args(args), args.out, resume=args.resume, started=args.started
            )
        except TrainingFailed:
            # a new run diverged before its first checkpoint: nothing trained is kept, so the
            # same command with the advised lower --lr trains anew (a resumed one keeps its own)
            if not args.resume and not (args.out / "last.pt").exists():
                (args.out / "config.yaml").unlink(missing_ok=True)
            raise
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 talks
        print(f"done: {_result_line(result)}; run in {result.run_dir}")
        if args.profile:
            phases.mark("command done")
            print(phases.table())
    return 0


def _result_line(result) -> str:
    parts = []
    if result.best_val_acc is not None:
        tta = "" if result.tta_val_acc is None else f" ({result.tta_val_acc:.2%} with TTA)"
        parts.append(
            f"best val acc {result.best_val_acc:.2%}, final {result.final_val_acc:.2%}{tta}"
        )
    if result.test_acc is not None:
        tta = "" if result.test_tta_acc is None else f" ({result.test_tta_acc:.2%} with TTA)"
        final = "final test acc" if result.best_test_acc is not None else "test acc"
        parts.append(f"{final} {result.test_acc:.2%}{tta}")
    if result.best_test_acc is not None:
        parts.append(
            f"best test acc over epochs {result.best_test_acc:.2%} (chosen on test: optimistic)"
        )
    parts.append(f"{result.seconds:.0f}s")
    return ", ".join(parts)


def _print_named(about: dict[str, str]) -> int:
    width = max(map(len, about))
    for name, text in about.items():
        print(f"{name:<{width}}  {text}")
    return 0


def cmd_models(args) -> int:
    from cifarlab.models import MODELS, open_names

    if args.filter is None and not args.all:
        _print_named({name: spec.about for name, spec in MODELS.items()})
        print(MODELS_FOOTER)
        return 0
    for prefix, names in open_names(args.filter or "").items():
        if names is None:
            print(f"{prefix}<name>: not installed (pip install 'cifarlab[timm]')")
        elif args.filter is None and prefix == "timm:":
            print(f"{prefix}<name>: {len(names)} models; `cifarlab models --filter WORD` searches")
        else:
            print(f"{prefix}<name>: {len(names)} models")
            for name in names:
                print(f"  {prefix}{name}")
    return 0


MODELS_FOOTER = """
tv:<name>    any torchvision classification model, e.g. tv:convnext_tiny, tv:vit_b_16
             (pretrained: true or weights: IMAGENET1K_V1 for its ImageNet weights, weights: FILE)
timm:<name>  any timm model, e.g. timm:resnet10t (pip install 'cifarlab[timm]'; weights: FILE)
             ViT-style models (fixed input side) need stem: imagenet and take input_size.
`cifarlab models --all` lists torchvision's names; `--filter WORD` searches both."""


def cmd_recipes(_args) -> int:
    return _print_named(cfg.list_recipes())


def cmd_evaluate(args) -> int:
    from cifarlab.evaluate import EvalOptions, evaluate

    classes = cfg.parse_names(args.classes or "")
    if classes is None:
        raise UserError(
            f"--classes {args.classes}: a stray double quote; quote whole names, as in CSV"
        )
    evaluate(EvalOptions(
        args.model, args.split, args.data, args.tta, args.ema, args.out, classes, args.device,
        on_bad_image=args.on_bad_image,
    ))  # fmt: skip
    return 0


def cmd_predict(args) -> int:
    from cifarlab.predict import run_predict

    return run_predict(args.model, args.paths, args.top_k, args.json, args.batch_size)


def cmd_suite(args) -> int:
    from cifarlab.suites import SuiteOptions, list_suites, run_suite

    if args.list:
        return _print_named(list_suites())
    if not args.name or not args.data or not args.out:
        raise UserError("suite: NAME, --data and --out are required (or --list)")
    if args.seed is not None:
        raise UserError("suite: give seeds with --seeds (e.g. --seeds 0,1,2), not --seed")
    overrides = run_overrides(args)  # --weights or --set weights=: the pretrained runs only
    opts = SuiteOptions(
        args.out, args.seeds, args.only, overrides, args.epochs, args.budget, args.recipe
    )
    rows = run_suite(args.name, opts)
    failed = [r["run"] for r in rows if str(r.get("status", "")).startswith("cannot start")]
    if failed:
        print(f"error: {len(failed)} run(s) could not start: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            "expected integers separated by commas, e.g. 0,1,2"
        ) from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text}: each seed once")
    return seeds or [0]


def cmd_export(args) -> int:
    from cifarlab.export import default_output, export_model, format_of, sidecar

    fmt = format_of(args.format, args.out)
    out = export_model(args.model, fmt, args.out or default_output(args.model, fmt), args.force)
    also = f" and {sidecar(out)}" if fmt == "safetensors" else ""
    print(f"exported {out}{also}")
    return 0


def cmd_calibrate(args) -> int:
    from cifarlab.calibration import calibrate_run

    calibrate_run(args.run, device=args.device)
    return 0


def cmd_tune(args) -> int:
    from cifarlab.tune import TuneOptions, run_tune

    if not args.data:
        raise UserError("tune: --data is required")
    base = _config_from_args(args)
    run_tune(
        TuneOptions(args.recipe or "seed-cnn", base, run_overrides(args), args.trials,
                    args.storage, args.out, args.study or "",
                    search_epochs=args.epochs is None and args.budget is None)
    )  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    shared = {"parents": [common], "formatter_class": _Help}  # every parser's
    parser = _Parser(
        prog="cifarlab", description="Train, analyse and compare small-image classifiers.",
        **shared,
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"cifarlab {cifarlab.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    for name, (about, add_flags, _run) in _COMMANDS.items():
        add_flags(sub.add_parser(name, help=about, description=about, **shared))
    return parser


_RUN_OR_CHECKPOINT = {
    "type": _given,
    "metavar": "RUN_DIR|CHECKPOINT",
    "help": "a run directory (its best.pt) or a checkpoint",
}


def _train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=_path, help="run directory")
    p.add_argument(
        "--profile", action="store_true",
        help="print where start-up and the end of the run went (data, model, probe, TTA, test pass)",
    )  # fmt: skip
    _run_flags(p, "recipe name (see `cifarlab recipes`) or YAML file (default seed-cnn)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument(
        "--weights",
        help="torchvision/timm models: a local state-dict file, or a torchvision weights name (IMAGENET1K_V1)",
    )
    p.add_argument(
        "--init-from", metavar="RUN_DIR|CHECKPOINT", help="start from our own trained weights"
    )


def _evaluate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", **_RUN_OR_CHECKPOINT)
    p.add_argument("--split", choices=["val", "test"],
                   help="which split to score (default: val where the run had one, held out or its data's val/ folder; else test); "
                   "with --data another source, its val/ or test/ folder (default: all of it, see --data)")  # fmt: skip
    p.add_argument("--data", type=_given,
                   help="score another data source's labelled images whole, never cut by the run's --subset/--val-size: "
                   "its test/ split, else all its images (a plain <class>/ folder); its classes must be among the run's")  # fmt: skip
    p.add_argument("--tta", nargs="?", const="flip", default="none", choices=["none", "flip", "flip-translate"],
                   help="also report test-time-augmented accuracy (flip, or flip-translate)")  # fmt: skip
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--out", type=_path,
                   help="output folder (default RUN_DIR/eval-<split>, then -<checkpoint> other than best.pt, -ema, "
                   "-<data name>: one folder per evaluation, replaced when it is run again; --tta adds its accuracy to that report)")  # fmt: skip
    p.add_argument("--classes", help="classes shown in the mistakes gallery, comma-separated as in CSV (default: "
                   "the two hardest); the scored data is not filtered, unlike train --classes")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--on-bad-image", choices=["error", "skip"],
                   help="unreadable or non-image files: stop (error) or leave them out (skip); "
                   "default: as the run was trained")  # fmt: skip


def _predict_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        type=_given,
        metavar="RUN_DIR|CHECKPOINT|FILE.onnx|FILE.pt2|FILE.safetensors",
        help="a run, a checkpoint or an exported model",
    )
    p.add_argument("paths", nargs="+", type=_given, metavar="PATH", help="image files or folders")
    p.add_argument("--top-k", type=int, default=3, help="classes shown per image")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")


def _suite_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "name", nargs="?", type=_given, metavar="NAME|FILE", help="a shipped suite or a suite YAML"
    )
    p.add_argument("--list", action="store_true", help="list the shipped suites")
    p.add_argument(
        "--out", type=_path, help="suite folder: one run directory per run, and the tables"
    )
    _run_flags(p, "run every run on this recipe (e.g. lesson-cnn), its own settings on top")
    p.add_argument("--seeds", default="0", type=_seeds, help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--only", help="run only this run of the suite")
    p.add_argument(
        "--weights",
        metavar="FILE",
        help="ImageNet weights file for the runs that ask for them (pretrained: true) only",
    )


def _export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", **_RUN_OR_CHECKPOINT)
    p.add_argument("--format", metavar="{onnx,pt2,safetensors}",
                   help="onnx (torch.export-based exporter), pt2 (torch.export program), or "
                   "safetensors (weights + a .json beside them); default: the one --out's "
                   "suffix names, else onnx")  # fmt: skip
    p.add_argument("--out", type=_path, help="output file (default RUN_DIR/model.<format>)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")


def _calibrate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run",
        type=_given,
        metavar="RUN_DIR|CHECKPOINT",
        help="a run directory (both checkpoints) or one checkpoint",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")


def _tune_flags(p: argparse.ArgumentParser) -> None:
    _run_flags(p, "recipe to search around (default seed-cnn)")
    p.add_argument(
        "--trials", type=int, required=True, help="trials to finish (completed or pruned)"
    )
    p.add_argument(
        "--storage",
        help="any Optuna RDB URL (default sqlite:///OUT/study.db: each --out its own study)",
    )
    p.add_argument("--study", help="study name (default <recipe>-<data name>)")
    p.add_argument(
        "--out", type=_path, default=Path("tune"),
        help="folder for the trials' run directories (and, without --storage, the study's study.db)",
    )  # fmt: skip


def _models_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="list every tv: name and count timm's")
    p.add_argument(
        "--filter", metavar="WORD", help="tv: and timm: names containing WORD (or a glob)"
    )


# Each command: what it does, the function that adds its flags, the one that runs it.
_COMMANDS = {
    "train": ("train a model into a run directory", _train_flags, cmd_train),
    "evaluate": ("metrics, figures and an HTML report for a trained run", _evaluate_flags, cmd_evaluate),
    "predict": ("classify image files and folders", _predict_flags, cmd_predict),
    "suite": ("run an experiment suite and tabulate it", _suite_flags, cmd_suite),
    "export": ("export a checkpoint as ONNX, a torch.export program or safetensors", _export_flags,
               cmd_export),
    "calibrate": ("fit a run's temperature on its validation split (into its checkpoints)",
                  _calibrate_flags, cmd_calibrate),
    "tune": ("hyperparameter search with Optuna (shared, resumable study)", _tune_flags, cmd_tune),
    "models": ("list the models: the fixed names, and torchvision's and timm's", _models_flags,
               cmd_models),
    "recipes": ("list the shipped recipes", lambda p: None, cmd_recipes),
}  # fmt: skip
COMMANDS = {name: run for name, (_about, _flags, run) in _COMMANDS.items()}


def _stdout_gone() -> bool:
    """Whether standard output is a pipe (whose reader, then, is the one that went away); if so
    it is pointed at /dev/null, so that the exit's own flush raises nothing more."""
    try:
        if not stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode):
            return False  # a broken pipe of another kind (a worker's, a socket's) is a real error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # not a real descriptor (captured output)
        return False
    return True


_STOPPED: list[int] = []  # the exit code of a stop signal that arrived (set from its handler)


def _exit_143(signum, frame):
    _STOPPED.append(143)
    raise SystemExit(143)


def _interrupt_130(signum, frame):
    _STOPPED.append(130)
    raise KeyboardInterrupt


def _negative_values_joined(argv: list[str]) -> list[str]:
    """`--time -5s` as `--time=-5s`: apart, argparse takes '-5s' for an option and says only
    'expected one argument'; joined, the value's own check says what is wrong."""
    out: list[str] = []
    for arg in argv:
        if out and re.fullmatch(r"--\w[\w-]*", out[-1]) and re.match(r"-[\d.]", arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    words = _negative_values_joined(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in words
    if getattr(sys.stdout, "errors", "") == "strict":  # a path that is not UTF-8 prints as \udcff
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        args = build_parser().parse_args(words)
        # a --time-budget counts from the command's start: a process's own command from the
        # import (torch's import is part of its time), a call of main() in a running one from now
        args.started = cifarlab.IMPORTED if argv is None else time.perf_counter()
        _STOPPED.clear()
        # SIGTERM exits 143 through every `finally` (an export's temporary file is removed), not
        # at once as its default does; training installs its own handler, which saves first.
        # Ctrl-C is recorded too (where Python's handler is set: a background job ignores it)
        ctrl_c = [signal.SIGINT] * (signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        with handling(_exit_143, signal.SIGTERM), handling(_interrupt_130, *ctrl_c):
            try:
                code = COMMANDS[args.command](args)
                sys.stdout.flush()  # inside: a closed pipe shows here, not at interpreter exit
                return code
            except Exception as exc:  # a stop rewrapped by a library (torch's exporter)
                if _STOPPED and not isinstance(exc, UserError | Interrupted):
                    raise (SystemExit(143) if _STOPPED[0] == 143 else KeyboardInterrupt) from None
                raise
    except BrokenPipeError:
        if not _stdout_gone():
            raise
        return 141  # the reader of our output went away (`| head`): stop quietly, as Unix tools do
    except (Interrupted, KeyboardInterrupt) as exc:
        newline = "\n" if sys.stderr.isatty() else ""  # a terminal shows ^C where the cursor was
        said = one_line(str(exc)) if isinstance(exc, Interrupted) else "interrupted"
        print(f"{newline}{said}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    except Exception as exc:
        if not hasattr(exc, "exit_code"):  # a bug: its traceback
            raise
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(str(exc))}", file=sys.stderr)  # one line, whatever a path holds
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
