"""Every exercise suite runs end to end at a tiny budget on real images with a test split, and
reports test accuracy; Exercise 4 with a local file standing in for torchvision's ImageNet weights.
Each suite runs once (`exercise`), at 16x16 pixels: the tests that read it share it."""

import json
import shutil

import pytest
import torch

from cifarlab.suites import SuiteOptions, load_suite, run_suite

TINY = {"val_size": 50, "batch_size": 50, "threads": 1, "progress": False, "width": 0.25,
        "subset": 200, "image_size": 16}  # fmt: skip


@pytest.fixture(scope="module")
def real_with_test(real_jpegs, tmp_path_factory):
    """The real JPEGs split per class: 55 images to train/, 5 to test/."""
    root = tmp_path_factory.mktemp("real-test")
    for folder in sorted((real_jpegs / "train").iterdir()):
        for i, image in enumerate(sorted(folder.iterdir())):
            dest = root / ("test" if i % 12 == 0 else "train") / folder.name / image.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, dest)
    return root


@pytest.fixture(scope="module")
def imagenet_stand_in(tmp_path_factory):
    """A random ResNet-18 state dict where torchvision looks for its ImageNet download."""
    from torchvision import models

    home = tmp_path_factory.mktemp("torch")
    target = home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    target.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(models.resnet18(weights=None).state_dict(), target)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TORCH_HOME", str(home))
        yield target


@pytest.fixture(scope="module")
def exercise(request, real_with_test, imagenet_stand_in, tmp_path_factory):
    """Suite exercise-<param> run at budget 0.001: (its name, rows, --out, what it logged)."""
    name, out = f"exercise-{request.param}", tmp_path_factory.mktemp("exercise")
    data_root = tmp_path_factory.getbasetemp() / "exercise-data"  # one decoded cache for all
    overrides = {**TINY, "data": str(real_with_test), "data_root": str(data_root)}
    messages = []
    rows = run_suite(
        name, SuiteOptions(out / "out", overrides=overrides, budget=0.001), log=messages.append
    )
    return name, rows, out / "out", messages


@pytest.mark.parametrize("exercise", [1, 2, 3, 4, 5], indirect=True)
def test_exercise_suite_runs_end_to_end_and_reports_test_accuracy(exercise):
    name, rows, out, messages = exercise
    assert not [m for m in messages if "cannot start" in m], messages
    assert [r["run"] for r in rows] == [r.name for r in load_suite(name, {"data": "x"}).runs]
    for r in rows:  # the table reports the test accuracy each run measured and stored
        stored = json.loads((out / r["run"] / "result.json").read_text())
        assert r["test_acc"] == pytest.approx(stored["test_acc"])
    table = (out / "results.md").read_text()
    assert "test acc" in table
    if name == "exercise-5":
        assert "gain over previous" in table
    if name == "exercise-3":
        assert (out / "mixup_examples.png").is_file()
    for picture in ("curves_val_acc.png", "curves_train_loss.png", "index.html"):
        assert (out / picture).is_file()


@pytest.mark.parametrize("exercise", [4], indirect=True)
def test_a_budget_too_short_to_unfreeze_still_fine_tunes_one_epoch(exercise):
    suite = load_suite("exercise-4", {"data": "x"}, budget=0.02)
    staged = next(r.config for r in suite.runs if r.name == "head-then-finetune")
    assert staged.freeze_epochs >= 1 and staged.epochs - staged.freeze_epochs >= 1
    said = "\n".join(m for m in exercise[3] if "[head-then-finetune]" in m)  # budget 0.001
    assert "epochs 1-1 of 2: only the head trains" in said and "freshly initialised" in said
    assert "backbone unfrozen" in said


def test_suite_recipe_runs_every_arm_on_lesson_cnn_with_its_own_settings_on_top(
    real_with_test, tmp_path
):
    overrides = {**TINY, "data": str(real_with_test), "data_root": str(tmp_path / "d"),
                 "val_size": 0, "workers": 0}  # fmt: skip
    suite = load_suite("exercise-2", overrides, budget=0.001, recipe_for_all="lesson-cnn")
    configs = {r.name: r.config for r in suite.runs}
    assert {c.loader for c in configs.values()} == {"torchvision"}
    assert {c.recipe for c in configs.values()} == {"lesson-cnn"}
    assert (configs["none"].crop_padding, configs["crop-flip"].jitter_brightness) == (0, 0.0)
    assert configs["crop-flip-jitter"].jitter_brightness == 0.2
    opts = SuiteOptions(tmp_path / "out", overrides=overrides, budget=0.001, recipe="lesson-cnn")
    messages = []
    rows = run_suite("exercise-2", opts, log=messages.append)
    assert not [m for m in messages if "cannot start" in m], messages
    assert all("test_acc" in r for r in rows)


def test_suite_weights_go_to_the_pretrained_arms_only(imagenet_stand_in, tmp_path):
    suite = load_suite("exercise-4", {"data": "x", "weights": str(imagenet_stand_in)})
    weights = {r.name: r.config.weights for r in suite.runs}
    assert weights == {"scratch": "", "pretrained": str(imagenet_stand_in),
                       "head-then-finetune": str(imagenet_stand_in)}  # fmt: skip


def test_cli_suite_weights_flag_and_set_weights_never_reach_the_scratch_arm(
    imagenet_stand_in, tmp_path, monkeypatch
):
    from cifarlab import cli, suites

    seen = {}
    monkeypatch.setattr(suites, "run_suite", lambda name, opts: seen.setdefault("o", opts) and [])
    for flags in (["--weights", str(imagenet_stand_in)], ["--set", f"weights={imagenet_stand_in}"]):
        cli.main(["suite", "exercise-4", "--data", "x", "--out", str(tmp_path / "o"), *flags])
        suite = suites.load_suite("exercise-4", seen.pop("o").overrides)
        assert {r.name: r.config.weights for r in suite.runs} == {
            "scratch": "", "pretrained": str(imagenet_stand_in),
            "head-then-finetune": str(imagenet_stand_in),
        }  # fmt: skip
