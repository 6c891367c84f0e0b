"""`cifarlab predict`: classify image files and folders with a trained checkpoint."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from cifarlab.augment import Normalize
from cifarlab.checkpoint import ENTRIES, EXPORTED, check_entries, load_checkpoint
from cifarlab.config import expand, quoted_name
from cifarlab.data.images import (
    NOT_AN_IMAGE_NAME,
    BadImage,
    decode_image,
    is_image_name,
    visible_entries,
)
from cifarlab.data.loaders import to_device_uint8
from cifarlab.data.sources import printable
from cifarlab.errors import UserError, first_line, import_extra, one_line
from cifarlab.hardware import pick_device
from cifarlab.inference import LoadedModel, load_model
from cifarlab.rundir import json_text


def image_files(paths: list[str]) -> tuple[list[Path], list[Path]]:
    """Files as given and the image files of folders, in a stable order; then the files of those
    folders left out for their suffix, as training leaves them out (`is_image_name`)."""
    files, skipped = [], []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise UserError(f"{raw}: no such file or folder")
        if not path.is_dir():
            files.append(path)
            continue
        for p in visible_entries(path):
            if not p.is_dir():  # a dangling link or a pipe among them is reported when read
                (files if is_image_name(p) else skipped).append(p)
    return files, skipped


def _say_skipped(skipped: list[Path], shown: int = 5) -> None:
    """One line on stderr: how many files of the folders were left out, and the first few."""
    if skipped:
        names = ", ".join(_one_line(p) for p in skipped[:shown])
        more = f" and {len(skipped) - shown} more" if len(skipped) > shown else ""
        print(f"skipped {len(skipped)} file(s) {NOT_AN_IMAGE_NAME}: {names}{more}", file=sys.stderr)


class Predictor:
    """A trained checkpoint ready to classify uint8 images; probabilities use its temperature."""

    def __init__(self, model_path: str, device: str = "auto"):
        self.device = pick_device(device, "device='cpu'")
        self.loaded = load_model(load_checkpoint(model_path), self.device)
        self.classes, self.size = self.loaded.classes, self.loaded.args.image_size
        self.temperature = self.loaded.temperature

    def probabilities(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        logits = self.loaded.logits(to_device_uint8(images, self.device), batch_size)
        return torch.softmax(logits / self.temperature, 1).cpu().numpy()


# what an export's metadata may hold, as a checkpoint holds it; which top-level keys an export
# must have depends on its format (`_read_meta`'s `required`), so none is required here
_AS_IN_CHECKPOINTS = ("classes", "mean", "std", "temperature", "model_args")
EXPORT_META = {
    **{
        key: (required and "." in key, what, fits)
        for key, (required, what, fits) in ENTRIES.items()
        if key.split(".")[0] in _AS_IN_CHECKPOINTS
    },
    "image_size": (False, "8 to 1024 pixels", lambda v: type(v) is int and 8 <= v <= 1024),
}


def _read_meta(predictor, meta: str | bytes | dict, where: str, required=("classes",)) -> dict:
    """An export's metadata (JSON text, or ONNX's map of JSON strings) into the predictor's
    classes, image size and temperature (absent: 1.0); a damaged one is refused in one line."""
    if isinstance(meta, str | bytes):
        try:
            meta = json.loads(meta)
        except ValueError as exc:
            raise UserError(
                f"{where}: its metadata is not valid JSON ({exc}); export the model again"
            ) from None
    if not isinstance(meta, dict):
        raise UserError(f"{where}: its metadata is not a JSON object; export the model again")
    meta = {k: _json_value(v) for k, v in meta.items()}
    missing = [k for k in required if k not in meta]
    if missing:
        raise UserError(
            f"{where}: no {', '.join(missing)} in its metadata; export it with cifarlab export"
        )
    check_entries(meta, where, "export the model again", EXPORT_META)
    predictor.classes = list(meta["classes"])
    predictor.size = int(meta.get("image_size", 32))
    predictor.temperature = float(meta.get("temperature", 1.0))
    return meta


def _json_value(value):
    with contextlib.suppress(TypeError, ValueError):  # a plain string, or not a string at all
        return json.loads(value)
    return value


class _ExportedPredictor:
    """The exported formats, normalisation inside: batches of [0, 1] floats in. `_load` gives
    the model as a function of a float32 NCHW array, and the metadata it carries."""

    kind, advice = "", ""

    def __init__(self, path: str):
        self.path = path
        try:
            self.run, meta = self._load(path)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(
                f"{path}: not a loadable {self.kind} ({first_line(exc)}){self.advice}"
            ) from None
        _read_meta(self, meta, path)

    @staticmethod
    def _torch_run(module: torch.nn.Module):
        return torch.inference_mode()(lambda batch: module(torch.from_numpy(batch)).numpy())

    def probabilities(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        floats = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        outs = [self.run(floats[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        logits = torch.from_numpy(np.concatenate(outs))
        _check_class_count(logits.shape[1], self.classes, self.path)
        return torch.softmax(logits / self.temperature, 1).numpy()


def _check_class_count(scored: int, classes: list[str], where) -> None:
    """An export's class names, one per output of its model (its metadata edited by hand)."""
    if scored != len(classes):
        raise UserError(
            f"{where}: the model scores {scored} classes but its metadata names {len(classes)}; "
            "export the model again"
        )


def _one_line(path: Path) -> str:
    """A file name as one line of text: undecodable bytes and control characters escaped."""
    return one_line(printable(str(path)))


