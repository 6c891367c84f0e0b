import dataclasses
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from functools import partial

import optuna
import pytest

from cifarlab.config import apply_overrides, load_recipe
from cifarlab.errors import UserError
from cifarlab.tune import TuneOptions, run_tune

TINY = {"model": "fastnet", "batch_size": 50, "val_size": 100, "subset": 200, "progress": False, "threads": 1,
        "tta": "none", "warmup_epochs": 0.0}  # fmt: skip


def _opts(real_jpegs, tmp_path, trials, **more):
    overrides = {
        **TINY,
        "epochs": 2,
        "data": str(real_jpegs),
        "data_root": str(tmp_path / "d"),
        **more,
    }
    base = apply_overrides(load_recipe("fast"), overrides, where="test")
    return TuneOptions(
        "fast",
        base,
        overrides,
        trials,
        f"sqlite:///{tmp_path / 'study.db'}",
        tmp_path / "tune",
        "s",
    )


def test_tune_runs_trials_continues_a_study_and_writes_the_best_recipe(real_jpegs, tmp_path):
    study = run_tune(_opts(real_jpegs, tmp_path, 2), log=lambda s: None)
    assert len(study.trials) == 2
    best = load_recipe(str(tmp_path / "tune" / "best-recipe.yaml"))
    assert best.lr == study.best_trial.params["lr"] and best.model == "fastnet"
    assert best.muon_lr == study.best_trial.params["muon_lr"]  # fast's filters follow muon_lr
    assert 2.4e-4 <= best.weight_decay <= 7.2e-3  # around fast's 2.4e-3
    assert best.batch_size == 50 and best.subset == 200  # the command line's overrides are kept
    searched = study.best_trial.params["epochs"]  # 1 or 2 of the base's 2: fast's 3 whitening-bias
    assert best.whiten_bias_epochs == (1 if searched == 1 else 3)  # epochs shaped as --epochs does
    # same storage: continues; threads and where the cache lives are not settings of the search
    again = run_tune(_opts(real_jpegs, tmp_path, 3, threads=2, data_root=str(tmp_path / "d2")),
                     log=lambda s: None)  # fmt: skip
    assert len(again.trials) == 3 and {t.number for t in again.trials} == {0, 1, 2}
    other = r"study 's' .* was started with other settings \(epochs: 2 -> 1\)"
    with pytest.raises(UserError, match=other):  # its trials would not be comparable
        run_tune(_opts(real_jpegs, tmp_path, 4, epochs=1), log=lambda s: None)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 3


def test_tune_killed_mid_trial_finishes_after_a_restart(real_jpegs, tmp_path):
    trials = tmp_path / "tune"
    args = [sys.executable, "-m", "cifarlab", "tune", "--recipe", "fast", "--data", str(real_jpegs), "--trials", "2",
            "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--study", "k", "--out", str(trials),
            "--epochs", "2", "--no-progress", "--set", f"data_root={tmp_path / 'd'}"]  # fmt: skip
    args += [a for k, v in TINY.items() if k != "progress" for a in ("--set", f"{k}={v}")]
    with open(tmp_path / "first.err", "w+") as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 120
        # wait for its first epoch's row; a crash ends the wait at once
        while not list(trials.glob("trial-*/metrics.csv")) and time.time() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # does nothing once it has exited
        code = proc.wait()
        err.seek(0)
        assert code == -signal.SIGKILL, f"the first run ended ({code}) unkilled:\n{err.read()}"
    assert list(trials.glob("trial-*/metrics.csv")), "no trial wrote metrics.csv in 120 s"
    second = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    study = optuna.load_study(study_name="k", storage=f"sqlite:///{tmp_path / 'study.db'}")
    finished = [
        t
        for t in study.trials
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ]
    assert len(finished) == 2 and (trials / "best-recipe.yaml").is_file()


