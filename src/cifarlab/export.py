"""`cifarlab export`: a checkpoint as ONNX (the `torch.export`-based exporter), a `torch.export`
program (`.pt2`), or safetensors weights with a `.json` beside them. The inputs, outputs and
metadata of each format are in docs/guide.md (`cifarlab export`)."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from cifarlab import rundir
from cifarlab.checkpoint import EXPORTED, load_checkpoint, resolve_checkpoint
from cifarlab.config import expand
from cifarlab.errors import UserError, import_extra
from cifarlab.inference import LoadedModel, load_model
from cifarlab.models.torchvision_nets import ARCHS

# format -> suffix: each exported suffix but the dropped TorchScript's, named by itself
FORMATS = {suffix[1:]: suffix for suffix in EXPORTED if suffix != ".ts"}
_BY_SUFFIX = {suffix: name for name, suffix in FORMATS.items()}
OPSET = 18  # the torch.export-based exporter's own (torchlib) opset; onnxruntime >= 1.14 runs it
DROPPED = {
    "torchscript": "TorchScript export was dropped (torch.jit.trace is deprecated by PyTorch); "
    "use --format pt2 for a torch.export program (cifarlab predict still reads old .ts files)"
}


class Deployable(nn.Module):
    """The model with its input normalisation, so callers pass plain [0, 1] images."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def metadata(loaded: LoadedModel) -> dict:
    """What predict and a plain torchvision user need beside the network (docs/guide.md)."""
    builder = ARCHS.get(loaded.args.name)  # tv-* models: how to rebuild them with torchvision
    tv = {"builder": builder, "stem": loaded.args.stem, "input_size": loaded.args.input_size}
    return {
        "classes": list(loaded.classes),
        "image_size": loaded.args.image_size,
        "mean": list(loaded.normalize.mean),
        "std": list(loaded.normalize.std),
        "temperature": loaded.temperature,
        "model": loaded.args.name,
        "model_args": loaded.args.to_dict(),
        "torchvision": tv if builder else None,
        "producer": "cifarlab",
    }


def format_of(fmt: str | None, out: Path | None) -> str:
    """--format as given, else the one --out's suffix names, else onnx."""
    if fmt is not None:
        return fmt
    return _BY_SUFFIX.get(out.suffix.lower(), "onnx") if out is not None else "onnx"


def default_output(model: str, fmt: str) -> Path:
    """RUN_DIR/model.<suffix>, or the checkpoint's name with the format's suffix."""
    suffix = FORMATS.get(fmt, "." + fmt)
    src = expand(model)
    return src / f"model{suffix}" if src.is_dir() else src.with_suffix(suffix)


