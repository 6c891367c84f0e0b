"""Model registry and the one model constructor.

`ModelArgs` are a model's constructor arguments; every checkpoint stores them, and
`build_model(args)` is the only way a model is made, for training and for every reload
(evaluate, predict, export, `--init-from`), so what trains is what reloads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from cifarlab.errors import UserError
from cifarlab.models.cnn import CIFAR10CNN
from cifarlab.models.fastnet import FastNet
from cifarlab.models.resnet import ResNet
from cifarlab.models.torchvision_nets import ARCHS, BackboneOptions, torchvision_backbone


@dataclass(frozen=True)
class ModelArgs:
    """What builds a model's modules; weights are loaded separately."""

    name: str
    num_classes: int
    width: float = 1.0  # channel multiplier (our own nets)
    image_size: int = 32  # side of the images the model is fed
    stem: str = "cifar"  # tv-* models: cifar (3x3 stride-1 conv1, no max-pool) | imagenet
    input_size: int = 0  # tv-* models with stem imagenet: side the batch is upsampled to

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[ModelArgs], nn.Module] | None  # None: a torchvision backbone
    about: str
    takes_weights: bool = False  # ImageNet weights (pretrained / --weights) exist for it
    has_stems: bool = False  # stem: cifar | imagenet applies


MODELS: dict[str, ModelSpec] = {
    "cnn": ModelSpec(
        lambda a: CIFAR10CNN(a.num_classes, a.width, a.image_size),
        "the lesson's CIFAR10CNN: 3 conv blocks 64/128/256, 3.3M params",
    ),
    "resnet18": ModelSpec(
        lambda a: ResNet([2, 2, 2, 2], a.num_classes, a.width),
        "CIFAR ResNet-18 (3x3 stem, no max-pool), 11M params",
    ),
    "resnet34": ModelSpec(
        lambda a: ResNet([3, 4, 6, 3], a.num_classes, a.width), "CIFAR ResNet-34, 21M params"
    ),
    "fastnet": ModelSpec(
        lambda a: FastNet(a.num_classes, a.width),
        "speed-record-class net (airbench-style, GELU/BN, 3 blocks)",
    ),
}
for _name, _arch in ARCHS.items():
    MODELS[_name] = ModelSpec(
        None,
        f"torchvision {_arch} (pretrained: true for ImageNet weights; stem: cifar|imagenet)",
        takes_weights=True,
        has_stems=True,
    )


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise UserError(f"unknown model '{name}'; valid models: {', '.join(MODELS)}")
    return MODELS[name]


def build_model(
    args: ModelArgs, pretrained: bool = False, weights: str = "", log=lambda s: None
) -> nn.Module:
    """The model `args` describe; `pretrained`/`weights` start a tv-* model from ImageNet weights."""
    spec = model_spec(args.name)
    if spec.build is not None:
        return spec.build(args)
    opts = BackboneOptions(args.stem, args.input_size or 224, pretrained, weights)
    return torchvision_backbone(args.name, args.num_classes, opts, log)


def create_model(
    name: str, num_classes: int, width: float = 1.0, image_size: int = 32
) -> nn.Module:
    """Shorthand for benchmarks and tests: `build_model(ModelArgs(...))` with random weights."""
    return build_model(ModelArgs(name, num_classes, width, image_size))


def head_name(model: nn.Module) -> str:
    """Qualified name of the classifier head: the last Linear layer (what a new class set replaces)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
