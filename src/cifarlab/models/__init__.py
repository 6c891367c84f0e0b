"""The model registry and `build_model`, the one constructor for training and every reload.

Names: the fixed ones in `MODELS`, plus `tv:<builder>` (any torchvision classifier) and
`timm:<name>` (the `timm` extra).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cifarlab.checkpoint import ModelArgs
from cifarlab.errors import UserError
from cifarlab.models.adapt import BackboneOptions, cifar_stem
from cifarlab.models.cnn import CIFAR10CNN
from cifarlab.models.fastnet import FastNet
from cifarlab.models.resnet import ResNet
from cifarlab.models.timm_nets import check_timm_name, has_fixed_input, timm_backbone
from cifarlab.models.torchvision_nets import (
    ARCHS,
    check_builder,
    fixed_size_keywords,
    lesson_stem,
    torchvision_backbone,
    torchvision_names,
)

Build = Callable[[ModelArgs, BackboneOptions, Callable[[str], None]], nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    build: Build  # (args, weights and stem options, log) -> the model
    about: str
    backbone: bool = False  # an ImageNet backbone: takes `weights: FILE`; stem: cifar | imagenet
    named_weights: bool = False  # `pretrained: true` and `weights: ENUM_NAME` (torchvision)
    fixed_input: bool = False  # embeddings fix the input side: stem imagenet only
    sides: tuple[int, int] = (8, 1024)  # the image sides it can take, smallest and largest


def _torchvision(arch: str, stem=cifar_stem) -> Build:
    return lambda a, opts, log: torchvision_backbone(arch, a.num_classes, opts, log, stem)


def _timm(name: str) -> Build:
    return lambda a, opts, log: timm_backbone(name, a.num_classes, opts, log)


MODELS: dict[str, ModelSpec] = {  # our own nets take neither weights nor stem options
    "cnn": ModelSpec(
        lambda a, *_: CIFAR10CNN(a.num_classes, a.width, a.image_size),
        "the lesson's CIFAR10CNN: 3 conv blocks 64/128/256, 3.3M params",
    ),
    "resnet18": ModelSpec(
        lambda a, *_: ResNet([2, 2, 2, 2], a.num_classes, a.width),
        "CIFAR ResNet-18 (3x3 stem, no max-pool), 11M params",
    ),
    "resnet34": ModelSpec(
        lambda a, *_: ResNet([3, 4, 6, 3], a.num_classes, a.width),
        "CIFAR ResNet-34, 21M params",
    ),
    "fastnet": ModelSpec(
        lambda a, *_: FastNet(a.num_classes, a.width),
        "speed-record-class net (airbench-style, GELU/BN, 3 blocks)",
        sides=(25, 48),  # its 3x3 pool after three halvings must leave one pixel
    ),
}
for _name, _arch in ARCHS.items():
    MODELS[_name] = ModelSpec(
        _torchvision(_arch, lesson_stem),
        f"tv:{_arch} with the lesson's stem (a ResNet's conv1: fresh 3x3, stride 1); "
        "stem: imagenet builds exactly tv:" + _arch,
        backbone=True,
        named_weights=True,
    )


def model_spec(name: str) -> ModelSpec:
    if name in MODELS:
        return MODELS[name]
    family, colon, arch = name.partition(":")
    if colon and family == "tv":
        fixed = bool(fixed_size_keywords(check_builder(arch), 224))
        return ModelSpec(_torchvision(arch), f"torchvision {arch}", True, True, fixed)
    if colon and family == "timm":
        fixed = has_fixed_input(check_timm_name(arch))
        return ModelSpec(_timm(arch), f"timm {arch}", True, False, fixed)
    close = difflib.get_close_matches(name, MODELS, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise UserError(
        f"unknown model '{name}'; {hint}valid models: {', '.join(MODELS)}, tv:<torchvision "
        "name>, timm:<timm name> (see `cifarlab models --all`)"
    )


def open_names(pattern: str = "") -> dict[str, list[str] | None]:
    """The `tv:` and `timm:` names containing `pattern` (a glob such as `convnext*` also works);
    None for timm when it is not installed."""
    glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    tv = fnmatch.filter(torchvision_names(), glob)
    try:
        import timm
    except ImportError:
        return {"tv:": tv, "timm:": None}
    return {"tv:": tv, "timm:": timm.list_models(glob)}


def fixed_input_problem(spec: ModelSpec, name: str, stem: str) -> str:
    """Why `stem` does not fit model `name` ('' when it does): its embeddings fix the side."""
    if stem == "imagenet" or not spec.fixed_input:
        return ""
    return (
        f"model {name} has patch/position embeddings of a fixed input side; set stem: imagenet "
        "(it upsamples to input_size, 224 matches ImageNet weights)"
    )


def build_model(
    args: ModelArgs, pretrained: bool = False, weights: str = "", log=lambda s: None, seed: int = 0
) -> nn.Module:
    """The model `args` describe; `pretrained`/`weights` start a torchvision or timm model from
    ImageNet weights (DEFAULT / an enum name / a local file). Its random initialisation draws
    from `seed`, leaving torch's global generator as it was."""
    spec = model_spec(args.name)
    if problem := fixed_input_problem(spec, args.name, args.stem):
        raise UserError(problem)
    opts = BackboneOptions(args.stem, args.input_size or 224, pretrained, weights)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return spec.build(args, opts, log)


def create_model(
    name: str, num_classes: int, width: float = 1.0, image_size: int = 32
) -> nn.Module:
    """Shorthand for benchmarks and tests: `build_model(ModelArgs(...))` with random weights."""
    return build_model(ModelArgs(name, num_classes, width, image_size))


def head_name(model: nn.Module) -> str:
    """Qualified name of the classifier head: the last Linear layer (what a new class set replaces)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
