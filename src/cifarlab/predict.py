"""`cifarlab predict`: classify image files and folders with a trained checkpoint."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cifarlab.checkpoint import load_checkpoint, resolve_checkpoint
from cifarlab.data.images import BadImage, decode_image, is_image_name
from cifarlab.data.loaders import to_device_uint8
from cifarlab.errors import UserError
from cifarlab.hardware import pick_device
from cifarlab.inference import load_model, predict_logits


def image_files(paths: list[str]) -> Iterator[Path]:
    """Files as given, folders walked for image files, in a stable order."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p))
        elif path.exists():
            yield path
        else:
            raise UserError(f"{raw}: no such file or folder")


class Predictor:
    """A trained checkpoint ready to classify uint8 images."""

    def __init__(self, model_path: str, device: str = "auto"):
        self.device = pick_device(device)
        loaded = load_model(load_checkpoint(resolve_checkpoint(model_path)), self.device)
        self.classes, self.size = loaded.classes, loaded.image_size
        self.model, self.normalize = loaded.model, loaded.normalize

    def probabilities(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        logits = predict_logits(
            self.model, to_device_uint8(images, self.device), self.normalize, batch_size
        )
        return torch.softmax(logits, 1).cpu().numpy()


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def _as_float(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0


class OnnxPredictor:
    """An exported `.onnx` file run by onnxruntime (normalisation is inside the graph)."""

    def __init__(self, path: str):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(
                "predicting with .onnx needs the extra: pip install 'cifarlab[onnx]'"
            ) from None
        try:
            self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise UserError(
                f"{path}: not a loadable ONNX model ({str(exc).splitlines()[0]})"
            ) from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "classes" not in meta:
            raise UserError(
                f"{path}: no class names in its metadata; export it with cifarlab export"
            )
        self.classes = json.loads(meta["classes"])
        self.size = int(meta.get("image_size", 32))

    def probabilities(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        outs = [
            self.session.run(None, {"images": _as_float(images[i : i + batch_size])})[0]
            for i in range(0, len(images), batch_size)
        ]
        return _softmax(np.concatenate(outs))


class TorchScriptPredictor:
    """An exported TorchScript file (`.ts`)."""

    def __init__(self, path: str):
        extra = {"cifarlab.json": ""}
        try:
            self.model = torch.jit.load(path, map_location="cpu", _extra_files=extra).eval()
        except Exception as exc:
            raise UserError(
                f"{path}: not a loadable TorchScript file ({str(exc).splitlines()[0]})"
            ) from None
        if not extra["cifarlab.json"]:
            raise UserError(f"{path}: no class names inside; export it with cifarlab export")
        meta = json.loads(extra["cifarlab.json"])
        self.classes = json.loads(meta["classes"])
        self.size = int(meta["image_size"])

    @torch.inference_mode()
    def probabilities(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        outs = [
            self.model(torch.from_numpy(_as_float(images[i : i + batch_size])))
            for i in range(0, len(images), batch_size)
        ]
        return torch.softmax(torch.cat(outs), 1).numpy()


def load_predictor(model: str):
    """By file type: `.onnx` (onnxruntime), `.ts` (TorchScript), else a run directory or checkpoint."""
    suffix = Path(model).suffix.lower()
    if suffix == ".onnx":
        return OnnxPredictor(model)
    if suffix == ".ts":
        return TorchScriptPredictor(model)
    return Predictor(model)


def run_predict(
    model: str, paths: list[str], top_k: int = 3, as_json: bool = False, batch_size: int = 256
) -> int:
    """Prints one line per image; returns 0, or 1 when some files could not be read."""
    if top_k < 1 or batch_size < 1:
        raise UserError("--top-k and --batch-size must be >= 1")
    if not Path(model).exists():
        raise UserError(f"{model}: no such run directory, checkpoint or exported model")
    predictor = load_predictor(model)
    k = min(top_k, len(predictor.classes))
    files = list(image_files(paths))
    if not files:
        raise UserError(f"no image files found in {' '.join(paths)}")
    failed = 0
    width = min(max(len(str(f)) for f in files), 60)
    for start in range(0, len(files), batch_size):
        chunk, images = [], []
        for f in files[start : start + batch_size]:
            try:
                images.append(decode_image(f, predictor.size))
                chunk.append(f)
            except BadImage as exc:
                failed += 1
                print(f"error: {exc}", file=sys.stderr)
        if not chunk:
            continue
        probs = predictor.probabilities(np.stack(images), batch_size)
        for f, p in zip(chunk, probs, strict=True):
            top = np.argsort(-p, kind="stable")[:k]
            if as_json:
                entry = {
                    "path": str(f),
                    "top_k": [
                        {"class": predictor.classes[i], "prob": round(float(p[i]), 6)} for i in top
                    ],
                }
                print(json.dumps(entry))
            else:
                print(
                    f"{f!s:<{width}}  "
                    + "  ".join(f"{predictor.classes[i]} {p[i]:.1%}" for i in top)
                )
    return 1 if failed else 0
