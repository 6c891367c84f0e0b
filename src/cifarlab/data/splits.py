"""Class filters, stratified subsets and the seeded validation split; normalisation statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePath

import numpy as np
import torch

from cifarlab.config import TrainConfig, data_root, quoting_hint, split_seed
from cifarlab.data.sources import ImageSet, SourceData, load_source
from cifarlab.errors import TooFewImages, UserError


@dataclass
class Splits:
    train: ImageSet
    val: ImageSet  # empty (0 images, same classes) with val_size=0: train on everything
    test: ImageSet | None
    classes: list[str]
    mean: list[float]  # per channel, in [0, 1], from the training split
    std: list[float]
    skipped: list[str] = field(default_factory=list)
    val_folder: str = ""  # the data's val folder (`Valid`) where val is it; val_size ignored


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


def select_classes(ds: ImageSet, wanted: list[str]) -> ImageSet:
    """The images of the `wanted` classes (the `classes` key), relabelled in that order."""
    repeated = sorted({c for c in wanted if wanted.count(c) > 1})
    if repeated:
        raise UserError(f"classes: {repeated} listed more than once; name each class once")
    if len(wanted) < 2:
        raise UserError(f"classes: {wanted} is fewer than two classes; a classifier needs two")
    unknown = [c for c in wanted if c not in ds.classes]
    if unknown:
        hint = quoting_hint(ds.classes)
        raise UserError(f"classes: unknown classes {unknown}; the data has {ds.classes}{hint}")
    index = np.asarray([wanted.index(c) if c in wanted else -1 for c in ds.classes], dtype=np.int64)
    out = ds.take(np.flatnonzero(index[ds.labels] >= 0))
    return ImageSet(out.images, index[out.labels], list(wanted), out.paths)


def onto_classes(ds: ImageSet, classes: list[str], where: str) -> ImageSet:
    """`ds` relabelled onto the indices of `classes` (a model's); any subset of them is fine, and
    so is a class of `ds` without images (a test/ set onto train/'s classes keeps them all)."""
    unknown = [ds.classes[i] for i in np.unique(ds.labels) if ds.classes[i] not in classes]
    if unknown:
        more = "..." if len(classes) > 5 else ""
        raise UserError(
            f"{where} was trained on {len(classes)} classes ({', '.join(classes[:5])}{more}), "
            f"but the data has {len(unknown)} it does not know ({', '.join(unknown[:5])}); "
            "evaluate on class folders named like the model's"
        )
    index = np.asarray([classes.index(c) if c in classes else -1 for c in ds.classes], np.int64)
    return ImageSet(ds.images, index[ds.labels], list(classes), ds.paths)


def classes_note(ds: ImageSet | None, name: str) -> str:
    """The data line's note (", test: 2 of 3 classes have images") where `ds`, not empty, has no
    image of some of its classes: they are scored as having none (no accuracy), not 0%."""
    if ds is None or not len(ds):
        return ""
    have = len(np.unique(ds.labels))
    verb = "has" if have == 1 else "have"
    return f", {name}: {have} of {len(ds.classes)} classes {verb} images" * (have < len(ds.classes))


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] from each channel's histogram: exact, with no float copy
    of the pixels (torch's bincount takes uint8 as it is; numpy's copies it to int64 first)."""
    counts = np.zeros((3, 256), dtype=np.int64)
    pixels = torch.from_numpy(np.ascontiguousarray(images).reshape(-1, 3))
    for part in pixels.split(1 << 22):  # each channel's copy stays small
        for c in range(3):
            counts[c] += torch.bincount(part[:, c].contiguous(), minlength=256).numpy()
    value = np.arange(256) / 255.0
    n = max(len(pixels), 1)
    mean = counts @ value / n
    std = np.sqrt(np.maximum(counts @ value**2 / n - mean**2, 1e-12))
    return mean.round(6).tolist(), std.round(6).tolist()


def load_splits(config: TrainConfig, source: SourceData | None = None) -> Splits:
    """Train, val and test of `config.data` (`source` where the caller loaded it already),
    filtered to `config.classes`, train cut to `subset`; val is the data's val/ folder if any
    (`val_size` ignored), else `val_size` held out of train."""
    source = source or load_source(
        config.data, data_root(config), config.image_size, config.on_bad_image
    )
    if source.train is None:
        raise UserError(
            f"--data {config.data}: no train/ folder beside test/ or val/; training and a held-out "
            "val split need <root>/train/<class>/ (evaluate --split test scores it as it is)"
        )
    if len(source.train.classes) < 2:  # it trained to "100%"
        raise UserError(
            f"--data {config.data}: only one class folder found: "
            f"{', '.join(source.train.classes) or 'none'}; need at least two to train"
        )
    train = source.train
    val, test = (
        _onto_train(config, train, s, n) for s, n in ((source.val, "val"), (source.test, "test"))
    )
    if config.classes:
        train, val, test = (
            None if ds is None else select_classes(ds, config.classes) for ds in (train, val, test)
        )
    seed = split_seed(config)
    if config.subset:
        if config.subset > len(train):
            raise TooFewImages(
                f"subset={config.subset} is larger than the {len(train)} training images",
                f"lower it to {len(train)} or less, or give 0 for all of them",
            )
        train = train.take(stratified_pick(train.labels, config.subset, seed))
    # its paths are relative to the folder holding the split folders: each begins with its name
    val_folder = PurePath(source.val.paths[0]).parts[0] if source.val is not None else ""
    if not val_folder:
        train, val = hold_out(train, config.val_size, seed + 1)
    mean, std = channel_stats(train.images)
    return Splits(train, val, test, train.classes, mean, std, source.skipped, val_folder)


def _onto_train(config: TrainConfig, train: ImageSet, ds: ImageSet | None, name: str):
    """A val/ or test/ folder holding train's classes or some of them (a small test set may have
    no image of one), relabelled onto train's class indices: train's class list is the model's.
    A class train lacks (of `config.classes`, when given) is refused: the model never predicts
    it; one the selection drops anyway is kept, after train's."""
    if ds is None:
        return None
    extra = [c for c in ds.classes if c not in train.classes]
    if shown := [c for c in extra if not config.classes or c in config.classes]:
        among = " among the selected classes" if config.classes else ""
        train_dir, its_dir = (PurePath(s.paths[0]).parts[0] + "/" for s in (train, ds))
        raise UserError(
            f"--data {config.data}: train and {name} classes differ{among} (only in {name}: "
            f"{shown}); a model trained on {train_dir} never predicts them: add those class "
            f"folders to {train_dir} or remove them from {its_dir}"
        )
    return onto_classes(ds, [*train.classes, *extra], "")