class OnnxPredictor(_ExportedPredictor):
    """An exported `.onnx` file run by onnxruntime; its metadata is a map of JSON strings."""

    kind = "ONNX model"

    @staticmethod
    def _load(path: str) -> tuple:
        ort = import_extra("onnxruntime", "onnx", "predicting with .onnx")
        runner = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        run = lambda batch: runner.run(None, {"images": batch})[0]  # noqa: E731
        return run, runner.get_modelmeta().custom_metadata_map


class Pt2Predictor(_ExportedPredictor):
    """An exported `torch.export` program (`.pt2`)."""

    kind, advice = "torch.export program", "; export it again with cifarlab export --format pt2"

    @classmethod
    def _load(cls, path: str) -> tuple:
        # torch logs a damaged archive's traceback before raising; our one line says it
        logger, extra = logging.getLogger("torch.export"), {"cifarlab.json": ""}
        level = logger.level
        logger.setLevel(logging.CRITICAL)
        try:
            module = torch.export.load(path, extra_files=extra).module()
        finally:
            logger.setLevel(level)
        return cls._torch_run(module), extra["cifarlab.json"] or "{}"


class SafetensorsPredictor(Predictor):
    """Weights-only `model.safetensors` + its `model.json`, rebuilt by cifarlab's constructor."""

    def __init__(self, path: str, device: str = "auto"):
        from cifarlab.export import sidecar, torchvision_core
        from cifarlab.models import ModelArgs, build_model

        st = import_extra("safetensors.torch", "safetensors", "predicting with .safetensors")
        meta_path = sidecar(Path(path))
        if not meta_path.is_file():
            raise UserError(
                f"{path}: no {meta_path.name} beside it (classes, model, normalisation); "
                "export both with cifarlab export --format safetensors"
            )
        required = ("classes", "model_args", "mean", "std")
        meta = _read_meta(self, meta_path.read_text(errors="replace"), str(meta_path), required)
        args = ModelArgs.from_dict(meta["model_args"])
        _check_class_count(args.num_classes, self.classes, meta_path)
        model = build_model(args)
        try:
            torchvision_core(model).load_state_dict(st.load_file(path))
        except Exception as exc:
            raise UserError(
                f"{path}: its weights do not fit the {meta['model']} that {meta_path.name} "
                f"describes ({first_line(exc)[:200]})"
            ) from None
        self.device = pick_device(device, "device='cpu'")
        # an export keeps no precision (hardware None): the device's rule
        normalize = Normalize(meta["mean"], meta["std"])
        self.loaded = LoadedModel(model.to(self.device).eval(), normalize, self.classes, args)


class TorchScriptPredictor(_ExportedPredictor):
    """A TorchScript file (`.ts`): read, no longer written (`export.DROPPED`)."""

    kind = "TorchScript file"

    @classmethod
    def _load(cls, path: str) -> tuple:
        extra = {"cifarlab.json": ""}
        module = torch.jit.load(path, map_location="cpu", _extra_files=extra).eval()
        return cls._torch_run(module), extra["cifarlab.json"] or "{}"


# file suffix -> reader: one per suffix that load_checkpoint refuses (`EXPORTED`, in its order);
# anything else is a run directory or checkpoint
_READERS = (OnnxPredictor, Pt2Predictor, SafetensorsPredictor, TorchScriptPredictor)
PREDICTORS = dict(zip(EXPORTED, _READERS, strict=True))


def load_predictor(model: str | Path):
    path = expand(model)
    if not path.exists():
        raise UserError(f"{model}: no such run directory, checkpoint or exported model")
    return PREDICTORS.get(path.suffix.lower(), Predictor)(str(path))


def run_predict(
    model: str, paths: list[str], top_k: int = 3, as_json: bool = False, batch_size: int = 256
) -> int:
    """Prints one line per image; returns 0, or 1 when some files could not be read."""
    for flag, value in (("--top-k", top_k), ("--batch-size", batch_size)):
        if value < 1:
            raise UserError(f"{flag} {value}: give a whole number >= 1")
    predictor = load_predictor(model)
    k = min(top_k, len(predictor.classes))
    files, skipped = image_files(paths)
    _say_skipped(skipped)
    if not files:
        raise UserError(f"no image files found in {' '.join(paths)}")
    failed = 0
    width = min(max(len(_one_line(f)) for f in files), 60)
    for start in range(0, len(files), batch_size):
        chunk, images = [], []
        for f in files[start : start + batch_size]:
            try:
                images.append(decode_image(f, predictor.size))
                chunk.append(f)
            except BadImage as exc:
                failed += 1
                print(f"error: {one_line(str(exc))}", file=sys.stderr)
        if not chunk:
            continue
        probs = predictor.probabilities(np.stack(images), batch_size)
        for f, p in zip(chunk, probs, strict=True):
            top = [(predictor.classes[i], float(p[i])) for i in np.argsort(-p, kind="stable")[:k]]
            if as_json:  # the path made printable: strict JSON has no lone surrogates
                ranked = [{"class": c, "prob": round(q, 6)} for c, q in top]
                print(json_text({"path": printable(str(f)), "top_k": ranked}, indent=None))
            else:
                print(
                    f"{_one_line(f):<{width}}  "
                    + "  ".join(f"{quoted_name(_one_line(c))} {q:.1%}" for c, q in top)
                )
    return 1 if failed else 0
