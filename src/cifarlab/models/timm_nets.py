"""timm models (`timm:<name>`, the `timm` extra), random or from a local file, never downloaded.
Stems as for torchvision (`adapt`); those timm marks `fixed_input_size` are built for
`input_size` (timm resamples their position embeddings when it loads a file)."""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from torch import nn

from cifarlab.errors import UserError, first_line, import_extra
from cifarlab.models.adapt import BackboneOptions, unwrapped, with_stem


def _timm():
    return import_extra("timm", "timm", "a timm: model")


def check_timm_name(name: str) -> str:
    """`name` if timm builds it, else an error naming the closest architectures."""
    if not _timm().is_model(name):
        close = difflib.get_close_matches(name, _timm().list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join('timm:' + c for c in close)}? " if close else ""
        raise UserError(
            f"unknown timm model 'timm:{name}'; {hint}`cifarlab models --filter WORD` searches"
        )
    return name


def has_fixed_input(name: str) -> bool:
    """timm's own flag for models whose embeddings fix the input side (ViT, DeiT, Swin, ...)."""
    cfg = _timm().models.get_pretrained_cfg(name)
    return bool(cfg and cfg.fixed_input_size)


def timm_backbone(
    name: str, num_classes: int, opts: BackboneOptions, log=lambda s: None
) -> nn.Module:
    """timm's `name` with `num_classes` outputs, its weights from `opts.weights` if given."""
    if opts.pretrained:  # config validation refuses it too; a direct build must not ignore it
        raise UserError(
            f"pretrained: true downloads; timm:{name} takes weights only from a file: weights: FILE"
        )
    kwargs = {"img_size": opts.input_size} if has_fixed_input(name) else {}
    if not opts.weights:
        net = _timm().create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    else:
        net = _from_file(name, num_classes, Path(opts.weights), kwargs)
    return with_stem(net, opts, log)


def _from_file(name: str, num_classes: int, path: Path, kwargs: dict) -> nn.Module:
    """timm reads the file (safetensors too) and loads it, keys `unwrapped`, with the model's
    own checkpoint filter (a new head when the class count differs); it only warns on keys that
    do not fit, so we check them ourselves."""
    timm = _timm()
    ours = _keys(timm, name, num_classes, kwargs)
    try:
        state = unwrapped(timm.models.load_state_dict(str(path)), ours)
    except Exception as exc:  # EOFError, SafetensorError, UnpicklingError, ...: no state dict
        raise UserError(
            f"--weights {path}: not a readable state dict ({first_line(exc)})"
        ) from None
    if not state:  # timm would look its own weights up online instead
        raise UserError(f"--weights {path}: holds no tensors; give a model's state dict")
    try:
        net = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"state_dict": state},
            num_classes=num_classes, **kwargs,
        )  # fmt: skip
    except (RuntimeError, KeyError, ValueError) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise UserError(
            f"--weights {path}: does not fit timm:{name} ({lines[-1][:200] if lines else exc})"
        ) from None
    net.pretrained_cfg.pop("state_dict", None)  # the model would keep a copy of the weights
    heads = net.get_classifier()  # LeViT, EfficientFormer: (head, distillation head)
    heads = heads if isinstance(heads, tuple) else (heads,)
    new = tuple(n + "." for n, m in net.named_modules() if any(m is h for h in heads))
    missing = [k for k in ours if k not in state and not k.startswith(new)]
    if missing:
        raise UserError(
            f"--weights {path}: does not fit timm:{name} ({len(missing)} tensors missing, "
            f"e.g. {missing[0]})"
        )
    return net


def _keys(timm, name: str, num_classes: int, kwargs: dict) -> list[str]:
    """The model's state-dict keys from a build on the meta device (no weights), or on the CPU
    where building reads a tensor's value, which older timm does (1.0.15: ViT, DeiT, Swin,
    ConvNeXt, PVT), the random state kept as it was."""
    try:
        with torch.device("meta"):
            return list(timm.create_model(name, num_classes=num_classes, **kwargs).state_dict())
    except RuntimeError:  # NotImplementedError too: "Cannot copy out of meta tensor"
        with torch.random.fork_rng(devices=[]):
            return list(timm.create_model(name, num_classes=num_classes, **kwargs).state_dict())
