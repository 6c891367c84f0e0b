"""Expected calibration error on validation images the temperature never saw.

A benchmark, not a test: the run's validation split is cut in two by a seeded permutation; the
temperature is fitted on one half and the ECE and accuracy are measured on the other, before and
after. It answers issue 15's "ECE at most half on data not used to fit, accuracy unchanged".

    python benchmarks/calibration_heldout.py runs/fast-cpu/best.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from cifarlab import metrics
from cifarlab.calibration import fit_temperature
from cifarlab.checkpoint import load_checkpoint
from cifarlab.config import TrainConfig, apply_overrides
from cifarlab.data import load_splits
from cifarlab.data.loaders import to_device_uint8
from cifarlab.inference import load_model, predict_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    config = apply_overrides(TrainConfig(), ckpt["config"], where=str(args.checkpoint))
    val = load_splits(config).val
    loaded = load_model(ckpt)
    images = to_device_uint8(val.images, torch.device("cpu"))
    logits = predict_logits(loaded.model, images, loaded.normalize).clone()
    labels = torch.from_numpy(val.labels)
    order = np.random.default_rng(0).permutation(len(labels))
    fit, held = order[: len(order) // 2], order[len(order) // 2 :]
    temperature = fit_temperature(logits[fit], labels[fit])
    for name, t in (("before", 1.0), ("after", temperature)):
        probs = torch.softmax(logits[held] / t, 1).numpy()
        acc = (probs.argmax(1) == val.labels[held]).mean()
        ece = metrics.calibration(probs, val.labels[held])["ece"]
        print(
            f"{name}: temperature {t:.3f}, accuracy {acc:.4f}, ECE {ece:.4f} on {len(held)} images"
        )


if __name__ == "__main__":
    main()
