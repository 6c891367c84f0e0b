"""The Python API: a recipe with overrides, training, evaluation, and a trained model that
classifies anything image-like. Re-exported by `cifarlab` (see docs/guide.md, "Python API"):

    import cifarlab
    config = cifarlab.recipe("fast-cpu", epochs=2, data="cifar10")
    result = cifarlab.train_model(config, "runs/fast")
    report = cifarlab.evaluate_model(result)          # the report as a dict
    model = cifarlab.load_model(result)
    model.predict(["cat.png", pil_image, tensor])     # top-1 class names
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cifarlab.config import (
    TrainConfig,
    apply_overrides,
    expand,
    load_recipe,
    validate_config,
    with_length,
)
from cifarlab.data.images import BadImage, decode_image, image_array
from cifarlab.errors import Interrupted, UserError
from cifarlab.evaluate import EvalOptions, evaluate
from cifarlab.predict import load_predictor
from cifarlab.rundir import RunDirTaken
from cifarlab.train import Result, train

__all__ = [
    "Classifier", "Result", "TrainConfig", "evaluate_model", "load_model", "recipe", "train_model",
]  # fmt: skip


def recipe(
    name: str = "seed-cnn", *, epochs: int | None = None, budget: float | None = None, **overrides
) -> TrainConfig:
    """A shipped recipe (or a .yaml path) as a checked `TrainConfig`: `epochs` (or `budget`, a
    fraction of the recipe's epochs) shortens it keeping the schedule's shape, then `overrides`
    set any config key, e.g. `recipe("fast-cpu", epochs=2, data="data.tar.gz", subset=2000)`."""
    where = f"recipe({name!r})"
    config = with_length(load_recipe(name), epochs, budget, where)
    return validate_config(apply_overrides(config, overrides, where=where), where=where)


def train_model(
    config: TrainConfig | str | dict[str, Any], out: str | Path, *, resume: bool = False, log=print
) -> Result:
    """Train `config` (a recipe name, or a dict of `recipe`'s arguments) into the run directory
    `out`; the `Result` holds the accuracies, `history` (one dict per epoch, as metrics.csv),
    `run_dir` and `checkpoint`. With `resume`, an interrupted run in `out` continues (a finished
    one is returned as is)."""
    if isinstance(config, str):
        config = recipe(config)
    elif isinstance(config, dict):  # {"name": "fast-cpu", "epochs": 2, "model": "cnn"}
        config = recipe(**{str(k): v for k, v in config.items()})  # {1: 2}: an unknown key
    elif not isinstance(config, TrainConfig):
        raise UserError(
            f"train_model: config of type {type(config).__name__}; give a TrainConfig "
            "(cifarlab.recipe(...)), a recipe name or a dict of recipe()'s arguments"
        )
    if str(out) == "":  # as the command line's empty --out: never the working folder unasked
        raise UserError("train_model: out is empty; give the run directory, e.g. 'runs/fast2'")
    try:
        return train(config, Path(out), resume=resume, log=log or (lambda s: None))
    except RunDirTaken as exc:
        raise UserError(exc.worded(resume="pass resume=True", out="out")) from None
    except Interrupted as exc:  # train's hint is the command line's
        said, cli, _ = str(exc).partition(" Resume with:")
        hint = " Resume with: train_model(config, out, resume=True)" if cli else ""
        raise Interrupted(said + hint, exc.exit_code) from None


def _source(run: str | Path | Result) -> str:
    return str(run.run_dir if isinstance(run, Result) else run)


def evaluate_model(
    run: str | Path | Result, *, split: str | None = None, data: str | None = None,
    tta: str = "none", out: str | Path | None = None, device: str = "auto", log=print,
) -> dict[str, Any]:  # fmt: skip
    """Score a run (its `best.pt`) or checkpoint on `split` of its own data, or on all of `data`;
    `split` None: as `cifarlab evaluate`, val where the run had a validation split, else test.
    Writes the report (`<run>/eval-<split>/report.html`) and returns it as a dict: accuracy,
    per_class, confusion_matrix, calibration, most_confused, ..."""
    opts = EvalOptions(
        _source(run), split=split, data=data, tta=tta,
        out=Path(out) if out is not None else None, device=device,
    )  # fmt: skip
    return evaluate(opts, log=log or (lambda s: None))


def load_model(source: str | Path | Result, *, batch_size: int = 256) -> Classifier:
    """A run directory, checkpoint (.pt) or exported model (.onnx, .ts) ready to classify."""
    return Classifier(load_predictor(_source(source)), batch_size)


ImageLike = str | Path | bytes | Image.Image | np.ndarray | torch.Tensor
_RANGES = "give floats in 0..1 or uint8 in 0..255"


class Classifier:
    """A trained model that classifies images of any size, one or a sequence or batch: paths,
    bytes, PIL images, arrays (HWC/NHWC) or tensors (CHW/NCHW), uint8 0..255 or float 0..1, grey,
    RGB or RGBA, each resized to the model's input as training files were (`decode_image`)."""

    def __init__(self, predictor, batch_size: int = 256):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"load_model: batch_size={batch_size!r}; give a whole number >= 1")
        self.predictor, self.batch_size = predictor, batch_size
        self.classes: list[str] = list(predictor.classes)
        self.image_size: int = predictor.size

    def probabilities(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """(N, classes) float32, each row summing to 1, in the order of `self.classes`."""
        batch = isinstance(images, np.ndarray | torch.Tensor) and images.ndim == 4  # N images
        many = batch or isinstance(images, list | tuple)
        arrays = [self._array(x) for x in (images if many else [images])]
        if not arrays:
            return np.zeros((0, len(self.classes)), np.float32)
        return self.predictor.probabilities(np.stack(arrays), self.batch_size).astype(np.float32)

    def top_k(self, images, k: int = 3) -> list[list[tuple[str, float]]]:
        """Per image, the `k` likeliest (class, probability) pairs, likeliest first."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UserError(f"top_k: k={k!r}; give a whole number >= 1")
        probs = self.probabilities(images)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self.classes[j], float(p[j])) for j in row] for p, row in zip(probs, order, strict=True)]  # fmt: skip

    def predict(self, images) -> list[str]:
        """Per image, the likeliest class name."""
        return [self.classes[i] for i in self.probabilities(images).argmax(1)]

    def _array(self, image: ImageLike) -> np.ndarray:
        size = self.image_size
        if isinstance(image, str | Path) and expand(image).is_dir():  # one class per image given
            raise UserError(
                f"{image}: a folder; give its image files (`cifarlab predict` takes folders)"
            )
        if isinstance(image, str | Path | bytes):
            try:
                return decode_image(image if isinstance(image, bytes) else expand(image), size)
            except BadImage as exc:
                raise UserError(str(exc)) from None
        if isinstance(image, Image.Image) and image.mode != "F":  # F: floats, read as arrays
            return image_array(image, size)
        return image_array(Image.fromarray(_uint8_hwc(image)), size)


def _uint8_hwc(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """An array (HWC) or tensor (CHW) image as uint8 HWC (HW for grey), for PIL."""
    if isinstance(image, Image.Image):
        image = np.asarray(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.is_floating_point():  # numpy has no bf16
            image = image.float()
        image = (image.permute(1, 2, 0) if image.ndim == 3 else image).numpy()
    if not isinstance(image, np.ndarray):
        raise UserError(
            f"cannot classify a {type(image).__name__}; give paths, PIL images, arrays or tensors"
        )
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise UserError(
            f"image of shape {image.shape}: expected HxW, HxWx3 or HxWx4 (arrays) or 3xHxW (tensors)"
        )
    if image.size == 0:
        raise UserError(f"empty image of shape {image.shape}: give an image at least 1x1 pixel")
    if image.dtype == np.uint8:
        return image
    if image.dtype.kind not in "uif" or not np.isfinite(image).all():
        what = f"dtype {image.dtype}" if image.dtype.kind not in "uif" else "NaN or infinite values"
        raise UserError(f"image with {what}: {_RANGES}")
    floats, lo, hi = image.dtype.kind == "f", float(image.min()), float(image.max())
    if lo < 0 or hi > (1 if floats else 255):
        kind = "float" if floats else "integer"
        raise UserError(f"{kind} image with values {lo:g}..{hi:g}: {_RANGES}")
    return np.round(image * (255 if floats else 1)).astype(np.uint8)