def default_split(config: TrainConfig, val_folder: bool | str) -> str:
    """What a run is scored on unless told: "val" where it had a validation split, held out or
    its data's val folder (`val_folder`, from the data already loaded), else "test"."""
    return "val" if config.val_size or val_folder else "test"


def check_sizes(config: TrainConfig, splits: Splits) -> None:
    """What training needs: a held-out image of each class (a temperature is fitted on them), a
    training image of each class (one never seen is never predicted) and a batch's worth."""
    classes, train = len(splits.classes), len(splits.train)
    if 0 < len(splits.val) < classes and not splits.val_folder:
        raise UserError(
            f"--val-size {config.val_size} holds out fewer images than the {classes} classes; "
            f"give --val-size {classes} or more (one image a class at the least), or 0 for none"
        )
    counts = np.bincount(splits.train.labels, minlength=classes)
    unseen = [c for c, n in zip(splits.classes, counts, strict=True) if not n]
    if unseen:
        if splits.val_folder:  # a val/ folder takes nothing out of train/: --subset did it
            why, fix = f"--subset {config.subset} keeps {train}", "raise --subset or drop it"
        else:
            cut = f"--subset {config.subset} keeps {config.subset}, " if config.subset else ""
            why = f"{cut}--val-size {config.val_size} holds out {len(splits.val)}, leaving {train}"
            fix = "lower --val-size" + (", or raise --subset or drop it" if config.subset else "")
        raise TooFewImages(
            f"the training split holds no image of {len(unseen)} of the {classes} classes "
            f"({', '.join(unseen[:5])}{' ...' * (len(unseen) > 5)}; {why})",
            fix,
        )
    if train < config.batch_size:
        raise TooFewImages(
            f"batch_size={config.batch_size} is larger than the {train} training images",
            f"give --batch-size {train} or less, or train on more images",
        )


def hold_out(train: ImageSet, n: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """(the rest, `n` stratified images held out of `train`); n=0 holds out an empty set. The
    rest is kept in `train`'s own arrays (`ImageSet.take_in_place`): `train` is used up."""
    if n >= len(train):
        raise TooFewImages(
            f"val_size={n} leaves no training images out of {len(train)}",
            "lower --val-size or use more data",
        )
    val_idx = stratified_pick(train.labels, n, seed)
    val = train.take(val_idx)
    return train.take_in_place(np.setdiff1d(np.arange(len(train)), val_idx)), val
