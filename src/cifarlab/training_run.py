"""The pieces `train.py`'s loop turns, built once from a validated config: hardware, data, the
model (through the one constructor), optimiser, schedule, EMA, AMP scaler, lookahead, batches."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cifarlab.augment import BatchAugment, Normalize
from cifarlab.checkpoint import load_checkpoint, resolve_checkpoint
from cifarlab.config import (
    TrainConfig,
    apply_overrides,
    model_width,
    name_multipliers,
    smallest_chunk,
    split_seed,
)
from cifarlab.data import Splits, load_splits
from cifarlab.data.loaders import DeviceBatches, TorchvisionBatches, to_device_uint8
from cifarlab.data.splits import check_sizes, classes_note
from cifarlab.distributed import Dist
from cifarlab.errors import UserError
from cifarlab.hardware import AMP_NAMES, Hardware, setup_hardware
from cifarlab.inference import model_args
from cifarlab.lookahead import Lookahead
from cifarlab.models import ModelArgs, build_model, head_name, model_spec
from cifarlab.models.torchvision_nets import IMAGENET_MEAN, IMAGENET_STD
from cifarlab.models.whitening import first_conv, init_whitening
from cifarlab.muon import MuonSGD
from cifarlab.phases import phase
from cifarlab.schedules import make_scheduler, stretch

# The usual CIFAR-10 training-set statistics, as lessons hard-code them (per pixel and channel).
CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2470, 0.2435, 0.2616]


@dataclass
class TrainingRun:
    config: TrainConfig
    hw: Hardware
    splits: Splits
    model_args: ModelArgs
    model: torch.nn.Module
    step_model: torch.nn.Module  # compiled and/or DDP-wrapped; shares weights with `model`
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    lookahead: Lookahead | None
    batches: DeviceBatches | TorchvisionBatches
    normalize: Normalize
    val_images: torch.Tensor
    val_labels: torch.Tensor
    fixed: set[int]  # ids of parameters that never train (e.g. whitened weights)
    dist: Dist
    data_fingerprint: str
    test_fingerprint: str  # "" without a test split
    test_images: torch.Tensor | None = None  # scored every epoch for the record, never to select
    test_labels: torch.Tensor | None = None
    # the eval model's logits on val from the latest validation, reused by the final TTA pass
    # (its first view) and the temperature fit (the same weights): two of six passes saved
    val_logits: torch.Tensor | None = None

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model

    @functools.cached_property
    def train_digests(self) -> torch.Tensor:
        """`image_digests` of the training split, kept in every checkpoint; taken at the first
        save, so that hashing every training image does not delay the first step."""
        return image_digests(self.splits.train.images)


SMALL_CHUNK = 16  # images: BatchNorm statistics of fewer are noisy enough to hurt


def _warn_small_chunks(config: TrainConfig, model: torch.nn.Module, log, world: int) -> None:
    """Chunks of 2-15 images ruin BatchNorm's statistics: said (the config refuses only 1)."""
    per_process, smallest = smallest_chunk(config, world)
    has_bn = any(isinstance(m, _BatchNorm) for m in model.modules())
    if has_bn and 0 < smallest < SMALL_CHUNK:
        log(
            f"warning: micro_batch={config.micro_batch} makes chunks as small as {smallest} images of each "
            f"batch of {per_process}: BatchNorm normalises each chunk, and its statistics from so few "
            f"images ruin training; use chunks of {SMALL_CHUNK} or more, or 0 for whole batches"
        )


