"""torchvision backbones for small images: ImageNet weights (cache or local file) and two stems.

`stem: cifar` is the lesson's adaptation (3x3 stride-1 first conv, no max-pool); `stem: imagenet`
keeps the pretrained stem and upsamples the batch on the device to `input_size` first.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.checkpoint import read_failure, refusal_reason
from cifarlab.errors import UserError

ARCHS = {  # our name -> torchvision builder name
    "tv-resnet18": "resnet18",
    "tv-resnet34": "resnet34",
    "tv-resnet50": "resnet50",
    "tv-mobilenet_v3_small": "mobilenet_v3_small",
    "tv-efficientnet_b0": "efficientnet_b0",
}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class BackboneOptions:
    stem: str = "cifar"  # cifar | imagenet
    input_size: int = 224  # imagenet stem: images are upsampled to this side
    pretrained: bool = (
        False  # torchvision's ImageNet weights (from torch's cache, downloaded if online)
    )
    weights: str = ""  # a local state-dict file instead of the download


class Upsample(nn.Module):
    """Resize on the device, inside the model, so evaluation, prediction and export all see it."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x):
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)


def _imagenet_state_dict(arch: str, opts: BackboneOptions) -> dict | None:
    if opts.weights:
        path = Path(opts.weights)
        if not path.is_file():
            raise UserError(f"--weights {path}: no such file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UserError(f"--weights {path}: refused to load ({refusal_reason(exc)})") from None
        except Exception as exc:
            raise UserError(
                f"--weights {path}: not a readable state dict ({read_failure(path, exc)})"
            ) from None
        return state.get("model", state) if isinstance(state, dict) and "model" in state else state
    if not opts.pretrained:
        return None
    from torchvision.models import get_model_weights

    weights = get_model_weights(arch).DEFAULT
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:
        name = weights.url.rsplit("/", 1)[-1]
        target = Path(torch.hub.get_dir()) / "checkpoints" / name
        raise UserError(
            f"ImageNet weights for {arch} are not cached and could not be downloaded ({type(exc).__name__}); "
            f"put {name} (from {weights.url}) at {target}, or pass --weights FILE"
        ) from None


def _replace_head(net: nn.Module, num_classes: int) -> None:
    if hasattr(net, "fc"):
        net.fc = nn.Linear(net.fc.in_features, num_classes)
    else:
        last = net.classifier[-1]
        net.classifier[-1] = nn.Linear(last.in_features, num_classes)


def _cifar_stem(net: nn.Module, log) -> None:
    if hasattr(net, "conv1"):
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
        log(
            "stem: cifar — conv1 replaced by a 3x3 stride-1 conv that starts untrained; max-pool removed"
        )
    else:
        first = net.features[0][0]
        first.stride = (1, 1)  # keeps its pretrained 3x3 weights; only the stride changes
        log("stem: cifar — first conv stride 2 -> 1 (weights kept)")


def torchvision_backbone(
    name: str, num_classes: int, opts: BackboneOptions, log=lambda s: None
) -> nn.Module:
    from torchvision import models

    arch = ARCHS[name]
    net = getattr(models, arch)(weights=None)
    state = _imagenet_state_dict(arch, opts)
    if state is not None:
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise UserError(f"weights do not fit {arch}: {str(exc).splitlines()[0]}") from None
    _replace_head(net, num_classes)
    if opts.stem == "cifar":
        _cifar_stem(net, log)
        return net
    return nn.Sequential(Upsample(opts.input_size), net)
