import dataclasses
import shutil

import pytest
import torch

from cifarlab.checkpoint import load_checkpoint
from cifarlab.errors import UserError
from cifarlab.models import ModelArgs, build_model
from cifarlab.train import train
from tests.conftest import make_config

FIRST5 = ["airplane", "automobile", "bird", "cat", "deer"]
LAST5 = ["dog", "frog", "horse", "ship", "truck"]


def test_a_torchvision_weights_file_round_trips_through_weights(tmp_path):
    from torchvision import models

    torch.manual_seed(1)
    original = models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(original, path)
    model = build_model(ModelArgs("tv-resnet18", 10, stem="imagenet"), weights=str(path))
    loaded = model[1].state_dict()
    assert all(torch.equal(loaded[k], original[k]) for k in original if not k.startswith("fc."))
    assert loaded["fc.weight"].shape == (10, 512)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_offline_pretrained_names_the_file_and_the_alternative(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(
        UserError, match=r"put resnet18-f37072fd\.pth .* at .*checkpoints.* or pass --weights FILE"
    ):
        build_model(ModelArgs("tv-resnet18", 10), pretrained=True)


@pytest.fixture(scope="module")
def pretrained_run(real_jpegs, tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    config = make_config(data=str(real_jpegs), data_root=str(root / "d"), model="fastnet", classes=FIRST5,
                         epochs=1, batch_size=50, val_size=50, lr=0.2)  # fmt: skip
    train(config, root / "first5", log=lambda s: None)
    return root


def _tensors(state, head):
    body = {k: v for k, v in state.items() if not k.startswith(head)}
    return body, {k: v for k, v in state.items() if k.startswith(head)}


def test_frozen_backbone_is_bit_identical_while_the_head_trains(pretrained_run, real_jpegs):
    root = pretrained_run
    config = make_config(data=str(real_jpegs), data_root=str(root / "d"), model="fastnet", classes=LAST5, epochs=1,
                         batch_size=50, val_size=50, lr=0.2, init_from=str(root / "first5"), freeze="backbone",
                         freeze_epochs=1)  # fmt: skip
    train(config, root / "frozen", log=lambda s: None)
    before, _ = _tensors(load_checkpoint(root / "first5" / "last.pt")["model"], "head.")
    after, head = _tensors(load_checkpoint(root / "frozen" / "last.pt")["model"], "head.")
    assert all(torch.equal(before[k], after[k]) for k in before), (
        "backbone (incl. BN statistics) changed"
    )
    assert head["head.weight"].shape == (5, 256)


def test_unfreezing_after_freeze_epochs_trains_the_backbone(pretrained_run, real_jpegs):
    root = pretrained_run
    messages = []
    config = make_config(data=str(real_jpegs), data_root=str(root / "d"), model="fastnet", classes=LAST5, epochs=2,
                         batch_size=50, val_size=50, lr=0.2, init_from=str(root / "first5"), freeze="backbone",
                         freeze_epochs=1, backbone_lr_mult=0.1)  # fmt: skip
    train(config, root / "staged", log=messages.append)
    before, _ = _tensors(load_checkpoint(root / "first5" / "last.pt")["model"], "head.")
    after, _ = _tensors(load_checkpoint(root / "staged" / "last.pt")["model"], "head.")
    trainable = [
        k for k in before if k.endswith("weight") and "whiten" not in k and before[k].ndim > 1
    ]
    assert all(not torch.equal(before[k], after[k]) for k in trainable)
    assert any("backbone unfrozen" in m for m in messages)
    assert any("new 5-class head" in m for m in messages)


def test_init_from_another_model_is_refused(pretrained_run, real_jpegs, tmp_path):
    config = make_config(data=str(real_jpegs), data_root=str(pretrained_run / "d"), model="cnn", classes=LAST5,
                         epochs=1, val_size=50, init_from=str(pretrained_run / "first5"))  # fmt: skip
    with pytest.raises(UserError, match="it holds a fastnet .*this run trains a cnn"):
        train(config, tmp_path / "x", log=lambda s: None)
    narrow = dataclasses.replace(config, model="fastnet", width_halvings=1)  # as fit_width builds
    with pytest.raises(
        UserError, match=r"a fastnet of width 1, this run trains width 0.5; add --set width=2$"
    ):
        train(narrow, tmp_path / "x", log=lambda s: None)
    assert not (tmp_path / "x").exists()


def test_init_from_a_file_that_is_not_a_checkpoint_names_the_flag(
    pretrained_run, real_jpegs, tmp_path
):
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights")
    config = make_config(data=str(real_jpegs), data_root=str(pretrained_run / "d"), model="fastnet", classes=LAST5,
                         epochs=1, val_size=50, init_from=str(notes))  # fmt: skip
    with pytest.raises(UserError, match=r"^--init-from .*notes\.txt: not a checkpoint"):
        train(config, tmp_path / "x", log=lambda s: None)
    assert not (tmp_path / "x").exists()


def test_init_from_a_run_of_another_image_size_names_the_size_when_weights_do_not_fit(
    synthetic_images, tmp_path
):
    """It was torch's size mismatch of a classifier tensor, without a word of why."""
    train(_tiny(synthetic_images, tmp_path, val_size=0), tmp_path / "at32", log=lambda s: None)
    at40 = _tiny(
        synthetic_images, tmp_path, val_size=0, image_size=40, init_from=str(tmp_path / "at32")
    )
    with pytest.raises(UserError, match=r"size mismatch .*32 px images: add --set image_size=32$"):
        train(at40, tmp_path / "x", log=lambda s: None)


def test_weights_of_another_model_name_the_file_and_the_tensors_that_do_not_fit(tmp_path):
    """It said only "weights do not fit resnet18: Error(s) in loading state_dict for ResNet:"."""
    other = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3), "head.weight": torch.zeros(1)}, other)
    with pytest.raises(UserError) as err:
        build_model(ModelArgs("tv:resnet18", 10), weights=str(other))
    assert f"--weights {other}: they do not fit tv:resnet18" in str(err.value)
    for part in ("missing, e.g. bn1.weight", "1 unexpected, e.g. head.weight", "another shape"):
        assert part in str(err.value)