def build_run(config: TrainConfig, log, d: Dist, splits: Splits | None = None) -> TrainingRun:
    """The run `config` describes, ready to train: on `splits` when given (loaded otherwise)."""
    with phase("precision decision (hardware)"):
        hw = setup_hardware(config, d)
    log(hw.amp_reason)
    if hw.threads_warning:
        log(hw.threads_warning)
    config = dataclasses.replace(config, amp=AMP_NAMES[hw.amp_dtype])
    config = resolve_input_size(config, hw.device, log)
    if splits is None:
        with phase("data (cache read, split)"):
            splits = load_splits(config)
    test = f" / {len(splits.test)} test" if splits.test is not None else ""
    skipped = (
        f", {len(splits.skipped)} skipped (listed in skipped_images.txt)" if splits.skipped else ""
    )
    folder = splits.val_folder
    val = f" (val: the data's {folder}/ folder; --val-size not used)" if folder else ""
    sizes = f"{len(splits.train)} train / {len(splits.val)} val{test}"
    classes = f"{len(splits.classes)} classes" + classes_note(splits.val, "val")
    classes += classes_note(splits.test, "test")  # a class without images in a split
    log(f"data: {config.data} — {sizes} images{val}, {classes}{skipped}")
    if not len(splits.val) and splits.test is None:
        log("note: no validation and no test split: no accuracy is measured while it trains; "
            "evaluate RUN --data FOLDER scores it after, or give --val-size N")  # fmt: skip
    check_sizes(config, splits)
    normalize = Normalize(*input_statistics(config, splits))
    with phase("model build (whitening init)"):
        args, model, fixed = _build_model(config, splits, normalize, hw, d, log)
    _warn_small_chunks(config, model, log, d.world)
    step_model = model
    if d.active:
        ids = [hw.device.index] if hw.device.type == "cuda" else None
        # parameters that stop training mid-run (the whitening bias, a backbone frozen for its
        # first epochs) leave DDP's reducer waiting for their grads unless it looks for them
        stops = bool(config.whitening and config.whiten_bias_epochs) or config.freeze == "backbone"
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=stops
        )
    step_model = torch.compile(step_model) if config.compile else step_model
    optimizer = make_optimizer(model, config, log)
    if config.loader == "device":
        augment = BatchAugment(config, normalize)
        batches = DeviceBatches(splits.train, config, hw.device, augment, d.rank, d.world)
    else:
        batches = TorchvisionBatches(splits.train, config, hw.device, normalize)
    if config.train_steps and math.ceil(config.train_steps / len(batches)) != config.epochs:
        raise UserError(
            f"train_steps={config.train_steps} is {config.train_steps / len(batches):.2f} epochs of "
            f"{len(batches)} steps, but epochs={config.epochs}; set both to agree (or use --time-budget)"
        )
    total = total_steps(config, len(batches))
    scheduler = _scheduler(config, optimizer, len(batches))
    average = get_ema_multi_avg_fn(config.ema_decay)
    ema = AveragedModel(model, multi_avg_fn=average, use_buffers=True) if config.ema else None
    lookahead = None
    if config.lookahead:
        lookahead = Lookahead(model, config.lookahead_every, config.lookahead_decay, total)
    with phase("data fingerprint"):
        fingerprints = data_fingerprint(splits), data_fingerprint(splits, test=True)
    return TrainingRun(
        config, hw, splits, args, model, step_model, optimizer, scheduler,
        torch.amp.GradScaler(hw.device.type, enabled=hw.amp_dtype == torch.float16),
        ema, lookahead, batches, normalize,
        *_on_device(splits.val, hw.device), fixed, d, *fingerprints,
        *(_on_device(splits.test, hw.device) if splits.test is not None and len(splits.test) else ()),
    )  # fmt: skip


def _on_device(part, device: torch.device) -> tuple:
    return to_device_uint8(part.images, device), torch.from_numpy(part.labels).to(device)


def _scheduler(config: TrainConfig, optimizer, steps_per_epoch: int):
    return make_scheduler(
        config.schedule, optimizer, total_steps(config, steps_per_epoch),
        round(config.warmup_epochs * steps_per_epoch), steps_per_epoch if config.lr_step == "epoch" else 1,
    )  # fmt: skip