def check_out(out: Path, source: Path, force: bool, suffix: str = "", label: str = "") -> None:
    """One line, before any work, for an --out that would lose a file, cannot be written or (with
    `suffix`) does not end in it: `predict` tells the formats apart by their suffix. A run file
    of any training run (its result.json, say) is never replaced, --force or not: --force is for
    an earlier export. `label` names `out` in the message (a metadata file beside --out)."""
    if out.exists() and (
        out.resolve() == source.resolve()
        or (out.parent.resolve() == source.parent.resolve() and out.name in rundir.RUN_FILES)
    ):
        raise UserError(
            f"--out {out} is the checkpoint being exported or a file of its run; pick another file"
        )
    label = label or f"--out {out}"
    held = [n for n in rundir.RUN_FILES if (out.parent / n).exists()]
    if out.name in rundir.RUN_FILES and held:
        raise UserError(
            f"{label} would replace {out.name} of the training run in {out.parent} "
            f"({', '.join(held[:3])}); pick an --out outside it (--force replaces only an "
            "earlier export, never a run's files)"
        )
    rundir.check_out(out, folder=False)
    if out.exists() and not out.is_file():  # --force would replace /dev/null itself (as root)
        raise UserError(f"{label} is not a regular file (a device or a pipe); give a file name")
    if out.exists() and not force:
        raise UserError(f"--out {out} already exists; add --force to overwrite it")
    if suffix and out.suffix.lower() != suffix:
        named = _BY_SUFFIX.get(out.suffix.lower())
        said = f"its suffix says {named}" if named else f"a {suffix} export needs that suffix"
        raise UserError(
            f"--out {out}: {said}; give --out {out.with_suffix(suffix).name} or --format"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create its folder ({exc.strerror})") from None


def export_model(target: str, fmt: str, out: Path, force: bool = False) -> Path:
    """Write `target`'s checkpoint to `out` (safetensors: and its `.json`); an existing file
    only with `force`, never the input; each file is replaced only when complete."""
    if fmt in DROPPED:
        raise UserError(f"--format {fmt}: {DROPPED[fmt]}")
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: valid formats: {', '.join(FORMATS)}")
    source = resolve_checkpoint(target)
    check_out(out, source, force, FORMATS[fmt])  # makes the folders above `out`
    if fmt == "safetensors":
        if sidecar(out).is_dir():
            raise UserError(
                f"--out {out}: its metadata file {sidecar(out)} is a folder; pick another --out"
            )
        check_out(
            sidecar(out), source, force, label=f"--out {out}: its metadata file {sidecar(out)}"
        )
    loaded = load_model(load_checkpoint(source))
    try:
        _write(fmt, loaded, metadata(loaded), out, force)
    except FileExistsError as exc:  # made by another process since `check_out`
        raise UserError(
            f"{exc.filename2 or exc.filename} was written by another process meanwhile; add "
            "--force to overwrite it"
        ) from None
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write it ({exc.strerror or exc})") from None
    return out


def _write(fmt: str, loaded: LoadedModel, meta: dict, out: Path, force: bool) -> None:
    if fmt == "safetensors":
        return _export_safetensors(loaded.model, out, meta, force)
    net = Deployable(loaded.model, loaded.normalize.mean, loaded.normalize.std).eval()
    example = torch.rand(2, 3, loaded.args.image_size, loaded.args.image_size)
    with rundir.replaced_when_complete(out, exclusive=not force) as tmp:
        if fmt == "onnx":
            _export_onnx(net, example, tmp, meta)
        else:
            program = torch.export.export(net, (example,), dynamic_shapes=(_batch_dim(),))
            packed = io.BytesIO()  # torch's file writer aborts the process when a write fails
            torch.export.save(program, packed, extra_files={"cifarlab.json": json.dumps(meta)})
            tmp.write_bytes(packed.getvalue())


def _batch_dim() -> dict:
    return {0: torch.export.Dim("batch", min=1, max=65536)}


def _export_onnx(net: nn.Module, example: torch.Tensor, out: Path, meta: dict) -> None:
    onnx = import_extra("onnx", "onnx", "ONNX export")
    import_extra("onnxscript", "onnx", "ONNX export")  # the torch.export-based exporter's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (example,), str(out), input_names=["images"], output_names=["logits"],
            dynamic_shapes=(_batch_dim(),), opset_version=OPSET, dynamo=True, verbose=False,
            external_data=False,  # one self-contained file; the default leaves a `.data` file beside it
        )  # fmt: skip
    proto = onnx.load(str(out))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(proto, str(out))


def torchvision_core(model: nn.Module) -> nn.Module:
    """The torchvision network itself: tv-* models with stem imagenet wrap it after an Upsample."""
    if isinstance(model, nn.Sequential) and len(model) == 2 and isinstance(model[0], nn.Upsample):
        return model[1]
    return model


def sidecar(path: Path) -> Path:
    """`model.safetensors` -> `model.json`."""
    return path.with_suffix(".json")


def _export_safetensors(model: nn.Module, out: Path, meta: dict, force: bool) -> None:
    st = import_extra("safetensors.torch", "safetensors", "safetensors export")
    state = {k: v.contiguous() for k, v in torchvision_core(model).state_dict().items()}
    # written by open(): save_file would make it 0600
    with rundir.replaced_when_complete(out, exclusive=not force) as tmp:
        tmp.write_bytes(st.save(state, metadata={"producer": "cifarlab"}))
    with rundir.replaced_when_complete(sidecar(out), exclusive=not force) as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
