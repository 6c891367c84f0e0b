"""`cifarlab predict`: classify image files and folders with a trained checkpoint."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cifarlab.augment import Normalize
from cifarlab.checkpoint import load_checkpoint, resolve_checkpoint
from cifarlab.data.images import BadImage, decode_image, is_image_name
from cifarlab.data.loaders import to_device_uint8
from cifarlab.errors import UserError
from cifarlab.hardware import pick_device
from cifarlab.inference import model_from_checkpoint, predict_logits


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
    """A checkpoint ready to classify uint8 images."""

    def __init__(self, model_path: str, device: str = "auto"):
        ckpt = load_checkpoint(resolve_checkpoint(model_path))
        self.classes = list(ckpt["classes"])
        self.size = int(ckpt["config"].get("image_size", 32))
        self.device = pick_device(device)
        self.model = model_from_checkpoint(ckpt, self.device)
        self.normalize = Normalize(ckpt["mean"], ckpt["std"])

    def probabilities(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        logits = predict_logits(
            self.model, to_device_uint8(images, self.device), self.normalize, batch_size
        )
        return torch.softmax(logits, 1).cpu().numpy()


def run_predict(
    model: str, paths: list[str], top_k: int = 3, as_json: bool = False, batch_size: int = 256
) -> int:
    """Prints one line per image; returns 0, or 1 when some files could not be read."""
    if top_k < 1 or batch_size < 1:
        raise UserError("--top-k and --batch-size must be >= 1")
    predictor = Predictor(model)
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
