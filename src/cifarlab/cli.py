"""The `cifarlab` command: parse, validate, call. Exit codes: 0 done, 1 failed, 2 bad input, 130/143 stopped."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from cifarlab.errors import Interrupted, UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like every other bad input
        raise UserError(f"{self.prog}: {message} (see --help)")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", help="cifar10, cifar100, a class folder, or a .tar/.tar.gz/.zip of one"
    )
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument(
        "--recipe", default="seed-cnn", help="recipe name (see `cifarlab recipes`) or YAML file"
    )
    p.add_argument(
        "--data-root",
        help="where datasets and caches live (default $CIFARLAB_DATA or ~/.cache/cifarlab)",
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--subset", type=int, help="keep a stratified subset of N training images")
    p.add_argument(
        "--val-size", type=int, help="validation images held out from train (default 5000)"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--classes", help="train on these classes only, comma-separated")
    p.add_argument("--weights", help="tv-* models: local ImageNet state-dict file")
    p.add_argument(
        "--init-from", metavar="RUN_DIR|CHECKPOINT", help="start from our own trained weights"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar, epoch lines only")


def _config_from_args(args) -> object:
    from cifarlab.config import apply_overrides, load_recipe, parse_set_options

    config = load_recipe(args.recipe)
    flags = {
        "data": args.data, "data_root": args.data_root, "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": args.lr, "seed": args.seed, "subset": args.subset, "val_size": args.val_size,
        "classes": args.classes, "weights": args.weights, "init_from": args.init_from,
    }  # fmt: skip
    overrides = {k: v for k, v in flags.items() if v is not None}
    if args.no_progress:
        overrides["progress"] = False
    config = apply_overrides(config, overrides, where="command line")
    return apply_overrides(config, parse_set_options(args.set), where="--set")


def cmd_train(args) -> int:
    from cifarlab.models import MODELS
    from cifarlab.train import train

    config = _config_from_args(args)
    if config.model not in MODELS:
        raise UserError(f"unknown model '{config.model}'; valid models: {', '.join(MODELS)}")
    result = train(config, args.out, resume=args.resume)
    tta = "" if result.tta_val_acc is None else f" ({result.tta_val_acc:.2%} with TTA)"
    print(
        f"done: best val acc {result.best_val_acc:.2%}, final {result.final_val_acc:.2%}{tta}, "
        f"{result.seconds:.0f}s; run in {result.run_dir}"
    )
    return 0


def cmd_models(_args) -> int:
    from cifarlab.models import MODELS

    width = max(map(len, MODELS))
    for name, spec in MODELS.items():
        print(f"{name:<{width}}  {spec.about}")
    return 0


def cmd_recipes(_args) -> int:
    from cifarlab.config import list_recipes

    recipes = list_recipes()
    width = max(map(len, recipes))
    for name, about in recipes.items():
        print(f"{name:<{width}}  {about}")
    return 0


def cmd_evaluate(args) -> int:
    from cifarlab.evaluate import EvalOptions, evaluate

    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    opts = EvalOptions(
        args.model, args.split, args.data, args.tta, args.ema, args.out, classes, args.device
    )
    evaluate(opts)
    return 0


def cmd_predict(args) -> int:
    from cifarlab.predict import run_predict

    return run_predict(args.model, args.paths, args.top_k, args.json, args.batch_size)


def cmd_suite(args) -> int:
    from cifarlab.config import parse_set_options
    from cifarlab.suites import SuiteOptions, list_suites, run_suite

    if args.list:
        suites = list_suites()
        width = max(map(len, suites))
        for name, about in suites.items():
            print(f"{name:<{width}}  {about}")
        return 0
    if not args.name or not args.data or not args.out:
        raise UserError("suite: NAME, --data and --out are required (or --list)")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(
            f"--seeds {args.seeds!r}: expected integers separated by commas, e.g. 0,1,2"
        ) from None
    if args.parallel > 1:
        print(
            f"note: --parallel {args.parallel}: runs go one at a time on this machine's single device"
        )
    overrides = parse_set_options(args.set)
    if args.no_progress:
        overrides["progress"] = False
    opts = SuiteOptions(
        args.data, args.out, args.epochs, args.subset, seeds or [0], args.only, overrides
    )
    run_suite(args.name, opts)
    return 0


def cmd_export(args) -> int:
    from cifarlab.export import export_model

    suffix = ".onnx" if args.format == "onnx" else ".ts"
    src = Path(args.model)
    out = args.out or (src / f"model{suffix}" if src.is_dir() else src.with_suffix(suffix))
    print(f"exported {export_model(args.model, args.format, out, args.force)}")
    return 0


def cmd_tune(args) -> int:
    from cifarlab.config import parse_set_options
    from cifarlab.tune import TuneOptions, run_tune

    overrides = parse_set_options(args.set)
    for key in ("epochs", "subset", "val_size"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.no_progress:
        overrides["progress"] = False
    run_tune(
        TuneOptions(
            args.recipe, args.data, args.trials, args.storage, args.out, args.study or "", overrides
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cifarlab", description="Train, analyse and compare small-image classifiers."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _train_args(sub.add_parser("train", help="train a model into a run directory"))
    ev = sub.add_parser("evaluate", help="metrics, figures and an HTML report for a trained run")
    ev.add_argument("model", metavar="RUN_DIR|CHECKPOINT")
    ev.add_argument("--split", choices=["val", "test"], default="val")
    ev.add_argument(
        "--data", help="evaluate on another data source (with --split test: its test folder)"
    )
    ev.add_argument("--tta", nargs="?", const="flip", default="none", choices=["none", "flip", "flip-translate"],
                    help="also report test-time-augmented accuracy (flip, or flip-translate)")  # fmt: skip
    ev.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    ev.add_argument("--out", type=Path, help="output folder (default RUN_DIR/eval-<split>)")
    ev.add_argument("--classes", help="classes for the mistakes gallery, comma-separated")
    ev.add_argument("--device", default="auto")
    pr = sub.add_parser("predict", help="classify image files and folders")
    pr.add_argument("model", metavar="RUN_DIR|CHECKPOINT|FILE.onnx|FILE.ts")
    pr.add_argument("paths", nargs="+", metavar="PATH")
    pr.add_argument("--top-k", type=int, default=3)
    pr.add_argument("--json", action="store_true", help="one JSON object per line")
    pr.add_argument("--batch-size", type=int, default=256)
    su = sub.add_parser("suite", help="run an experiment suite and tabulate it")
    su.add_argument("name", nargs="?", metavar="NAME|FILE")
    su.add_argument("--list", action="store_true", help="list the shipped suites")
    su.add_argument("--data")
    su.add_argument("--out", type=Path)
    su.add_argument("--epochs", type=int)
    su.add_argument("--subset", type=int)
    su.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    su.add_argument("--only", help="run only this run of the suite")
    su.add_argument(
        "--parallel", type=int, default=1, help="runs at a time where there are devices"
    )
    su.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run"
    )
    su.add_argument("--no-progress", action="store_true")
    ex = sub.add_parser("export", help="export a checkpoint as ONNX or TorchScript")
    ex.add_argument("model", metavar="RUN_DIR|CHECKPOINT")
    ex.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    ex.add_argument("--out", type=Path, help="output file (default RUN_DIR/model.onnx or .ts)")
    ex.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    tu = sub.add_parser("tune", help="hyperparameter search with Optuna (shared, resumable study)")
    tu.add_argument("--recipe", default="seed-cnn")
    tu.add_argument("--data", required=True)
    tu.add_argument(
        "--trials", type=int, required=True, help="trials to finish (completed or pruned)"
    )
    tu.add_argument("--storage", default="sqlite:///study.db", help="any Optuna RDB URL")
    tu.add_argument("--study", help="study name (default <recipe>-<data name>)")
    tu.add_argument(
        "--out", type=Path, default=Path("tune"), help="folder for the trials' run directories"
    )
    tu.add_argument(
        "--epochs", type=int, help="most epochs a trial trains (searched in [epochs/2, epochs])"
    )
    tu.add_argument("--subset", type=int)
    tu.add_argument("--val-size", type=int)
    tu.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    tu.add_argument("--no-progress", action="store_true")
    sub.add_parser("models", help="list the models")
    sub.add_parser("recipes", help="list the shipped recipes")
    return parser


COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "suite": cmd_suite,
    "export": cmd_export,
    "tune": cmd_tune,
    "models": cmd_models,
    "recipes": cmd_recipes,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UserError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:
        print(f"\n{exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug or not hasattr(exc, "exit_code"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
