"""`cifarlab export`: a checkpoint as ONNX or TorchScript with normalisation baked in.

Input: float RGB in [0, 1], NCHW, any batch size. Output: logits. Class names, image size and
the normalisation travel inside the file (ONNX metadata_props / TorchScript extra files).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from cifarlab.checkpoint import load_checkpoint, resolve_checkpoint
from cifarlab.errors import UserError
from cifarlab.inference import load_model

FORMATS = ("onnx", "torchscript")


class Deployable(nn.Module):
    """The model with its input normalisation, so callers pass plain [0, 1] images."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def metadata(ckpt: dict) -> dict[str, str]:
    return {
        "classes": json.dumps(list(ckpt["classes"])),
        "image_size": str(int(ckpt["config"].get("image_size", 32))),
        "mean": json.dumps(list(ckpt["mean"])),
        "std": json.dumps(list(ckpt["std"])),
        "model": str(ckpt["config"]["model"]),
        "producer": "cifarlab",
    }


def check_out(out: Path, source: Path, force: bool) -> None:
    """One line, before any work, for an --out that would lose a file or cannot be written."""
    if out.exists() and out.resolve() == source.resolve():
        raise UserError(f"--out {out} is the checkpoint being exported; pick another file")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name, e.g. {out / 'model.onnx'}")
    if out.exists() and not force:
        raise UserError(f"--out {out} already exists; add --force to overwrite it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create its folder ({exc.strerror})") from None
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"--out {out}: its folder {out.parent} is not writable")


def export_model(target: str, fmt: str, out: Path, force: bool = False) -> Path:
    """Write `target`'s checkpoint to `out`; an existing `out` only with `force`, never the input."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: valid formats: {', '.join(FORMATS)}")
    source = resolve_checkpoint(target)
    check_out(out, source, force)
    ckpt = load_checkpoint(source)
    loaded = load_model(ckpt)
    net = Deployable(loaded.model, loaded.normalize.mean, loaded.normalize.std).eval()
    size = loaded.image_size
    example = torch.rand(2, 3, size, size)
    meta = metadata(ckpt)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # `out` is replaced only when complete
    try:
        if fmt == "onnx":
            _export_onnx(net, example, tmp, meta)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript's deprecation notice
                traced = torch.jit.trace(net, example)
                torch.jit.save(traced, str(tmp), _extra_files={"cifarlab.json": json.dumps(meta)})
        os.replace(tmp, out)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write it ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _export_onnx(net: nn.Module, example: torch.Tensor, out: Path, meta: dict[str, str]) -> None:
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs the extra: pip install 'cifarlab[onnx]'") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (example,), str(out), input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
        )  # fmt: skip
    proto = onnx.load(str(out))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))
