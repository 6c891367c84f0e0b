"""The Python API as a user meets it: `import cifarlab`, a recipe, a run, its report, and a
classifier fed paths, bytes, PIL images, arrays and tensors of any size."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cifarlab
from cifarlab.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env={**os.environ, **env},
        cwd=ROOT, timeout=600,
    )  # fmt: skip


def _quickstart():
    """examples/quickstart.py as a module: its main(argv) runs in this process (no second
    interpreter paying torch's import)."""
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_example_trains_evaluates_and_classifies(
    real_jpegs, tmp_path, monkeypatch, capsys
):
    # one epoch of fastnet at quarter width: the script's steps, not its accuracy (the tests on
    # the session's fastnet run check that training on these images learns)
    monkeypatch.setenv("CIFARLAB_DATA", str(tmp_path / "data-root"))
    summary = _quickstart().main(
        ["--data", str(real_jpegs), "--out", str(tmp_path / "run"), "--epochs", "1",
         "--val-size", "50", "--set", "width=0.25", "--set", "batch_size=64"]
    )  # fmt: skip
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert summary["classes"] == 10 and summary["classified"] == 3
    report = json.loads((tmp_path / "run" / "eval-val" / "report.json").read_text())
    assert report["num_images"] == 50 and report["accuracy"] == summary["accuracy"]
    assert summary["split"] == "val" and (tmp_path / "run" / "eval-val" / "report.html").is_file()


def test_quickstart_example_under_the_lessons_val_size_0_scores_the_test_split(
    synthetic_images, tmp_path, monkeypatch, capsys
):
    """No validation split: the example reports test accuracy (it asked for split="val" and
    ended in a UserError traceback after training)."""
    monkeypatch.setenv("CIFARLAB_DATA", str(tmp_path / "data-root"))
    summary = _quickstart().main(
        ["--data", str(synthetic_images), "--out", str(tmp_path / "run"), "--epochs", "1",
         "--val-size", "0", "--set", "width=0.25", "--set", "batch_size=12"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "epoch 1: train loss" in printed and "test acc" in printed and "nan" not in printed
    report = json.loads((tmp_path / "run" / "eval-test" / "report.json").read_text())
    assert summary["split"] == "test" and report["num_images"] == 12
    assert summary["accuracy"] == report["accuracy"] == pytest.approx(summary["test_acc"])
    assert summary["best_val_acc"] is None and summary["classified"] == 3


def test_import_cifarlab_loads_torch_only_when_the_api_is_used():
    code = (
        "import sys, cifarlab, cifarlab.cli, cifarlab.config  # `cifarlab --help` needs no torch\n"
        "assert 'torch' not in sys.modules, 'import cifarlab pulled in torch'\n"
        "import cifarlab.train, cifarlab.evaluate  # the modules that share the API's verbs\n"
        "assert callable(cifarlab.train_model) and callable(cifarlab.evaluate_model)\n"
        "assert 'load_model' in dir(cifarlab)\n"
    )
    done = _run(["-c", code])
    assert done.returncode == 0, done.stderr


def test_recipe_shortens_the_schedule_then_applies_checked_overrides():
    config = cifarlab.recipe("fast-cpu", epochs=3, lr=0.2, data="somewhere")
    assert (config.epochs, config.whiten_bias_epochs, config.lr) == (3, 1, 0.2)  # 3 of 9 -> 1 of 3
    assert config.recipe == "fast-cpu" and config.data == "somewhere" and config.time_budget == 0
    sgd = cifarlab.recipe("fast-sgd", epochs=2)
    assert sgd.warmup_epochs == pytest.approx(3.5 * 2 / 16)  # warm-up 3.5 of 16
    assert cifarlab.recipe("fast-cpu", budget=0.5).epochs == 4
    with pytest.raises(UserError, match="did you mean 'lr'"):
        cifarlab.recipe("fast-cpu", lrr=0.1)
    with pytest.raises(UserError, match="unknown recipe 'nope'.*fast-cpu"):
        cifarlab.recipe("nope")
    with pytest.raises(UserError, match="epochs or budget, not both"):
        cifarlab.recipe("fast-cpu", epochs=2, budget=0.5)
    for bad in (0, "two", 2.5, True):  # checked as the `epochs` key is
        with pytest.raises(UserError, match="'epochs' must be"):
            cifarlab.recipe("fast-cpu", epochs=bad)


@pytest.fixture(scope="module")
def trained(synthetic_images, tmp_path_factory):
    """A one-epoch cnn on the three colour classes, and its evaluation on their test/ folder."""
    out = tmp_path_factory.mktemp("api")
    config = cifarlab.recipe(
        "seed-cnn", epochs=1, data=str(synthetic_images), data_root=str(out / "d"),
        batch_size=8, val_size=6, device="cpu", threads=1, progress=False,
    )  # fmt: skip
    result = cifarlab.train_model(config, out / "run", log=None)
    return result, cifarlab.evaluate_model(result, split="test", device="cpu", log=None)


def test_train_model_returns_history_and_paths_and_evaluate_model_the_report(trained):
    result, report = trained
    assert [row["epoch"] for row in result.history] == [1]
    assert result.checkpoint == result.run_dir / "best.pt" and result.checkpoint.is_file()
    assert report["num_images"] == 12 and report["split"] == "test"  # 3 classes x 4 test images
    assert set(report["per_class"]) == {"blue", "green", "red"}
    confusion = report["confusion_matrix"]  # accuracy: the share of the 12 images on its diagonal
    assert report["accuracy"] == sum(confusion[i][i] for i in range(3)) / 12
    assert (result.run_dir / "eval-test" / "report.json").is_file()


def test_classifier_gives_one_answer_for_a_file_and_every_in_memory_form_of_it(
    trained, synthetic_images
):
    model = cifarlab.load_model(trained[0])
    path = synthetic_images / "test" / "green" / "000.png"
    pil = Image.open(path).convert("RGB")
    array = np.asarray(pil)  # HWC uint8, as PIL gives it
    chw = torch.from_numpy(array).permute(2, 0, 1)  # CHW, as torchvision gives it
    forms = [
        str(path), path, path.read_bytes(), pil, array, array / 255.0, chw, chw.float() / 255,
        chw[None], [pil],
    ]  # fmt: skip
    probs = [model.probabilities(x) for x in forms]
    for p in probs:
        assert p.shape == (1, 3) and np.allclose(p, probs[0], atol=1e-6)
    assert np.isclose(probs[0].sum(), 1.0)
    assert model.predict([path, path]) == [model.classes[int(probs[0].argmax())]] * 2
    top = model.top_k(path, k=2)[0]
    assert len(top) == 2 and top[0][1] >= top[1][1] and top[0][0] in model.classes


def test_a_float_pil_image_is_read_as_floats_in_0_1_as_arrays_are(trained, synthetic_images):
    """A mode F image (32-bit floats) went through PIL's conversion, which clips it to 0 or 1
    of 255: black."""
    model = cifarlab.load_model(trained[0])
    grey = Image.open(synthetic_images / "test" / "green" / "000.png").convert("L")
    floats = Image.fromarray(np.asarray(grey, np.float32) / 255.0, "F")
    assert np.allclose(model.probabilities(floats), model.probabilities(grey), atol=1e-6)
    with pytest.raises(UserError, match="float image with values .*: give floats in 0..1"):
        model.probabilities(Image.fromarray(np.asarray(grey, np.float32), "F"))


def test_classifier_resizes_any_size_as_training_files_were(trained, synthetic_images, tmp_path):
    model = cifarlab.load_model(trained[0].run_dir)  # a run directory works as well as a Result
    big = Image.open(synthetic_images / "test" / "red" / "001.png").convert("RGB").resize((96, 80))
    big.save(tmp_path / "big.png")
    from_file = model.probabilities(tmp_path / "big.png")
    assert np.allclose(model.probabilities(big), from_file, atol=1e-6)
    assert np.allclose(model.probabilities(np.asarray(big)), from_file, atol=1e-6)
    grey, rgba = big.convert("L"), big.convert("RGBA")
    assert model.probabilities([np.asarray(grey), rgba, big]).shape == (3, 3)


def test_classifier_refuses_what_it_cannot_read_with_the_fix(trained, tmp_path):
    model = cifarlab.load_model(trained[0])
    with pytest.raises(UserError, match="floats.*uint8"):
        model.predict(np.full((32, 32, 3), 200.0))
    with pytest.raises(UserError, match=r"shape \(32, 32, 5\)"):
        model.predict(np.zeros((32, 32, 5), np.uint8))
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(UserError, match="notes.png.*readable"):
        model.predict(tmp_path / "notes.png")
    with pytest.raises(UserError, match="no such run directory"):
        cifarlab.load_model(tmp_path / "missing")
    assert model.probabilities([]).shape == (0, 3)
    with pytest.raises(UserError, match="NaN or infinite"):
        model.predict(np.full((32, 32, 3), np.nan))
    with pytest.raises(UserError, match="dtype bool"):
        model.predict(np.zeros((32, 32, 3), bool))
    for empty in (np.zeros((0, 0)), np.zeros((0, 5, 3), np.uint8), torch.zeros(3, 0, 0)):
        with pytest.raises(UserError, match="empty image"):
            model.predict(empty)
    with pytest.raises(UserError, match="k=0; give a whole number >= 1"):
        model.top_k(np.zeros((32, 32, 3), np.uint8), k=0)
    half = torch.rand(3, 32, 32)  # bf16 tensors (numpy has no bf16) are read as their floats
    assert model.predict(half.to(torch.bfloat16)) == model.predict(half.to(torch.bfloat16).float())
    with pytest.raises(UserError, match="split 'train'"):
        cifarlab.evaluate_model(trained[0], split="train")
    with pytest.raises(UserError, match="tta 'flop'"):
        cifarlab.evaluate_model(trained[0], tta="flop")


def test_a_run_on_a_relative_data_path_is_evaluated_from_another_folder(
    synthetic_images, tmp_path, monkeypatch
):
    monkeypatch.chdir(synthetic_images.parent)
    config = cifarlab.TrainConfig(  # not through recipe(): train itself stores the path absolute
        data=f"./{synthetic_images.name}", data_root=str(tmp_path / "d"), epochs=1, width=0.25,
        batch_size=8, val_size=6, device="cpu", threads=1, progress=False,
    )  # fmt: skip
    result = cifarlab.train_model(config, tmp_path / "run", log=None)
    monkeypatch.chdir(tmp_path)
    assert cifarlab.evaluate_model(result, device="cpu", log=None)["num_images"] == 6
    assert cifarlab.evaluate_model(result, split="test", device="cpu", log=None)["num_images"] == 12


def test_train_model_into_an_existing_run_says_resume_true_not_the_cli_flag(trained):
    result, _ = trained
    config = cifarlab.recipe("seed-cnn", epochs=1, device="cpu")
    with pytest.raises(UserError, match="resume=True") as err:
        cifarlab.train_model(config, result.run_dir, log=None)
    assert "--resume" not in str(err.value) and "--out" not in str(err.value)


def test_train_model_stopped_by_ctrl_c_says_resume_true_not_the_cli_flag(
    synthetic_images, tmp_path
):
    """A notebook's interrupt was told "Resume with: cifarlab train --out ... --resume"."""
    import signal

    from cifarlab.errors import Interrupted

    config = cifarlab.recipe(
        "seed-cnn", epochs=2, data=str(synthetic_images), data_root=str(tmp_path / "d"),
        batch_size=8, val_size=6, device="cpu", threads=1, progress=False,
    )  # fmt: skip

    def stop_after_epoch_1(line: str) -> None:
        if line.startswith("epoch 1/"):
            os.kill(os.getpid(), signal.SIGINT)  # what a notebook's interrupt sends

    with pytest.raises(Interrupted, match=r"Resume with: train_model\(config, out, resume=True\)"):
        cifarlab.train_model(config, tmp_path / "run", log=stop_after_epoch_1)
    result = cifarlab.train_model(config, tmp_path / "run", resume=True, log=None)
    assert [row["epoch"] for row in result.history] == [1, 2]


def test_a_run_with_a_relative_cache_folder_never_decodes_into_another_working_directory(
    tmp_path, monkeypatch
):
    """The run stores its data_root absolute too: evaluated from another folder, it decoded the
    data again (for cifar10: downloaded it) into a relative cache there."""
    from tests.conftest import write_synthetic_folder

    write_synthetic_folder(tmp_path / "a" / "data")
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    config = cifarlab.recipe(
        "seed-cnn", epochs=1, data="data", data_root="cache", batch_size=8, val_size=6,
        device="cpu", threads=1, progress=False, width=0.25,
    )  # fmt: skip
    result = cifarlab.train_model(config, tmp_path / "run", log=None)
    monkeypatch.chdir(tmp_path / "b")
    assert cifarlab.evaluate_model(result, device="cpu", log=None)["num_images"] == 6
    assert list((tmp_path / "b").iterdir()) == []


def test_classifier_says_what_a_missing_file_a_folder_and_junk_bytes_are(
    trained, synthetic_images, tmp_path, monkeypatch
):
    """Each said "not a regular file (a dangling link, pipe or device?)", or named the bytes by
    a BytesIO's repr; a folder is refused (one class per image given), `~` is the home folder."""
    model = cifarlab.load_model(trained[0])
    with pytest.raises(UserError, match="nope.jpg: no such file"):
        model.predict([tmp_path / "nope.jpg"])
    with pytest.raises(UserError, match="a folder; give its image files"):
        model.predict([str(synthetic_images / "test" / "red")])
    with pytest.raises(UserError, match="the given bytes: not a readable image") as err:
        model.predict(b"junk")
    assert "BytesIO" not in str(err.value)
    with pytest.raises(UserError, match="batch_size=0"):
        cifarlab.load_model(trained[0], batch_size=0)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "red.png").write_bytes((synthetic_images / "test" / "red" / "000.png").read_bytes())
    assert model.predict("~/red.png") == model.predict(tmp_path / "red.png")


def test_train_model_takes_a_dict_and_its_result_agrees_with_result_json(
    synthetic_images, tmp_path
):
    """A dict is `recipe`'s arguments (it was an AttributeError); without a validation split
    the val accuracies are None as result.json's nulls (they were NaN); seconds are rounded as
    result.json's are with a final TTA pass too."""
    base = {"epochs": 1, "data": str(synthetic_images), "data_root": str(tmp_path / "d"),
            "width": 0.25, "batch_size": 8, "device": "cpu", "threads": 1, "progress": False}  # fmt: skip
    for val_size, tta in ((0, "none"), (6, "flip")):
        out = tmp_path / f"run{val_size}"
        result = cifarlab.train_model({**base, "val_size": val_size, "tta": tta}, out, log=None)
        saved = json.loads((out / "result.json").read_text())
        assert result.to_dict() == saved  # NaN != None: they disagreed
        assert (result.best_val_acc is None) == (saved["final_val_acc"] is None) == (not val_size)
        assert result.seconds == round(result.seconds, 2)
    with pytest.raises(UserError, match="config of type int"):
        cifarlab.train_model(3, tmp_path / "x", log=None)
    with pytest.raises(UserError, match="unknown config key '1'"):  # it was a raw TypeError
        cifarlab.train_model({1: 2}, tmp_path / "x", log=None)
    with pytest.raises(UserError, match="out is empty"):  # it trained into the working folder
        cifarlab.train_model({**base, "val_size": 6}, "", log=None)
