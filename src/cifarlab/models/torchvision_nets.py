"""Any torchvision classifier (`tv:<builder>`, and the fixed `tv-*` names): ImageNet weights by
enum name, DEFAULT, or from a local file; the head and stem fitted by `adapt`. ViT and MaxViT
(embeddings of a fixed side) are built for `input_size`, ViT's weights resampled to it."""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from torch import nn

from cifarlab.errors import UserError
from cifarlab.models.adapt import (
    BackboneOptions,
    cifar_stem,
    load_state_file,
    replace_head,
    unwrapped,
    weights_file,
    with_stem,
)

ARCHS = {  # our fixed names (checkpoints carry them) -> torchvision builder name
    "tv-resnet18": "resnet18",
    "tv-resnet34": "resnet34",
    "tv-resnet50": "resnet50",
    "tv-mobilenet_v3_small": "mobilenet_v3_small",
    "tv-efficientnet_b0": "efficientnet_b0",
}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# builder-name -> keywords without which the model is no plain classifier (aux heads in training)
_NO_AUX = {"aux_logits": False, "init_weights": True}
BUILDER_KWARGS = {"googlenet": _NO_AUX, "inception_v3": _NO_AUX}


def torchvision_names() -> list[str]:
    """torchvision's classification builders (detection, video, quantized ones are not listed)."""
    from torchvision import models

    return models.list_models(module=models)


def check_builder(arch: str) -> str:
    """`arch` if torchvision builds it, else an error naming the closest builders."""
    names = torchvision_names()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join('tv:' + c for c in close)}? " if close else ""
        raise UserError(
            f"unknown torchvision model 'tv:{arch}'; {hint}`cifarlab models --all` lists all "
            f"{len(names)}"
        )
    return arch


def fixed_size_keywords(arch: str, side: int) -> dict:
    """The builder keywords sizing the embeddings for input side `side` ({} when any side goes)."""
    if arch.startswith("vit_"):
        return {"image_size": side}
    if arch.startswith("maxvit_"):
        return {"input_size": (side, side)}
    return {}


def _imagenet_state_dict(arch: str, opts: BackboneOptions) -> dict | None:
    """From a local file, or by weights name (DEFAULT for `pretrained`) from torch's cache,
    downloaded when missing; None for random weights."""
    from torchvision.models import get_model_weights

    name = opts.weights
    if file := weights_file(name, named=True):
        return load_state_file(file)
    if not (opts.pretrained or name):
        return None
    enum = get_model_weights(arch)
    valid = [w.name for w in enum]
    if name not in ("", "DEFAULT", *valid):
        close = difflib.get_close_matches(name, valid, n=2, cutoff=0.4)
        raise UserError(
            f"weights: {name} is neither a file nor a weights name of {arch}"
            + (f"; did you mean {' or '.join(close)}?" if close else "")
            + f" (its weights: {', '.join(valid)})"
        )
    weights = enum[name or "DEFAULT"]
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:
        file = weights.url.rsplit("/", 1)[-1]
        target = Path(torch.hub.get_dir()) / "checkpoints" / file
        raise UserError(
            f"ImageNet weights for {arch} are not cached and could not be downloaded ({type(exc).__name__}); "
            f"put {file} (from {weights.url}) at {target}, or pass --weights FILE"
        ) from None


def _load(net: nn.Module, arch: str, state: dict, weights: str) -> None:
    ours = net.state_dict()
    state = unwrapped(state, ours.keys())
    if arch.startswith("vit_"):  # ImageNet position embeddings resampled to the side built for
        from torchvision.models.vision_transformer import interpolate_embeddings

        state = interpolate_embeddings(net.image_size, net.patch_size, state)
    elif arch in BUILDER_KWARGS:  # ImageNet weights include the auxiliary heads built without
        state = {k: v for k, v in state.items() if k in ours}
    wrong = {  # torch's own message lists every key, and its first line none
        "missing": [k for k in ours if k not in state],
        "unexpected": [k for k in state if k not in ours],
        "of another shape": [k for k in ours if k in state and state[k].shape != ours[k].shape],
    }
    if found := [f"{len(keys)} {what}, e.g. {keys[0]}" for what, keys in wrong.items() if keys]:
        raise UserError(
            f"--weights {weights or 'DEFAULT'}: they do not fit tv:{arch} ({'; '.join(found)}); "
            f"give a state dict saved from torchvision's {arch}"
        )
    net.load_state_dict(state)


def lesson_stem(net: nn.Module, log) -> None:
    """The fixed tv-* names' stem, the only thing that tells `tv-<builder>` from `tv:<builder>`:
    a ResNet's 7x7 conv1 becomes a fresh 3x3 stride-1 conv (the lesson's transfer model; its
    checkpoints hold that shape); other families as `cifar_stem`, so there the names agree."""
    if not hasattr(net, "conv1"):
        cifar_stem(net, log)
        return
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    log(
        "stem: cifar — conv1 replaced by a 3x3 stride-1 conv that starts untrained; max-pool removed"
    )


def torchvision_backbone(
    arch: str, num_classes: int, opts: BackboneOptions, log=lambda s: None, stem=cifar_stem
) -> nn.Module:
    """torchvision's `arch` with optional ImageNet weights, a `num_classes` head and the stem."""
    from torchvision.models import get_model

    kwargs = {**BUILDER_KWARGS.get(arch, {}), **fixed_size_keywords(arch, opts.input_size)}
    try:
        net = get_model(arch, weights=None, **kwargs)
    except (ValueError, AssertionError, RuntimeError) as exc:
        raise UserError(
            f"tv:{arch} cannot be built for input_size {opts.input_size} "
            f"({' '.join(str(exc).split())}); try input_size: 224"
        ) from None
    state = _imagenet_state_dict(arch, opts)
    if state is not None:
        _load(net, arch, state, opts.weights)
    replace_head(net, num_classes, f"tv:{arch}")
    return with_stem(net, opts, log, stem)
