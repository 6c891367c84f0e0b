"""A checkpoint back to a ready model, and its logits over a whole uint8 image set, with
optional flip (+ translate) test-time augmentation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cifarlab.augment import Normalize
from cifarlab.errors import UserError
from cifarlab.hardware import Hardware, inference_hardware
from cifarlab.models import ModelArgs, build_model

TTA_VIEWS = {"none": 1, "flip": 2, "flip-translate": 4}  # model passes per image


def _views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    if tta == "none":
        return [x]
    views = [x, x.flip(3)]
    if tta == "flip-translate":  # one-pixel shifts, as airbench's TTA
        pad = F.pad(x, (1, 1, 1, 1), mode="reflect")
        views += [pad[:, :, :-2, :-2], pad[:, :, 2:, 2:]]
    return views


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    images: torch.Tensor,
    normalize: Normalize,
    batch_size: int = 500,
    tta: str = "none",
    hardware=None,
    plain: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits (float32, on the images' device) for uint8 NCHW `images`; TTA averages the views'
    logits. Without `hardware`, training's precision rule for the images' device. `plain`: the
    logits without TTA, already computed: the first view is not run again."""
    hardware = hardware or inference_hardware(images.device)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size])
        if hardware.channels_last:  # the inputs alone pick those kernels; the model is as it is
            x = x.contiguous(memory_format=torch.channels_last)
        views = _views(x, tta)
        with hardware.autocast():
            known = [] if plain is None else [plain[start : start + batch_size]]
            logits = [*known, *(model(v).float() for v in views[len(known) :])]
            logits = torch.stack(logits).mean(0)
        out.append(logits)
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, device=images.device)


def model_args(ckpt: dict) -> ModelArgs:
    """The checkpoint's constructor arguments (without `model_args`: from its resolved config)."""
    if "model_args" in ckpt:
        return ModelArgs.from_dict(ckpt["model_args"])
    c = ckpt["config"]
    return ModelArgs(
        c["model"], len(ckpt["classes"]), c.get("width", 1.0) / 2 ** c.get("width_halvings", 0),
        c.get("image_size", 32),
        c.get("stem", "cifar"), c.get("input_size", 0),
    )  # fmt: skip


@dataclass
class LoadedModel:
    """A trained model in eval mode with everything needed to feed it."""

    model: torch.nn.Module
    normalize: Normalize
    classes: list[str]
    args: ModelArgs
    temperature: float = 1.0  # probabilities are softmax(logits / temperature); see calibration
    hardware: Hardware | None = None  # the run's precision where this device runs it

    def logits(self, images: torch.Tensor, batch_size: int = 500, tta: str = "none", plain=None):
        """`predict_logits` with this model's normalisation and precision."""
        return predict_logits(
            self.model, images, self.normalize, batch_size, tta, self.hardware, plain
        )


def _ema_state(ckpt: dict) -> dict:
    if ckpt.get("ema") is None:
        raise UserError("--ema: this checkpoint holds no EMA weights (train with --set ema=true)")
    return {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}


def load_model(
    ckpt: dict, device: torch.device | str = "cpu", use_ema: bool = False
) -> LoadedModel:
    """The one way back from a checkpoint (`load_checkpoint`'s, checked) to a model."""
    args = model_args(ckpt)
    if args.num_classes != len(ckpt["classes"]):
        raise UserError(
            f"checkpoint: its model has {args.num_classes} outputs but it lists "
            f"{len(ckpt['classes'])} classes; the file is damaged or was edited"
        )
    model = build_model(args)
    try:
        model.load_state_dict(_ema_state(ckpt) if use_ema else ckpt["model"])
    except RuntimeError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
        raise UserError(
            f"checkpoint: its weights do not fit a {args.name} built from its own arguments "
            f"({detail[:200]}); the file is damaged or was edited"
        ) from None
    normalize = Normalize(ckpt["mean"], ckpt["std"])
    temperature = float(ckpt.get("temperature_ema" if use_ema else "temperature", 1.0))
    hardware = inference_hardware(torch.device(device), ckpt["config"].get("amp", "auto"))
    return LoadedModel(
        model.to(device).eval(), normalize, list(ckpt["classes"]), args, temperature, hardware
    )
