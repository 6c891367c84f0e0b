"""Model outputs over a whole uint8 image set, with optional flip (+ translate) test-time augmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cifarlab.augment import Normalize


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
) -> torch.Tensor:
    """Logits (float32, on the images' device) for uint8 NCHW `images`; TTA averages the views' logits."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size].float().div_(255))
        if hardware is not None and hardware.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        views = _views(x, tta)
        with hardware.autocast() if hardware is not None else torch.autocast("cpu", enabled=False):
            logits = torch.stack([model(v).float() for v in views]).mean(0)
        out.append(logits)
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def model_from_checkpoint(
    ckpt: dict, device: torch.device, use_ema: bool = False
) -> torch.nn.Module:
    """The checkpoint's model with its weights (the EMA weights when asked and present), in eval mode."""
    from cifarlab.errors import UserError
    from cifarlab.models import create_model

    config = ckpt["config"]
    model = create_model(
        config["model"],
        len(ckpt["classes"]),
        config.get("width", 1.0),
        config.get("image_size", 32),
    )
    state = ckpt["model"]
    if use_ema:
        if ckpt.get("ema") is None:
            raise UserError(
                "--ema: this checkpoint holds no EMA weights (train with --set ema=true)"
            )
        state = {
            k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")
        }
    model.load_state_dict(state)
    return model.to(device).eval()
