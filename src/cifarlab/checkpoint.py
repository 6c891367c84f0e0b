"""Checkpoints: atomic writes (temp file, fsync, rename), safe loading (`weights_only=True`) and
the entries loading checks, `ModelArgs` among them (what rebuilds the model)."""

from __future__ import annotations

import math
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

import torch

from cifarlab.errors import TrainingFailed, UserError, first_line
from cifarlab.rundir import expand, is_number, replaced_when_complete


@dataclass(frozen=True)
class ModelArgs:
    """What `models.build_model` builds, as every checkpoint stores it; weights come separately."""

    name: str
    num_classes: int
    width: float = 1.0  # channel multiplier (our own nets)
    image_size: int = 32  # side of the images the model is fed
    stem: str = "cifar"  # torchvision/timm models: cifar (no early downsampling) | imagenet
    input_size: int = 0  # torchvision/timm models with stem imagenet: side upsampled to

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelArgs:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def atomic_save(obj: Any, path: Path) -> None:
    """Write `obj` so that `path` holds either the old file or the complete new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with replaced_when_complete(path) as tmp, open(tmp, "wb") as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as exc:  # torch raises RuntimeError over a failed write
        cause = exc if isinstance(exc, OSError) else exc.__context__
        if not isinstance(cause, OSError):
            raise
        raise UserError(
            f"{path}: cannot write it ({cause.strerror or cause}); free space (or make it "
            "writable), then run the command again (train: with --resume)"
        ) from None


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def read_tensors(path: Path, where: str, kind: str, way_out: str = "restore it from a copy") -> Any:
    """`torch.load` onto the CPU of tensors and plain data; a foreign, damaged or code-running
    file is one line naming `where`, the `kind` of file expected and `way_out`. The zip archive
    torch.save writes is checked against its CRCs first: torch.load does not check them, so
    altered bytes inside a tensor would load as altered weights."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise UserError(f"{where}: not a readable {kind} (the file is empty); {way_out}")
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise UserError(
            f"{where}: not a {kind} (torch.save did not write it: it is neither a zip archive "
            "nor a pickle); the file is damaged or of another kind"
        )
    if head == b"PK\x03\x04":
        check_zip(path, where, kind, way_out)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # never its message: it advises weights_only=False
        code = _GLOBAL.search(str(exc))
        raise UserError(
            f"{where}: refused to load, "
            + (f"it would import {code.group(1)}" if code else "unsupported pickle content")
            + f" (a {kind} holds tensors and plain data only; the file is damaged or not one)"
        ) from None
    except Exception as exc:  # EOFError, KeyError, RuntimeError, ... : any way damage shows
        said = first_line(exc).split(". ")[0][:160]  # torch's first sentence, never cut mid-way
        raise UserError(
            f"{where}: not a readable {kind}, the file is damaged ({said}); {way_out}"
        ) from None


def check_zip(path: Path, where: str, kind: str, way_out: str) -> None:
    """Refuses, in one line, a zip archive cut short (no central directory at its end) or with
    a member whose bytes fail their CRC (`testzip` reads every member; about the cost of reading
    the file once more from the page cache, a fraction of what loading it costs)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as exc:  # BadZipFile, EOFError, OSError, ...: the archive does not open
        raise UserError(
            f"{where}: not a complete {kind}, the file is truncated or damaged "
            f"(its zip archive does not open: {first_line(exc)[:80]}); {way_out}"
        ) from None
    if bad is not None:
        raise UserError(
            f"{where}: damaged {kind}, its member {bad[:80]} fails the zip's CRC check (bytes "
            f"changed after it was written); {way_out}"
        )


def damaged_way_out(path: Path) -> str:
    """What to do about a damaged checkpoint: restore it, or what its run still has."""
    best = path.with_name("best.pt")
    if path.name == "last.pt" and best.is_file():
        return (
            f"restore it from a copy, or continue from the run's best weights in a new --out "
            f"(cifarlab train --out NEW --init-from {best})"
        )
    if path.name == "best.pt" and path.with_name("last.pt").is_file():
        return (
            f"restore it from a copy, or use the run's last weights ({path.with_name('last.pt')})"
        )
    return "restore it from a copy, or train it again"


# exported models (`cifarlab export`'s formats, and TorchScript's .ts): `predict.PREDICTORS` reads each
EXPORTED = (".onnx", ".pt2", ".safetensors", ".ts")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint dict (of a file, or of a run directory's as `resolve_checkpoint` picks it),
    its tensors on the CPU; files that would run code on load, and those whose entries do not
    fit `ENTRIES`, are refused."""
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise UserError(f"{path}: not a regular file; give a checkpoint or its run directory")
    if path.suffix.lower() in EXPORTED:  # not damaged: a model for predict, without a run's state
        raise UserError(
            f"{path}: an exported model ({path.suffix}), which is for `cifarlab predict`; "
            "give a run directory or its checkpoint (best.pt, last.pt) instead"
        )
    weights = path.with_suffix(".safetensors")
    if path.suffix.lower() == ".json" and weights.is_file():  # `export.sidecar`: its metadata
        raise UserError(
            f"{path}: the metadata of the safetensors export {weights.name}, not a model; give "
            f"`cifarlab predict` the {weights.name} beside it"
        )
    ckpt = read_tensors(path, str(path), "checkpoint", damaged_way_out(path))
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path}: not a cifarlab checkpoint (no model weights and config inside)")
    fix = "the file is damaged or was edited: re-train, or restore the file"
    check_entries(ckpt, f"checkpoint {path}", fix)
    bad = non_finite(ckpt["model"]) or non_finite(ckpt.get("ema") or {})
    if bad:  # scored, argmax of NaN is class 0: a plausible accuracy from broken weights
        raise UserError(
            f"{path}: non-finite weights ({bad}); the file is damaged or training diverged, "
            "use an earlier checkpoint"
        )
    return ckpt


