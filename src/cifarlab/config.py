"""The one typed training config, recipe loading, overrides and their validation.

A recipe is a YAML file of overrides on `TrainConfig`'s defaults. Every override is checked
against its field's type and limits, and an unknown key fails with the closest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import itertools
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from cifarlab.errors import UserError
from cifarlab.rundir import expand, replaced_when_complete

RECIPE_DIR = Path(__file__).parent / "recipes"
DATASETS = ("cifar10", "cifar100")  # the names `data` takes for torchvision's sets; else a path


MAX_TIME_BUDGET = 7 * 86400  # seconds
MAX_SEED = 2**32 - 1
MAX_LR = 1e6  # lr and its multipliers: far above any that trains, and well inside float32


def _key(default: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
         **kind: Any) -> Any:  # fmt: skip
    """A field with its limits (`lo` <= value <= `hi`, `lo` < value with `lo_open`) and its kind
    for `differences`: runtime (how a run executes, never what it computes: --resume may change
    it), length (how long it trains), scaled (epochs scaled in proportion with `epochs`),
    auto=value (a run resolves `value` on its machine; a config still asking for it matches)."""
    return field(default=default, metadata={"min": lo, "max": hi, "lo_open": lo_open, **kind})


def _one_of(*choices: str, **kind: Any) -> Any:
    """A field that takes one of `choices`, the first by default."""
    return field(default=choices[0], metadata={"choices": choices, **kind})


@dataclass
class TrainConfig:
    # --- what to train on ---
    data: str = "cifar10"  # cifar10 | cifar100 | folder | .tar/.tar.gz/.zip of a folder
    data_root: str = _key("", runtime=True)  # where torchvision datasets and caches live
    # ("" = $CIFARLAB_DATA or ~/.cache/cifarlab)
    image_size: int = _key(32, 8, 1024)  # pixels, square
    val_size: int = _key(5000, 0)  # images held out from train (unused beside a val/ folder)
    subset: int = _key(0, 0)  # keep N training images (0 = all)
    classes: list[str] = field(default_factory=list)  # train on these classes only ([] = all)
    on_bad_image: str = _one_of("error", "skip")
    normalize: str = _one_of("auto", "train", "cifar10", "imagenet")
    # input statistics: train = computed from the training split; cifar10 / imagenet = the fixed
    # constants; auto = imagenet when starting from ImageNet weights, else train

    # --- model ---
    model: str = "cnn"
    width: float = _key(1.0, 0.0, lo_open=True)  # channel multiplier
    pretrained: bool = False  # tv-*/tv: models: torchvision's DEFAULT ImageNet weights
    weights: str = ""  # a local state-dict file (tv-*, tv:, timm:), or a torchvision weights
    # name such as IMAGENET1K_V1 (tv-*, tv:): an all-caps name that is not an existing file
    stem: str = _one_of("cifar", "imagenet")  # tv-*/tv:/timm:
    input_size: int = _key(0, 0, auto=0)  # imagenet stem: side to upsample to
    # (0 = 224 on CUDA, 64 on CPU where 224 would be ~12x slower)
    init_from: str = ""  # start from our own run/checkpoint (new head if the classes differ)
    freeze: str = _one_of("none", "backbone")
    freeze_epochs: int = _key(0, 0, length=True, scaled=True)  # train the head only this long
    backbone_lr_mult: float = _key(1.0, 0.0, MAX_LR, lo_open=True)  # lr x this
    # for everything but the head (discriminative fine-tuning, e.g. 0.1)
    lr_mults: list[str] = field(default_factory=list, metadata={"pairs": True})  # "prefix=x":
    # parameters whose name starts with prefix train at lr x x (e.g. classifier=0.1); longest wins

    # --- optimisation ---
    epochs: int = _key(100, 1, length=True)
    train_steps: int = _key(0, 0, length=True)  # stop after this many optimiser
    # steps, the schedule ending there (0 = epochs x steps per epoch); set by time_budget
    time_budget: float = _key(0.0, 0.0, MAX_TIME_BUDGET, length=True)  # s, whole run
    # (training, validation, final TTA and test passes); the run times its first steps and
    # picks train_steps to fit (0 = off; `--time-budget 15m` on the command line)
    fit_width: bool = _key(False, runtime=True)  # with time_budget (cnn, resnet*, fastnet):
    # while fewer than half of `epochs` fit, the model is built again at half its width (down to
    # a quarter) and timed again; how a new run chooses `width_halvings`, which is then compared
    width_halvings: int = _key(0, 0, 2)  # the model trains at width / 2**this (set by fit_width)
    batch_size: int = _key(128, 1)
    micro_batch: int = _key(0, 0)  # forward and backward each batch
    # in chunks of this many images, one optimiser step on their summed gradients (0, or not
    # below the batch: whole). BatchNorm normalises each chunk on its own ("ghost batches"), so
    # it is part of the recipe; a chunk's activations may stay in cache (faster on a CPU)
    lr: float = _key(0.1, 0.0, MAX_LR, lo_open=True)  # peak lr for this batch size
    momentum: float = _key(0.9, 0.0, 1.0)
    nesterov: bool = False
    optimizer: str = _one_of("sgd", "muon")  # muon: conv filters
    # (4-D weights) take Muon's orthogonalised steps (airbench94_muon), the rest SGD as above
    muon_lr: float = _key(0.24, 0.0, MAX_LR, lo_open=True)  # peak, per step
    muon_momentum: float = _key(0.6, 0.0, 1.0)  # Nesterov
    weight_decay: float = _key(5e-4, 0.0)
    no_decay_norm_bias: bool = False  # no weight decay on BatchNorm and bias parameters
    bias_lr_mult: float = _key(1.0, 0.0, MAX_LR, lo_open=True)  # lr x this for 1-D
    # params (norm scales/shifts, biases), their weight decay / this, so their decay per step stays
    schedule: str = _one_of("cosine", "onecycle", "linear", "constant")  # linear: from the peak
    # (after any warm-up) straight down to zero
    lr_step: str = _one_of("step", "epoch")  # the schedule moves
    # every optimiser step, or once per epoch (the lesson's scheduler.step() after each epoch)
    warmup_epochs: float = _key(0.0, 0.0, length=True, scaled=True)
    label_smoothing: float = _key(0.0, 0.0, 1.0)
    ema: bool = False  # evaluate and keep an exponential moving average of the weights
    ema_decay: float = _key(0.999, 0.0, 1.0, lo_open=True)  # per step

    # --- speed-record ingredients (airbench); usable with any model ---
    whitening: bool = False  # first conv set to whiten the training patches, weights frozen
    whiten_bias_epochs: int = _key(0, 0, length=True, scaled=True)  # with whitening: that conv's
    # bias trains for this many epochs, then freezes (0 = it trains throughout)
    lookahead: bool = False  # every lookahead_every steps, weights reset onto their slow average
    lookahead_every: int = _key(5, 1)
    lookahead_decay: float = _key(0.95, 0.0, 1.0)  # per step, ramped
    # in as progress^3; the run ends on the slow average

    # --- data pipeline and augmentation ---
    loader: str = _one_of("device", "torchvision")
    drop_last: bool = True  # an epoch's last partial batch skipped (false: the torchvision
    # loader trains on it too, as a plain DataLoader does: 391 steps for 50,000 at batch 128)
    crop_padding: int = _key(4, 0)  # random-crop padding, 0 = no crop
    padding_mode: str = _one_of("reflect", "zeros")
    flip: bool = True
    alt_flip: bool = False  # with flip: each image is mirrored in every other epoch (random
    # phase per image) instead of by a fresh coin each time it is seen
    jitter_brightness: float = _key(0.0, 0.0, 1.0)
    jitter_contrast: float = _key(0.0, 0.0, 1.0)
    jitter_saturation: float = _key(0.0, 0.0, 1.0)
    cutout: int = _key(0, 0)  # side of the square cut out, pixels
    policy: str = _one_of("none", "autoaugment", "randaugment", "trivialaugment")
    mixup_alpha: float = _key(0.0, 0.0)  # 0 = off
    cutmix_alpha: float = _key(0.0, 0.0)  # 0 = off
    mix_prob: float = _key(1.0, 0.0, 1.0)  # share of batches mixed
    switch_prob: float = _key(0.5, 0.0, 1.0)  # CutMix share when both on
    workers: int = _key(2, 0, runtime=True)  # DataLoader workers (torchvision loader)

    # --- hardware ---
    device: str = _key("auto", runtime=True)  # auto | cpu | cuda | cuda:N | mps
    threads: int = _key(0, 0, runtime=True)  # CPU threads, 0 = all cores (more are capped at them)
    amp: str = _one_of("auto", "bf16", "fp16", "off", auto="auto")
    channels_last: str = _one_of("auto", "on", "off")
    compile: bool = False
    sync_bn: bool = False  # under torchrun: BatchNorm statistics synchronised across ranks

    # --- run control ---
    seed: int = _key(0, 0, MAX_SEED)  # numpy and torch take 0..2**32-1
    split_seed: int = _key(-1, -1, MAX_SEED)  # draws the subset and
    # the held-out validation split (-1 = `seed`): fix it to compare initialisations on one split
    save_every_steps: int = _key(0, 0, runtime=True)  # mid-epoch last.pt, 0 = off
    on_nan: str = _one_of("stop", "skip", runtime=True)  # a non-finite or exploding batch
    # loss (over 50x a uniform guess's): stop as diverged, or skip the batch
    eval_batch_size: int = _key(500, 1, runtime=True)
    tta: str = _one_of("none", "flip", "flip-translate")  # after the last epoch, validation
    # once more with TTA (and `evaluate`'s default in suites)
    progress: bool = _key(True, runtime=True)
    tensorboard: bool = _key(False, runtime=True)  # scalars and the config (HParams) under
    # <run>/tensorboard/
    tracking: str = _one_of("none", "mlflow", runtime=True)  # mlflow: the
    # config as params, every epoch's metrics, result files, best.pt and reports as artifacts
    tracking_uri: str = _key("", runtime=True)  # MLflow store
    # ("" = sqlite:///<folder holding the run>/mlflow.db)
    experiment: str = _key("", runtime=True)  # MLflow experiment
    # ("" = cifarlab; a suite's runs: the suite's name)
    recipe: str = "default"  # the recipe these settings came from (informational)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = get_type_hints(TrainConfig)


def default_data_root() -> Path:
    return expand(os.environ.get("CIFARLAB_DATA") or "~/.cache/cifarlab")


def data_root(config: TrainConfig) -> Path:
    return expand(config.data_root) if config.data_root else default_data_root()


def absolute_data(src: str) -> str:
    """`data` as a run stores it: a path that exists made absolute, so that the run's commands
    (evaluate, calibrate) find it from any working directory; a dataset name as given."""
    path = expand(src)
    return os.path.abspath(path) if src not in DATASETS and path.exists() else src


# what other tools call some keys (timm, Keras, the lesson's notebook)
OTHER_NAMES = {"learning_rate": "lr", "wd": "weight_decay", "bs": "batch_size", "num_epochs": "epochs",
               "n_epochs": "epochs", "smoothing": "label_smoothing", "mixup": "mixup_alpha",
               "cutmix": "cutmix_alpha", "warmup": "warmup_epochs", "opt": "optimizer",
               "sched": "schedule", "lr_schedule": "schedule", "arch": "model"}  # fmt: skip


_BOOLS = {
    **dict.fromkeys(("true", "1", "yes", "on"), True),
    **dict.fromkeys(("false", "0", "no", "off"), False),
}


def _closest(key: str) -> str:
    names = {**{name: name for name in FIELDS}, **OTHER_NAMES}
    match = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return f" (did you mean '{names[match[0]]}'?)" if match else ""


def _checked(key: str, value: Any, where: str) -> Any:
    """`value` as field `key` takes it (strings from the command line parsed), within its limits."""
    kind, meta = _TYPES[key], FIELDS[key].metadata
    finite = " (a finite number)" if kind in (int, float) else ""
    bad = f"{where}: '{key}' must be {getattr(kind, '__name__', kind)}{finite}, got {value!r}"
    if kind is bool:
        value = _BOOLS.get(value.lower(), value) if isinstance(value, str) else value
        if not isinstance(value, bool):
            raise UserError(bad)
    elif kind in (int, float):
        if key == "time_budget" and isinstance(value, str) and value.strip()[-1:].isalpha():
            value = parse_duration(value, f"{where}: 'time_budget'")  # 15m, 1.5h as on the CLI
        try:
            value = kind(value) if isinstance(value, str) else value
        except ValueError:
            raise UserError(bad) from None
        allowed = int if kind is int else int | float
        if isinstance(value, bool) or not isinstance(value, allowed) or not math.isfinite(value):
            raise UserError(bad)
        value, lo, hi, lo_open = kind(value), meta.get("min"), meta.get("max"), meta.get("lo_open")
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise UserError(
                f"{where}: '{key}' must be {'>' if lo_open else '>='} {lo}, got {value}"
            )
        if hi is not None and value > hi:
            raise UserError(f"{where}: '{key}' must be <= {hi}, got {value}")
    elif kind == list[str]:
        bad = f"{where}: '{key}' must be names (a,b or [a, b]; quoted \"b,c\" keeps its comma), got {value!r}"
        if isinstance(value, str) and value.strip().startswith("["):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise UserError(bad) from None
        if isinstance(value, str):
            names = parse_names(value)
            value = names if names or not value.strip() else value  # ",," names none: refused
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise UserError(bad)
        if meta.get("pairs"):
            name_multipliers(value, f"{where}: '{key}'")
    else:
        word = {True: "on", False: "off"}.get(value) if isinstance(value, bool) else None
        if word in meta.get("choices", ()):
            value = word  # YAML 1.1 reads an unquoted on/off as a boolean
        if not isinstance(value, str):
            raise UserError(f"{where}: '{key}' must be a string, got {value!r} (quote it in YAML)")
        if value not in meta.get("choices", (value,)):
            raise UserError(
                f"{where}: '{key}' must be one of {', '.join(meta['choices'])}; got {value!r}"
            )
    return value


# one item of a comma-separated list: a name in double quotes ("" for a quote) keeps commas and
# spaces at its ends, as in CSV; an unquoted one is stripped
_LIST_ITEM = r'\s*(?:"(?:[^"]|"")*"|[^,"]*)\s*'


def parse_names(text: str) -> list[str] | None:
    """`a, "b,c", " d"` -> ["a", "b,c", " d"]; empty items dropped; None for stray quotes."""
    if not re.fullmatch(rf"{_LIST_ITEM}(,{_LIST_ITEM})*", text):
        return None
    items = [m.strip() for m in re.findall(rf"(?:^|,)({_LIST_ITEM})", text)]
    return [i[1:-1].replace('""', '"') if i.startswith('"') else i for i in items if i]


def quoted_name(name: str) -> str:
    """`name` as `parse_names` reads it back: in double quotes (doubled inside) when it holds a
    comma, a quote or edge spaces, so a comma-separated list of names stays readable."""
    if "," in name or '"' in name or name != name.strip():
        return '"' + name.replace('"', '""') + '"'
    return name


def quoting_hint(names: list[str]) -> str:
    """For an unknown-class error: how to give the names a plain comma list cannot."""
    if any(quoted_name(n) != n for n in names):
        return (
            "; give a name holding a comma, a quote or edge spaces in double quotes: '\"a,b\",cat'"
        )
    return ""


def name_multipliers(items: list[str], where: str = "lr_mults") -> dict[str, float]:
    """["prefix=0.1", ...] -> {"prefix": 0.1}; each multiplier a positive number up to MAX_LR."""
    out = {}
    for item in items:
        prefix, _, mult = item.partition("=")
        try:
            value = float(mult)
        except ValueError:
            value = float("nan")
        if not prefix.strip() or not 0 < value <= MAX_LR:
            raise UserError(
                f"{where}: {item!r} must be name-prefix=positive-number (at most {MAX_LR:g}), "
                "e.g. classifier=0.1"
            )
        if prefix.strip() in out:  # the last would win without a word
            raise UserError(f"{where}: {prefix.strip()!r} is given twice; give each prefix once")
        out[prefix.strip()] = value
    return out


def apply_overrides(config: TrainConfig, overrides: dict[str, Any], where: str) -> TrainConfig:
    """A copy of `config` with `overrides` applied, each checked against its field."""
    values = config.to_dict()
    for key, value in overrides.items():
        if key not in FIELDS:
            raise UserError(f"{where}: unknown config key '{key}'{_closest(key)}")
        values[key] = _checked(key, value, where)
    return TrainConfig(**values)


def parse_set_options(items: list[str]) -> dict[str, str]:
    """`--set key=value` strings to raw strings, which `apply_overrides` parses by field type."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set label_smoothing=0.1")
        out[key.strip()] = raw.strip()
    return out


