"""Fitting an ImageNet classifier (torchvision's or timm's) to our task: a new head, and either
a stem that keeps 32 px images' resolution (`stem: cifar`) or an upsampling to `input_size`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from cifarlab.checkpoint import read_tensors
from cifarlab.errors import UserError


@dataclass(frozen=True)
class BackboneOptions:
    stem: str = "cifar"  # cifar | imagenet
    input_size: int = 224  # imagenet stem: images are upsampled to this side
    pretrained: bool = False  # the DEFAULT weights (from torch's cache, downloaded if online)
    weights: str = ""  # a local state-dict file, or a torchvision weights name (IMAGENET1K_V1)


_WEIGHTS_NAME = re.compile(r"[A-Z][A-Z0-9_]*")  # IMAGENET1K_V1, DEFAULT: a torchvision enum name


def weights_file(weights: str, named: bool) -> Path | None:
    """The local file `weights` names: None when it is empty or, for a model that takes
    torchvision's weights by name (`named`), such a name that is not an existing file."""
    if not weights or (named and _WEIGHTS_NAME.fullmatch(weights) and not Path(weights).is_file()):
        return None
    return Path(weights)


def load_state_file(path: Path) -> dict:
    """A state dict from a local file, also one wrapped under a `state_dict` or `model` key (our
    checkpoints, many training scripts', PyTorch Lightning's)."""
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file")
    state = read_tensors(path, f"--weights {path}", "state dict")
    if not isinstance(state, dict):
        raise UserError(
            f"--weights {path}: holds a {type(state).__name__}, not a state dict; save one with "
            "torch.save(model.state_dict(), FILE)"
        )
    inner = [v for k, v in state.items() if k in ("state_dict", "model") and isinstance(v, dict)]
    return inner[0] if len(inner) == 1 else state


def unwrapped(state: dict, wanted) -> dict:
    """`state` without the prefixes that all its keys carry, removed one at a time until a key is
    one of the model's (`wanted`): a wrapper's (`module.` of DataParallel, `_orig_mod.` of
    torch.compile, a LightningModule's attribute: `model.`, `net.`), never the model's own; as
    given when no removal makes a key fit."""
    bare = state
    while bare and not wanted & bare.keys():
        wrap = str(next(iter(bare))).partition(".")[0] + "."
        if not all(str(k).startswith(wrap) for k in bare):
            return state
        bare = {k.removeprefix(wrap): v for k, v in bare.items()}
    return bare


def replace_head(net: nn.Module, num_classes: int, where: str) -> None:
    """The last `Linear` (fc, classifier[-1], heads.head, ...) made a fresh `num_classes` one."""
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"{where} has no Linear classifier to replace; pick another model")
    _set(net, linears[-1], nn.Linear(net.get_submodule(linears[-1]).in_features, num_classes))


def cifar_stem(net: nn.Module, log) -> None:
    """The first conv with stride > 1 gets stride 1 (its weights are kept), and a max-pool after
    it, before the next strided conv, becomes Identity (ResNet's, also after a deep stem)."""
    modules = list(net.named_modules())
    first = next((i for i, (_, m) in enumerate(modules) if _strided_conv(m)), None)
    if first is None:
        log("stem: cifar — no strided conv to relax; the model is used as built")
        return
    name, conv = modules[first]
    conv.stride = (1, 1)
    done = [f"{name} stride -> 1 (weights kept)"]
    for later, module in modules[first + 1 :]:
        if _strided_conv(module):
            break
        if isinstance(module, nn.MaxPool2d):
            _set(net, later, nn.Identity())
            done.append(f"{later} removed")
            break
    log("stem: cifar — " + "; ".join(done))


def with_stem(net: nn.Module, opts: BackboneOptions, log, stem=cifar_stem) -> nn.Module:
    """`net` adapted for `opts.stem`: changed in place (cifar) or behind an `Upsample` (imagenet)."""
    if opts.stem == "cifar":
        stem(net, log)
        return net
    # resized inside the model, so evaluation, prediction and export all see it
    side = (opts.input_size, opts.input_size)
    return nn.Sequential(nn.Upsample(side, mode="bilinear", align_corners=False), net)


def _strided_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and max(module.stride) > 1


def _set(net: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(net.get_submodule(parent), attr, module)
