"""Quickstart: the Python API end to end — train a small model, evaluate it, classify images.

    python examples/quickstart.py --data cifar10 --out runs/quickstart
    CIFARLAB_EXAMPLE_DATA=cifar10-train-jpg.tar.gz python examples/quickstart.py --subset 5000

At the defaults (fast-cpu, 4 epochs) on all of CIFAR-10 it takes about 14 minutes on 2 CPU
cores (docs: 86.6%); its test runs it for one epoch at width 0.25 (the steps, not the accuracy).

`--data` (or $CIFARLAB_EXAMPLE_DATA) is anything `cifarlab train --data` takes: cifar10, a
folder of <class>/ image folders, or an archive of one. `--val-size 0` (the lesson's protocol)
trains on every training image and scores the data's test split instead (cifar10, or a folder
with test/ beside train/). The last line printed is a JSON summary (the test that runs this
script in CI reads it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tarfile
import zipfile
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

import cifarlab


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("CIFARLAB_EXAMPLE_DATA", "cifar10"))
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    p.add_argument("--recipe", default="fast-cpu")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--subset", type=int, default=0, help="train on N images (0 = all)")
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, e.g. --set width=0.5 (repeatable)")  # fmt: skip
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    # 1. A recipe, shortened to a few epochs (its warm-up scaled to match), with overrides.
    config = cifarlab.recipe(
        args.recipe, epochs=args.epochs, data=args.data, subset=args.subset,
        val_size=args.val_size, progress=False, **dict(kv.split("=", 1) for kv in args.set),
    )  # fmt: skip
    # 2. Train: the run directory gets best.pt, last.pt, metrics.csv, config.yaml, result.json.
    result = cifarlab.train_model(config, args.out, resume=True)
    scored = "test" if result.best_val_acc is None else "val"  # --val-size 0: the lesson's
    for row in result.history:
        acc = row.get(f"{scored}_acc", float("nan"))
        print(f"epoch {row['epoch']}: train loss {row['train_loss']:.3f}, {scored} acc {acc:.1%}")
    # 3. Evaluate: the report (also written as <run>/eval-<split>/report.html) as a dict; the
    # split is val where the run held one out, else the data's test split.
    report = cifarlab.evaluate_model(result)
    hardest = min(report["per_class"], key=lambda c: report["per_class"][c]["accuracy"])
    print(f"{report['split']} accuracy {report['accuracy']:.1%}; hardest class: {hardest}")
    # 4. Classify: paths, bytes, PIL images, arrays and tensors of any size, resized as the
    # training images were; probabilities come in the order of model.classes.
    model = cifarlab.load_model(result)
    names, images = sample_images(args.data, 3)
    for name, top in zip(names, model.top_k(images, k=3), strict=True):
        print(f"{name}: " + ", ".join(f"{c} {p:.0%}" for c, p in top))
    if images:
        big = Image.open(io.BytesIO(images[0])).convert("RGB").resize((128, 128))
        print(f"{names[0]} at 128x128 (PIL): {model.predict(big)[0]}")
        print(f"as a float array in 0..1: {model.predict(np.asarray(big) / 255.0)[0]}")
    summary = {"split": report["split"], "accuracy": report["accuracy"]}
    summary.update(best_val_acc=result.best_val_acc, test_acc=result.test_acc)
    summary.update(classes=len(model.classes), classified=len(images))
    print(json.dumps(summary))
    return summary


def sample_images(data: str, n: int) -> tuple[list[str], list[bytes]]:
    """Names and bytes of the first image in each of the first `n` class folders of `data`, a
    folder or a .tar/.tar.gz/.zip of one (none for the built-in datasets, which are arrays)."""
    path = Path(data)
    chosen: dict[str, tuple[str, bytes]] = {}
    with contextlib.ExitStack() as stack:
        if path.is_dir():
            members = [(str(f), f.read_bytes) for f in sorted(path.rglob("*")) if _image(f.name)]
        elif zipfile.is_zipfile(path):
            archive = stack.enter_context(zipfile.ZipFile(path))
            members = [(m, partial(archive.read, m)) for m in archive.namelist() if _image(m)]
        elif path.is_file() and tarfile.is_tarfile(path):
            tar = stack.enter_context(tarfile.open(path))  # streamed: stops once n are found
            members = ((m.name, partial(_read, tar, m)) for m in tar if _image(m.name))
        else:
            members = []
        for name, read in members:
            folder = PurePosixPath(name.replace("\\", "/")).parent.name
            if folder not in chosen:
                chosen[folder] = (name, read())
            if len(chosen) == n:
                break
    return [name for name, _ in chosen.values()], [b for _, b in chosen.values()]


def _image(name: str) -> bool:
    return name.lower().endswith((".png", ".jpg", ".jpeg"))


def _read(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    return archive.extractfile(member).read()


if __name__ == "__main__":
    main()