def list_recipes() -> dict[str, str]:
    """Shipped recipe names and the first sentence of each file's opening comment."""
    out = {}
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        lines = path.read_text().splitlines()
        comment = " ".join(
            line.lstrip("#").strip()
            for line in itertools.takewhile(lambda line: line.startswith("#"), lines)
        )
        out[path.stem] = re.split(r"(?<=\.)\s", comment, maxsplit=1)[0].rstrip(".")
    return out


def named_yaml(name_or_file: str, folder: Path, kind: str, names) -> Path:
    """A `.yaml` path as given, or a shipped `<folder>/<name>.yaml`; the error lists `names()`."""
    path = Path(name_or_file)
    if path.suffix in (".yaml", ".yml"):
        if path.is_dir():  # "does not exist" would send the user looking for it
            raise UserError(f"{kind} file {path} is a folder; give the .yaml file inside it")
        if not path.is_file():
            shipped = (folder / f"{path.stem}.yaml").is_file()  # "exercise-2.yaml"
            hint = f"; for the shipped {kind}, give its name: {path.stem}" if shipped else ""
            raise UserError(f"{kind} file {path} does not exist{hint}")
        return path
    shipped = folder / f"{name_or_file}.yaml"
    if not shipped.is_file():
        valid = ", ".join(names())
        raise UserError(
            f"unknown {kind} '{name_or_file}'; valid {kind}s: {valid} (or a .yaml path)"
        )
    return shipped


