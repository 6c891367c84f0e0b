"""Shared fixtures: small sets of real CIFAR-10 JPEGs cut from the shared tarball, and configs."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest

from cifarlab.config import TrainConfig, apply_overrides

TEST_DATA = os.environ.get("CIFARLAB_TEST_DATA", "")
# the default data root (torchvision downloads, the kept bf16 timing) for this test session and
# the commands it runs in subprocesses: not the user's ~/.cache/cifarlab
os.environ["CIFARLAB_DATA"] = tempfile.mkdtemp(prefix="cifarlab-test-root-")
HAVE_DATA = bool(TEST_DATA) and Path(TEST_DATA).is_file()
needs_real_data = pytest.mark.skipif(
    not HAVE_DATA, reason="set CIFARLAB_TEST_DATA to the CIFAR-10 JPEG tarball (make test does)"
)


# Modules whose tests train models, spawn processes, build the torchvision/timm zoo or drive
# Chromium: `make test` (the fast tier, `-m "not slow"`) leaves them to `make test-all`.
SLOW_MODULES = {
    "test_api",
    "test_budget",
    "test_calibration",
    "test_checkpoint",
    "test_cli",
    "test_distributed",
    "test_evaluate",
    "test_export",
    "test_fast_ingredients",
    "test_hardware",
    "test_memory",
    "test_model_zoo",
    "test_resume_rules",
    "test_roundtrip",
    "test_rundir",
    "test_suites",
    "test_tracking",
    "test_train",
    "test_transfer",
    "test_tune",
    "test_exercises",
    "test_gradcam",
}


def pytest_collection_modifyitems(config, items):
    """Tests on real images (directly or through a fixture) need the tarball; say so when absent.
    Tests in SLOW_MODULES get the `slow` marker."""
    for item in items:
        if "real_jpegs" in getattr(item, "fixturenames", ()):
            item.add_marker(needs_real_data)
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="session")
def _fp32_on_every_cpu():
    """`amp: auto` would pick bf16 on a CPU with AMX or AVX512-BF16; the parity tests compare
    against fp32 exporters, so every test and every shared run (session and module fixtures
    included) sees a CPU without either, unless a test injects its own flags."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("cifarlab.hardware.cpu_flags", lambda: set())
        yield


def _cut_from_tarball(dest: Path, start: int, stop: int) -> Path:
    """`dest/<class>/*.jpg`: the real images start..stop-1 (in tarball order) of each class."""
    seen: dict[str, int] = {}
    with tarfile.open(TEST_DATA) as tf:
        for member in tf:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3:
                continue
            cls = parts[-2]
            seen[cls] = seen.get(cls, 0) + 1
            if start < seen[cls] <= stop:
                (dest / cls).mkdir(parents=True, exist_ok=True)
                (dest / cls / parts[-1]).write_bytes(tf.extractfile(member).read())
            if len(seen) == 10 and min(seen.values()) >= stop:
                break  # the tarball holds 50,000 more members: reading on costs seconds
    return dest


@pytest.fixture(scope="session")
def real_jpegs(tmp_path_factory) -> Path:
    """`<root>/train/<class>/*.jpg`: the first 60 real images of each CIFAR-10 class."""
    return _cut_from_tarball(tmp_path_factory.mktemp("cifar-jpg") / "train", 0, 60).parent


@pytest.fixture(scope="session")
def unseen_jpegs(tmp_path_factory) -> Path:
    """`<root>/test/<class>/*.jpg`: the next 20 real images of each class, which no shared run
    trains, selects or calibrates on."""
    return _cut_from_tarball(tmp_path_factory.mktemp("cifar-unseen") / "test", 60, 80).parent


@pytest.fixture(scope="session")
def fastnet_run(real_jpegs, tmp_path_factory) -> Path:
    """fastnet trained 4 epochs on the 500 real JPEGs (100 held out for val), with colour jitter:
    the one run on real images that the training, evaluation, prediction and export tests read.
    Tests that change a run copy it first (`copy_run`)."""
    root = tmp_path_factory.mktemp("fastnet-run")
    config = make_config(
        data=str(real_jpegs), data_root=str(root / "data"), model="fastnet", epochs=4,
        batch_size=50, val_size=100, lr=0.2, jitter_brightness=0.2, jitter_contrast=0.2,
    )  # fmt: skip
    from cifarlab.train import train

    train(config, root / "run", log=lambda s: None)
    return root / "run"


def copy_run(run: Path, dest: Path) -> Path:
    """A private copy of a shared run (fixture), for a test that writes into it."""
    shutil.copytree(run, dest)
    return dest


@pytest.fixture
def data_root(tmp_path) -> Path:
    """A fresh cache/dataset root per test, so no test sees another's cache."""
    return tmp_path / "data-root"


def make_config(**overrides) -> TrainConfig:
    base = {"progress": False, "device": "cpu", "threads": 2}
    return apply_overrides(TrainConfig(), {**base, **overrides}, where="test")


def write_synthetic_folder(
    root: Path, classes=("red", "green", "blue"), per_class: int = 12, size: int = 32
) -> Path:
    """`<root>/<class>/*.png`: noisy images whose dominant colour is their class, so a model can
    learn them in a few steps; for tests that must run without the shared JPEGs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (size, size, 3))
            pixels[..., c % 3] += 150
            Image.fromarray(pixels.astype("uint8")).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def synthetic_images(tmp_path_factory) -> Path:
    """Three colour classes of 12 PNGs each under `<root>/train/` and 4 each under `<root>/test/`."""
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_folder(root / "train")
    write_synthetic_folder(root / "test", per_class=4)
    return root


def read_only_folder(monkeypatch, folder: Path) -> Path:
    """`folder`, made and reported unwritable: the tests run as root, which ignores mode bits,
    so `os.access` denies it as a read-only mount would."""
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: Path(p) != folder and real_access(p, m))
    return folder


def disk_full_midway(monkeypatch, word: str) -> None:
    """`Path.write_text` of a file whose name holds `word` writes half its text, then fails as
    a full disk (or a kill) would stop it."""
    real = Path.write_text

    def write_text(path, text, *args, **kwargs):
        if word not in path.name:
            return real(path, text, *args, **kwargs)
        real(path, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_text)


@contextlib.contextmanager
def files_limited_to(size: int):
    """Writes past `size` bytes fail with EFBIG, as on a full disk (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
