"""`train(config, run_dir) -> Result`: the training loop, schedule, EMA, AMP, checkpoints.

Reads top to bottom: load data, build the model and optimiser, maybe resume, then per epoch
train, validate, append a metrics row and write `last.pt` (and `best.pt` when it improved).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from cifarlab.augment import BatchAugment, Normalize, mix_batch
from cifarlab.checkpoint import atomic_save, load_checkpoint, resolve_checkpoint
from cifarlab.config import TrainConfig, name_multipliers, save_config
from cifarlab.data import Splits, load_splits
from cifarlab.data.loaders import DeviceBatches, TorchvisionBatches, to_device_uint8
from cifarlab.distributed import Dist, all_sum, barrier, init_distributed
from cifarlab.errors import Interrupted, UserError
from cifarlab.hardware import Hardware, setup_hardware
from cifarlab.inference import predict_logits
from cifarlab.lookahead import Lookahead
from cifarlab.models import create_model, head_name
from cifarlab.models.torchvision_nets import IMAGENET_MEAN, IMAGENET_STD, BackboneOptions
from cifarlab.models.whitening import first_conv, init_whitening
from cifarlab.rundir import RunLock, append_metrics, prepare_run_dir, truncate_metrics
from cifarlab.schedules import make_scheduler


class TrainingFailed(Exception):
    """Training cannot go on (non-finite loss); exit 1, nothing good is overwritten."""

    exit_code = 1


@dataclass
class Result:
    run_dir: Path
    best_val_acc: float
    final_val_acc: float
    epochs: int
    seconds: float  # wall time of the training epochs, evaluation included
    images_per_s: float  # training throughput of the last epoch
    history: list[dict] = field(default_factory=list)
    tta_val_acc: float | None = None  # final weights with the config's TTA (None: tta none)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """The one place the loss is decided: cross-entropy on class indices or Mixup/CutMix
    probabilities, with label smoothing applied here exactly once."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)


def param_groups(model: torch.nn.Module, config: TrainConfig, log=print) -> list[dict]:
    """Parameters grouped by lr multiplier and weight decay: the head at the peak lr, the rest at
    `backbone_lr_mult`; 1-D parameters (norm scales/shifts, biases) at `bias_lr_mult` with their
    decay divided by it (so their decay per step stays), or none with `no_decay_norm_bias`."""
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


class _StopSignals:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves and exits 130/143."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        if self.received is not None:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


@dataclass
class _Run:
    """Everything a step needs; built once per run."""

    config: TrainConfig
    hw: Hardware
    splits: Splits
    model: torch.nn.Module
    step_model: torch.nn.Module  # compiled or not; shares weights with `model`
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    batches: DeviceBatches | TorchvisionBatches
    normalize: Normalize
    val_images: torch.Tensor
    val_labels: torch.Tensor
    run_dir: Path
    fixed: set[int]  # ids of parameters that never train
    dist: Dist
    lookahead: Lookahead | None = None


def _build_model(config: TrainConfig, splits: Splits, hw: Hardware, d: Dist, log):
    """The model on its device, initialised (seed, ImageNet weights, whitening, --init-from),
    with the normalisation it expects and the ids of parameters that never train."""
    torch.manual_seed(config.seed)
    if config.stem == "imagenet" and config.input_size == 0:
        config = dataclasses.replace(config, input_size=224 if hw.device.type == "cuda" else 64)
        log(
            f"stem: imagenet — images upsampled on the device to {config.input_size}x{config.input_size}"
        )
    backbone = BackboneOptions(config.stem, config.input_size, config.pretrained, config.weights)
    model = create_model(
        config.model, len(splits.classes), config.width, config.image_size, backbone, log
    )
    if config.stem == "imagenet" and (config.pretrained or config.weights):
        splits.mean, splits.std = IMAGENET_MEAN, IMAGENET_STD  # what the pretrained stem expects
    normalize = Normalize(splits.mean, splits.std)
    if config.whitening:
        sample = torch.from_numpy(splits.train.images[:5000]).permute(0, 3, 1, 2).float().div(255)
        init_whitening(first_conv(model), normalize(sample))
    if config.init_from:
        _init_from(model, config, splits.classes, log)
    if d.active and config.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    fixed = {id(p) for p in model.parameters() if not p.requires_grad}  # e.g. whitened weights
    model = model.to(hw.device)
    if hw.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return config, model, normalize, fixed


