"""Class folders under misuse: too few classes, dangling links, non-UTF-8 names, a bad --data-root."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifarlab.cli import main
from cifarlab.config import DATASETS, absolute_data
from cifarlab.data import cache, load_source, load_splits, sources
from cifarlab.errors import UserError
from cifarlab.eval_set import _data_present
from tests.conftest import make_config


def _folder(root: Path, classes=("cat", "dog"), per_class=3) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        folder = Path(os.fsdecode(os.path.join(os.fsencode(root), os.fsencode(c))))
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                folder / f"{i}.png"
            )
    return root


def test_a_single_class_folder_is_named_and_refused_for_training(tmp_path, data_root):
    src = _folder(tmp_path / "d", classes=("cat",))
    config = make_config(data=str(src), data_root=str(data_root), val_size=1)
    with pytest.raises(UserError, match="only one class folder found: cat; need at least two"):
        load_splits(config)
    assert load_source(str(src), data_root, 8).train.classes == ["cat"]  # fine to score


def test_one_class_left_after_dropping_empty_folders_is_refused(tmp_path, data_root):
    src = _folder(tmp_path / "d", classes=("cat",))
    (src / "dog").mkdir()
    config = make_config(data=str(src), data_root=str(data_root), val_size=1, on_bad_image="skip")
    with pytest.raises(UserError, match="only one class folder found: cat"):
        load_splits(config)


@pytest.mark.parametrize(
    ("classes", "needle"),
    [(["cat", "cat"], r"\['cat'\] listed more than once"), (["cat"], "fewer than two classes")],
)
def test_repeated_or_single_selected_classes_are_refused(tmp_path, data_root, classes, needle):
    src = _folder(tmp_path / "d", classes=("cat", "dog", "emu"), per_class=4)
    config = make_config(data=str(src), data_root=str(data_root), classes=classes, val_size=2)
    with pytest.raises(UserError, match=needle):
        load_splits(config)


def test_a_dangling_symlink_is_an_error_naming_it_or_skipped(tmp_path, data_root):
    src = _folder(tmp_path / "d")
    (src / "cat" / "gone.png").symlink_to(tmp_path / "missing.png")
    with pytest.raises(UserError, match="gone.png: a symbolic link to a missing file"):
        load_source(str(src), data_root, 8)
    data = load_source(str(src), data_root, 8, on_bad="skip")
    assert len(data.train) == 6 and any("gone.png" in s for s in data.skipped)


def test_a_file_among_the_class_folders_is_named_unless_it_documents_the_data(
    tmp_path, data_root, capsys
):
    """A class folder replaced by a file trained on the other classes without a word."""
    train = _folder(tmp_path / "d" / "train", classes=("cat", "dog", "emu"))
    for p in (train / "emu").iterdir():
        p.unlink()
    (train / "emu").rmdir()
    (train / "emu").write_text("what was the emu folder")
    (train / "README.md").write_text("about these images")
    (train / ".DS_Store").write_bytes(b"\0")
    for junk in ("Thumbs.db", "desktop.ini", "cat/Thumbs.db", "dog/desktop.ini"):  # Windows'
        (train / junk).write_bytes(b"\0")
    (train / "labels.csv").write_text("file,label")
    code = main(["train", "--data", str(train.parent), "--data-root", str(data_root),
                 "--out", str(tmp_path / "run"), "--epochs", "1", "--val-size", "2",
                 "--batch-size", "2", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "emu: a file, not a class folder" in err and "Traceback" not in err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()
    data = load_source(str(train.parent), data_root, 8, on_bad="skip")
    assert data.train.classes == ["cat", "dog"] and len(data.skipped) == 1
    assert data.skipped[0].startswith(f"{train / 'emu'}: a file")
    (train / "emu").unlink()  # a README, notes and hidden files beside the class folders are fine
    assert load_source(str(train.parent), data_root, 8).train.classes == ["cat", "dog"]


def test_non_utf8_class_and_file_names_load_as_printable_text(tmp_path, data_root):
    src = _folder(tmp_path / "d", classes=(b"caf\xe9", b"dog"))
    bad_file = os.path.join(os.fsencode(src), b"dog", b"x\xff.png")
    Image.new("RGB", (8, 8)).save(os.fsdecode(bad_file))
    data = load_source(str(src), data_root, 8)
    assert data.train.classes == ["caf\\xe9", "dog"]
    assert "d/dog/x\\xff.png" in data.train.paths
    for text in [*data.train.classes, *data.train.paths]:
        text.encode("utf-8")  # no lone surrogates: CSV, YAML and HTML can be written


def test_a_data_root_that_is_a_file_is_one_line(tmp_path, capsys):
    src = _folder(tmp_path / "d")
    blocker = tmp_path / "root-file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=f"--data-root {blocker}: not a writable folder"):
        load_source(str(src), blocker, 8)
    code = main(["train", "--data", str(src), "--data-root", str(blocker / "sub"),
                 "--out", str(tmp_path / "run"), "--epochs", "1", "--val-size", "2",
                 "--batch-size", "2", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "not a writable folder" in err and "Traceback" not in err


def test_a_read_only_data_root_is_one_line(tmp_path, monkeypatch):
    src = _folder(tmp_path / "d")
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    real_access = os.access  # root ignores the mode bits, so deny as a read-only mount would
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == root else real_access(p, m))
    with pytest.raises(UserError, match="not a writable folder"):
        load_source(str(src), root, 8)
    assert not (root / "arrays").exists()
    monkeypatch.undo()  # a shared cache made read-only after it was written is read as it is
    root.chmod(0o755)
    cached = load_source(str(src), root, 8)
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == root else real_access(p, m))
    assert len(load_source(str(src), root, 8).train) == len(cached.train)


def test_a_read_only_arrays_folder_is_named_before_any_decode(tmp_path, monkeypatch):
    src = _folder(tmp_path / "d")
    root = tmp_path / "root"
    (root / "arrays").mkdir(parents=True)
    real_access = os.access
    denied = root / "arrays"
    monkeypatch.setattr(
        os, "access", lambda p, m: False if Path(p) == denied else real_access(p, m)
    )
    decoded = []
    monkeypatch.setattr(sources, "_decode_folder", lambda *a: decoded.append(a))
    with pytest.raises(UserError, match=f"--data-root {root}: {denied} is not a writable folder"):
        load_source(str(src), root, 8)
    assert decoded == []


@pytest.mark.parametrize("name", DATASETS)
def test_a_dataset_name_is_the_dataset_even_beside_a_folder_of_that_name(
    name, tmp_path, data_root, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert _data_present(name)  # downloaded when missing: never "no longer there"
    _folder(tmp_path / name)
    asked = []
    train, test = (
        sources.ImageSet(np.zeros((n, 8, 8, 3), np.uint8), np.zeros(n, np.int64), ["x"])
        for n in (2, 1)
    )
    fake = sources.SourceData(train, test)
    monkeypatch.setattr(sources, "_load_cifar", lambda n, root, size: asked.append(n) or fake)
    assert load_source(name, data_root, 8) is fake
    assert load_source(name, data_root, 8).test is test  # not the folder's all
    assert asked == [name, name] and absolute_data(name) == name


def test_a_plain_folder_loaded_again_is_read_from_the_cache_without_a_second_walk(
    tmp_path, data_root, monkeypatch
):
    src = str(_folder(tmp_path / "d"))  # cat/ and dog/, 3 images each: one labelled set
    assert len(load_source(src, data_root, 8).train) == 6  # decoded and cached
    walks = []

    def counted(module, name):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args: walks.append(name) or real(*args))

    counted(sources, "_load_folder")  # the layout walked and decoded
    counted(cache, "_folder_stamp")  # every file's stat, for the cache's key
    assert len(load_source(src, data_root, 8).train) == 6
    assert walks == ["_folder_stamp"]  # the cache's key only


@pytest.mark.parametrize("inside", [".", "cat", "cache"])
def test_a_data_root_inside_the_class_folders_is_refused_before_anything_is_written(
    tmp_path, capsys, inside
):
    src = _folder(tmp_path / "d")
    root, out = src / inside, tmp_path / "run"
    code = main(["train", "--data", str(src), "--data-root", str(root), "--out", str(out),
                 "--epochs", "1", "--val-size", "2", "--batch-size", "2", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and f"--data-root {root} is inside {src}" in err and "Traceback" not in err
    assert err.count("\n") == 1 and not out.exists()
    assert sorted(p.name for p in src.iterdir()) == ["cat", "dog"]  # no arrays/ to read as a class
    with pytest.raises(UserError, match=r"pick --data-root \(or \$CIFARLAB_DATA\) outside it"):
        load_source(str(src), root, 8)  # as evaluate --data and tune load it
    assert load_source(str(src), tmp_path / "elsewhere", 8).train.classes == ["cat", "dog"]
    for _ in range(2):  # a cache below a hidden folder is never read as a class
        assert load_source(str(src), src / ".cache", 8).train.classes == ["cat", "dog"]


def test_a_data_root_beside_a_split_layout_is_fine_and_beside_a_wrapper_is_not(tmp_path):
    split = tmp_path / "s"
    _folder(split / "train")
    _folder(split / "test")
    assert load_source(str(split), split, 8).train.classes == ["cat", "dog"]  # split/arrays
    assert load_source(str(split), split, 8).train.classes == ["cat", "dog"]  # and again
    wrapped = _folder(tmp_path / "w" / "pets").parent  # looked through to pets/<class>
    with pytest.raises(UserError, match=f"--data-root {wrapped} is inside {wrapped}, whose"):
        load_source(str(wrapped), wrapped, 8)  # wrapped/arrays would make pets/ a class
    with pytest.raises(UserError, match=f"--out {wrapped / 'runs' / 'a'} is inside {wrapped}"):
        sources.check_outside_images(wrapped / "runs" / "a", str(wrapped))
    assert sorted(p.name for p in wrapped.iterdir()) == ["pets"]


def test_a_class_folder_name_with_a_newline_or_tab_is_refused_at_load(tmp_path, data_root):
    for odd in ("two\nlines", "tab\there"):
        src = _folder(tmp_path / odd.split()[0], classes=("cat", odd))
        with pytest.raises(UserError, match="control character") as err:
            load_source(str(src), data_root, 8)
        assert len(str(err.value).splitlines()) == 1 and repr(odd) in str(err.value)


ODD_NAMES = ("a,b", 'say "hi"', " lead", "trail ", "café<b>&", "$\\frac$")


def test_odd_class_names_are_selected_by_a_csv_quoted_list(tmp_path, data_root):
    src = _folder(tmp_path / "d", classes=(*ODD_NAMES, "trail"), per_class=4)
    given = '"a,b", "say ""hi"""," lead","trail ",café<b>&, $\\frac$'
    config = make_config(data=str(src), data_root=str(data_root), classes=given, val_size=7)
    assert config.classes == list(ODD_NAMES)
    assert load_splits(config).train.classes == list(ODD_NAMES)
    unquoted = make_config(data=str(src), data_root=str(data_root), classes="a,b", val_size=7)
    with pytest.raises(UserError, match="unknown classes.*double quotes"):
        load_splits(unquoted)
    with pytest.raises(UserError, match="must be names"):
        make_config(classes='"a,b, c')


