import codecs
import io
import os
import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cifarlab.config import config_changes
from cifarlab.data import cache, load_source, load_splits
from cifarlab.data.images import BadImage, decode_image
from cifarlab.data.splits import stratified_pick
from cifarlab.errors import UserError
from cifarlab.train import train
from tests.conftest import make_config


def _tiny_folder(root: Path, classes=("cat", "dog"), per_class=4, size=40, mode="RGB") -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).convert(mode).save(root / c / f"{i}.png")
    return root


def test_folder_of_real_jpegs_loads_with_cifar_classes(real_jpegs, data_root):
    data = load_source(str(real_jpegs), data_root, 32)
    assert data.train.images.shape == (600, 32, 32, 3) and data.train.images.dtype == np.uint8
    assert data.train.classes[:2] == ["airplane", "automobile"] and len(data.train.classes) == 10
    assert np.bincount(data.train.labels).tolist() == [60] * 10
    assert data.test is None


@pytest.mark.parametrize("kind", ["tar.gz", "tar", "zip"])
def test_archives_load_like_the_folder(real_jpegs, data_root, tmp_path, kind):
    archive = tmp_path / f"cifar.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for p in sorted((real_jpegs / "train").rglob("*.jpg")):
                zf.write(p, p.relative_to(real_jpegs))
    else:
        with tarfile.open(archive, "w:gz" if kind == "tar.gz" else "w") as tf:
            tf.add(real_jpegs / "train", arcname="train")
    from_archive = load_source(str(archive), data_root, 32)
    from_folder = load_source(str(real_jpegs), data_root / "other", 32)
    assert np.array_equal(from_archive.train.images, from_folder.train.images)
    assert np.array_equal(from_archive.train.labels, from_folder.train.labels)


def test_train_and_test_folders_any_size_and_mode_become_rgb(tmp_path, data_root):
    _tiny_folder(tmp_path / "d" / "train", size=50, mode="L")
    _tiny_folder(tmp_path / "d" / "test", size=20, mode="RGBA")
    data = load_source(str(tmp_path / "d"), data_root, 32)
    assert data.train.images.shape == (8, 32, 32, 3) and data.test.images.shape == (8, 32, 32, 3)
    gray = data.train.images[0]
    assert np.array_equal(gray[..., 0], gray[..., 1])


def test_second_load_reads_the_cache_without_decoding(tmp_path, data_root, monkeypatch):
    src = _tiny_folder(tmp_path / "d")
    first = load_source(str(src), data_root, 32)
    monkeypatch.setattr(
        "cifarlab.data.sources.decode_image", lambda *a: pytest.fail("decoded again")
    )
    second = load_source(str(src), data_root, 32)
    assert np.array_equal(first.train.images, second.train.images)


def _flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0xFF]) + blob[at + 1 :]


def test_a_changed_source_or_damaged_cache_is_rebuilt(tmp_path, data_root, capsys):
    src = _tiny_folder(tmp_path / "d")
    first = load_source(str(src), data_root, 32)
    npz = next((data_root / "arrays").glob("*.npz"))
    good = npz.read_bytes()
    pixels = good.index(bytes(np.asarray(first.train.images[3]).tobytes()[:64]))
    for damaged in (good[:-100] + b"x" * 100, _flip(good, pixels + 10)):  # zip tail; one pixel
        npz.write_bytes(damaged)
        again = load_source(str(src), data_root, 32)
        assert "damaged" in capsys.readouterr().err and len(again.train) == 8
        assert np.array_equal(again.train.images, first.train.images)
    _tiny_folder(tmp_path / "d", classes=("emu",))
    assert load_source(str(src), data_root, 32).train.classes == ["cat", "dog", "emu"]


REWRITES = {  # each a cache file with valid CRCs whose arrays do not fit together
    "fewer images than labels": lambda a: {**a, "train_images": a["train_images"][:-2]},
    "images not 4-D": lambda a: {**a, "train_images": a["train_images"][..., 0]},
    "images not uint8": lambda a: {**a, "train_images": a["train_images"].astype(np.float32)},
    "a label past the classes": lambda a: {**a, "train_labels": a["train_labels"] + 1},
    "a negative label": lambda a: {**a, "train_labels": a["train_labels"] - 1},
    "fewer paths than images": lambda a: {**a, "train_paths": a["train_paths"][:-1]},
    "classes not a list": lambda a: {**a, "train_classes": np.asarray("cat")},
}