def _build(config: TrainConfig, run_dir: Path, log, d: Dist) -> _Run:
    hw = setup_hardware(config)
    if d.active and config.loader != "device":
        raise UserError(
            "under torchrun use loader: device (the torchvision loader is single-process)"
        )
    if d.active and config.batch_size % d.world:
        raise UserError(
            f"batch_size={config.batch_size} must divide by the {d.world} processes (global batch)"
        )
    if config.alt_flip and config.loader != "device":
        raise UserError("alt_flip needs loader: device (the torchvision loader flips by coin)")
    if config.whitening and (config.pretrained or config.weights):
        raise UserError(
            "whitening: true would overwrite the pretrained first layer; drop one of the two"
        )
    splits = load_splits(config)
    log(
        f"data: {config.data} — {len(splits.train)} train / {len(splits.val)} val images, "
        f"{len(splits.classes)} classes"
        + (f", {len(splits.skipped)} skipped" if splits.skipped else "")
    )
    if splits.skipped and d.main:
        (run_dir / "skipped_images.txt").write_text("\n".join(splits.skipped) + "\n")
    if len(splits.train) < config.batch_size:
        raise UserError(
            f"batch_size={config.batch_size} is larger than the {len(splits.train)} training images"
        )
    config, model, normalize, fixed = _build_model(config, splits, hw, d, log)
    step_model = model
    if d.active:
        ids = [hw.device.index] if hw.device.type == "cuda" else None
        step_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    step_model = torch.compile(step_model) if config.compile else step_model
    optimizer = torch.optim.SGD(
        param_groups(model, config, log),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
    )
    if config.loader == "device":
        augment = BatchAugment(config, normalize)
        batches = DeviceBatches(splits.train, config, hw.device, augment, d.rank, d.world)
    else:
        batches = TorchvisionBatches(splits.train, config, hw.device, normalize)
    total = config.epochs * len(batches)
    scheduler = make_scheduler(
        config.schedule, optimizer, total, round(config.warmup_epochs * len(batches))
    )
    ema = None
    if config.ema:
        ema = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True
        )
    scaler = torch.amp.GradScaler(hw.device.type, enabled=hw.amp_dtype == torch.float16)
    lookahead = None
    if config.lookahead:
        lookahead = Lookahead(model, config.lookahead_every, config.lookahead_decay, total)
    val_images = to_device_uint8(splits.val.images, hw.device)
    val_labels = torch.from_numpy(splits.val.labels).to(hw.device)
    return _Run(
        config, hw, splits, model, step_model, optimizer, scheduler, scaler, ema, batches, normalize,
        val_images, val_labels, run_dir, fixed, d, lookahead,
    )  # fmt: skip