def test_an_out_holding_a_trial_of_another_study_is_refused_without_suggesting_resume(
    synthetic_images, tmp_path, capsys
):
    from cifarlab.cli import main

    old_trial = tmp_path / "tune" / "trial-000"
    old_trial.mkdir(parents=True)
    (old_trial / "last.pt").write_bytes(b"an earlier study's trial")
    args = ["tune", "--data", str(synthetic_images), "--data-root", str(tmp_path / "d"), "--trials", "1",
            "--val-size", "6", "--batch-size", "8", "--out", str(tmp_path / "tune"),
            "--storage", f"sqlite:///{tmp_path / 'new.db'}"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds trial-000" in err and "--resume" not in err and "Traceback" not in err
    assert (old_trial / "last.pt").read_bytes() == b"an earlier study's trial"
    # refused before a trial began: the new study holds no failed trial
    (name,) = optuna.get_all_study_names(f"sqlite:///{tmp_path / 'new.db'}")
    assert (
        optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'new.db'}").trials == []
    )


def test_tune_refuses_what_it_cannot_select_on(real_jpegs, tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="nowhere"):  # one line before any study is stored
        run_tune(_opts(real_jpegs, tmp_path, 1, data=missing), log=lambda s: None)
    assert optuna.get_all_study_names(f"sqlite:///{tmp_path / 'study.db'}") == []
    with pytest.raises(UserError, match="--val-size must be > 0"):
        run_tune(_opts(real_jpegs, tmp_path, 1, val_size=0), log=lambda s: None)
    with pytest.raises(UserError, match="instead of a time budget"):
        run_tune(_opts(real_jpegs, tmp_path, 1, time_budget=60), log=lambda s: None)


def test_tune_selects_on_the_datas_val_folder_under_val_size_0(synthetic_images, tmp_path):
    data = tmp_path / "with-val"
    shutil.copytree(synthetic_images / "train", data / "train")
    shutil.copytree(synthetic_images / "test", data / "val")
    opts = _small(synthetic_images, tmp_path, 1, epochs=1)
    base = apply_overrides(opts.base, {"data": str(data), "val_size": 0}, where="test")
    run_tune(dataclasses.replace(opts, base=base), log=lambda s: None)  # it was refused
    assert (tmp_path / "tune" / "best-recipe.yaml").is_file()


def test_epochs_are_searched_only_when_the_command_line_left_the_length_open():
    from cifarlab.tune import suggest

    base = load_recipe("fast")
    params = {"lr": 1.0, "weight_decay": 1e-3, "mixup_alpha": 0.0, "cutmix_alpha": 0.0,
              "label_smoothing": 0.1, "muon_lr": 0.2, "epochs": 5}  # fmt: skip
    assert suggest(optuna.trial.FixedTrial(params), base)["epochs"] == 5
    fixed = suggest(optuna.trial.FixedTrial(params), base, search_epochs=False)
    assert "epochs" not in fixed and fixed["lr"] == 1.0


