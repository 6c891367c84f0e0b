"""Shared fixtures: small sets of real CIFAR-10 JPEGs cut from the shared tarball, and configs."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from cifarlab.config import TrainConfig, apply_overrides

TEST_DATA = os.environ.get("CIFARLAB_TEST_DATA", "")
HAVE_DATA = bool(TEST_DATA) and Path(TEST_DATA).is_file()
needs_real_data = pytest.mark.skipif(
    not HAVE_DATA, reason="set CIFARLAB_TEST_DATA to the CIFAR-10 JPEG tarball (make test does)"
)


def pytest_collection_modifyitems(config, items):
    """Tests on real images (directly or through a fixture) need the tarball; say so when absent."""
    for item in items:
        if "real_jpegs" in getattr(item, "fixturenames", ()):
            item.add_marker(needs_real_data)


@pytest.fixture(scope="session")
def real_jpegs(tmp_path_factory) -> Path:
    """`<root>/train/<class>/*.jpg`: the first 60 real images of each CIFAR-10 class."""
    root = tmp_path_factory.mktemp("cifar-jpg")
    per_class: dict[str, int] = {}
    with tarfile.open(TEST_DATA) as tf:
        for member in tf:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3:
                continue
            cls = parts[-2]
            if per_class.get(cls, 0) >= 60:
                continue
            per_class[cls] = per_class.get(cls, 0) + 1
            dest = root / "train" / cls / parts[-1]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tf.extractfile(member).read())
    return root


@pytest.fixture
def data_root(tmp_path) -> Path:
    """A fresh cache/dataset root per test, so no test sees another's cache."""
    return tmp_path / "data-root"


def make_config(**overrides) -> TrainConfig:
    base = {"progress": False, "device": "cpu", "threads": 2}
    return apply_overrides(TrainConfig(), {**base, **overrides}, where="test")
