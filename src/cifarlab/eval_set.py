"""The images evaluate and calibrate score: another source whole, or the run's own split drawn
again from its config, refused when that data is gone or changed since the run trained."""

from __future__ import annotations

import numpy as np

from cifarlab.config import DATASETS, TrainConfig, apply_overrides, data_root, expand
from cifarlab.data import ImageSet, load_source, load_splits
from cifarlab.data.archive import is_archive
from cifarlab.data.splits import default_split, onto_classes
from cifarlab.errors import TooFewImages, UserError, data_changed
from cifarlab.training_run import data_fingerprint

# per command: how to get past its run's data being gone or changed; past a checkpoint naming none
WAYS_OUT = {
    "evaluate": (
        "restore the data, or pass --data with a held-out folder of <class>/ images",
        "pass --data",
    ),
    "calibrate": ("restore the data, then calibrate again", "re-train, or restore the file"),
}


def load_eval_set(
    ckpt: dict,
    where: str,
    *,
    split: str | None = "val",
    data: str | None = None,
    on_bad_image: str | None = None,
    command: str = "evaluate",
) -> tuple[ImageSet, str, str]:
    """The images to score, labelled with the checkpoint's class indices, their source and the
    split scored. Another source in `data` is scored whole (`_other_data`), never carved by the
    run's subset or val_size; the run's own data gives its held-out split for "val", its test/
    for "test", and for None the `default_split` of the data as loaded."""
    way_out, no_data = WAYS_OUT[command]
    if data is None and "data" not in ckpt["config"]:  # the default would fill in cifar10
        raise UserError(f"checkpoint {where} has no config.data; {no_data}")
    config = apply_overrides(TrainConfig(), ckpt["config"], where=where)
    own_data = data is None or same_source(data, config.data)
    if own_data and not _data_present(config.data):
        raise UserError(
            f"{where} was trained on {config.data}, which is no longer there; {way_out}"
        )
    for key, value in (("data", data), ("on_bad_image", on_bad_image)):
        if value:  # as the command line says; else as the run was trained
            config = apply_overrides(config, {key: value}, where="--" + key.replace("_", "-"))
    if not own_data:
        scored, split = _other_data(config, split, list(ckpt["classes"]), where)
        return scored, config.data, split
    # the run's own data, however spelt, gives its held-out split: whole, it holds training images
    source = load_source(*_source_args(config))  # read once: also says what None is
    default = default_split(config, source.val is not None)
    asked, split = split, split or default
    if split == "val":
        try:
            splits = load_splits(config, source)
        except TooFewImages as exc:  # enough for the run's own config when it trained
            raise data_changed(where, f"{config.data}: {exc.detail}", way_out) from None
        # a split held out of changed data mixes in images the run trained on (in-sample scores
        # and temperature); a checkpoint without a fingerprint passes
        theirs = ckpt.get("data_fingerprint")
        checked = not splits.val_folder and theirs is not None
        if checked and theirs != data_fingerprint(splits):
            raise data_changed(
                where,
                f"{config.data}: images, labels or classes differ",
                f"its validation split would include training images; {way_out}",
            )
        scored = splits.val
    else:
        scored = source.test
    if scored is None:  # no test split: the default only where the run held out no val split
        val = ", or use --split val" if default == "val" else ""
        why = f"--split test: {config.data}" if asked else (
            f"{where}: the run held out no validation images (val_size 0) and {config.data}"
        )  # fmt: skip
        own = ""
        if data:  # named on the command line: whole, it holds the images the run trained on
            own = f" (--data {data} is the data it trained on: only its held-out part is scored)"
        raise UserError(
            f"{why} has no test split{own}; pass --data with another folder: "
            f"a <root>/test/<class>/ or plain <root>/<class>/ folder{val}"
        )
    if config.classes:  # the run's own data: the classes it was trained on, images of any
        trained = [i for i, c in enumerate(scored.classes) if c in config.classes]
        scored = scored.take(np.flatnonzero(np.isin(scored.labels, trained)))
    return onto_classes(scored, list(ckpt["classes"]), where), config.data, split


def _other_data(
    config: TrainConfig, split: str | None, classes: list[str], where: str
) -> tuple[ImageSet, str]:
    """All of another source's labelled images and the split that names them: a plain
    `<class>/` folder whole ("all"); else the --split asked for, or without one its test/,
    else all its images ("all"). Classes are checked against the model's (`onto_classes`)."""
    src = load_source(*_source_args(config))
    if not src.plain and split:
        scored = src.test if split == "test" else src.val
        if scored is None:
            raise UserError(
                f"--split {split}: {config.data} has no {split} split ({split}/ folder); leave "
                "out --split to score it whole (its test/, else all its images)"
            )
        return onto_classes(scored, classes, where), split
    if not src.plain and src.test is not None:
        return onto_classes(src.test, classes, where), "test"
    parts = [onto_classes(s, classes, where) for s in src.splits().values()]  # test/ is none
    return ImageSet(
        np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
        classes, [path for p in parts for path in p.paths],
    ), "all"  # fmt: skip


def same_source(a: str, b: str) -> bool:
    """`--data` spellings of one source: cifar10, or one folder however its path is written."""
    return a == b or expand(a).resolve() == expand(b).resolve()


def _data_present(src: str) -> bool:
    """A dataset name (downloaded when missing), a folder, or an archive file."""
    path = expand(src)
    return src in DATASETS or path.is_dir() or is_archive(path)


def _source_args(config: TrainConfig) -> tuple:
    return config.data, data_root(config), config.image_size, config.on_bad_image