def retarget(run: TrainingRun, config: TrainConfig) -> None:
    """`run` given `config`'s length (a time budget's): a new schedule before the first step,
    later the schedule's rest spread over the steps left; the lookahead ends at the new end."""
    run.config, total = config, total_steps(config, len(run.batches))
    if run.scheduler.last_epoch == 0:
        run.scheduler = _scheduler(config, run.optimizer, len(run.batches))
    else:
        stretch(run.scheduler, total)
    if run.lookahead is not None:
        run.lookahead.total = total


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    return config.train_steps or config.epochs * steps_per_epoch


def epoch_steps(config: TrainConfig, steps_per_epoch: int, epoch: int) -> int:
    """The steps `epoch` takes: all, or fewer where the run's steps end in it."""
    return min(steps_per_epoch, total_steps(config, steps_per_epoch) - epoch * steps_per_epoch)


def resolve_input_size(config: TrainConfig, device: torch.device, log) -> TrainConfig:
    """`stem: imagenet` with `input_size: 0` means 224 on CUDA, 64 on the CPU (224 is ~12x slower)."""
    if config.stem != "imagenet" or config.input_size:
        return config
    size = 224 if device.type == "cuda" else 64
    log(f"stem: imagenet — images upsampled on the device to {size}x{size}")
    return dataclasses.replace(config, input_size=size)


def input_statistics(config: TrainConfig, splits: Splits) -> tuple[list[float], list[float]]:
    """Per-channel mean and std the model's input is normalised with (`normalize` in config)."""
    choice = config.normalize
    if choice == "auto":  # a pretrained ImageNet stem expects ImageNet's statistics
        pretrained_stem = config.stem == "imagenet" and (config.pretrained or config.weights)
        choice = "imagenet" if pretrained_stem else "train"
    return {
        "train": (splits.mean, splits.std),
        "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
        "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    }[choice]


def _build_model(config, splits, normalize, hw, d, log):
    """The model on its device, initialised (seed, ImageNet weights, whitening, --init-from),
    with the ids of parameters that never train."""
    args = ModelArgs(
        config.model, len(splits.classes), model_width(config), config.image_size, config.stem,
        config.input_size,
    )  # fmt: skip
    model = build_model(args, config.pretrained, config.weights, log, seed=config.seed)
    if ":" in config.model:  # tv:/timm: names; the fixed models' sides are checked with the config
        _check_image_side(model, config)
    if config.whitening:
        sample = torch.from_numpy(splits.train.images[:5000]).permute(0, 3, 1, 2).contiguous()
        init_whitening(first_conv(model), normalize(sample))
    if config.init_from:
        init_from(model, config, splits, log)
    if d.active and config.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    fixed = {id(p) for p in model.parameters() if not p.requires_grad}
    model = model.to(hw.device)
    if hw.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return args, model, fixed


def _check_image_side(model: torch.nn.Module, config: TrainConfig) -> None:
    """One blank image forward: a model whose pooling leaves nothing of a small image fails here,
    before the run saves anything, not in its first step with a config.yaml left behind."""
    side, was = config.image_size, model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, side, side))
    except RuntimeError as exc:
        raise UserError(
            f"model {config.model} cannot take {side} px images ({str(exc).splitlines()[0]}); "
            "set a larger image_size, or stem: imagenet (it upsamples to input_size)"
        ) from None
    finally:
        model.train(was)


def data_fingerprint(splits: Splits, test: bool = False) -> str:
    """A digest of exactly what trains and validates: classes, labels and pixels of both splits;
    with `test`, of the test split (scored every epoch) instead, "" without one."""
    if test and splits.test is None:
        return ""
    h = hashlib.sha256(repr(splits.classes).encode())
    for part in (splits.test,) if test else (splits.train, splits.val):
        h.update(part.labels.tobytes())
        if len(part):  # an empty view cannot be cast
            h.update(memoryview(np.ascontiguousarray(part.images)).cast("B"))
    return h.hexdigest()[:24]