@pytest.mark.parametrize("rewrite", REWRITES)
def test_a_cache_rewritten_with_arrays_that_do_not_fit_is_rebuilt(
    tmp_path, data_root, capsys, rewrite
):
    src = _tiny_folder(tmp_path / "d")
    first = load_source(str(src), data_root, 32)
    npz = next((data_root / "arrays").glob("*.npz"))
    np.savez(npz, **REWRITES[rewrite](dict(np.load(npz))))
    again = load_source(str(src), data_root, 32)
    assert "damaged" in capsys.readouterr().err
    assert np.array_equal(again.train.images, first.train.images)
    assert np.array_equal(again.train.labels, first.train.labels) and len(again.train.paths) == 8


def _gradients(n: int, rng) -> np.ndarray:
    """(n, 32, 32, 3) uint8 images whose every channel is a plane of its own slopes: any resize
    of one is that plane at the new side, while a swapped axis, channel or image is far from it."""
    y, x = np.mgrid[0:32, 0:32][..., None] / 31 - 0.5
    bx, by = rng.uniform(-120, 120, (2, n, 1, 1, 3))
    return np.rint(128 + bx * x + by * y).astype(np.uint8)


def _write_cifar_batch(path: Path, n: int, rng, label_key="labels", smooth=False):
    """Random pixels, or `_gradients` when `smooth`, as torchvision's channel-major rows."""
    data = _gradients(n, rng).transpose(0, 3, 1, 2).reshape(n, 3072) if smooth else None
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8) if data is None else data
    with open(path, "wb") as f:
        pickle.dump(
            {"data": data, label_key: list(rng.integers(0, 10, n)), "filenames": ["x"] * n}, f
        )
    return data


def _tiny_cifar10(root: Path, smooth=False) -> np.ndarray:
    """Five train batches of 6 images and a test batch of 5; returns the train rows."""
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = [
        _write_cifar_batch(folder / f"data_batch_{i}", 6, rng, smooth=smooth) for i in range(1, 6)
    ]
    _write_cifar_batch(folder / "test_batch", 5, rng, smooth=smooth)
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    return np.concatenate(rows)


def test_cifar10_pickle_layout_loads_train_and_test(tmp_path):
    rows = _tiny_cifar10(tmp_path)
    data = load_source("cifar10", tmp_path, 32)
    assert data.train.images.shape == (30, 32, 32, 3) and data.test.images.shape == (5, 32, 32, 3)
    assert np.array_equal(data.train.images, rows.reshape(30, 3, 32, 32).transpose(0, 2, 3, 1))
    assert data.train.classes[3] == "cat"


@pytest.mark.parametrize("size", [64, 24])
def test_cifar_pickles_at_another_image_size_are_resized_images(tmp_path, size):
    rows = _tiny_cifar10(tmp_path, smooth=True)
    data = load_source("cifar10", tmp_path, size)
    assert data.train.images.shape == (30, size, size, 3) and data.train.images.dtype == np.uint8
    assert data.test.images.shape == (5, size, size, 3)
    at_32 = load_source("cifar10", tmp_path, 32)
    assert np.array_equal(data.train.labels, at_32.train.labels)
    # an antialiased bilinear resize by torch: the same planes, within rounding at the borders
    planes = torch.from_numpy(rows.reshape(30, 3, 32, 32)).float()
    want = F.interpolate(planes, size=size, mode="bilinear", antialias=True).permute(0, 2, 3, 1)
    off = np.abs(data.train.images - want.numpy())
    assert off.max() <= 2, f"{off.max():.1f} levels from a resize of the original"
    config = make_config(data="cifar10", data_root=str(tmp_path), image_size=size, model="cnn",
                         width=0.25, epochs=1, batch_size=10, val_size=10)  # fmt: skip
    result = train(config, tmp_path / "run", log=lambda s: None)
    assert np.isfinite(result.history[0]["train_loss"]) and result.test_acc is not None