def test_weights_wrapped_under_state_dict_or_model_or_saved_from_dataparallel_load(tmp_path):
    """`{"state_dict": sd, "epoch": 3}` was refused: "1 unexpected, e.g. state_dict"."""
    from torchvision import models

    torch.manual_seed(1)
    original = models.resnet18(weights=None).state_dict()
    parallel = {"module." + k: v for k, v in original.items()}
    for name, saved in {
        "lightning": {"state_dict": original, "epoch": 3},
        "script": {"model": original, "arch": "resnet18"},
        "dataparallel": parallel,
        "both": {"state_dict": parallel, "model": "resnet18"},
    }.items():
        torch.save(saved, tmp_path / f"{name}.pth")
        net = build_model(ModelArgs("tv:resnet18", 10), weights=str(tmp_path / f"{name}.pth"))
        key = "layer4.1.conv2.weight"
        assert torch.equal(net.state_dict()[key], original[key]), name
    torch.save([original], tmp_path / "list.pth")
    with pytest.raises(UserError, match="list.pth: holds a list, not a state dict"):
        build_model(ModelArgs("tv:resnet18", 10), weights=str(tmp_path / "list.pth"))


def test_weights_of_a_compiled_model_or_a_lightning_checkpoint_load(tmp_path):
    """`_orig_mod.` (torch.compile) and `model.` (a LightningModule's attribute) were "122
    missing", and `net.` (another attribute name) still was; a prefix only some keys carry is no
    wrapper and stays."""
    from torchvision import models

    torch.manual_seed(2)
    original = models.resnet18(weights=None).state_dict()
    compiled = {"_orig_mod." + k: v for k, v in original.items()}
    lightning = {"state_dict": {"model." + k: v for k, v in original.items()}, "epoch": 3,
                 "global_step": 90, "pytorch-lightning_version": "2.4.0", "optimizer_states": []}  # fmt: skip
    net = {"state_dict": {"net." + k: v for k, v in original.items()}, "epoch": 3}
    for name, saved in {
        "compiled.pt": compiled,
        "lightning.ckpt": lightning,
        "net.ckpt": net,
    }.items():
        torch.save(saved, tmp_path / name)
        net = build_model(ModelArgs("tv:resnet18", 10), weights=str(tmp_path / name))
        key = "layer4.1.conv2.weight"
        assert torch.equal(net.state_dict()[key], original[key]), name
    partly = {("model." + k if k.startswith("layer") else k): v for k, v in original.items()}
    torch.save(partly, tmp_path / "partly.pt")
    with pytest.raises(UserError, match=r"unexpected, e\.g\. model\.layer1"):
        build_model(ModelArgs("tv:resnet18", 10), weights=str(tmp_path / "partly.pt"))