def init_from_checkpoint(config: TrainConfig, splits: Splits) -> tuple[Path, dict]:
    """`--init-from`'s checkpoint and its path, refused if it trained on this run's validation
    images (`_trained_on_val`); tune asks before its study is stored."""
    try:
        path = resolve_checkpoint(config.init_from)
        ckpt = load_checkpoint(path)
    except UserError as exc:
        raise UserError(f"--init-from {exc}") from None
    leaked = _trained_on_val(ckpt, config, splits)
    if leaked:
        raise UserError(f"--init-from {path}: {leaked}")
    return path, ckpt


def init_from(model: torch.nn.Module, config: TrainConfig, splits: Splits, log) -> None:
    """Our own checkpoint's weights into `model`; the head starts fresh when the classes differ."""
    classes = splits.classes
    path, ckpt = init_from_checkpoint(config, splits)
    if "train_digests" not in ckpt and len(splits.val):
        log(f"note: {path} keeps no train_digests, so whether its run trained on this run's "
            "validation images is not checked")  # fmt: skip
    theirs = model_args(ckpt)
    if (theirs.name, theirs.stem) != (config.model, config.stem):
        raise UserError(
            f"--init-from {path}: it holds a {theirs.name} (stem {theirs.stem}), this run trains "
            f"a {config.model} (stem {config.stem})"
        )
    if theirs.width != model_width(config) and not model_spec(config.model).backbone:
        asked = theirs.width * 2**config.width_halvings  # width / 2**width_halvings trains
        raise UserError(
            f"--init-from {path}: it holds a {theirs.name} of width {theirs.width:g}, this run "
            f"trains width {model_width(config):g}; add --set width={asked:g}"
        )
    head = head_name(model) + "."
    state = ckpt["model"]
    same_classes = list(ckpt["classes"]) == list(classes)
    if not same_classes:
        state = {k: v for k, v in state.items() if not k.startswith(head)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        side = theirs.image_size  # cnn's classifier is sized by the image's side
        hint = f"; it trained on {side} px images: add --set image_size={side}"
        raise UserError(
            f"--init-from {path}: weights do not fit ({str(exc).splitlines()[1].strip()})"
            + hint * (side != config.image_size)
        ) from None
    bad = [k for k in missing if not k.startswith(head)] + list(unexpected)
    if bad:
        raise UserError(f"--init-from {path}: weights do not fit this model (e.g. {bad[0]})")
    log(f"init: weights from {path}" + ("" if same_classes else f"; new {len(classes)}-class head"))


def image_digests(images: np.ndarray) -> torch.Tensor:
    """Each image's 8-byte digest of its pixels, sorted: which images a run trained on, whatever
    their files are called, wherever they lie and whatever else the data holds."""
    raw = b"".join(hashlib.blake2b(image.tobytes(), digest_size=8).digest() for image in images)
    return torch.from_numpy(np.sort(np.frombuffer(raw, dtype=np.int64)))


def _trained_on_val(ckpt: dict, config: TrainConfig, splits: Splits) -> str:
    """What is wrong when the checkpoint's run trained on images this run holds out for
    validation; "" when it did not or cannot be told (no `train_digests`). Images are compared
    by their pixels at the size that run decoded them; one this run also trains on (the data's
    own duplicate) is no fault of that run's."""
    theirs = ckpt.get("train_digests")
    if theirs is None or not len(splits.val):
        return ""
    size = model_args(ckpt).image_size
    if size != config.image_size:  # this run's split (drawn from labels alone) at that size
        splits = load_splits(dataclasses.replace(config, image_size=size))
    val = image_digests(splits.val.images).numpy()
    seen = val[np.isin(val, theirs.numpy())]
    if len(seen):
        seen = seen[~np.isin(seen, image_digests(splits.train.images).numpy())]
    if not len(seen):
        return ""
    harm = "they would inflate validation accuracy and pick best.pt"
    if splits.val_folder:  # validates on the folder whatever --val-size says
        return (
            f"its run trained on {len(seen)} of the {len(val)} images of the data's "
            f"{splits.val_folder}/ folder: "
            f"{harm}; start from a run that did not train on them"
        )
    try:
        them = apply_overrides(TrainConfig(), ckpt["config"], where="--init-from")
    except UserError:
        them = None  # a config of another version: its split cannot be told
    alike = them is not None and them.val_size and them.classes == config.classes
    same = ""
    if alike and _split_flags(them) != _split_flags(config):
        same = f"hold out the same ({_split_flags(them)}), "
    return (
        f"its run trained on {len(seen)} of the {len(val)} images this run holds out for "
        f"validation ({_split_flags(config)}): {harm}; {same}train with --val-size 0, or start "
        "from a run that held these images out"
    )


def _split_flags(config: TrainConfig) -> str:
    """The command-line flags that draw `config`'s validation split."""
    subset = f" --subset {config.subset}" if config.subset else ""
    return f"--val-size {config.val_size} --set split_seed={split_seed(config)}{subset}"


def param_groups(model: torch.nn.Module, config: TrainConfig, log=print) -> list[dict]:
    """Parameters grouped by lr multiplier and weight decay (`lr_mults`, `backbone_lr_mult`,
    `bias_lr_mult`, `no_decay_norm_bias`: see their config comments)."""
    head = head_name(model) + "."
    by_name = name_multipliers(config.lr_mults)
    names = [n for n, _ in model.named_parameters()]
    for prefix in by_name:  # a recipe's multiplier may be meant for another model: say so
        if not any(n.startswith(prefix) for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            log(
                f"warning: lr_mults '{prefix}' matches no parameter of {config.model}, ignored "
                f"(its top-level names: {', '.join(tops)})"
            )
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = 1.0 if name.startswith(head) else config.backbone_lr_mult
        matches = [k for k in by_name if name.startswith(k)]
        if matches:
            mult *= by_name[max(matches, key=len)]
        decay = config.weight_decay
        if p.ndim <= 1:
            mult *= config.bias_lr_mult
            decay = 0.0 if config.no_decay_norm_bias else decay / config.bias_lr_mult
        groups.setdefault((mult, decay), []).append(p)
    return [
        {"params": ps, "lr": config.lr * m, "weight_decay": d, "lr_mult": m}
        for (m, d), ps in groups.items()
    ]


def skip_dynamo_import() -> None:
    """Optimizer methods import torch._dynamo on first call (1.5-2 s on a 2-core CPU) only to
    keep torch.compile out; without compile each is marked as already wrapped (torch._compile's
    cache attribute: should torch rename it, the import happens as before)."""
    if "torch._dynamo" in sys.modules:
        return
    opt = torch.optim.Optimizer
    for method in (opt.zero_grad, opt.add_param_group, opt.state_dict, opt.load_state_dict):
        inner = getattr(method, "__wrapped__", None)
        if inner is not None and not hasattr(inner, "__dynamo_disable"):
            setattr(inner, "__dynamo_disable", inner)


def make_optimizer(model: torch.nn.Module, config: TrainConfig, log=print):
    """torch's SGD over `param_groups`; with `optimizer: muon` each group's conv filters move to a
    Muon group at `muon_lr` times the group's multiplier (its `lr_mult` relative to `lr`)."""
    if not config.compile:
        skip_dynamo_import()
    groups = param_groups(model, config, log)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov
        )
    sgd, muon = [], []
    for g in groups:
        filters = [p for p in g["params"] if p.ndim == 4]
        rest = [p for p in g["params"] if p.ndim != 4]
        if rest:
            sgd.append(dict(g, params=rest))
        if filters:
            lr = config.muon_lr * g["lr_mult"]
            muon.append(
                {"params": filters, "lr": lr, "lr_mult": lr / config.lr, "muon": True,
                 "momentum": config.muon_momentum, "nesterov": True}
            )  # fmt: skip
    if not muon:
        raise UserError(
            f"optimizer: muon needs convolution filters to train, and {config.model} has none "
            "that train; use --set optimizer=sgd"
        )
    return MuonSGD(sgd + muon, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)


def apply_freeze(run: TrainingRun, epoch: int, log) -> None:
    """`set_trainable` for this epoch, and the log lines of a staged run."""
    c = run.config
    set_trainable(run.model, c, run.fixed, epoch)
    if c.freeze == "backbone" and epoch == 0:
        fresh = ""
        if c.model.startswith("tv-resnet") and c.stem == "cifar":
            fresh = (
                "; conv1 is freshly initialised (stem: cifar replaces the 7x7 ImageNet conv) and "
                "stays random until then"
            )
        after = (
            f"all layers train from epoch {c.freeze_epochs + 1} "
            f"({c.epochs - c.freeze_epochs} fine-tune epoch(s))"
            if c.freeze_epochs < c.epochs
            else "it stays frozen for the whole run (a linear probe)"
        )
        log(
            f"epochs 1-{c.freeze_epochs} of {c.epochs}: only the head trains; the backbone is "
            f"frozen (weights and BatchNorm statistics){fresh}; {after}"
        )
    elif c.freeze == "backbone" and epoch == c.freeze_epochs:
        log(f"epoch {epoch + 1}: backbone unfrozen, all layers train from here")


def set_trainable(model: torch.nn.Module, c: TrainConfig, fixed: set[int], epoch: int) -> None:
    """What trains in `epoch` (never the `fixed` ids): only the head (BatchNorm frozen too) for
    `freeze_epochs`; the whitened conv's bias only for its `whiten_bias_epochs`."""
    if c.freeze == "backbone":
        head, frozen = head_name(model) + ".", epoch < c.freeze_epochs
        for name, p in model.named_parameters():
            if not name.startswith(head) and id(p) not in fixed:
                p.requires_grad_(not frozen)
        for name, m in model.named_modules():
            if frozen and isinstance(m, _BatchNorm) and not name.startswith(head):
                m.eval()
    if c.whitening and c.whiten_bias_epochs and epoch >= c.whiten_bias_epochs:
        bias = first_conv(model).bias
        if bias is not None:
            bias.requires_grad_(False)


def settling_epoch(c: TrainConfig) -> int:
    """The first epoch in which everything that trains only at first (or only later) has
    settled: a step costs from then on what it costs to the end (0: from the start)."""
    frozen = c.freeze_epochs if c.freeze == "backbone" else 0
    bias = c.whiten_bias_epochs if c.whitening else 0
    return min(c.epochs, max(frozen, bias))


# the parts of a run whose state a checkpoint keeps (None where the run has no such part)
STATEFUL = ("model", "ema", "lookahead", "optimizer", "scheduler", "scaler")


def checkpoint_state(
    run: TrainingRun, epoch: int, step: int = 0, stats: dict | None = None
) -> dict:
    """Enough to resume exactly (a step's random draws are seeded by its position, `StepRandom`)
    and to rebuild the model (`model_args`); `stats`: the epoch's running totals so far."""
    parts = {k: getattr(run, k) for k in STATEFUL}
    return {
        **{k: None if part is None else part.state_dict() for k, part in parts.items()},
        "model_args": run.model_args.to_dict(),
        "epoch": epoch,  # 0-based epoch in progress (== epochs done when next_step == 0)
        "next_step": step,
        "accumulators": stats or {},
        "config": run.config.to_dict(),
        "classes": run.splits.classes,
        "mean": run.normalize.mean,
        "std": run.normalize.std,
        "data_fingerprint": run.data_fingerprint,
        "test_fingerprint": run.test_fingerprint,
        "train_digests": run.train_digests,
    }


def restore(run: TrainingRun, ckpt: dict) -> None:
    for key in STATEFUL:
        if getattr(run, key) is not None:
            getattr(run, key).load_state_dict(ckpt[key])