def _is(*kinds: type) -> Callable[[Any], bool]:
    kinds = (*kinds, int) if float in kinds else kinds  # an int is a number
    return lambda v: isinstance(v, kinds)


def _listed(kind: type, size: int = 0) -> Callable[[Any], bool]:
    return lambda v: (
        isinstance(v, list | tuple)
        and len(v) == (size or len(v)) > 0
        and all(isinstance(x, kind) for x in v)
    )


def _positive(v: Any) -> bool:
    """A number > 0 (a temperature of 0 divides the logits by zero); not a bool."""
    return is_number(v) and math.isfinite(v) and v > 0


def _positive_rgb(v: Any) -> bool:
    """Three per-channel numbers > 0: pixels are divided by them."""
    return _listed(int | float, 3)(v) and all(_positive(x) for x in v)


_RGB = "3 numbers, one per colour channel"
_HINTS = get_type_hints(ModelArgs)
# what reading a checkpoint back takes: key -> (required, what it holds, whether a value fits);
# `a.b` is key b of mapping a where a is there (listed after a, so a is a mapping by then)
ENTRIES = {
    "model": (True, "a mapping", _is(dict)),
    "ema": (False, "a mapping or None", _is(dict, type(None))),
    "config": (True, "a mapping", _is(dict)),
    "config.model": (True, "a model name", _is(str)),
    "classes": (True, "a list of class names", _listed(str)),
    "mean": (True, _RGB, _listed(int | float, 3)),
    "std": (True, "3 positive numbers, one per colour channel", _positive_rgb),
    "temperature": (False, "a positive number", _positive),
    "temperature_ema": (False, "a positive number", _positive),
    "model_args": (False, "a mapping", _is(dict)),  # absent: from config (`inference.model_args`)
    "train_digests": (False, "a tensor of image digests", _is(torch.Tensor)),
    **{
        f"model_args.{f.name}": (f.default is MISSING, f"of type {f.type}", _is(_HINTS[f.name]))
        for f in fields(ModelArgs)
    },
}


def check_entries(found: dict, where: str, fix: str, entries: dict = ENTRIES) -> None:
    """Refuses, in one line naming the key, an entry of `entries` missing (where required) or
    of the wrong type in `found`: a checkpoint or an export's metadata, damaged or edited."""
    for key, (required, what, fits) in entries.items():
        parent, _, name = key.rpartition(".")
        holder = found.get(parent) if parent else found
        if not isinstance(holder, dict) or (name not in holder and not required):
            continue  # optional, or in an optional mapping that is absent
        if name not in holder or not fits(holder[name]):
            got = " ".join(repr(holder[name]).split())[:40] if name in holder else "missing"
            raise UserError(f"{where}: {key} is {got}, which should be {what}; {fix}")


def non_finite(state: dict) -> str | None:
    """The name of the first floating tensor of `state` holding NaN or inf, else None."""
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not v.isfinite().all():
            return k
    return None


def resolve_checkpoint(path_or_run: str | Path) -> Path:
    """A run directory means its `best.pt` (else `last.pt`); a file is taken as it is; `~` is
    expanded, as for every path a user gives."""
    path = expand(path_or_run)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise UserError(
            f"{path}: no best.pt or last.pt in this run directory; has it trained an epoch?"
        )
    if not path.exists():
        raise UserError(f"{path}: no such run directory or checkpoint")
    return path


class Checkpointer:
    """Owns a run's `last.pt` and `best.pt`: the best-so-far policy, atomic writes, and a
    finiteness check before every save, so no file named "the last good one" holds NaNs."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir, self.enabled, self.best = run_dir, enabled, float("-inf")
        self.last = run_dir / "last.pt"

    def save(self, state: dict, val_acc: float | None = None, end_of_epoch: bool = True) -> bool:
        """Write `last.pt`, and at an epoch's end `best.pt` when `val_acc` improved (or is None:
        no validation); returns whether `best.pt` was written."""
        if not self.enabled:
            return False
        bad = non_finite(state["model"])
        if bad:
            raise NonFiniteWeights(
                f"diverged: non-finite weights ({bad}) before saving; {self.last} still holds "
                "the last good state (lower --lr, or --set on_nan=skip)"
            )
        improved = end_of_epoch and (val_acc is None or val_acc > self.best)
        if improved and val_acc is not None:
            self.best = val_acc
        state["best_val_acc"] = self.best if self.best > float("-inf") else 0.0
        self._write(state, self.last)
        if improved:
            self._write(state, self.run_dir / "best.pt")
        return improved

    def _write(self, state: dict, path: Path) -> None:
        try:
            atomic_save(state, path)
        except OSError as exc:
            raise UserError(
                f"could not write {path} ({exc.strerror or exc}); the previous {path.name} is intact: "
                f"free space or fix permissions, then cifarlab train --out {self.run_dir} --resume"
            ) from None


class NonFiniteWeights(TrainingFailed):
    """Weights went NaN/inf: training cannot go on (exit 1); the files on disk stay good."""