def test_split_folders_named_in_any_case_are_the_splits_not_classes(tmp_path, data_root):
    """`Train/` and `Test/` alone were read as two classes, Train and Test; `test` beside
    `train/` in another case, or `validation/`, was never read."""
    src = tmp_path / "d"
    _folder(src / "Train", per_class=4)
    _folder(src / "TEST", per_class=2)
    _folder(src / "validation", per_class=1)
    data = load_source(str(src), data_root, 8)
    assert data.train.classes == ["cat", "dog"] and len(data.train) == 8
    assert len(data.test) == 4 and len(data.val) == 2 and not data.plain


@pytest.mark.parametrize("named", [("test",), ("Train", "val"), ("eval",), ("testing", "test")])
def test_a_class_folder_named_like_a_split_is_a_class_of_the_plain_layout(
    tmp_path, data_root, named
):
    """`<root>/<class>/` with a class called test (images in it, no class folders) was read as a
    test split holding no class folders: 'no class folders found; expected ... <root>/<class>/',
    the very layout given; eval/ or testing/ beside cat/ was refused as a misnamed split."""
    src = _folder(tmp_path / "d", classes=("cat", "dog", *named), per_class=2)
    data = load_source(str(src), data_root, 8)
    assert data.plain and data.test is None and data.val is None
    assert data.train.classes == sorted(["cat", "dog", *named])
    assert len(data.train) == 2 * (2 + len(named))