def test_a_searched_length_keeps_the_recipes_schedule_shape():
    from cifarlab.config import with_epochs
    from cifarlab.tune import trial_config

    base = load_recipe("fast")  # whitening bias for its first 3 of 9 epochs (airbench94's)
    short = trial_config(base, {"epochs": base.epochs // 2, "lr": 1.0})
    assert short == apply_overrides(with_epochs(base, base.epochs // 2), {"lr": 1.0}, where="t")
    assert short.whiten_bias_epochs < base.whiten_bias_epochs and short.lr == 1.0
    assert trial_config(base, {"lr": 1.0}).whiten_bias_epochs == base.whiten_bias_epochs


def _fake_trainer(monkeypatch, stop_first: bool, diverge_first: bool = False, weights=False):
    """`train` as the trials see it, without training: the first call stopped by Ctrl-C
    (`stop_first`) or diverged (`diverge_first`: its loss, or with `weights` its weights), every
    call's config recorded."""
    from types import SimpleNamespace

    from cifarlab.checkpoint import NonFiniteWeights
    from cifarlab.errors import Interrupted
    from cifarlab.train import TrainingFailed

    seen = []

    def train(config, run_dir, **kw):
        seen.append(config)
        if stop_first and len(seen) == 1:
            raise Interrupted("stopped at epoch 1 step 1", 130)
        if diverge_first and len(seen) == 1:
            failed = NonFiniteWeights if weights else TrainingFailed
            raise failed("diverged: non-finite loss at epoch 1 step 3; the last good ...")
        return SimpleNamespace(best_val_acc=0.5)

    monkeypatch.setattr("cifarlab.train.train", train)
    return seen


def _small(synthetic_images, tmp_path, trials, epochs=None):
    overrides = {"data": str(synthetic_images), "data_root": str(tmp_path / "d"), "val_size": 6,
                 "batch_size": 8}  # fmt: skip
    base = apply_overrides(load_recipe("fast"), overrides, where="test")
    if epochs is not None:  # as --epochs does
        from cifarlab.config import with_epochs

        base = with_epochs(base, epochs)
    return TuneOptions("fast", base, overrides, trials, f"sqlite:///{tmp_path / 'study.db'}",
                       tmp_path / "tune", "s", search_epochs=epochs is None)  # fmt: skip


def test_a_trial_stopped_by_ctrl_c_runs_again_first_when_the_study_continues(
    synthetic_images, tmp_path, monkeypatch
):
    from cifarlab.errors import Interrupted

    seen = _fake_trainer(monkeypatch, stop_first=True)
    with pytest.raises(Interrupted, match="stopped during trial 0"):
        run_tune(_small(synthetic_images, tmp_path, 2), log=lambda s: None)
    run_tune(_small(synthetic_images, tmp_path, 2), log=lambda s: None)
    assert seen[1].lr == seen[0].lr and seen[1].mixup_alpha == seen[0].mixup_alpha


@pytest.mark.parametrize("weights", [False, True], ids=["loss", "weights"])
def test_a_diverged_trial_is_pruned_and_the_study_goes_on(
    synthetic_images, tmp_path, monkeypatch, weights
):
    seen = _fake_trainer(monkeypatch, stop_first=False, diverge_first=True, weights=weights)
    messages = []
    study = run_tune(_small(synthetic_images, tmp_path, 2), log=messages.append)
    assert [t.state.name for t in study.trials] == ["PRUNED", "COMPLETE"] and len(seen) == 2
    assert any("trial 0: diverged: non-finite loss" in m and "pruned" in m for m in messages)
    assert (tmp_path / "tune" / "best-recipe.yaml").is_file()


def test_best_recipe_of_a_fixed_length_search_keeps_that_length(
    synthetic_images, tmp_path, monkeypatch
):
    seen = _fake_trainer(monkeypatch, stop_first=False)
    run_tune(_small(synthetic_images, tmp_path, 1, epochs=1), log=lambda s: None)
    best = load_recipe(str(tmp_path / "tune" / "best-recipe.yaml"))
    assert (
        seen[0].epochs == best.epochs == 1 and best.whiten_bias_epochs == seen[0].whiten_bias_epochs
    )


def test_an_out_that_cannot_hold_trials_is_refused_before_a_study_is_stored(
    synthetic_images, tmp_path
):
    import dataclasses

    (tmp_path / "afile").write_text("not a folder")
    opts = dataclasses.replace(_small(synthetic_images, tmp_path, 1), out=tmp_path / "afile")
    with pytest.raises(UserError, match="afile: is a file, not a folder"):
        run_tune(opts, log=lambda s: None)
    assert not (tmp_path / "study.db").exists()


def test_a_batch_larger_than_the_training_split_is_refused_before_a_study_is_stored(
    synthetic_images, tmp_path
):
    opts = _small(synthetic_images, tmp_path, 1)
    opts = dataclasses.replace(opts, base=dataclasses.replace(opts.base, batch_size=64))
    with pytest.raises(UserError, match="batch_size=64 is larger than the 30 training images"):
        run_tune(opts, log=lambda s: None)
    assert optuna.get_all_study_names(f"sqlite:///{tmp_path / 'study.db'}") == []


def test_a_study_whose_trials_all_failed_takes_the_settings_of_the_command_that_continues_it(
    synthetic_images, tmp_path, monkeypatch
):
    """Nothing finished is nothing to keep comparable: the corrected command goes on in the same
    study instead of being told to run it with the settings that failed."""

    def failing(config, run_dir, **kw):
        raise UserError("cannot build this model here")

    monkeypatch.setattr("cifarlab.train.train", failing)
    with pytest.raises(UserError, match="cannot build"):
        run_tune(_small(synthetic_images, tmp_path, 1), log=lambda s: None)
    seen = _fake_trainer(monkeypatch, stop_first=False)
    opts = _small(synthetic_images, tmp_path, 1)
    opts = dataclasses.replace(opts, base=dataclasses.replace(opts.base, subset=30))
    study = run_tune(opts, log=lambda s: None)
    assert seen[0].subset == 30 and study.user_attrs["cifarlab_settings"]["subset"] == 30
    with pytest.raises(UserError, match="subset: 30 -> 0"):  # a finished trial now holds it
        run_tune(_small(synthetic_images, tmp_path, 2), log=lambda s: None)


@pytest.mark.parametrize(
    ("storage", "why"),
    [("nosuch://db", "nosuch"), ("sqlite://", "in memory"), ("sqlite:///:memory:", "in memory")],
)
def test_a_storage_that_cannot_open_leaves_no_out_behind(synthetic_images, tmp_path, storage, why):
    opts = dataclasses.replace(_small(synthetic_images, tmp_path, 1), storage=storage)
    with pytest.raises(UserError, match=f"cannot open the study database.*{why}"):
        run_tune(opts, log=lambda s: None)
    assert not opts.out.exists()


@pytest.mark.parametrize("damage", ["cut short", "overwritten inside", "text", "folder"])
def test_a_damaged_study_db_in_out_is_named_with_the_way_out(
    synthetic_images, tmp_path, monkeypatch, capsys, damage
):
    """It named a --storage the command line never gave, and no way on."""
    from cifarlab.cli import main

    _fake_trainer(monkeypatch, stop_first=False)
    assert main(_tune_args(synthetic_images, tmp_path, "t")) == 0
    db = tmp_path / "t" / "study.db"
    whole = db.read_bytes()
    db.unlink()
    if damage == "folder":
        db.mkdir()
    elif damage == "overwritten inside":  # the header whole: it opens, its first query fails
        db.write_bytes(whole[:40000] + b"\xff" * 30000 + whole[70000:])
    else:
        db.write_bytes(whole[:5000] if damage == "cut short" else b"not a database\n")
    capsys.readouterr()
    assert main(_tune_args(synthetic_images, tmp_path, "t")) == 2
    err = capsys.readouterr().err.strip()
    assert f"{db} cannot be opened" in err and "move it away" in err and "--storage" not in err
    assert len(err.splitlines()) == 1


def test_a_study_whose_every_trial_diverged_exits_1_saying_so(
    synthetic_images, tmp_path, monkeypatch, capsys
):
    from cifarlab.cli import main
    from cifarlab.train import TrainingFailed

    def diverging(config, run_dir, **kw):
        raise TrainingFailed("diverged: non-finite loss at epoch 1 step 1; the last good ...")

    monkeypatch.setattr("cifarlab.train.train", diverging)
    args = ["tune", "--recipe", "fast", "--data", str(synthetic_images), "--val-size", "6",
            "--batch-size", "8", "--data-root", str(tmp_path / "d"), "--trials", "2",
            "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--out", str(tmp_path / "tune")]  # fmt: skip
    assert main(args) == 1  # it was Optuna's ValueError traceback ("Record does not exist")
    assert "no trial completed" in capsys.readouterr().err
    assert not (tmp_path / "tune" / "best-recipe.yaml").exists()


def test_an_out_among_the_class_folders_is_refused_before_a_study_is_stored(
    synthetic_images, tmp_path
):
    import shutil

    data = shutil.copytree(synthetic_images / "train", tmp_path / "data")
    opts = _small(synthetic_images, tmp_path, 1)
    opts = dataclasses.replace(opts, base=dataclasses.replace(opts.base, data=str(data)),
                               out=data / "tune")  # fmt: skip
    with pytest.raises(UserError, match="whose folders are read as classes"):
        run_tune(opts, log=lambda s: None)  # every trial failed there, the folder left behind
    assert not opts.out.exists() and not (tmp_path / "study.db").exists()


def test_an_out_holding_a_training_run_is_refused_before_a_study_is_stored(
    synthetic_images, tmp_path
):
    run = tmp_path / "run"  # a training run's folder: trials and tables among its files
    run.mkdir()
    (run / "config.yaml").write_text("epochs: 1\n")
    opts = dataclasses.replace(_small(synthetic_images, tmp_path, 1), out=run)
    with pytest.raises(UserError, match=r"holds a training run \(config.yaml\); tune writes"):
        run_tune(opts)
    assert [p.name for p in run.iterdir()] == ["config.yaml"]
    assert not (tmp_path / "study.db").exists()


def test_init_from_a_run_that_trained_on_the_validation_images_is_refused_before_a_study_is_stored(
    synthetic_images, tmp_path
):
    """Every trial would be refused, the first after its study and a failed trial were stored."""
    from cifarlab.train import train

    every = apply_overrides(
        load_recipe("seed-cnn"),
        {"data": str(synthetic_images), "data_root": str(tmp_path / "d"), "model": "cnn",
         "width": 0.25, "epochs": 1, "batch_size": 8, "val_size": 0, "progress": False},
        where="test",
    )  # fmt: skip
    train(every, tmp_path / "all", log=lambda s: None)
    opts = _small(synthetic_images, tmp_path, 1)
    base = apply_overrides(
        opts.base, {"model": "cnn", "width": 0.25, "init_from": str(tmp_path / "all")}, "t"
    )
    with pytest.raises(UserError, match="--init-from .* holds out for validation"):
        run_tune(dataclasses.replace(opts, base=base), log=lambda s: None)
    assert not opts.out.exists() and not (tmp_path / "study.db").exists()


def _tune_args(synthetic_images, tmp_path, out: str, *more: str) -> list[str]:
    return ["tune", "--recipe", "fast", "--data", str(synthetic_images), "--val-size", "6",
            "--batch-size", "8", "--data-root", str(tmp_path / "d"), "--trials", "1",
            "--out", str(tmp_path / out), *more]  # fmt: skip


def test_each_out_keeps_its_own_study_by_default(synthetic_images, tmp_path, monkeypatch, capsys):
    """The default storage was ./study.db: a second --out continued the first's study, trained
    nothing and wrote a best recipe naming the first --out's trial."""
    from cifarlab.cli import main

    monkeypatch.chdir(tmp_path)
    seen = _fake_trainer(monkeypatch, stop_first=False)
    assert main(_tune_args(synthetic_images, tmp_path, "t2")) == 0
    assert main(_tune_args(synthetic_images, tmp_path, "t3")) == 0
    out = capsys.readouterr().out
    assert len(seen) == 2 and not (tmp_path / "study.db").exists()
    for name in ("t2", "t3"):
        storage = f"sqlite:///{tmp_path / name / 'study.db'}"
        assert f"in {storage}: 0 of 1 trials finished" in out
        (name_of_study,) = optuna.get_all_study_names(storage)
        study = optuna.load_study(study_name=name_of_study, storage=storage)
        assert [t.user_attrs["run_dir"] for t in study.trials] == [
            str(tmp_path / name / "trial-000")
        ]
        assert (tmp_path / name / "best-recipe.yaml").is_file()
    assert "note:" not in out
    assert main(_tune_args(synthetic_images, tmp_path, "t2")) == 0  # continues its own study
    assert "1 of 1 trials finished" in capsys.readouterr().out and len(seen) == 2


def test_a_shared_storage_says_where_the_trials_of_another_out_are(
    synthetic_images, tmp_path, monkeypatch, capsys
):
    from cifarlab.cli import main

    seen = _fake_trainer(monkeypatch, stop_first=False)
    shared = ("--storage", f"sqlite:///{tmp_path / 'shared.db'}")
    assert main(_tune_args(synthetic_images, tmp_path, "a", *shared)) == 0
    capsys.readouterr()
    assert main(_tune_args(synthetic_images, tmp_path, "b", *shared)) == 0
    out = capsys.readouterr().out
    assert len(seen) == 1 and "1 of 1 trials finished" in out
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and f"ran under another --out ({tmp_path / 'a'})" in notes[0], out
    assert f"best: trial 0 (its run in {tmp_path / 'a' / 'trial-000'})" in out


def test_two_tunes_sharing_a_study_stop_at_its_trials_between_them(synthetic_images, tmp_path):
    """Each counted only finished trials: with --trials 4, the tune whose trial ended while
    the other's fourth ran started a fifth."""
    args = _tune_args(synthetic_images, tmp_path, "t", "--epochs", "2", "--no-progress")
    args[args.index("--trials") + 1] = "4"
    args = [sys.executable, "-m", "cifarlab", *args, "--set", "threads=1"]
    tune = partial(
        subprocess.Popen, args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    tunes = [tune()]
    deadline = time.time() + 60
    while not (tmp_path / "t" / "trial-000").exists() and time.time() < deadline:
        time.sleep(0.05)  # the second starts as the first trains: the study is made once
    tunes.append(tune())
    said = [t.communicate(timeout=240)[0] for t in tunes]
    assert [t.returncode for t in tunes] == [0, 0], said
    storage = f"sqlite:///{tmp_path / 't' / 'study.db'}"
    (name,) = optuna.get_all_study_names(storage)
    states = [t.state.name for t in optuna.load_study(study_name=name, storage=storage).trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == 4, (states, said)


@pytest.mark.parametrize("name", ["t?x", "t#1", "t%41", "a b é"])
def test_the_default_study_lives_inside_an_out_named_with_url_characters(
    synthetic_images, tmp_path, monkeypatch, capsys, name
):
    """SQLAlchemy ends a URL's path at `?` and decodes `%41` in it: `--out 't?x'` stored its
    study in a file `t` beside --out, where every such --out would share it."""
    from cifarlab.cli import main

    _fake_trainer(monkeypatch, stop_first=False)
    assert main(_tune_args(synthetic_images, tmp_path, name)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["d", name])
    db = tmp_path / name / "study.db"
    with sqlite3.connect(db) as con:
        assert con.execute("select count(*) from studies").fetchone() == (1,)
    assert main(_tune_args(synthetic_images, tmp_path, name)) == 0  # continues it
    assert "1 of 1 trials finished" in capsys.readouterr().out


def test_a_failed_write_of_best_recipe_keeps_the_one_before(
    synthetic_images, tmp_path, monkeypatch
):
    import errno
    from pathlib import Path

    from cifarlab.tune import write_best_recipe

    _fake_trainer(monkeypatch, stop_first=False)
    opts = _small(synthetic_images, tmp_path, 1)
    study = run_tune(opts, log=lambda s: None)
    path = tmp_path / "tune" / "best-recipe.yaml"
    before, write = path.read_text(), Path.write_text

    def half_then_disk_full(self, text, *args, **kwargs):
        write(self, text[: len(text) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_disk_full)
    with pytest.raises(OSError, match="No space"):
        write_best_recipe(opts, opts.base, study.best_trial, "s")
    monkeypatch.undo()
    assert path.read_text() == before and [p.name for p in path.parent.glob(".*tmp*")] == []


def test_a_study_store_failing_without_a_message_is_still_one_line(monkeypatch, tmp_path):
    """An error with an empty message (an EOFError from a cut file) is named by its type."""
    import optuna

    from cifarlab.errors import UserError
    from cifarlab.tune import _open_study

    def fails(**kwargs):
        raise EOFError

    monkeypatch.setattr(optuna, "create_study", fails)
    with pytest.raises(UserError, match=r"cannot be opened \(EOFError\)"):
        _open_study("s", f"sqlite:///{tmp_path}/study.db", default=tmp_path / "study.db")


def test_trials_a_killed_tune_left_running_are_marked_failed_when_the_study_continues(
    synthetic_images, tmp_path, monkeypatch
):
    """A kill as optuna made a trial (before its first heartbeat) left it RUNNING for good; one
    killed later stayed RUNNING until a trial started 90 s after its last heartbeat."""
    from datetime import datetime, timedelta

    from cifarlab.tune import RUN_DIR, _open_study

    _fake_trainer(monkeypatch, stop_first=False)
    run_tune(_small(synthetic_images, tmp_path, 1), log=lambda s: None)
    study = _open_study("s", f"sqlite:///{tmp_path / 'study.db'}")
    never_beat, beat, live = study.ask(), study.ask(), study.ask()
    for trial in (beat, live):  # trials that began training
        trial.set_user_attr(RUN_DIR, str(tmp_path / f"trial-{trial.number:03d}"))
        study._storage.record_heartbeat(trial._trial_id)
    long_ago = 150  # past the grace of 90 s
    with sqlite3.connect(tmp_path / "study.db") as db:  # what a kill that long ago leaves
        db.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', ?)",
                   (f"-{long_ago} seconds",))  # fmt: skip
        db.execute("UPDATE trials SET datetime_start = ? WHERE number = ?",
                   (datetime.now() - timedelta(seconds=long_ago), never_beat.number))  # fmt: skip
        db.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now') WHERE trial_id = ?",
                   (live._trial_id,))  # fmt: skip
    messages = []  # 3: the live trial counts toward --trials, as one more finished trial does
    done = run_tune(_small(synthetic_images, tmp_path, 3), log=messages.append)
    states = {t.number: t.state.name for t in done.trials}
    assert states[never_beat.number] == states[beat.number] == "FAIL"
    assert states[live.number] == "RUNNING"  # another tune's, beating: left alone
    assert list(states.values()).count("COMPLETE") == 2
    note = f"note: trials {never_beat.number}, {beat.number} left running by a tune that was killed"
    assert any(m.startswith(note) for m in messages), messages


def test_a_trial_of_a_tune_killed_while_this_one_ran_stops_counting_once_its_heartbeat_is_stale(
    synthetic_images, tmp_path, monkeypatch
):
    """Another machine's tune on the study, killed in its trial while this one trained: its
    trial stayed RUNNING and counted toward --trials, so this tune stopped one trial short."""
    from types import SimpleNamespace

    from cifarlab.tune import RUN_DIR, _open_study

    calls = []

    def train(config, run_dir, **kw):
        calls.append(run_dir)
        if len(calls) == 1:  # its trial began (elsewhere: no lock file here) 150 s ago
            other = _open_study("s", f"sqlite:///{tmp_path / 'study.db'}")
            killed = other.ask()
            killed.set_user_attr(RUN_DIR, str(tmp_path / "elsewhere" / "trial-001"))
            other._storage.record_heartbeat(killed._trial_id)
            with sqlite3.connect(tmp_path / "study.db") as db:
                db.execute(
                    "UPDATE trial_heartbeats SET heartbeat = datetime('now', '-150 seconds') "
                    "WHERE trial_id = ?",
                    (killed._trial_id,),
                )
        return SimpleNamespace(best_val_acc=0.5)

    monkeypatch.setattr("cifarlab.train.train", train)
    messages = []
    done = run_tune(_small(synthetic_images, tmp_path, 2), log=messages.append)
    states = [t.state.name for t in done.trials]
    assert states.count("COMPLETE") == 2 and states[1] == "FAIL", (states, messages)
    assert any(
        m.startswith("note: trial 1 left running by a tune that was killed") for m in messages
    )


def test_sigterm_before_training_takes_it_fails_the_trial_and_says_how_to_continue(
    synthetic_images, tmp_path, monkeypatch, capsys
):
    """The command's SIGTERM handler exits through a SystemExit, which optuna lets by: the
    trial stayed RUNNING and the command ended without a word."""
    import os

    from cifarlab.cli import main

    def train(config, run_dir, **kw):  # SIGTERM as the trial's data loads
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr("cifarlab.train.train", train)
    assert main(_tune_args(synthetic_images, tmp_path, "t")) == 143
    assert "stopped during trial 0; run the same tune command" in capsys.readouterr().err
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 't' / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]  # its settings go first


@pytest.mark.parametrize("read_only", ["study.db", "--out"])
def test_a_read_only_study_database_says_to_make_it_writable_or_choose_another_out(
    synthetic_images, tmp_path, monkeypatch, capsys, read_only
):
    """It said "cannot be opened (attempt to write a readonly database); restore it, or move it
    away", as for a damaged file."""
    import os
    from pathlib import Path

    from cifarlab.cli import main

    _fake_trainer(monkeypatch, stop_first=False)
    assert main(_tune_args(synthetic_images, tmp_path, "t")) == 0
    denied = tmp_path / "t" / ("study.db" if read_only == "study.db" else "")
    real_access = os.access  # root ignores mode bits: deny as a read-only mount would
    monkeypatch.setattr(os, "access", lambda p, m: real_access(p, m) and Path(p) != denied)
    capsys.readouterr()
    assert main(_tune_args(synthetic_images, tmp_path, "t", "--trials", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "writable" in err and "--out" in err and "restore" not in err


def test_a_study_database_sqlite_opens_read_only_says_to_make_it_writable(
    synthetic_images, tmp_path, monkeypatch
):
    """SQLite's own refusal ("attempt to write a readonly database"), where the file system
    allows writing but SQLite opens it read-only."""
    _fake_trainer(monkeypatch, stop_first=False)
    run_tune(_small(synthetic_images, tmp_path, 1), log=lambda s: None)
    url = f"sqlite:///file:{tmp_path / 'study.db'}?mode=ro&uri=true"
    opts = dataclasses.replace(_small(synthetic_images, tmp_path, 2), storage=url)
    fix = r"readonly database\); make it writable, or choose another --storage"
    with pytest.raises(UserError, match=fix):
        run_tune(opts, log=lambda s: None)
