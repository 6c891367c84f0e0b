"""What --resume may and may not change, the data fingerprint, the lesson's val-size 0 protocol,
and the checkpointer's promises."""

import math
import shutil
from pathlib import Path

import pytest
import torch

from cifarlab.checkpoint import Checkpointer, NonFiniteWeights, load_checkpoint
from cifarlab.cli import main
from cifarlab.errors import UserError
from cifarlab.rundir import RESULT_NUMBERS, RESULT_OPTIONAL, read_metrics
from cifarlab.train import train
from tests.conftest import disk_full_midway, make_config, write_synthetic_folder

QUIET = lambda s: None  # noqa: E731


def _config(data, tmp_path, **more):
    base = dict(data=str(data), data_root=str(tmp_path / "d"), model="cnn", width=0.25, epochs=2,
                batch_size=8, val_size=6, lr=0.02, warmup_epochs=0.0, tta="none", threads=1)  # fmt: skip
    return make_config(**{**base, **more})


def test_resume_refuses_a_changed_config_and_names_the_keys(synthetic_images, tmp_path, capsys):
    train(_config(synthetic_images, tmp_path, epochs=1), tmp_path / "run", log=QUIET)
    (tmp_path / "run" / "last.pt").unlink()  # pretend it stopped early: keep best.pt as last
    shutil.copy(tmp_path / "run" / "best.pt", tmp_path / "run" / "last.pt")
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    ckpt["epoch"] = 0  # "mid-run": not finished
    torch.save(ckpt, tmp_path / "run" / "last.pt")
    code = main(
        ["train", "--out", str(tmp_path / "run"), "--resume", "--lr", "0.5", "--epochs", "5"]
    )
    err = capsys.readouterr().err
    assert (
        code == 2
        and "lr: 0.02 -> 0.5" in err
        and "epochs: 1 -> 5" in err
        and "Traceback" not in err
    )


def test_a_finished_run_resumed_says_so_and_reports_its_own_figures(
    synthetic_images, tmp_path, capsys
):
    first = train(_config(synthetic_images, tmp_path), tmp_path / "run", log=QUIET)
    before = (tmp_path / "run" / "metrics.csv").read_text()
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "already finished all 2 epochs" in out
    assert f"best val acc {first.best_val_acc:.2%}, final {first.final_val_acc:.2%}" in out
    assert (tmp_path / "run" / "metrics.csv").read_text() == before


def test_resume_with_a_recipe_file_compares_what_it_sets_not_its_name(
    synthetic_images, tmp_path, capsys
):
    first, other = tmp_path / "a" / "mine.yaml", tmp_path / "b" / "mine.yaml"
    for path, text in ((first, "base: seed-cnn\nlr: 0.05\n"), (other, "base: fast\nlr: 0.9\n")):
        path.parent.mkdir()
        path.write_text(text)
    data = ["--data", str(synthetic_images), "--data-root", str(tmp_path / "d"), "--epochs", "1",
            "--batch-size", "8", "--val-size", "6", "--set", "width=0.25", "--no-progress"]  # fmt: skip
    run = ["train", "--out", str(tmp_path / "run"), "--recipe"]
    assert main([*run, str(first), *data]) == 0
    assert main([*run, str(first), "--resume", "--no-progress"]) == 0  # the same recipe: fine
    assert "already finished" in capsys.readouterr().out
    assert main([*run, str(other), "--resume", "--no-progress"]) == 2  # same name, other contents
    err = capsys.readouterr().err
    assert "model: 'cnn' -> 'fastnet'" in err and "lr: 0.05 -> 0.9" in err


def test_files_left_out_of_a_run_are_listed_in_the_run_and_a_failed_rewrite_keeps_the_list(
    tmp_path, monkeypatch
):
    data = write_synthetic_folder(tmp_path / "data")
    (data / "red" / "notes.txt").write_text("not an image")
    messages, stop = [], _stop_after("epoch 1/2")
    config = _config(data, tmp_path, on_bad_image="skip", save_every_steps=1)
    with pytest.raises(UserError):  # stopped after the first epoch
        train(config, tmp_path / "run", log=lambda m: (messages.append(m), stop(m)))
    listed = (tmp_path / "run" / "skipped_images.txt").read_text().splitlines()
    assert listed == [f"{data / 'red' / 'notes.txt'}: not ending in .bmp/.jpeg/.jpg/.png/.webp"]
    assert any("1 skipped (listed in skipped_images.txt)" in m for m in messages)
    disk_full_midway(monkeypatch, "skipped_images")  # the resume's rewrite of the list fails
    with pytest.raises(OSError, match="No space left"):
        train(config, tmp_path / "run", resume=True, log=QUIET)
    assert (tmp_path / "run" / "skipped_images.txt").read_text().splitlines() == listed


