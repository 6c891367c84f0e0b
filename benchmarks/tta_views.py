"""Which test-time views pay: a checkpoint's validation accuracy under several view sets.

A benchmark, not a test. The views are the model's logits on the validation split for each of
the image, its mirror, and 1-pixel shifts (up-left, down-right) of both; the rows average them
with different weights, among them cifarlab's `flip-translate` and airbench94's level-2 TTA.

    python benchmarks/tta_views.py runs/fast/best.pt
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from cifarlab.checkpoint import load_checkpoint, resolve_checkpoint
from cifarlab.data.loaders import to_device_uint8
from cifarlab.eval_set import load_eval_set
from cifarlab.inference import load_model, predict_logits


def shifted(images: torch.Tensor, corner: int) -> torch.Tensor:
    """`images` moved one pixel toward the top-left (corner 0) or bottom-right (2), reflected in."""
    pad = F.pad(images.float(), (1, 1, 1, 1), mode="reflect").to(images.dtype)
    return pad[:, :, corner : corner + images.shape[2], corner : corner + images.shape[3]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    args = parser.parse_args()
    path = resolve_checkpoint(args.checkpoint)
    ckpt = load_checkpoint(path)
    data, *_ = load_eval_set(ckpt, str(path))
    loaded = load_model(ckpt, torch.device("cpu"))
    images = to_device_uint8(data.images, torch.device("cpu"))
    labels = torch.from_numpy(data.labels).long()
    views = {}
    for name, x in (
        ("x", images),
        ("up-left", shifted(images, 0)),
        ("down-right", shifted(images, 2)),
    ):
        views[name] = predict_logits(loaded.model, x, loaded.normalize, 1000)
        views[name + " mirrored"] = predict_logits(loaded.model, x.flip(3), loaded.normalize, 1000)
    rows = {
        "none (1 view)": {"x": 1},
        "flip (2 views)": {"x": 1, "x mirrored": 1},
        "cifarlab flip-translate (4 views)": {
            "x": 1,
            "x mirrored": 1,
            "up-left": 1,
            "down-right": 1,
        },
        "airbench94 level 2 (6 views)": {
            "x": 2,
            "x mirrored": 2,
            "up-left": 1,
            "up-left mirrored": 1,
            "down-right": 1,
            "down-right mirrored": 1,
        },
        "all 6 views equally": dict.fromkeys(views, 1),
    }
    print(f"{path}: {len(labels)} validation images\n")
    print("| views | accuracy |\n| --- | --- |")
    for name, weights in rows.items():
        logits = sum(w * views[v] for v, w in weights.items()) / sum(weights.values())
        print(f"| {name} | {(logits.argmax(1) == labels).float().mean().item():.2%} |")


if __name__ == "__main__":
    main()