def test_train_and_test_folders_of_loose_images_alone_are_splits_not_two_classes(
    tmp_path, data_root
):
    src = _folder(tmp_path / "d", classes=("train", "test"), per_class=2)
    with pytest.raises(UserError, match=r"train: holds images, not <class>/ folders"):
        load_source(str(src), data_root, 8)


@pytest.mark.parametrize(
    ("per_class", "said"),
    [(2, "holds images, not <class>/ folders; move them into test/<class>/"),
     (0, "a split folder without <class>/ folders; fill it (test/<class>/*.jpg) or remove it")],
)  # fmt: skip
def test_a_split_folder_without_class_folders_says_how_to_fill_it(
    tmp_path, data_root, capsys, per_class, said
):
    # it said "expected <root>/train/<class>/*.jpg or <root>/<class>/*.jpg", the train/ given
    src = tmp_path / "d"
    _folder(src / "train")
    _folder(src, classes=("test",), per_class=per_class)  # test/*.png, or test/ empty
    code = main(["train", "--data", str(src), "--data-root", str(data_root), "--out",
                 str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"error: {src / 'test'}: {said}" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("near", "name"), [("testing", "test/"), ("Training", "train/")])
def test_a_folder_named_like_a_split_but_none_is_refused_naming_the_split(
    tmp_path, data_root, near, name
):
    src = tmp_path / "d"
    _folder(src / "train")
    _folder(src / near)
    with pytest.raises(UserError, match=f"{near}: not a split folder .*rename it {name}"):
        load_source(str(src), data_root, 8)


def test_a_split_like_name_alone_is_a_class_or_a_wrapper_and_two_of_them_are_refused(
    tmp_path, data_root
):
    wrapped = _folder(tmp_path / "w" / "training")  # an archive's one top folder
    assert load_source(str(wrapped.parent), data_root, 8).train.classes == ["cat", "dog"]
    flat = _folder(tmp_path / "f", classes=("cat", "eval"))  # a class that happens to be named so
    assert load_source(str(flat), data_root, 8).train.classes == ["cat", "eval"]
    _folder(tmp_path / "two" / "Training")
    _folder(tmp_path / "two" / "Testing")  # the splits by other names: not two classes
    with pytest.raises(UserError, match="Testing: not a split folder .*rename it test/"):
        load_source(str(tmp_path / "two"), data_root, 8)