def recipe_path(name_or_file: str) -> Path:
    return named_yaml(name_or_file, RECIPE_DIR, "recipe", list_recipes)


class _KeySetTwice(yaml.constructor.ConstructorError):
    """A key written twice in one mapping: valid YAML, which would keep the last silently."""


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen = []
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _KeySetTwice(
                    None, None, f"key {key!r} is set twice; keep one", key_node.start_mark
                )
            seen.append(key)
        return super().construct_mapping(node, deep)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", exc)
        if not isinstance(exc, _KeySetTwice):
            problem = f"not valid YAML ({problem})"
        raise UserError(f"{where}: {problem}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    if data is not None and not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data or {}


def resolve_base(recipe: Path, base: str) -> str:
    """A recipe's `base`: a shipped name as it is, a relative file beside `recipe` that names it."""
    if Path(base).suffix in (".yaml", ".yml") and not Path(base).is_absolute():
        return str((recipe.parent / base).resolve())
    return base


def load_recipe(name_or_file: str, _seen: tuple[Path, ...] = ()) -> TrainConfig:
    """A recipe: its YAML overrides on the defaults, or on its `base:` recipe (a shipped name, or a
    file relative to this one). A child's `epochs` replaces the base's `time_budget` but, unlike
    `--epochs`, does not rescale the base's epoch-based keys."""
    path = recipe_path(name_or_file)
    if path.resolve() in _seen:
        chain = " -> ".join(p.stem for p in (*_seen, path.resolve()))
        raise UserError(f"{path}: recipes name each other as base in a circle ({chain})")
    overrides = read_yaml_mapping(path)
    base = overrides.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise UserError(f"{path}: 'base' must be a recipe name or file, got {base!r}")
    start = TrainConfig()
    if base:
        base = resolve_base(path, base)
        try:
            start = load_recipe(base, (*_seen, path.resolve()))
        except UserError as exc:
            if "in a circle" in str(exc):
                raise
            raise UserError(f"{path}: base {base}: {exc}") from None
        if "epochs" in overrides or "train_steps" in overrides:
            overrides.setdefault("time_budget", 0.0)  # a length set here replaces the base's budget
    named = overrides.setdefault("recipe", path.stem)  # a recipe file is named by its file
    # a run's config.yaml names every key (one from an older version nearly every key)
    saved_run = len(overrides) > len(FIELDS) // 2
    if named != path.stem and not saved_run:  # `recipe: fast` would train something else
        hint = "" if base else f", or write 'base: {named}' to start from {named}"
        raise UserError(
            f"{path}: 'recipe: {named}' only labels runs and loads nothing: drop it (this file "
            f"is the recipe '{path.stem}'){hint}"
        )
    return apply_overrides(start, overrides, where=str(path))


def save_config(config: TrainConfig, path: Path) -> None:
    """`path` holds the old config or the whole new one: a torn one would resume other settings."""
    with replaced_when_complete(path) as tmp:
        tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


# --- the rules across fields: the one place that decides whether a resolved config is valid ----


def validate_config(config: TrainConfig, where: str = "config", world: int = 1) -> TrainConfig:
    """Every field against its type and limits, then the rules between fields (`world`: torchrun
    processes). Returns `config` as a run stores it, its data and cache folder made absolute."""
    for key, value in config.to_dict().items():
        _checked(key, value, where)
    rules = (_model_rules(config), _training_rules(config), _run_rules(config, world))
    broken = next(itertools.chain(*rules), None)
    if broken:
        raise UserError(f"{where}: {broken}")
    root = config.data_root and os.path.abspath(expand(config.data_root))
    return dataclasses.replace(config, data=absolute_data(config.data), data_root=root)


def _model_rules(config: TrainConfig) -> Iterator[str]:
    """What is wrong with what the model can take: weights, stems, input sizes."""
    from cifarlab.models import fixed_input_problem, model_spec  # torch
    from cifarlab.models.adapt import weights_file

    spec = model_spec(config.model)
    if (config.pretrained or config.weights) and not spec.backbone:
        yield (
            f"model {config.model} has no ImageNet weights; pretrained/--weights apply to the "
            "tv-*, tv:<name> and timm:<name> models (see `cifarlab models`)"
        )
    if config.pretrained and not spec.named_weights:
        yield (
            f"pretrained: true downloads torchvision weights; {config.model} takes them only "
            "from a local file (weights: FILE)"
        )
    file = weights_file(config.weights, spec.named_weights)
    if spec.backbone and file and not file.is_file():
        named = ", or a torchvision weights name such as IMAGENET1K_V1" * spec.named_weights
        what = "is a folder" if file.is_dir() else "no such file"
        yield f"weights {file}: {what}; give a state-dict file{named}"
    if config.stem != "cifar" and not spec.backbone:
        yield (
            f"stem: {config.stem} applies to the tv-* models only and to tv:/timm: names, "
            f"not {config.model}"
        )
    if problem := fixed_input_problem(spec, config.model, config.stem):
        yield problem
    lo, hi = spec.sides
    if not lo <= config.image_size <= hi:
        yield (
            f"model {config.model} takes images of {lo} to {hi} px, not {config.image_size}; "
            "e.g. image_size: 32"
        )
    if config.whitening and (config.pretrained or config.weights):
        yield "whitening: true would overwrite the pretrained first layer; drop one of the two"
    if config.whiten_bias_epochs and not config.whitening:
        yield "whiten_bias_epochs needs whitening: true (or --set whiten_bias_epochs=0)"
    if config.fit_width and config.time_budget and (spec.backbone or config.init_from):
        why = "starts from --init-from's weights" if config.init_from else "has a fixed width"
        yield f"fit_width narrows cnn, resnet and fastnet; {config.model} {why}: --set fit_width=false"


def _training_rules(config: TrainConfig) -> Iterator[str]:
    """What is wrong between the data, augmentation and schedule keys."""
    if not config.data.strip():  # "" would read the working directory as a class folder
        yield "data is empty; give cifar10, cifar100, a class folder or an archive"
    if config.alt_flip and config.loader != "device":
        yield "alt_flip needs loader: device (the torchvision loader flips by coin)"
    if not config.drop_last and config.loader != "torchvision":
        yield "drop_last: false needs loader: torchvision (the device loader trains on full batches)"
    if config.crop_padding >= config.image_size:
        yield (
            f"crop_padding {config.crop_padding} is not below the image side ({config.image_size} px): "
            "a crop would be mostly padding (reflect padding cannot even make it); e.g. 4 for 32 px"
        )
    if config.alt_flip and not config.flip:
        yield (
            "alt_flip: true needs flip: true (it decides when each image is mirrored); "
            "add --set alt_flip=false"
        )
    if config.freeze == "backbone" and not 1 <= config.freeze_epochs <= config.epochs:
        yield (
            f"freeze: backbone needs freeze_epochs from 1 to epochs={config.epochs}, got "
            f"{config.freeze_epochs}: the epochs the head trains alone (all of them: a linear probe)"
        )
    if config.freeze_epochs and config.freeze != "backbone":
        yield "freeze_epochs needs freeze: backbone (or --set freeze_epochs=0)"
    if config.warmup_epochs >= config.epochs:
        yield (
            f"warmup_epochs={config.warmup_epochs:g} must be less than epochs={config.epochs}, "
            "or the lr never anneals"
        )
    twice = sorted({c for c in config.classes if config.classes.count(c) > 1})
    if twice:
        yield f"classes {config.classes}: {twice} listed more than once; name each class once"
    if len(config.classes) == 1:
        yield f"classes {config.classes}: name at least two classes (or none for all)"


def _run_rules(config: TrainConfig, world: int) -> Iterator[str]:
    """What is wrong with where and how the run executes: devices, extras, processes."""
    if config.tracking_uri and config.tracking == "none":
        yield f"tracking_uri {config.tracking_uri!r} is set but tracking is none; add --set tracking=mlflow"
    if config.tracking == "mlflow" and importlib.util.find_spec("mlflow") is None:
        yield "tracking: mlflow needs the extra: pip install 'cifarlab[mlflow]'"
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        yield "tensorboard: true needs the extra: pip install 'cifarlab[tensorboard]'"
    per_process, smallest = smallest_chunk(config, world)
    if smallest == 1:
        yield (
            f"micro_batch={config.micro_batch} leaves a chunk of one image in each batch of {per_process} "
            "images per process, whose BatchNorm statistics are meaningless; pick chunks of 2 or "
            "more that leave no single image over, or 0 for whole batches"
        )
    if world > 1 and config.loader != "device":
        yield "under torchrun use loader: device"
    if world > 1 and config.time_budget:
        yield "time_budget is for a single process (not torchrun)"
    if world > 1 and config.batch_size % world != 0:
        yield f"batch_size={config.batch_size} must divide by the {world} processes (global batch)"


LENGTH_KEYS = tuple(k for k, f in FIELDS.items() if f.metadata.get("length"))


def run_settings(config: TrainConfig) -> dict[str, Any]:
    """What `config` computes: every key but the runtime ones, which a resumed run takes anew."""
    return {k: v for k, v in config.to_dict().items() if not FIELDS[k].metadata.get("runtime")}


def with_epochs(config: TrainConfig, epochs: int) -> TrainConfig:
    """`config` trained for `epochs` (any time budget dropped), its epoch-based settings scaled
    in proportion: a shorter run keeps the schedule's shape and still anneals."""
    return dataclasses.replace(with_steps(config, epochs, 1), time_budget=0.0, train_steps=0)


def with_steps(config: TrainConfig, steps: int, steps_per_epoch: int) -> TrainConfig:
    """`config` stopped after `steps` optimiser steps, scaled as `with_epochs` scales it. A staged
    run (`freeze: backbone` for fewer than all epochs) keeps one head-only and one fine-tune
    epoch: never unfrozen, it would be a linear probe under the fine-tuning arm's name."""
    epochs = max(1, math.ceil(steps / steps_per_epoch))
    ratio = epochs / config.epochs
    staged = config.freeze == "backbone" and 0 < config.freeze_epochs < config.epochs
    epochs = max(epochs, 2) if staged else epochs
    warmup = config.warmup_epochs * (steps / steps_per_epoch / config.epochs)
    values = {"epochs": epochs, "train_steps": steps, "warmup_epochs": round(warmup, 4)}
    for key in ("freeze_epochs", "whiten_bias_epochs"):
        old = getattr(config, key)
        last = epochs - 1 if key == "freeze_epochs" and staged else epochs
        values[key] = max(1, min(last, round(old * ratio))) if old else 0  # a probe stays one
    return dataclasses.replace(config, **values)


def smallest_chunk(config: TrainConfig, world: int = 1) -> tuple[int, int]:
    """(the per-process batch, the fewest images a `micro_batch` chunk of it holds: the last
    chunk may be the smaller); 0 chunks when each process forwards its batch whole."""
    per_process, chunk = config.batch_size // world, config.micro_batch
    if not 0 < chunk < per_process:
        return per_process, 0
    return per_process, per_process % chunk or chunk


def parse_duration(text: str, where: str = "--time-budget") -> float:
    """ "900", "90s", "15m", "1.5h", "2d" -> seconds; `where` names the setting in errors."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    raw = text.strip().lower()
    scale = units.get(raw[-1:])
    try:
        value = float(raw[:-1] if scale else raw) * (scale or 1)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise UserError(
            f"{where} {text!r}: expected a positive duration such as 900, 90s, 15m or 1.5h"
        )
    if value > MAX_TIME_BUDGET:
        raise UserError(f"{where} {text}: at most 7 days (168h)")
    return value


def with_length(
    config: TrainConfig, epochs: int | None, budget: float | None, where: str = ""
) -> TrainConfig:
    """`config` trained for `epochs` (`with_epochs`), or for `budget` times its own epochs (at
    least one), or as it is when neither is given. Errors name `where`, or the CLI's flags."""
    if epochs is not None and budget is not None:
        raise UserError(
            f"{where or '--epochs/--budget'}: both set the run's length; give epochs or budget, "
            "not both"
        )
    if budget is not None:
        if not (math.isfinite(budget) and budget > 0):
            raise UserError(
                f"{where or '--budget'}: budget {budget} must be a positive fraction, e.g. 0.1"
            )
        epochs = max(1, round(config.epochs * budget))
    elif epochs is not None:
        epochs = _checked("epochs", epochs, where or "--epochs")
    return config if epochs is None else with_epochs(config, epochs)


def model_width(config: TrainConfig) -> float:
    """The width the model is built at: `width`, halved `width_halvings` times by `fit_width`."""
    return config.width / 2**config.width_halvings


def split_seed(config: TrainConfig) -> int:
    """The seed that draws the subset and the validation split."""
    return config.split_seed if config.split_seed >= 0 else config.seed


def differences(saved: TrainConfig, wanted: TrainConfig) -> list[str]:
    """The one "same run?" rule (--resume, suite reruns, tune continuations): the keys in which
    `wanted` computes something other than `saved`. Runtime keys may differ; what `wanted` leaves
    to the run (`auto` values; under an unplanned time budget the length, and with `fit_width`
    `width_halvings`) matches what `saved` resolved; split_seed -1 is the seed, a relative data path
    its absolute one. When `epochs` differs, the keys scaled with it are not listed."""
    left = {k for k, f in FIELDS.items() if f.metadata.get("auto", ...) == getattr(wanted, k)}
    if wanted.time_budget and not wanted.train_steps:  # the run chooses its length
        left |= set(LENGTH_KEYS) - {"time_budget"}
        left |= {"width_halvings"} if wanted.fit_width else set()  # ... and how narrow it trains
    old, new = (
        dataclasses.replace(c, split_seed=split_seed(c), data=absolute_data(c.data))
        for c in (saved, wanted)
    )
    differ = {k for k, v in run_settings(old).items() if k not in left and v != getattr(new, k)}
    if "epochs" in differ:
        differ -= {k for k in differ if FIELDS[k].metadata.get("scaled")}
    return [k for k in FIELDS if k in differ]


def config_changes(saved: TrainConfig, wanted: TrainConfig) -> list[str]:
    """ "key: old -> new" for each of `differences(saved, wanted)`."""
    return [
        f"{k}: {getattr(saved, k)!r} -> {getattr(wanted, k)!r}" for k in differences(saved, wanted)
    ]