def _rewrite(path: Path, **changes) -> None:
    with open(path, "rb") as f:
        batch = pickle.load(f)
    with open(path, "wb") as f:
        pickle.dump({**batch, **changes}, f)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        (
            {"data": np.zeros((6, 3000), np.uint8)},
            r"'data' is uint8 of shape \(6, 3000\), not one row of 3,072",
        ),
        ({"labels": [0, 1, 2, 3, 4]}, "5 'labels' for 6 images"),
        ({"data": np.zeros((0, 3072), np.uint8), "labels": []}, "holds no images"),
        (
            {"labels": [0, 1, 2, 3, 4, 10]},
            "labels run from 0 to 10, but batches.meta names 10 classes",
        ),
    ],
)
def test_a_malformed_cifar_batch_is_one_line_naming_it(tmp_path, changes, needle):
    _tiny_cifar10(tmp_path)
    _rewrite(tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_2", **changes)
    with pytest.raises(UserError, match=f"data_batch_2: {needle}"):
        load_source("cifar10", tmp_path, 32)


def test_a_cifar_meta_naming_a_class_twice_is_refused(tmp_path):
    """It trained, with two classes named cat."""
    _tiny_cifar10(tmp_path)
    names = ["cat", "dog", "cat", *(f"c{i}" for i in range(7))]
    _rewrite(tmp_path / "cifar10" / "cifar-10-batches-py" / "batches.meta", label_names=names)
    with pytest.raises(UserError, match="batches.meta: names cat more than once"):
        load_source("cifar10", tmp_path, 32)


@pytest.mark.parametrize("name", ["batches.meta", "data_batch_3", "test_batch"])
def test_a_missing_cifar_file_is_one_line_with_the_way_out(tmp_path, name):
    """A missing batches.meta was a FileNotFoundError traceback."""
    _tiny_cifar10(tmp_path)
    (tmp_path / "cifar10" / "cifar-10-batches-py" / name).unlink()
    with pytest.raises(UserError, match=f"{name} is missing; .* to download it again"):
        load_source("cifar10", tmp_path, 32)


def test_cifar_batches_written_with_bytes_keys_load(tmp_path):
    _tiny_cifar10(tmp_path)
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    for path in folder.iterdir():
        with open(path, "rb") as f:
            batch = pickle.load(f)
        with open(path, "wb") as f:
            pickle.dump({k.encode(): v for k, v in batch.items()}, f)
    data = load_source("cifar10", tmp_path, 32)
    assert data.train.classes[3] == "cat" and len(data.train.labels) == 30


def test_cifar_batches_pickled_with_protocol_2_by_python_3_load(tmp_path):
    """Protocol 2 stores bytes as `_codecs.encode(<latin-1 text>, 'latin1')`."""
    _tiny_cifar10(tmp_path)
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    for path in folder.iterdir():
        with open(path, "rb") as f:
            batch = pickle.load(f)
        path.write_bytes(pickle.dumps({k.encode(): v for k, v in batch.items()}, protocol=2))
    assert b"_codecs" in (folder / "data_batch_1").read_bytes()
    data = load_source("cifar10", tmp_path, 32)
    assert data.train.classes[3] == "cat" and len(data.train.labels) == 30


class _Runs:
    """Pickles as a call of `func(*args)`, as a malicious batch would."""

    def __init__(self, func, *args):
        self.call = (func, args)

    def __reduce__(self):
        return self.call


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (_Runs(os.system, "echo owned"), r"refusing to load (posix|nt|os)\.system"),
        (_Runs(eval, "1 + 1"), r"refusing to load (__builtin__|builtins)\.eval"),
        (_Runs(codecs.encode, b"x", "zlib"), "refusing _codecs.encode with the 'zlib' codec"),
    ],
)
def test_a_protocol_2_pickle_that_would_run_code_is_still_refused(tmp_path, payload, needle):
    _tiny_cifar10(tmp_path)
    path = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": payload, b"labels": [0]}, protocol=2))
    with pytest.raises(UserError, match=needle):
        load_source("cifar10", tmp_path, 32)


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    _tiny_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(UserError, match="refusing to load builtins.print"):
        load_source("cifar10", tmp_path, 32)


