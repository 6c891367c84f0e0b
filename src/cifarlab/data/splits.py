"""Class filters, stratified subsets and the seeded validation split; normalisation statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cifarlab.config import TrainConfig, default_data_root
from cifarlab.data.sources import ImageSet, load_source
from cifarlab.errors import UserError


@dataclass
class Splits:
    train: ImageSet
    val: ImageSet
    test: ImageSet | None
    classes: list[str]
    mean: list[float]  # per channel, in [0, 1], from the training split
    std: list[float]
    skipped: list[str] = field(default_factory=list)


def stratified_pick(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of `n` items whose class shares match `labels`' (largest remainder)."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts / counts.sum() * n
    quota = np.floor(exact).astype(int)
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[: n - quota.sum()]] += 1
    picked = [
        rng.permutation(np.flatnonzero(labels == c))[:q]
        for c, q in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate(picked))


def select_classes(ds: ImageSet, wanted: list[str], where: str) -> ImageSet:
    repeated = sorted({c for c in wanted if wanted.count(c) > 1})
    if repeated:
        raise UserError(f"{where}: {repeated} listed more than once; name each class once")
    if len(wanted) < 2:
        raise UserError(f"{where}: {wanted} is fewer than two classes; a classifier needs two")
    unknown = [c for c in wanted if c not in ds.classes]
    if unknown:
        raise UserError(f"{where}: unknown classes {unknown}; the data has {ds.classes}")
    old = np.asarray([ds.classes.index(c) for c in wanted])
    keep = np.flatnonzero(np.isin(ds.labels, old))
    out = ds.take(keep)
    remap = np.full(len(ds.classes), -1, dtype=np.int64)
    remap[old] = np.arange(len(wanted))
    return ImageSet(out.images, remap[out.labels], list(wanted), out.paths)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    total = np.zeros(3)
    squares = np.zeros(3)
    for start in range(0, len(images), 4096):  # chunks keep float memory small
        chunk = images[start : start + 4096].reshape(-1, 3).astype(np.float64) / 255.0
        total += chunk.sum(0)
        squares += (chunk**2).sum(0)
    n = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean**2, 1e-12))
    return mean.round(6).tolist(), std.round(6).tolist()


def load_splits(config: TrainConfig) -> Splits:
    root = Path(config.data_root).expanduser() if config.data_root else default_data_root()
    source = load_source(config.data, root, config.image_size, config.on_bad_image)
    train, test = source.train, source.test
    if config.classes:
        train = select_classes(train, config.classes, "classes")
        test = test and select_classes(test, config.classes, "classes")
    if config.subset:
        if config.subset > len(train):
            raise UserError(
                f"subset={config.subset} is larger than the {len(train)} training images"
            )
        train = train.take(stratified_pick(train.labels, config.subset, config.seed))
    if config.val_size >= len(train):
        raise UserError(
            f"val_size={config.val_size} leaves no training images out of {len(train)}; "
            "lower --val-size or use more data"
        )
    val_idx = stratified_pick(train.labels, config.val_size, config.seed + 1)
    mask = np.ones(len(train), dtype=bool)
    mask[val_idx] = False
    val, train = train.take(val_idx), train.take(np.flatnonzero(mask))
    mean, std = channel_stats(train.images)
    return Splits(train, val, test, train.classes, mean, std, source.skipped)