def test_unwrapping_stops_at_the_models_own_keys():
    """A net keeping its body under `self.model` lost that prefix too: `model.` was removed
    whenever every key carried it."""
    from cifarlab.models.adapt import unwrapped

    own = {"model.conv.weight": 1, "model.fc.weight": 2}
    assert unwrapped(own, own.keys()) == own
    assert unwrapped({"module." + k: v for k, v in own.items()}, own.keys()) == own
    other = {"a.conv.weight": 1, "a.b": 2}
    assert unwrapped(other, own.keys()) == other  # no removal fits: as given, named as saved


def test_an_empty_or_code_running_weights_file_is_one_line(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.touch()
    with pytest.raises(UserError, match=r"not a readable state dict \(the file is empty\)"):
        build_model(ModelArgs("tv-resnet18", 10), weights=str(empty))
    for junk in (b"\x80" + bytes(range(200)), b"a text file, not weights\n"):
        (tmp_path / "junk.pth").write_bytes(junk)
        with pytest.raises(UserError, match="junk.pth: .*state dict.*damaged") as damaged:
            build_model(ModelArgs("tv-resnet18", 10), weights=str(tmp_path / "junk.pth"))
        assert "\n" not in str(damaged.value)
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": print}, evil)
    with pytest.raises(UserError, match="refused to load") as refused:
        build_model(ModelArgs("tv-resnet18", 10), weights=str(evil))
    assert "weights_only" not in str(refused.value)


def _tiny(synthetic_images, root, **more):
    settings = {"model": "cnn", "width": 0.25, "epochs": 1, "batch_size": 8, "val_size": 6, **more}
    return make_config(data=str(synthetic_images), data_root=str(root / "d"), **settings)


def test_init_from_a_run_that_trained_on_this_runs_validation_images_is_refused(
    synthetic_images, tmp_path, capsys
):
    """A run of the same data that held out nothing, or another slice, learnt the images this
    run would pick best.pt on: its validation accuracy would be inflated without a word."""
    from cifarlab.cli import main

    train(_tiny(synthetic_images, tmp_path, val_size=0), tmp_path / "all", log=lambda s: None)
    train(_tiny(synthetic_images, tmp_path, seed=1), tmp_path / "seed1", log=lambda s: None)
    for earlier, count in (("all", "6 of the 6"), ("seed1", "[1-6] of the 6")):
        config = _tiny(synthetic_images, tmp_path, init_from=str(tmp_path / earlier))
        with pytest.raises(UserError, match=f"trained on {count} images this run holds out"):
            train(config, tmp_path / "x", log=lambda s: None)
        assert not (tmp_path / "x").exists()
    flags = ["--data", str(synthetic_images), "--data-root", str(tmp_path / "d"), "--model", "cnn",
             "--set", "width=0.25", "--epochs", "1", "--batch-size", "8", "--val-size", "6",
             "--no-progress", "--init-from", str(tmp_path / "all")]  # fmt: skip
    assert main(["train", "--out", str(tmp_path / "y"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "--init-from" in err and "--val-size 0" in err and len(err.splitlines()) == 1
    # the same slice, no slice at all, or other classes: nothing held out was trained on
    same = _tiny(synthetic_images, tmp_path, seed=1, init_from=str(tmp_path / "seed1"))
    train(same, tmp_path / "same", log=lambda s: None)
    everything = _tiny(synthetic_images, tmp_path, val_size=0, init_from=str(tmp_path / "seed1"))
    train(everything, tmp_path / "everything", log=lambda s: None)


def test_init_from_a_run_that_trained_on_the_datas_val_folder_names_the_folder_not_val_size(
    synthetic_images, tmp_path
):
    train(_tiny(synthetic_images, tmp_path, val_size=0), tmp_path / "all", log=lambda s: None)
    data = tmp_path / "with-val"
    shutil.copytree(synthetic_images / "test", data / "train")
    shutil.copytree(synthetic_images / "train", data / "val")  # what "all" trained on
    config = _tiny(synthetic_images, tmp_path, init_from=str(tmp_path / "all"), val_size=0)
    with pytest.raises(UserError, match=r"trained on \d+ of the 36 images of the data's val/") as e:
        train(dataclasses.replace(config, data=str(data)), tmp_path / "x", log=lambda s: None)
    assert "--val-size" not in str(e.value)  # the folder validates whatever it says


def test_the_validation_check_knows_images_by_their_pixels_not_their_files(
    synthetic_images, tmp_path
):
    """Each of these hid that the earlier run had learnt this run's validation images: the same
    files renamed into another order, more images beside them, another image_size, another
    on_bad_image. A duplicate this run also trains on is the data's, not a refusal."""
    train(_tiny(synthetic_images, tmp_path, val_size=0), tmp_path / "all", log=lambda s: None)
    renamed, more, twice = tmp_path / "renamed", tmp_path / "more", tmp_path / "twice"
    shutil.copytree(synthetic_images / "train", more)
    shutil.copytree(synthetic_images / "train", twice)
    for f in sorted((synthetic_images / "train").rglob("*.png")):
        (renamed / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, renamed / f.parent.name / f"{99 - int(f.stem)}.png")
        shutil.copy(f, twice / f.parent.name / f"copy-{f.name}")
    for f in (synthetic_images / "test").rglob("*.png"):
        shutil.copy(f, more / f.parent.name / f"new-{f.name}")
    original = str(synthetic_images / "train")
    for data, more_settings in ((renamed, {}), (more, {}), (original, {"image_size": 40}),
                                (original, {"on_bad_image": "skip"})):  # fmt: skip
        config = _tiny(synthetic_images, tmp_path, init_from=str(tmp_path / "all"), **more_settings)
        with pytest.raises(UserError, match=r"trained on [1-6] of the 6 images this run holds out"):
            train(dataclasses.replace(config, data=str(data)), tmp_path / "x", log=lambda s: None)
    old = torch.load(tmp_path / "all" / "best.pt", weights_only=False)
    del old["train_digests"]  # a checkpoint that cannot be checked says so, and is used
    torch.save(old, tmp_path / "old.pt")
    lines = []
    train(_tiny(synthetic_images, tmp_path, init_from=str(tmp_path / "old.pt")), tmp_path / "o",
          log=lines.append)  # fmt: skip
    assert any("keeps no train_digests" in line for line in lines)
    first = dataclasses.replace(_tiny(synthetic_images, tmp_path, lr=0.01), data=str(twice))
    train(first, tmp_path / "first", log=lambda s: None)
    again = dataclasses.replace(first, init_from=str(tmp_path / "first"))
    train(again, tmp_path / "again", log=lambda s: None)
