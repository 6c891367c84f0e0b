"""The data types every data module shares (own module: sources and cache import it, no cycle)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ImageSet:
    """Images as (N, H, W, 3) uint8 with int64 labels indexing `classes`."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    paths: list[str] = field(default_factory=list)  # source file of each image, where known

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> ImageSet:
        paths = [self.paths[i] for i in index] if self.paths else []
        return ImageSet(self.images[index], self.labels[index], self.classes, paths)

    def take_in_place(self, index: np.ndarray) -> ImageSet:
        """`take(index)` for ascending `index`, moving the images to the front of this set's own
        array (a new array of them all costs as long again as reading the cache); used up after."""
        images = self.images
        if not images.flags.writeable:
            return self.take(index)
        for start in range(0, len(index), 1024):  # each row moves to or before its place
            part = index[start : start + 1024]
            images[start : start + len(part)] = images[part]
        paths = [self.paths[i] for i in index] if self.paths else []
        return ImageSet(images[: len(index)], self.labels[index], self.classes, paths)


@dataclass
class SourceData:
    train: ImageSet | None  # None for a folder holding only test/ (or val/): scored, not trained on
    test: ImageSet | None
    skipped: list[str] = field(default_factory=list)  # "path: reason" of images left out
    # a val/, valid/ or validation/ folder beside train/: the validation split instead of a held-out slice
    val: ImageSet | None = None
    plain: bool = False  # a plain `<class>/` folder: `train` is all of one labelled set

    def splits(self) -> dict[str, ImageSet]:
        named = {"train": self.train, "val": self.val, "test": self.test}
        return {name: ds for name, ds in named.items() if ds is not None}
