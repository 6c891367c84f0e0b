"""Temperature scaling (Guo et al. 2017, arXiv 1706.04599): one scalar T, fitted on the
validation split, so that softmax(logits / T) is calibrated (T < 1 sharpens under-confident
probabilities, as label smoothing makes `fast`'s); the argmax never changes. A checkpoint's
`temperature` (absent: 1.0) belongs to its `model` weights, `temperature_ema` to its EMA weights."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from cifarlab.checkpoint import atomic_save, load_checkpoint, resolve_checkpoint
from cifarlab.config import expand
from cifarlab.data.loaders import to_device_uint8
from cifarlab.errors import UserError
from cifarlab.eval_set import load_eval_set
from cifarlab.hardware import Hardware, pick_device
from cifarlab.inference import load_model, predict_logits
from cifarlab.rundir import rewrite_lock


class ValSet(NamedTuple):
    """A run's validation split already in memory (the end of training): no second load."""

    images: torch.Tensor  # uint8 N, C, H, W on the run's device
    labels: torch.Tensor
    hardware: Hardware | None  # the run's precision and memory format (None: the rule's)
    batch_size: int
    # (weights, their logits on these images): a checkpoint holding those weights is not run again
    known: tuple[dict, torch.Tensor] | None = None


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T minimising the cross-entropy of softmax(logits / T); LBFGS on log T keeps T positive
    (one-dimensional and convex in 1/T: a few dozen iterations reach the optimum)."""
    logits = logits.detach().float().cpu().clone()  # predict_logits returns inference tensors
    labels = labels.detach().long().cpu()
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    # clamped: on a set the model gets all right the optimum is T -> 0
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def _load_val(ckpt: dict, path: Path, device: torch.device) -> ValSet:
    """The run's validation split, loaded again from the data its config names."""
    data, *_ = load_eval_set(ckpt, str(path), command="calibrate")
    if len(data) == 0:
        raise UserError(
            f"{path}: the run has no validation split (val_size 0) to fit a temperature on; "
            "retrain with --set val_size=N, or leave the probabilities uncalibrated"
        )
    return ValSet(to_device_uint8(data.images, device), torch.from_numpy(data.labels), None, 500)


def _val_logits(ckpt: dict, use_ema: bool, device: torch.device, val: ValSet) -> torch.Tensor:
    """The logits of `ckpt`'s weights (or its EMA weights) on `val`, on the CPU; those of the
    weights `val` knows are not computed again."""
    if not use_ema and val.known is not None and _equal(ckpt["model"], val.known[0]):
        return val.known[1].float().cpu()
    loaded = load_model(ckpt, device, use_ema)
    logits = predict_logits(  # in the hardware's memory format, the model's weights included
        loaded.model,
        val.images.to(device),
        loaded.normalize,
        val.batch_size,
        hardware=val.hardware or loaded.hardware,
    )
    return logits.float().cpu()


def _fit(ckpt: dict, path: Path, val: ValSet, device: torch.device, log) -> None:
    """Fit the temperature of `ckpt`'s weights, and of its EMA weights, into `ckpt`."""
    labels = val.labels.long().cpu()
    for use_ema in (False, True) if ckpt.get("ema") is not None else (False,):
        logits = _val_logits(ckpt, use_ema, device, val)
        t = fit_temperature(logits, labels)
        before, after = (F.cross_entropy(logits / s, labels).item() for s in (1.0, t))
        ckpt["temperature_ema" if use_ema else "temperature"] = t
        weights = "EMA weights" if use_ema else "weights"
        log(
            f"{path.name}: temperature {t:.3f} for its {weights} "
            f"(val NLL {before:.3f} -> {after:.3f} on {len(labels)} images)"
        )


def _equal(x: dict | None, y: dict | None) -> bool:
    """The same tensors under the same names (wherever each lives)."""
    if x is None or y is None:
        return x is y
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k].to(x[k].device)) for k in x)


def calibrate_run(
    run_dir: Path | str, log=print, device: str = "auto", val: ValSet | None = None
) -> float:
    """Each of the run's checkpoints gets the temperature of its own weights, fitted on the
    validation split (`val`: already in memory) and written atomically; returns that of the
    checkpoint predict uses (best.pt, else last.pt)."""
    run_dir = expand(run_dir)
    resolve_checkpoint(run_dir)  # one line for a missing path, or a run without checkpoints
    present = [run_dir / name for name in ("best.pt", "last.pt") if (run_dir / name).is_file()]
    if run_dir.is_file():
        present, val = [run_dir], None
    dev, first = pick_device(device, "--device cpu"), None
    # held from reading the checkpoints to writing them: a `train --resume` meanwhile would save
    # an epoch that the write of the copy read before it then rolls back
    with rewrite_lock(present[0].parent):
        for path in present:
            ckpt = load_checkpoint(path)
            # last.pt == best.pt: one fit
            if first and all(_equal(ckpt.get(k), first.get(k)) for k in ("model", "ema")):
                ckpt.update({k: v for k, v in first.items() if k.startswith("temperature")})
                log(
                    f"{path.name}: temperature {ckpt['temperature']:.3f} "
                    f"(the same weights as {present[0].name})"
                )
            else:
                val = val or _load_val(ckpt, path, dev)  # loaded once, for every fit
                _fit(ckpt, path, val, dev, log)
            atomic_save(ckpt, path)
            first = first or ckpt
    return first["temperature"]