def test_resume_after_the_data_changed_is_refused(tmp_path):
    data = write_synthetic_folder(tmp_path / "data")
    config = _config(data, tmp_path, epochs=2, save_every_steps=1)
    with pytest.raises(UserError):  # stop after the first epoch by making the second impossible
        train(config, tmp_path / "run", log=_stop_after("epoch 1/2"))
    write_synthetic_folder(tmp_path / "data", classes=("red", "green", "blue", "gray"))
    with pytest.raises(UserError, match="data changed"):
        train(config, tmp_path / "run", resume=True, log=QUIET)


def test_resume_of_a_subset_run_whose_data_shrank_says_the_data_changed(tmp_path, capsys):
    """Its --subset no longer fitting the data is the data changing, not a --subset to lower."""
    data = write_synthetic_folder(tmp_path / "data")
    config = _config(data, tmp_path, epochs=2, save_every_steps=1, subset=30)
    with pytest.raises(UserError):
        train(config, tmp_path / "run", log=_stop_after("epoch 1/2"))
    shutil.rmtree(data / "blue")
    code = main(["train", "--out", str(tmp_path / "run"), "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "data changed" in err and "subset=30" in err and "Traceback" not in err


def test_resume_whose_subset_lost_a_class_beside_a_val_folder_does_not_advise_val_size(
    tmp_path, capsys
):
    data = write_synthetic_folder(tmp_path / "data" / "train").parent
    write_synthetic_folder(data / "val", per_class=2)
    config = _config(data, tmp_path, subset=10, batch_size=4)
    with pytest.raises(UserError):
        train(config, tmp_path / "run", log=_stop_after("epoch 1/2"))
    for f in sorted((data / "train" / "blue").iterdir())[1:]:
        f.unlink()  # blue's one image left: --subset 10 keeps none of it
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "data changed" in err and "blue" in err and "--subset" in err
    assert "--val-size" not in err  # a val/ folder validates whatever it says


def _stopped_after_one_epoch_with_a_test_split(tmp_path, test=True) -> tuple[Path, list[str]]:
    """The lesson's protocol (no validation split, test scored every epoch) stopped after epoch
    1 of 2: its data folder, and the command line that resumes it."""
    data = write_synthetic_folder(tmp_path / "data" / "train").parent
    if test:
        write_synthetic_folder(data / "test", per_class=4)
    with pytest.raises(UserError):
        train(_config(data, tmp_path, val_size=0), tmp_path / "run", log=_stop_after("epoch 1/2"))
    return data, ["train", "--out", str(tmp_path / "run"), "--resume", "--no-progress"]


def test_resume_after_the_test_split_changed_is_refused(tmp_path, capsys):
    data, resume = _stopped_after_one_epoch_with_a_test_split(tmp_path)
    (data / "test" / "red" / "000.png").unlink()
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert "data changed" in err and "test split" in err and "Traceback" not in err
    write_synthetic_folder(data / "test", per_class=4)  # the same images again
    assert main(resume) == 0


def test_a_test_split_added_before_resume_is_scored_from_then_on(tmp_path):
    data, resume = _stopped_after_one_epoch_with_a_test_split(tmp_path, test=False)
    write_synthetic_folder(data / "test", per_class=4)  # not a second test set: the first
    assert main(resume) == 0
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert math.isnan(rows[0]["test_acc"]) and not math.isnan(rows[1]["test_acc"])


def test_an_unreadable_image_on_resume_is_to_be_restored_not_skipped(tmp_path, capsys):
    """Skipping it is a config change resume refuses; a new run may skip it."""
    data, resume = _stopped_after_one_epoch_with_a_test_split(tmp_path)
    (data / "test" / "red" / "000.png").write_text("not an image")
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert "data changed" in err and "restore that file" in err and "on_bad_image" not in err
    fresh = ["train", "--data", str(data), "--data-root", str(tmp_path / "d"), "--no-progress"]
    assert main([*fresh, "--out", str(tmp_path / "new")]) == 2
    assert "--set on_bad_image=skip" in capsys.readouterr().err


def _stop_after(marker):
    def log(message):
        if marker in message:
            raise UserError("stop here")

    return log


def test_val_size_zero_trains_on_everything_and_reports_test_accuracy(synthetic_images, tmp_path):
    messages = []
    result = train(
        _config(synthetic_images, tmp_path, val_size=0), tmp_path / "run", log=messages.append
    )
    assert result.test_acc is not None and result.best_val_acc is None  # as result.json has it
    assert any("no model selection, best.pt is the last epoch's weights" in m for m in messages)
    assert any("test acc of best.pt" in m for m in messages)
    best, last = (load_checkpoint(tmp_path / "run" / n)["model"] for n in ("best.pt", "last.pt"))
    assert all(torch.equal(best[k], last[k]) for k in best)
    assert len(read_metrics(tmp_path / "run" / "metrics.csv")) == 2
    assert main(["evaluate", str(tmp_path / "run")]) == 0  # it scores test: there is no val
    assert (tmp_path / "run" / "eval-test" / "report.html").is_file()


def test_fixed_cifar10_normalisation_travels_in_the_checkpoint(synthetic_images, tmp_path):
    train(
        _config(synthetic_images, tmp_path, epochs=1, normalize="cifar10"),
        tmp_path / "run",
        log=QUIET,
    )
    assert load_checkpoint(tmp_path / "run" / "best.pt")["mean"] == [0.4914, 0.4822, 0.4465]


def test_lr_column_after_a_mid_epoch_resume_is_the_epochs_starting_lr(
    synthetic_images, tmp_path, monkeypatch
):
    config = _config(synthetic_images, tmp_path, epochs=2, save_every_steps=1, schedule="cosine")
    whole = train(config, tmp_path / "whole", log=QUIET).history  # 30 images / 8: 3 steps an epoch
    _power_cut_in_epoch_two(monkeypatch, config, tmp_path / "cut")
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["next_step"] == 1
    resumed = train(config, tmp_path / "cut", resume=True, log=QUIET).history
    assert [r["lr"] for r in resumed] == [r["lr"] for r in whole]


def test_checkpointer_never_saves_non_finite_weights(tmp_path):
    saver = Checkpointer(tmp_path)
    saver.save({"model": {"w": torch.ones(2)}}, val_acc=0.5)
    with pytest.raises(NonFiniteWeights, match="last good state"):
        saver.save({"model": {"w": torch.tensor([1.0, float("nan")])}}, val_acc=0.9)
    assert torch.equal(torch.load(tmp_path / "last.pt")["model"]["w"], torch.ones(2))


def test_disk_full_while_saving_says_last_pt_is_intact_and_how_to_go_on(tmp_path, monkeypatch):
    import errno

    saver = Checkpointer(tmp_path)
    saver.save({"model": {"w": torch.ones(2)}}, val_acc=0.5)

    def full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("cifarlab.checkpoint.atomic_save", full)
    with pytest.raises(UserError, match=r"No space left.*intact.*--resume"):
        saver.save({"model": {"w": torch.zeros(2)}}, val_acc=0.6)
    assert torch.equal(torch.load(tmp_path / "last.pt")["model"]["w"], torch.ones(2))


def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_one_line(
    synthetic_images, tmp_path, capsys
):
    train(_config(synthetic_images, tmp_path, epochs=1), tmp_path / "run", log=QUIET)
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    ckpt["model_args"]["width"] = 0.5  # a config edited after training
    torch.save(ckpt, tmp_path / "edited.pt")
    assert main(["evaluate", str(tmp_path / "edited.pt")]) == 2
    err = capsys.readouterr().err
    assert "do not fit" in err and "Traceback" not in err
    del ckpt["classes"]
    torch.save(ckpt, tmp_path / "cut.pt")
    assert main(["predict", str(tmp_path / "cut.pt"), str(synthetic_images / "test")]) == 2
    assert "classes is missing" in capsys.readouterr().err
    for command in ("evaluate", "calibrate"):
        assert main([command, str(tmp_path / "cut.pt")]) == 2
        err = capsys.readouterr().err
        assert "classes is missing" in err and "Traceback" not in err, command


def test_a_suite_rerun_with_other_settings_refuses_the_old_runs(synthetic_images, tmp_path):
    from cifarlab.suites import SuiteOptions, run_suite

    path = tmp_path / "s.yaml"
    path.write_text("runs:\n  - {name: a, recipe: seed-cnn, set: {width: 0.25, epochs: 1}}\n")
    base = {"data": str(synthetic_images), "data_root": str(tmp_path / "d"), "batch_size": 8, "val_size": 6,
            "threads": 1, "progress": False}  # fmt: skip
    run_suite(str(path), SuiteOptions(tmp_path / "out", overrides=base), log=QUIET)
    with pytest.raises(UserError, match=r"another config \(lr: 0.1 -> 0.05"):
        run_suite(
            str(path), SuiteOptions(tmp_path / "out", overrides={**base, "lr": 0.05}), log=QUIET
        )


def test_resume_before_the_first_checkpoint_keeps_the_runs_own_config(
    synthetic_images, tmp_path, capsys
):
    config = _config(synthetic_images, tmp_path, epochs=1)
    (tmp_path / "run").mkdir()
    from cifarlab.config import save_config

    save_config(config, tmp_path / "run" / "config.yaml")  # killed before its first save
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--lr", "0.3"]) == 2
    assert "lr: 0.02 -> 0.3" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--no-progress"]) == 0
    assert "starting it over" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "run" / "last.pt")["config"]["model"] == "cnn"


def test_resume_may_not_change_the_length_a_time_budget_chose(
    synthetic_images, tmp_path, capsys, monkeypatch
):
    from cifarlab.budget import Timings

    monkeypatch.setattr(
        "cifarlab.budget.measure", lambda run, **_: Timings(step=1.0, val_image=0.001)
    )
    config = _config(synthetic_images, tmp_path, epochs=4, time_budget=4.5, save_every_steps=1)
    train(config, tmp_path / "run", log=QUIET)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    torch.save({**ckpt, "epoch": 0, "next_step": 1}, tmp_path / "run" / "last.pt")
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--epochs", "9"]) == 2
    assert "epochs: " in capsys.readouterr().err
    train(config, tmp_path / "run", resume=True, log=QUIET)  # the same budgeted config resumes


def test_train_steps_that_disagree_with_epochs_are_refused(synthetic_images, tmp_path):
    with pytest.raises(UserError, match="train_steps=100 is .* epochs=2"):
        train(_config(synthetic_images, tmp_path, train_steps=100), tmp_path / "run", log=QUIET)


def test_resume_into_a_folder_of_other_files_says_there_is_no_run(
    tmp_path, capsys, synthetic_images
):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep")
    args = ["train", "--out", str(tmp_path / "out"), "--resume", "--data", str(synthetic_images)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no run to continue" in err and "add --resume" not in err
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep"


def test_a_suite_out_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("keep")
    assert main(["suite", "exercise-1", "--data", "x", "--out", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "afile").read_text() == "keep"


def test_export_never_overwrites_the_runs_own_files_even_with_force(
    synthetic_images, tmp_path, capsys
):
    train(_config(synthetic_images, tmp_path, epochs=1), tmp_path / "run", log=QUIET)
    for name in ("last.pt", "config.yaml", "metrics.csv"):
        before = (tmp_path / "run" / name).read_bytes()
        assert (
            main(
                ["export", str(tmp_path / "run"), "--out", str(tmp_path / "run" / name), "--force"]
            )
            == 2
        )
        assert "being exported" in capsys.readouterr().err
        assert (tmp_path / "run" / name).read_bytes() == before


@pytest.mark.parametrize(
    "more",
    [
        {"policy": "trivialaugment"},
        {"loader": "torchvision", "workers": 0, "flip": True},
        # the lesson's protocol: its loader's workers, all images trained on
        {"loader": "torchvision", "workers": 2, "flip": True, "val_size": 0, "batch_size": 12},
    ],
)
def test_a_run_with_dropout_and_torchvisions_draws_resumes_exactly_and_leaves_torchs_generator(
    synthetic_images, tmp_path, monkeypatch, more
):
    config = _config(synthetic_images, tmp_path, save_every_steps=1, **more)  # cnn: dropout
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    train(config, tmp_path / "whole", log=QUIET)
    assert torch.equal(torch.rand(3), expected)  # the caller's generator, as it left it
    _power_cut_in_epoch_two(monkeypatch, config, tmp_path / "cut")
    torch.manual_seed(99)  # whatever the caller's generator holds, the resumed steps are the same
    train(config, tmp_path / "cut", resume=True, log=QUIET)
    whole, cut = (load_checkpoint(tmp_path / d / "last.pt")["model"] for d in ("whole", "cut"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


def _power_cut_in_epoch_two(monkeypatch, config, run_dir) -> None:
    """Train `config` into `run_dir` until a crash at its 5th optimiser step (with 2-step
    epochs: epoch 2's second step, when last.pt holds epoch 2 after its first)."""
    import cifarlab.train as training

    real_step, calls = training.optimizer_step, []

    def crash_in_epoch_two(*args):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("power cut")
        real_step(*args)

    monkeypatch.setattr(training, "optimizer_step", crash_in_epoch_two)
    with pytest.raises(RuntimeError, match="power cut"):
        train(config, run_dir, log=QUIET)
    monkeypatch.setattr(training, "optimizer_step", real_step)


def _stopped_after_epoch_one(synthetic_images, tmp_path) -> Path:
    """A run killed after epoch 1's last.pt and metrics row, before epoch 2's."""

    class Crash(Exception):
        pass

    def crash(row):
        raise Crash

    with pytest.raises(Crash):
        train(_config(synthetic_images, tmp_path), tmp_path / "run", log=QUIET, on_epoch=crash)
    return tmp_path / "run"


def test_a_metrics_row_torn_by_a_crash_is_written_again_on_resume(
    synthetic_images, tmp_path, capsys
):
    run = _stopped_after_epoch_one(synthetic_images, tmp_path)
    with open(run / "metrics.csv", "a") as f:
        f.write("2,0.01,2.30")  # epoch 2's row cut short: the process died while appending it
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0  # a TypeError
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "lacks" not in out + err  # epoch 1's row is whole
    assert [r["epoch"] for r in read_metrics(run / "metrics.csv")] == [1.0, 2.0]


@pytest.mark.parametrize("name", ["metrics.csv", "config.yaml"])
def test_a_folder_where_a_run_file_goes_is_one_line_before_resuming(
    synthetic_images, tmp_path, capsys, name
):
    run = tmp_path / "run"
    train(_config(synthetic_images, tmp_path, epochs=1), run, log=QUIET)
    (run / name).unlink()
    (run / name).mkdir()  # writing the file would fail mid-run (IsADirectoryError)
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{name} is a folder where the run keeps a file" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "damaged",
    [None, b"\xba\xff" * 50, b"hello,world\n1,2\n", b"epoch,lr\n-inf,0.1\n-1,0.1\n1.5,0.1\n"],
    ids=["deleted", "binary", "no-epoch-column", "epochs-not-whole-from-1"],
)
def test_resuming_without_metrics_rows_says_which_epochs_the_curves_lack(
    synthetic_images, tmp_path, damaged
):
    run, said = _stopped_after_epoch_one(synthetic_images, tmp_path), []
    if damaged is None:
        (run / "metrics.csv").unlink()
    else:  # were UnicodeDecodeError, KeyError and OverflowError tracebacks
        (run / "metrics.csv").write_bytes(damaged)
    train(_config(synthetic_images, tmp_path), run, resume=True, log=said.append)
    assert any("metrics.csv lacks epoch(s) 1 of the 1 trained" in line for line in said), said
    assert [r["epoch"] for r in read_metrics(run / "metrics.csv")] == [2.0]


@pytest.mark.parametrize(
    "damaged",
    [
        '{"best_val_acc": 0.',  # a full disk, a crash mid-write: JSONDecodeError
        "{}",  # was TypeError: Result.__init__() missing 5 required positional arguments
        '{"best_val_acc": "x", "final_val_acc": 0.5, "epochs": 1, "seconds": 1.0,'
        ' "images_per_s": 9.0}',  # was TypeError: must be real number, not str
        '{"best_val_acc": 0.5, "final_val_acc": 0.5, "epochs": true, "seconds": 1.0,'
        ' "images_per_s": 9.0, "test_acc": [1]}',
        "[1, 2]",
        '{"epochs": 1, "seconds": 1.0, "images_per_s": 9.0}',  # Result's accuracies missing
    ],
    ids=["cut-short", "empty-object", "string-accuracy", "wrong-types", "a-list", "no-accuracies"],
)
def test_a_finished_run_whose_result_json_is_damaged_writes_it_again_on_resume(
    synthetic_images, tmp_path, capsys, damaged
):
    import json

    run = tmp_path / "run"
    first = train(_config(synthetic_images, tmp_path, epochs=1), run, log=QUIET)
    (run / "result.json").write_text(damaged)
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert f"best val acc {first.best_val_acc:.2%}" in captured.out, captured.err
    assert json.loads((run / "result.json").read_text())["epochs"] == 1


def _strict_json(text: str):
    import json

    def refuse(word):
        raise AssertionError(f"{word} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_val_size_zero_writes_strict_json_and_a_resume_reads_its_nulls_back_as_none(
    synthetic_images, tmp_path
):
    run = tmp_path / "run"
    train(_config(synthetic_images, tmp_path, epochs=1, val_size=0), run, log=QUIET)
    saved = _strict_json((run / "result.json").read_text())  # was "best_val_acc": NaN
    assert saved["best_val_acc"] is None and saved["final_val_acc"] is None
    assert set(saved) == {*RESULT_NUMBERS, *RESULT_OPTIONAL, "epochs"}  # what read_result checks
    again = train(None, run, resume=True, log=QUIET)  # finished: read back, not trained again
    assert again.best_val_acc is None and again.final_val_acc is None
    assert again.test_acc == saved["test_acc"]


@pytest.mark.parametrize("state", ["no-checkpoint-yet", "mid-run", "finished"])
def test_resuming_a_run_in_use_says_only_that_and_touches_nothing(
    synthetic_images, tmp_path, capsys, state
):
    from cifarlab.config import save_config
    from cifarlab.rundir import RunLock

    run = tmp_path / "run"
    if state == "no-checkpoint-yet":
        run.mkdir()
        save_config(_config(synthetic_images, tmp_path), run / "config.yaml")
    else:
        _stopped_after_epoch_one(synthetic_images, tmp_path)
    if state == "finished":
        train(_config(synthetic_images, tmp_path), run, resume=True, log=QUIET)
    with RunLock(run):  # another process training it (flock: any other open file is refused)
        before = {p.name: p.read_bytes() for p in run.iterdir()}
        for more in ([], ["--lr", "0.3"]):  # a plan line, or a refused change, came first
            code = main(["train", "--out", str(run), "--resume", "--no-progress", *more])
            out, err = capsys.readouterr()
            assert code == 2 and out == "" and "in use by process" in err, out + err
            assert len(err.splitlines()) == 1
        after = {p.name: p.read_bytes() for p in run.iterdir()}
    assert after == before  # the holder's .lock included


def _edited(run: Path, key: str, value) -> None:
    import yaml

    path = run / "config.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), key: value}))


def test_resume_refuses_an_edited_config_yaml_and_names_the_keys(
    synthetic_images, tmp_path, capsys
):
    run = _stopped_after_epoch_one(synthetic_images, tmp_path)
    last = (run / "last.pt").read_bytes()
    _edited(run, "lr", 0.2)
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "lr: 0.02 -> 0.2" in err and "restore" in err and len(err.splitlines()) == 1
    assert (run / "last.pt").read_bytes() == last


def test_resume_honours_runtime_keys_edited_in_config_yaml(synthetic_images, tmp_path):
    run = _stopped_after_epoch_one(synthetic_images, tmp_path)
    _edited(run, "eval_batch_size", 7)  # as --set eval_batch_size=7 would
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert load_checkpoint(run / "last.pt")["config"]["eval_batch_size"] == 7


@pytest.mark.parametrize(
    "text", ["lr: [0.1\n", "- lr\n", "lrr: 0.1\n", "lr: fast\n"],
    ids=["not-yaml", "not-a-mapping", "unknown-key", "wrong-type"],
)  # fmt: skip
def test_resume_with_a_damaged_config_yaml_is_one_line_naming_it(
    synthetic_images, tmp_path, capsys, text
):
    run = _stopped_after_epoch_one(synthetic_images, tmp_path)
    (run / "config.yaml").write_text(text)
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "config.yaml" in err and len(err.splitlines()) == 1 and "Traceback" not in err