@pytest.mark.parametrize("kind", ["folder", "archive"])
def test_torchvisions_cifar_folder_given_as_data_says_to_give_cifar10(tmp_path, kind):
    """It was "no class folders found; expected <root>/train/<class>/*.jpg": no way forward."""
    _tiny_cifar10(tmp_path)
    src = tmp_path / "cifar10" / "cifar-10-batches-py"
    if kind == "archive":
        with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(src, arcname=src.name)
        src = tmp_path / "cifar-10-python.tar.gz"
    with pytest.raises(UserError, match="CIFAR batches, not class folders; give --data cifar10"):
        load_source(str(src), tmp_path / "root", 32)


def test_cifar_in_torchvisions_own_layout_under_the_data_root_is_found(tmp_path, monkeypatch):
    """`<data-root>/cifar-10-batches-py`, where torchvision's `CIFAR10(root)` keeps it, was not
    looked at: offline an error, online a second download."""
    rows = _tiny_cifar10(tmp_path / "tmp")
    (tmp_path / "tmp" / "cifar10" / "cifar-10-batches-py").rename(tmp_path / "cifar-10-batches-py")

    def offline(url, root, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", offline)
    data = load_source("cifar10", tmp_path, 32)
    assert np.array_equal(data.train.images, rows.reshape(30, 3, 32, 32).transpose(0, 2, 3, 1))


def test_offline_cifar_download_names_where_to_put_it(tmp_path, monkeypatch):
    def offline(url, root, **k):
        Path(root).mkdir(parents=True, exist_ok=True)  # as torchvision does before fetching
        raise OSError("network unreachable")

    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", offline)
    with pytest.raises(UserError, match="put torchvision's 'cifar-10-batches-py' folder under"):
        load_source("cifar10", tmp_path / "a" / "b", 32)
    assert list(tmp_path.iterdir()) == []  # no empty folders left by the failed download


def test_a_file_as_data_root_for_cifar_says_so_not_that_the_download_failed(tmp_path):
    """It said "could not be downloaded (NotADirectoryError); put torchvision's folder under
    FILE/cifar10", which cannot be done."""
    root = tmp_path / "afile"
    root.write_text("")
    with pytest.raises(UserError, match=r"--data-root .*afile: not a writable folder \(it is a"):
        load_source("cifar10", root, 32)
    assert root.read_text() == ""


def test_corrupt_jpeg_is_an_error_naming_it_or_skipped_and_listed(real_jpegs, tmp_path, data_root):
    src = tmp_path / "d"
    shutil.copytree(real_jpegs, src)
    bad = src / "train" / "cat" / "0003.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(UserError, match="0003.jpg: not a readable image"):
        load_source(str(src), data_root, 32)
    data = load_source(str(src), data_root, 32, on_bad="skip")
    assert len(data.train) == 599 and any("0003.jpg" in s for s in data.skipped)


def test_non_image_file_and_empty_class_folder(tmp_path, data_root):
    src = _tiny_folder(tmp_path / "d")
    (src / "cat" / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="notes.txt: not ending in .bmp"):
        load_source(str(src), data_root, 32)
    (src / "cat" / "notes.txt").unlink()
    (src / "emu").mkdir()
    with pytest.raises(UserError, match="emu: class folder holds no images"):
        load_source(str(src), data_root, 32)


def test_train_and_test_with_different_classes_is_an_error(tmp_path, data_root):
    _tiny_folder(tmp_path / "d" / "train", classes=("cat", "dog"))
    _tiny_folder(tmp_path / "d" / "test", classes=("cat", "emu"))
    with pytest.raises(UserError, match="train and test classes differ"):
        load_splits(make_config(data=str(tmp_path / "d"), data_root=str(data_root)))


def test_tar_with_path_traversal_is_refused(tmp_path, data_root):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        payload = b"x"
        info = tarfile.TarInfo("../../escaped.jpg")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    with pytest.raises(UserError, match="unsafe member refused"):
        load_source(str(archive), data_root, 32)
    assert not (tmp_path / "escaped.jpg").exists()


def test_zip_with_path_traversal_is_refused(tmp_path, data_root):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../escaped.jpg", b"x")
    with pytest.raises(UserError, match="would land outside its folder"):
        load_source(str(archive), data_root, 32)


def test_decode_rejects_random_bytes_with_the_file_name(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_bytes(b"\xff\xd8\xff" + bytes(range(256)))
    with pytest.raises(BadImage, match="x.jpg"):
        decode_image(path, 32)


def test_a_large_image_is_shrunk_quietly_and_a_bomb_refused(tmp_path, monkeypatch, recwarn):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow warns past it, refuses past 2x
    Image.new("RGB", (40, 40), "red").save(tmp_path / "large.png")
    assert decode_image(tmp_path / "large.png", 32).shape == (32, 32, 3)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    Image.new("RGB", (50, 50), "red").save(tmp_path / "bomb.png")
    with pytest.raises(BadImage, match="bomb.png: image too large"):
        decode_image(tmp_path / "bomb.png", 32)


def test_stratified_pick_keeps_class_shares():
    labels = np.repeat(np.arange(10), 100)
    picked = stratified_pick(labels, 250, seed=0)
    assert len(picked) == 250 and len(set(picked)) == 250
    counts = np.bincount(labels[picked])
    assert counts.min() >= 24 and counts.max() <= 26


def test_splits_are_seeded_disjoint_and_respect_subset(real_jpegs, data_root):
    config = make_config(data=str(real_jpegs), data_root=str(data_root), subset=300, val_size=100)
    a, b = load_splits(config), load_splits(config)
    assert len(a.train) == 200 and len(a.val) == 100
    assert np.bincount(a.val.labels).tolist() == [10] * 10
    assert a.train.paths == b.train.paths and not set(a.train.paths) & set(a.val.paths)
    assert all(0 < m < 1 for m in a.mean) and all(0 < s < 0.5 for s in a.std)


def test_split_seed_holds_the_split_while_seed_varies(real_jpegs, data_root):
    def splits(**kw):
        return load_splits(make_config(data=str(real_jpegs), data_root=str(data_root),
                                       subset=300, val_size=100, **kw))  # fmt: skip

    base, other = splits(seed=0), splits(seed=1)
    assert base.val.paths != other.val.paths  # --seed alone draws another split
    for seed in (1, 7):
        held = splits(seed=seed, split_seed=0)
        assert held.val.paths == base.val.paths and held.train.paths == base.train.paths
    assert splits(seed=0, split_seed=1).val.paths == other.val.paths
    # a resume or suite rerun with split_seed spelt out for the split it had is not a change
    assert config_changes(make_config(seed=3), make_config(seed=3, split_seed=3)) == []
    assert config_changes(make_config(seed=3), make_config(seed=3, split_seed=0)) == [
        "split_seed: -1 -> 0"
    ]


def test_val_size_larger_than_data_is_an_error(real_jpegs, data_root):
    with pytest.raises(UserError, match="val_size=600 leaves no training images"):
        load_splits(make_config(data=str(real_jpegs), data_root=str(data_root), val_size=600))


def test_cache_key_changes_with_size(tmp_path):
    src = _tiny_folder(tmp_path / "d")
    assert cache.source_key(src, 32, "error") != cache.source_key(src, 64, "error")


def test_a_cache_file_or_folder_in_the_way_is_named_and_no_partial_copy_is_left(tmp_path):
    src = _tiny_folder(tmp_path / "d")
    root = tmp_path / "root"
    key = cache.source_key(src, 32, "error")
    (root / "arrays" / f"{key}.npz").mkdir(parents=True)  # a folder where the cache file goes
    with pytest.raises(UserError, match=rf"cannot write the image cache at .*{key}\.npz"):
        load_source(str(src), root, 32)
    assert [p.name for p in (root / "arrays").iterdir()] == [f"{key}.npz"]
    shutil.rmtree(root / "arrays")
    (root / "arrays").write_text("x")  # a file where the cache folder goes
    with pytest.raises(
        UserError, match=r"arrays is a file where the image cache keeps a folder; remove or move"
    ):
        load_source(str(src), root, 32)
    assert (root / "arrays").read_text() == "x"
