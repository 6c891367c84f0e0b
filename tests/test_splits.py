"""Splits: val_size 0 (the lesson's train-on-everything protocol) and val/ folders beside train/."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifarlab.data import load_source, load_splits
from cifarlab.data.imageset import ImageSet
from cifarlab.data.splits import (
    channel_stats,
    check_sizes,
    classes_note,
    default_split,
    hold_out,
    onto_classes,
    stratified_pick,
)
from cifarlab.errors import TooFewImages, UserError
from tests.conftest import make_config


def _pngs(folder: Path, classes=("cat", "dog"), per_class=4, size=24, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                folder / c / f"{i}.png"
            )
    return folder


def test_stratified_pick_of_zero_items_is_empty():
    picked = stratified_pick(np.repeat(np.arange(3), 5), 0, seed=1)
    assert picked.shape == (0,) and picked.dtype == np.int64


def test_val_size_zero_trains_on_every_image_with_an_empty_val_of_the_same_classes(
    tmp_path, data_root
):
    src = _pngs(tmp_path / "d" / "train", per_class=6).parent
    splits = load_splits(make_config(data=str(src), data_root=str(data_root), val_size=0))
    assert len(splits.train) == 12 and not splits.val_folder
    assert splits.val.images.shape == (0, 32, 32, 3) and splits.val.labels.shape == (0,)
    assert splits.val.classes == splits.train.classes == ["cat", "dog"]


def test_val_size_zero_with_a_class_subset_and_subset(tmp_path, data_root):
    src = _pngs(tmp_path / "d", classes=("cat", "dog", "emu"), per_class=6)
    config = make_config(
        data=str(src), data_root=str(data_root), val_size=0, classes=["dog", "emu"], subset=10
    )
    splits = load_splits(config)
    assert len(splits.train) == 10 and len(splits.val) == 0 and splits.classes == ["dog", "emu"]


def test_a_subset_larger_than_the_data_says_how_to_fix_it(tmp_path, data_root):
    src = _pngs(tmp_path / "d" / "train", per_class=6).parent
    with pytest.raises(UserError, match="subset=20 is larger than the 12 training images; lower"):
        load_splits(make_config(data=str(src), data_root=str(data_root), subset=20))


@pytest.mark.parametrize("name", ["val", "valid"])
def test_val_folder_beside_train_is_the_val_split_and_val_size_is_ignored(
    tmp_path, data_root, name
):
    _pngs(tmp_path / "d" / "train", per_class=4)
    _pngs(tmp_path / "d" / name, per_class=3, size=40, seed=1)
    _pngs(tmp_path / "d" / "test", per_class=2, seed=2)
    splits = load_splits(
        make_config(data=str(tmp_path / "d"), data_root=str(data_root), val_size=5)
    )
    assert len(splits.train) == 8 and len(splits.val) == 6 and len(splits.test) == 4
    assert splits.val_folder and splits.val.images.shape == (6, 32, 32, 3)
    assert all(p.startswith(f"{name}/") for p in splits.val.paths)
    assert np.bincount(splits.val.labels).tolist() == [3, 3]


@pytest.mark.parametrize(
    ("val_size", "val_folder", "asked", "scored"),
    [
        (2, False, None, ("val", 2)),  # held out of train/
        (2, True, None, ("val", 6)),  # its val/ folder: val_size not used
        (0, True, None, ("val", 6)),
        (0, False, None, ("test", 4)),  # no validation split: test
        (0, True, "test", ("test", 4)),  # --split as asked
        (0, False, "val", ("val", 0)),  # evaluate then says it has none
    ],
)
def test_the_default_split_is_val_wherever_the_run_had_one_and_the_data_is_read_once(
    tmp_path, data_root, monkeypatch, val_size, val_folder, asked, scored
):
    import cifarlab.data.cache as cache
    from cifarlab.eval_set import load_eval_set

    src = _pngs(tmp_path / "d" / "train", per_class=4).parent
    _pngs(src / "test", per_class=2, seed=2)
    if val_folder:
        _pngs(src / "val", per_class=3, seed=1)
    config = make_config(data=str(src), data_root=str(data_root), val_size=val_size)
    load_source(str(src), data_root, 32)  # cached: every read of it after this is a cache.load
    reads, load = [], cache.load
    monkeypatch.setattr(cache, "load", lambda *a: reads.append(a) or load(*a))
    ckpt = {"config": config.to_dict(), "classes": ["cat", "dog"]}
    data, _, split = load_eval_set(ckpt, "run", split=asked)
    assert (split, len(data)) == scored
    assert len(reads) == 1  # the split is chosen from the data it then scores
    assert asked or default_split(config, val_folder) == split


def test_a_missing_test_split_points_to_val_only_where_the_run_had_one(tmp_path, data_root):
    from cifarlab.eval_set import load_eval_set

    src = _pngs(tmp_path / "d" / "train", per_class=4).parent
    ckpt = {"config": make_config(data=str(src), data_root=str(data_root), val_size=0).to_dict(),
            "classes": ["cat", "dog"]}  # fmt: skip
    with pytest.raises(UserError, match=r"has no test split; pass --data .*folder$"):
        load_eval_set(ckpt, "run", split=None)  # no val/ either: nothing to point to
    _pngs(src / "val", per_class=3, seed=1)
    with pytest.raises(UserError, match=r"has no test split; .*, or use --split val$"):
        load_eval_set(ckpt, "run", split="test")


def test_a_class_cut_by_subset_beside_a_val_folder_is_not_blamed_on_val_size(tmp_path, data_root):
    _pngs(tmp_path / "d" / "train", classes=("cat", "dog", "emu"), per_class=6)
    _pngs(tmp_path / "d" / "val", classes=("cat", "dog", "emu"), per_class=2, seed=1)
    for f in sorted((tmp_path / "d" / "train" / "emu").iterdir())[1:]:
        f.unlink()  # emu's one image: --subset 4 keeps none of it
    config = make_config(data=str(tmp_path / "d"), data_root=str(data_root), subset=4, batch_size=4)
    with pytest.raises(TooFewImages, match="emu; --subset 4 keeps 4.*raise --subset") as info:
        check_sizes(config, load_splits(config))
    assert "--val-size" not in str(info.value)  # ignored beside a val/ folder


def test_val_folder_comes_back_from_the_cache_without_decoding(tmp_path, data_root, monkeypatch):
    _pngs(tmp_path / "d" / "train")
    _pngs(tmp_path / "d" / "val", per_class=2, seed=1)
    first = load_source(str(tmp_path / "d"), data_root, 32)
    monkeypatch.setattr(
        "cifarlab.data.sources.decode_image", lambda *a: pytest.fail("decoded again")
    )
    second = load_source(str(tmp_path / "d"), data_root, 32)
    assert np.array_equal(first.val.images, second.val.images)
    assert second.val.paths == first.val.paths and second.val.classes == ["cat", "dog"]


def test_val_folder_with_a_class_train_lacks_is_an_error(tmp_path, data_root):
    _pngs(tmp_path / "d" / "Train", classes=("cat", "dog"))
    _pngs(tmp_path / "d" / "valid", classes=("cat", "emu"))
    with pytest.raises(UserError, match=r"train and val classes differ \(only in val: \['emu'\]\); "
                       r"a model trained on Train/ never predicts them: add those class folders "
                       r"to Train/ or remove them from valid/$"):  # fmt: skip
        load_splits(make_config(data=str(tmp_path / "d"), data_root=str(data_root)))


def test_val_and_test_folders_holding_some_of_trains_classes_are_on_its_indices(
    tmp_path, data_root
):
    _pngs(tmp_path / "d" / "train", classes=("cat", "dog", "emu"))
    _pngs(tmp_path / "d" / "val", classes=("dog",))
    _pngs(tmp_path / "d" / "test", classes=("cat", "emu"), per_class=2)
    splits = load_splits(make_config(data=str(tmp_path / "d"), data_root=str(data_root)))
    assert splits.val.classes == splits.test.classes == ["cat", "dog", "emu"]
    assert splits.val.labels.tolist() == [1] * 4 and splits.test.labels.tolist() == [0, 0, 2, 2]
    assert classes_note(splits.val, "val") == ", val: 1 of 3 classes has images"
    assert classes_note(splits.test, "test") == ", test: 2 of 3 classes have images"
    assert classes_note(splits.train, "train") == ""
    picked = load_splits(
        make_config(data=str(tmp_path / "d"), data_root=str(data_root), classes=["emu", "dog"])
    )
    assert picked.test.classes == ["emu", "dog"] and picked.test.labels.tolist() == [0, 0]
    assert picked.val.labels.tolist() == [1] * 4


def test_a_class_train_lacks_is_refused_only_when_the_selection_keeps_it(tmp_path, data_root):
    _pngs(tmp_path / "d" / "train", classes=("cat", "dog"))
    _pngs(tmp_path / "d" / "test", classes=("cat", "dog", "emu"), per_class=2)
    config = make_config(data=str(tmp_path / "d"), data_root=str(data_root), val_size=2,
                         classes=["dog", "cat"])  # fmt: skip
    assert load_splits(config).test.labels.tolist() == [1, 1, 0, 0]  # emu: dropped
    with pytest.raises(
        UserError, match=r"differ among the selected classes \(only in test: \['emu'"
    ):
        load_splits(make_config(data=str(tmp_path / "d"), data_root=str(data_root),
                                classes=["cat", "emu"]))  # fmt: skip


def test_both_val_and_valid_folders_is_an_error(tmp_path, data_root):
    _pngs(tmp_path / "d" / "train")
    _pngs(tmp_path / "d" / "val")
    _pngs(tmp_path / "d" / "valid")
    with pytest.raises(UserError, match="both val/ and valid/ hold val images; keep one"):
        load_source(str(tmp_path / "d"), data_root, 32)


def test_a_folder_of_only_test_loads_but_cannot_train(tmp_path, data_root):
    _pngs(tmp_path / "d" / "test", per_class=3)
    data = load_source(str(tmp_path / "d"), data_root, 32)
    assert data.train is None and len(data.test) == 6
    with pytest.raises(UserError, match="no train/ folder beside test/ or val/"):
        load_splits(make_config(data=str(tmp_path / "d"), data_root=str(data_root)))


def test_onto_classes_maps_a_subset_onto_the_models_indices(tmp_path, data_root):
    data = load_source(str(_pngs(tmp_path / "d", classes=("dog", "emu"))), data_root, 32).train
    mapped = onto_classes(data, ["cat", "dog", "emu"], "best.pt")
    assert mapped.classes == ["cat", "dog", "emu"]
    assert mapped.labels.tolist() == [1] * 4 + [2] * 4
    with pytest.raises(UserError, match=r"trained on 1 classes .* does not know \(emu\)"):
        onto_classes(data, ["dog"], "best.pt")


def test_channel_stats_match_the_float64_mean_and_std_of_the_pixels(real_jpegs, data_root):
    train = load_splits(
        make_config(data=str(real_jpegs), data_root=str(data_root), val_size=100)
    ).train
    pixels = train.images.reshape(-1, 3).astype(np.float64) / 255.0
    mean, std = channel_stats(train.images)
    np.testing.assert_allclose(mean, pixels.mean(0), atol=1e-6)
    np.testing.assert_allclose(std, pixels.std(0), atol=1e-6)
    assert mean[0] != mean[2]  # per channel, not one figure for all


def test_classes_are_selected_before_train_and_test_are_compared(tmp_path, data_root):
    from cifarlab.eval_set import load_eval_set

    _pngs(tmp_path / "d" / "train", classes=("cat", "dog", "emu"))
    _pngs(tmp_path / "d" / "test", classes=("cat", "dog"))
    config = make_config(data=str(tmp_path / "d"), data_root=str(data_root), val_size=2,
                         classes=["cat", "dog"])  # fmt: skip
    splits = load_splits(config)
    assert splits.train.classes == splits.test.classes == ["cat", "dog"]
    ckpt = {"config": config.to_dict(), "classes": ["cat", "dog"]}
    for data in (str(tmp_path / "d"), None):  # another run's data, and the run's own
        scored, *_ = load_eval_set(ckpt, "run", split="test", data=data)
        assert len(scored) == 8 and sorted(set(scored.labels)) == [0, 1]
    # a selected class the test folder lacks has no images there: not an error
    picked = load_splits(make_config(data=str(tmp_path / "d"), data_root=str(data_root),
                                     val_size=2, classes=["cat", "emu"]))  # fmt: skip
    assert picked.test.classes == ["cat", "emu"] and picked.test.labels.tolist() == [0] * 4


def test_hold_out_gives_what_copies_would_and_keeps_the_rest_in_the_sets_own_array():
    rng = np.random.default_rng(0)
    n = 3000  # several of take_in_place's blocks of 1024
    images = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, n).astype(np.int64)
    paths = [f"p{i}.png" for i in range(n)]
    data = ImageSet(images.copy(), labels, [str(c) for c in range(5)], paths)
    rest, val = hold_out(data, 500, seed=3)
    val_idx = stratified_pick(labels, 500, 3)
    kept = np.setdiff1d(np.arange(n), val_idx)
    assert np.array_equal(val.images, images[val_idx]) and np.array_equal(
        val.labels, labels[val_idx]
    )
    assert np.array_equal(rest.images, images[kept]) and np.array_equal(rest.labels, labels[kept])
    assert rest.paths == [paths[i] for i in kept] and val.paths == [paths[i] for i in val_idx]
    assert np.shares_memory(rest.images, data.images)  # no second copy of the training images


@pytest.mark.parametrize("name", ["val", "Validation"])
def test_a_run_on_data_with_a_val_folder_says_val_size_is_not_used(tmp_path, data_root, name):
    """The line named val/ whatever the folder was called (valid/, Validation/)."""
    from cifarlab.train import train

    _pngs(tmp_path / "d" / "train", per_class=4)
    _pngs(tmp_path / "d" / name, per_class=2, seed=1)
    config = make_config(data=str(tmp_path / "d"), data_root=str(data_root), val_size=3,
                         model="cnn", width=0.25, epochs=1, batch_size=4, tta="none")  # fmt: skip
    messages = []
    train(config, tmp_path / "run", log=messages.append)
    line = next(m for m in messages if m.startswith("data:"))
    assert f"8 train / 4 val images (val: the data's {name}/ folder; --val-size not used)" in line
