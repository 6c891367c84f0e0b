"""Model registry: `create_model(name, num_classes)`; `cifarlab models` lists `MODELS`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from cifarlab.errors import UserError
from cifarlab.models.cnn import CIFAR10CNN
from cifarlab.models.fastnet import FastNet
from cifarlab.models.resnet import ResNet
from cifarlab.models.torchvision_nets import ARCHS, BackboneOptions, torchvision_backbone


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., nn.Module] | None  # (num_classes, width, image_size) -> module
    about: str


MODELS: dict[str, ModelSpec] = {
    "cnn": ModelSpec(
        lambda k, w, s: CIFAR10CNN(k, w, s),
        "the lesson's CIFAR10CNN: 3 conv blocks 64/128/256, 3.3M params",
    ),
    "resnet18": ModelSpec(
        lambda k, w, s: ResNet([2, 2, 2, 2], k, w),
        "CIFAR ResNet-18 (3x3 stem, no max-pool), 11M params",
    ),
    "resnet34": ModelSpec(
        lambda k, w, s: ResNet([3, 4, 6, 3], k, w), "CIFAR ResNet-34, 21M params"
    ),
    "fastnet": ModelSpec(
        lambda k, w, s: FastNet(k, w), "speed-record-class net (airbench-style, GELU/BN, 3 blocks)"
    ),
}


for _name, _arch in ARCHS.items():
    MODELS[_name] = ModelSpec(
        None, f"torchvision {_arch} (pretrained: true for ImageNet weights; stem: cifar|imagenet)"
    )


def create_model(
    name: str,
    num_classes: int,
    width: float = 1.0,
    image_size: int = 32,
    backbone: BackboneOptions | None = None,
    log=lambda s: None,
) -> nn.Module:
    if name not in MODELS:
        raise UserError(f"unknown model '{name}'; valid models: {', '.join(MODELS)}")
    if name in ARCHS:
        return torchvision_backbone(name, num_classes, backbone or BackboneOptions(), log)
    return MODELS[name].build(num_classes, width, image_size)


def head_name(model: nn.Module) -> str:
    """Qualified name of the classifier head: the last Linear layer (what a new class set replaces)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