def _init_from(model: torch.nn.Module, config: TrainConfig, classes: list[str], log) -> None:
    """Our own checkpoint's weights into `model`; the head starts fresh when the classes differ."""
    path = resolve_checkpoint(config.init_from)
    ckpt = load_checkpoint(path)
    if ckpt["config"]["model"] != config.model:
        raise UserError(
            f"--init-from {path}: it holds a {ckpt['config']['model']}, this run trains a {config.model}"
        )
    head = head_name(model) + "."
    state = ckpt["model"]
    same_classes = list(ckpt["classes"]) == list(classes)
    if not same_classes:
        state = {k: v for k, v in state.items() if not k.startswith(head)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise UserError(
            f"--init-from {path}: weights do not fit ({str(exc).splitlines()[1].strip()})"
        ) from None
    bad = [k for k in missing if not k.startswith(head)] + list(unexpected)
    if bad:
        raise UserError(f"--init-from {path}: weights do not fit this model (e.g. {bad[0]})")
    log(f"init: weights from {path}" + ("" if same_classes else f"; new {len(classes)}-class head"))


def _apply_freeze(run: _Run, epoch: int, log) -> None:
    """What trains this epoch: the head only during `freeze: backbone`'s `freeze_epochs` (frozen
    BatchNorm in eval mode); the whitened conv's bias only for its `whiten_bias_epochs`."""
    c = run.config
    if c.freeze == "backbone":
        _freeze_backbone(run, epoch < c.freeze_epochs)
        if epoch == c.freeze_epochs and epoch > 0:
            log(f"epoch {epoch + 1}: backbone unfrozen, all layers train from here")
    if c.whitening and c.whiten_bias_epochs and epoch >= c.whiten_bias_epochs:
        bias = first_conv(run.model).bias
        if bias is not None:
            bias.requires_grad_(False)


def _freeze_backbone(run: _Run, frozen: bool) -> None:
    head = head_name(run.model) + "."
    for name, p in run.model.named_parameters():
        if not name.startswith(head) and id(p) not in run.fixed:
            p.requires_grad_(not frozen)
    if frozen:
        for name, m in run.model.named_modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not name.startswith(head):
                m.eval()


def _state(run: _Run, epoch: int, next_step: int, best: float, acc: dict) -> dict:
    """The checkpoint: enough to resume exactly, and to evaluate or predict on its own."""
    return {
        "model": run.model.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "lookahead": run.lookahead.state_dict() if run.lookahead is not None else None,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "epoch": epoch,  # 0-based epoch in progress (== epochs done when next_step == 0)
        "next_step": next_step,
        "best_val_acc": best,
        "accumulators": acc,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        "config": run.config.to_dict(),
        "classes": run.splits.classes,
        "mean": run.splits.mean,
        "std": run.splits.std,
    }


def _restore(run: _Run, ckpt: dict) -> None:
    run.model.load_state_dict(ckpt["model"])
    if run.ema is not None and ckpt.get("ema") is not None:
        run.ema.load_state_dict(ckpt["ema"])
    if run.lookahead is not None and ckpt.get("lookahead") is not None:
        run.lookahead.load_state_dict(ckpt["lookahead"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])


def _validate(run: _Run, tta: str = "none") -> tuple[float, float]:
    model = run.ema.module if run.ema is not None else run.model
    logits = predict_logits(
        model, run.val_images, run.normalize, run.config.eval_batch_size, tta, hardware=run.hw
    )
    loss = F.cross_entropy(logits, run.val_labels).item()
    acc = (logits.argmax(1) == run.val_labels).float().mean().item()
    return loss, acc


def _train_epoch(
    run: _Run, epoch: int, start_step: int, acc: dict, stop: _StopSignals, log
) -> dict:
    c, hw = run.config, run.hw
    run.model.train()
    _apply_freeze(run, epoch, log)
    sync_every = 1 if hw.device.type == "cpu" or c.on_nan == "skip" else 50
    bar = tqdm(
        total=len(run.batches), initial=start_step, desc=f"epoch {epoch + 1}/{c.epochs}",
        disable=True if not c.progress else None, leave=False, unit="step", mininterval=1, file=sys.stderr,
    )  # fmt: skip
    t0 = time.perf_counter() - acc["seconds"]
    loss_sum = torch.tensor(acc["loss_sum"], device=hw.device)
    correct = torch.tensor(acc["correct"], device=hw.device)
    for step, (x, y, rand) in enumerate(run.batches.epoch(epoch, start_step), start=start_step):
        if hw.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        targets = y
        if c.mixup_alpha or c.cutmix_alpha:
            x, targets = mix_batch(x, F.one_hot(y, len(run.splits.classes)).float(), c, rand.rng)
        with hw.autocast():
            logits = run.step_model(x)
        loss = loss_fn(logits, targets, c.label_smoothing)
        check = (step + 1) % sync_every == 0 or step == len(run.batches) - 1
        if check and not math.isfinite(loss.item()):
            if c.on_nan == "skip":
                acc["nan_skipped"] += 1
                run.optimizer.zero_grad(set_to_none=True)
                run.scheduler.step()
                continue
            raise TrainingFailed(
                f"non-finite loss at epoch {epoch + 1} step {step + 1}; the last good checkpoint is "
                f"{run.run_dir / 'last.pt'} (lower --lr, or --set on_nan=skip to skip such batches)"
            )
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        if run.lookahead is not None:
            run.lookahead.after_step(run.model, epoch * len(run.batches) + step + 1)
        if run.ema is not None:
            run.ema.update_parameters(run.model)
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        acc["seen"] += len(y)
        bar.update(1)
        if c.progress and (step % 10 == 0 or step == len(run.batches) - 1):
            elapsed = time.perf_counter() - t0
            bar.set_postfix(
                loss=f"{loss_sum.item() / acc['seen']:.3f}",
                acc=f"{correct.item() / acc['seen']:.1%}",
                ips=f"{acc['seen'] / max(elapsed, 1e-9):.0f}",
            )
        next_step = step + 1
        save_now = (
            c.save_every_steps
            and next_step % c.save_every_steps == 0
            and next_step < len(run.batches)
        )
        if stop.received is not None or save_now:
            acc.update(
                loss_sum=loss_sum.item(), correct=correct.item(), seconds=time.perf_counter() - t0
            )
            if run.dist.main:
                atomic_save(
                    _state(run, epoch, next_step, acc["best"], dict(acc)), run.run_dir / "last.pt"
                )
            if stop.received is not None:
                bar.close()
                code = 130 if stop.received == signal.SIGINT else 143
                raise Interrupted(
                    f"stopped at epoch {epoch + 1} step {next_step}; saved {run.run_dir / 'last.pt'}. "
                    f"Resume with: cifarlab train --out {run.run_dir} --resume",
                    code,
                )
    bar.close()
    acc.update(loss_sum=loss_sum.item(), correct=correct.item(), seconds=time.perf_counter() - t0)
    return acc


def _fresh_accumulators(best: float) -> dict:
    return {
        "loss_sum": 0.0,
        "correct": 0.0,
        "seen": 0,
        "seconds": 0.0,
        "nan_skipped": 0,
        "best": best,
    }


def train(
    config: TrainConfig, run_dir: Path | str, resume: bool = False, log=print, on_epoch=None
) -> Result:
    """Train `config` into `run_dir`; with `resume`, continue exactly from `run_dir/last.pt`.

    `on_epoch(row)` is called after each epoch's metrics row is saved (tuning prunes from it)."""
    run_dir = Path(run_dir)
    d = init_distributed()
    if not d.main:
        log = lambda s: None  # noqa: E731 - only rank 0 talks and writes
    last = run_dir / "last.pt"
    ckpt = None
    if resume and last.is_file():
        ckpt = load_checkpoint(last)
        config = TrainConfig(**{**ckpt["config"], "progress": config.progress})
    elif resume:
        log(f"resume: {run_dir} has no last.pt yet; starting from the beginning")
    elif last.is_file():
        raise UserError(
            f"--out {run_dir} already holds a run (last.pt); add --resume to continue it or pick a new --out"
        )
    if d.main:
        prepare_run_dir(run_dir, need_bytes=200_000_000)
    barrier(d)
    lock = RunLock(run_dir) if d.main else contextlib.nullcontext()
    with lock, _StopSignals() as stop:
        run = _build(config, run_dir, log, d)
        config = run.config  # resolved (e.g. input_size)
        if d.main:
            save_config(config, run_dir / "config.yaml")
        n_params = sum(p.numel() for p in run.model.parameters())
        log(
            f"model: {config.model} ({n_params / 1e6:.2f}M params) on {run.hw.describe()}, recipe {config.recipe}"
        )
        first_epoch, start_step, acc = 0, 0, _fresh_accumulators(0.0)
        if ckpt is not None:
            _restore(run, ckpt)
            first_epoch, start_step, acc = (
                ckpt["epoch"],
                ckpt["next_step"],
                dict(ckpt["accumulators"]),
            )
            log(f"resume: from epoch {first_epoch + 1} step {start_step} of {run_dir / 'last.pt'}")
        if d.main:
            truncate_metrics(run_dir / "metrics.csv", first_epoch)
        writer = _tensorboard(run_dir) if config.tensorboard and d.main else None
        history, total_seconds, val_acc = [], 0.0, 0.0
        for epoch in range(first_epoch, config.epochs):
            group = run.optimizer.param_groups[0]
            lr = (
                group["lr"] / group["lr_mult"]
            )  # the peak-lr schedule, whatever the group's multiplier
            acc = _train_epoch(run, epoch, start_step, acc, stop, log)
            acc["loss_sum"], acc["correct"], acc["seen"] = all_sum(
                [acc["loss_sum"], acc["correct"], acc["seen"]], d, run.hw.device
            )  # every rank's share of the epoch
            start_step = 0
            t_val = time.perf_counter()
            val_loss, val_acc = _validate(run)
            seconds = acc["seconds"] + time.perf_counter() - t_val
            row = {
                "epoch": epoch + 1, "lr": round(lr, 8),
                "train_loss": round(acc["loss_sum"] / max(acc["seen"], 1), 5),
                "train_acc": round(acc["correct"] / max(acc["seen"], 1), 5),
                "val_loss": round(val_loss, 5), "val_acc": round(val_acc, 5),
                "seconds": round(seconds, 2), "images_per_s": round(acc["seen"] / max(acc["seconds"], 1e-9), 1),
            }  # fmt: skip
            if d.main:
                append_metrics(run_dir / "metrics.csv", row)
            if writer is not None:
                for key in ("lr", "train_loss", "train_acc", "val_loss", "val_acc", "images_per_s"):
                    writer.add_scalar(key, row[key], epoch + 1)
            history.append(row)
            total_seconds += seconds
            improved = val_acc > acc["best"]
            best = max(acc["best"], val_acc)
            if d.main:
                state = _state(run, epoch + 1, 0, best, _fresh_accumulators(best))
                atomic_save(state, run_dir / "last.pt")
                if improved:
                    atomic_save(state, run_dir / "best.pt")
            skipped = (
                f"  ({acc['nan_skipped']} non-finite batches skipped)" if acc["nan_skipped"] else ""
            )
            log(
                f"epoch {epoch + 1}/{config.epochs}  lr {lr:.4g}  train loss {row['train_loss']:.3f} "
                f"acc {row['train_acc']:.1%}  val loss {val_loss:.3f} acc {val_acc:.1%}"
                f"{' *' if improved else ''}  {seconds:.0f}s  {row['images_per_s']:.0f} img/s{skipped}"
            )
            acc = _fresh_accumulators(best)
            if on_epoch is not None:
                on_epoch(row)
        if writer is not None:
            writer.close()
        tta_acc = None
        if config.tta != "none" and history:  # as airbench: TTA once, on the final weights
            t_tta = time.perf_counter()
            tta_acc = _validate(run, config.tta)[1]
            total_seconds += time.perf_counter() - t_tta
            log(f"final val acc with {config.tta} TTA: {tta_acc:.2%}")
        barrier(d)
    ips = history[-1]["images_per_s"] if history else 0.0
    return Result(
        run_dir, acc["best"], val_acc, config.epochs, total_seconds, ips, history, tta_acc
    )


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "tensorboard: true needs the extra: pip install 'cifarlab[tensorboard]'"
        ) from None
    return SummaryWriter(str(run_dir / "tensorboard"))
