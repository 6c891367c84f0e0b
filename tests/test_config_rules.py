"""The one validation entry point, the epoch shaping of --epochs/--budget, and the shared CLI flags."""

import pytest
import torch

from cifarlab.cli import main
from cifarlab.config import (
    apply_overrides,
    differences,
    load_recipe,
    parse_set_options,
    validate_config,
    with_epochs,
    with_length,
)
from cifarlab.errors import UserError
from cifarlab.schedules import make_scheduler
from cifarlab.suites import SuiteOptions, run_suite
from tests.conftest import make_config


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"model": "cnn", "pretrained": True}, "has no ImageNet weights"),
        ({"model": "fastnet", "stem": "imagenet"}, "applies to the tv-. models only"),
        (
            {"model": "tv-resnet18", "pretrained": True, "whitening": True},
            "overwrite the pretrained",
        ),
        ({"whiten_bias_epochs": 2}, "needs whitening: true"),
        ({"alt_flip": True, "loader": "torchvision"}, "alt_flip needs loader: device"),
        ({"freeze": "backbone"}, r"needs freeze_epochs from 1 to epochs=\d+, got 0"),
        (
            {"freeze": "backbone", "epochs": 3, "freeze_epochs": 4},
            "needs freeze_epochs from 1 to epochs=3, got 4",
        ),
        ({"freeze_epochs": 2}, "freeze_epochs needs freeze: backbone"),
        ({"epochs": 2, "warmup_epochs": 2.0}, "must be less than epochs=2"),
        ({"classes": ["cat", "cat"]}, "\\['cat'\\] listed more than once"),
        ({"classes": ["cat"]}, "name at least two classes"),
        ({"model": "fastnet", "image_size": 16}, "fastnet takes images of 25 to 48 px, not 16"),
        ({"model": "fastnet", "image_size": 64}, "fastnet takes images of 25 to 48 px, not 64"),
    ],
)
def test_cross_field_conflicts_are_refused_by_the_one_validator(overrides, needle):
    with pytest.raises(UserError, match=needle):
        validate_config(make_config(**overrides))


def test_an_image_side_the_model_cannot_take_is_refused_before_out_is_made(capsys, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", "fastnet", "--set", "image_size=16", "--data", "/nowhere"]
    assert main([*args, "--out", str(out)]) == 2
    assert "takes images of 25 to 48 px" in capsys.readouterr().err and not out.exists()
    for size in (8, 24, 32, 128):  # the other fixed models take any side the config allows
        for name in ("cnn", "resnet18", "tv-resnet18", "tv-mobilenet_v3_small"):
            validate_config(make_config(model=name, image_size=size))


def test_an_lr_beyond_float32_is_refused_in_one_line(capsys, tmp_path):
    assert main(["train", "--lr", "1e39", "--data", "/nowhere", "--out", str(tmp_path / "r")]) == 2
    assert "'lr' must be <= 1000000" in capsys.readouterr().err


def test_an_empty_data_from_set_or_a_recipe_is_refused_not_read_as_the_working_folder(
    capsys, tmp_path
):
    out = tmp_path / "r"  # --data "" is refused by its flag; --set data= reached the data loader
    assert main(["train", "--data", "cifar10", "--set", "data= ", "--out", str(out)]) == 2
    assert "data is empty" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("command", ["train", "suite exercise-2", "tune --trials 1"])
def test_an_empty_recipe_flag_is_refused_not_taken_for_the_default(capsys, tmp_path, command):
    out = tmp_path / "r"  # `--recipe "$RECIPE"` with RECIPE unset trained seed-cnn's 100 epochs
    argv = [*command.split(), "--recipe", "", "--data", str(tmp_path / "d"), "--out", str(out)]
    assert main(argv) == 2
    assert "--recipe: empty" in capsys.readouterr().err and not out.exists()


def test_a_tilde_naming_no_user_is_a_path_that_does_not_exist_not_a_traceback(capsys, tmp_path):
    out = tmp_path / "r"  # Path.expanduser raised RuntimeError("Could not determine home ...")
    assert main(["train", "--data", "~nosuchuser-x/pets", "--out", str(out)]) == 2
    assert "~nosuchuser-x/pets: no such file or folder" in capsys.readouterr().err
    assert not out.exists()


def test_torchrun_rules_need_the_world_size():
    config = make_config(batch_size=100)
    validate_config(config, world=4)
    with pytest.raises(UserError, match="must divide by the 3 processes"):
        validate_config(config, world=3)


def test_string_values_stay_strings_whatever_yaml_would_make_of_them():
    config = apply_overrides(
        make_config(), parse_set_options(["amp=off", "channels_last=on"]), "--set"
    )
    assert config.amp == "off" and config.channels_last == "on"
    assert (
        apply_overrides(make_config(), {"amp": False}, "recipe.yaml").amp == "off"
    )  # YAML 1.1 off
    config = apply_overrides(
        make_config(), parse_set_options(["lr=1e-3", "classes=[cat, dog]"]), "--set"
    )
    assert config.lr == 0.001 and config.classes == ["cat", "dog"]


def test_shorter_runs_keep_the_schedules_shape_and_still_anneal():
    fast = load_recipe("fast-sgd")
    short = with_epochs(fast, 2)
    assert short.epochs == 2 and short.warmup_epochs == pytest.approx(3.5 * 2 / 16)
    steps = 10
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = make_scheduler(short.schedule, opt, 2 * steps, round(short.warmup_epochs * steps))
    lrs = []
    for _ in range(2 * steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(lrs) == pytest.approx(1.0) and lrs[-1] < 0.1  # it peaked, then annealed
    staged = with_length(load_recipe("resnet18"), None, 0.1)
    assert staged.epochs == 10
    transfer = with_length(apply_overrides(load_recipe("resnet18"), {"epochs": 30, "freeze": "backbone",
                                                                     "freeze_epochs": 10}, "t"), None, 0.1)  # fmt: skip
    assert (transfer.epochs, transfer.freeze_epochs) == (3, 1)


def test_a_linear_probe_stays_one_when_shortened_and_says_so():
    from types import SimpleNamespace

    from cifarlab.models import create_model
    from cifarlab.training_run import apply_freeze

    probe = make_config(model="resnet18", width=0.125, freeze="backbone", epochs=4, freeze_epochs=4)
    short = validate_config(with_epochs(probe, 2))
    assert (short.epochs, short.freeze_epochs) == (2, 2)
    lines = []
    run = SimpleNamespace(config=probe, model=create_model("resnet18", 10, 0.125), fixed=set())
    apply_freeze(run, 0, lines.append)
    assert "stays frozen for the whole run" in lines[0] and "fine-tune" not in lines[0]


def test_lr_stepped_per_epoch_holds_within_each_epoch():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = make_scheduler("cosine", opt, total_steps=12, warmup_steps=0, steps_per_epoch=4)
    lrs = []
    for _ in range(12):
        lrs.append(round(opt.param_groups[0]["lr"], 6))
        opt.step()
        sched.step()
    assert lrs[0:4] == [1.0] * 4 and len(set(lrs[4:8])) == 1 and len(set(lrs[8:12])) == 1
    assert lrs[4] < 1.0 and lrs[8] < lrs[4]


def test_a_suite_whose_third_run_conflicts_fails_before_the_first_trains(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "runs:\n"
        "  - {name: a, recipe: fast}\n"
        "  - {name: b, recipe: fast}\n"
        "  - {name: c, recipe: fast, set: {alt_flip: true, loader: torchvision}}\n"
    )
    with pytest.raises(UserError, match=r"run 3 \(c\): alt_flip needs loader: device"):
        run_suite(
            str(path),
            SuiteOptions(tmp_path / "out", overrides={"data": "/nowhere"}),
            log=lambda s: None,
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden"])
def test_suite_run_names_must_stay_inside_out(tmp_path, name):
    path = tmp_path / "s.yaml"
    path.write_text(f"runs:\n  - {{name: '{name}', recipe: fast}}\n")
    with pytest.raises(UserError, match="plain folder name inside --out"):
        run_suite(
            str(path), SuiteOptions(tmp_path / "out", overrides={"data": "x"}), log=lambda s: None
        )


def test_suite_run_names_must_be_unique(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("runs:\n  - {name: a, recipe: fast}\n  - {name: a, recipe: seed-cnn}\n")
    with pytest.raises(UserError, match="repeated: a"):
        run_suite(
            str(path), SuiteOptions(tmp_path / "out", overrides={"data": "x"}), log=lambda s: None
        )


VAL = {"data": "x", "val_size": 100}  # lesson-cnn holds out none: scored on a test split


def test_a_recipe_renamed_run_clashing_with_another_says_so_and_how_to_fix(tmp_path):
    """It said only "run names must be unique; repeated: lesson-cnn", of a file without two."""
    path = tmp_path / "s.yaml"
    path.write_text(
        "runs:\n  - {name: seed-cnn, recipe: seed-cnn}\n  - {name: lesson-cnn, recipe: fast}\n"
    )
    opts = SuiteOptions(tmp_path / "out", overrides=VAL, recipe="lesson-cnn")
    with pytest.raises(
        UserError,
        match=r"repeated: lesson-cnn \(run seed-cnn is lesson-cnn under --recipe\); copy the suite file",
    ):
        run_suite(str(path), opts, log=lambda s: None)


def test_a_folder_in_the_way_of_a_recipe_renamed_run_is_named_before_anything_trains(tmp_path):
    """Other files in it were a "cannot start" after the runs before it, advising --resume,
    which a suite does not take; another run's folder did not say why that name was used."""
    opts = SuiteOptions(tmp_path / "out", overrides=VAL, recipe="lesson-cnn")
    (tmp_path / "out" / "lesson-cnn").mkdir(parents=True)
    (tmp_path / "out" / "lesson-cnn" / "notes.txt").write_text("mine")
    with pytest.raises(
        UserError,
        match=r"run seed-cnn is lesson-cnn under --recipe, and .*lesson-cnn already holds other files \(notes.txt\); move them away, or choose a new --out",
    ) as err:
        run_suite("exercise-1", opts, log=lambda s: None)
    assert "--resume" not in str(err.value)
    (tmp_path / "out" / "lesson-cnn" / "notes.txt").rename(
        tmp_path / "out" / "lesson-cnn" / "config.yaml"
    )
    (tmp_path / "out" / "lesson-cnn" / "config.yaml").write_text("lr: 0.05\n")
    with pytest.raises(
        UserError,
        match=r"run seed-cnn is lesson-cnn under --recipe, and .* holds a run with another config",
    ):
        run_suite("exercise-1", opts, log=lambda s: None)


def test_cli_version_debug_after_subcommand_and_shared_flags(capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and "cifarlab 0." in capsys.readouterr().out
    assert main(["train", "--out", str(tmp_path), "--recipe", "nope", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    code = main(["suite", "exercise-1", "--data", "/nowhere", "--out", str(tmp_path / "s"), "--val-size", "500",
                 "--model", "fastnet", "--budget", "0.1"])  # fmt: skip
    err = capsys.readouterr().err  # the flags parsed; data no run can load is bad input
    assert code == 2 and "/nowhere: no such file or folder" in err and "could not start" not in err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert (
        "--budget" in help_text and "(default: sqlite" not in help_text and "--model" in help_text
    )


def test_one_same_run_rule_ignores_runtime_keys_and_what_a_run_resolved():
    saved = make_config(epochs=10, warmup_epochs=2.0, amp="bf16", input_size=64, seed=3)
    same = dict(threads=4, device="cpu", progress=False, eval_batch_size=7, data_root="/elsewhere")
    assert differences(saved, make_config(**{**vars(saved), **same})) == []
    # amp and input_size asked as auto match what the run chose; -1 is the seed it follows
    asked = {**vars(saved), "amp": "auto", "input_size": 0, "split_seed": 3}
    assert differences(saved, make_config(**asked)) == []
    assert differences(saved, make_config(**{**asked, "amp": "off", "lr": 0.5})) == ["lr", "amp"]
    # a new length: the warm-up that follows it is not a change of its own
    assert differences(saved, with_epochs(saved, 5)) == ["epochs"]
    # an unplanned time budget matches the length the budgeted run chose, not another budget
    budget = make_config(**{**vars(saved), "time_budget": 60.0})
    planned = make_config(**{**vars(budget), "epochs": 3, "train_steps": 40, "warmup_epochs": 0.5})
    assert differences(planned, budget) == []
    assert differences(planned, make_config(**{**vars(budget), "time_budget": 90.0})) == [
        "time_budget"
    ]
    assert differences(planned, make_config(**{**vars(planned), "train_steps": 41})) == [
        "train_steps"
    ]  # a planned length is compared


def test_a_data_path_is_stored_absolute_and_a_dataset_name_as_given(tmp_path, monkeypatch):
    from pathlib import Path

    from cifarlab.cli import _config_from_args, build_parser

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "cifar10").mkdir()

    def data(*flags):  # as every run stores its config: validated
        args = build_parser().parse_args(["train", "--out", "o", *flags])
        return validate_config(_config_from_args(args)).data

    assert data("--data", "d") == str(Path.cwd() / "d") == data("--set", "data=./d")
    assert data("--data", "cifar10") == "cifar10"  # the dataset, though a folder has its name
    assert data("--data", "gone") == "gone"  # the run says it is missing, as it was given
    assert differences(make_config(data="d"), make_config(data=data("--data", "d"))) == []


@pytest.mark.parametrize("flag", ["--time-budget", "--time", "--time-b"])
def test_a_negative_time_budget_is_refused_by_its_own_rule_however_the_flag_is_spelt(
    capsys, tmp_path, flag
):
    out = tmp_path / "r"
    assert main(["train", "--data", "/nowhere", "--out", str(out), flag, "-5s"]) == 2
    err = capsys.readouterr().err
    assert "expected a positive duration" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "suite", "tune"])
def test_a_time_budget_with_another_length_is_refused_by_every_command(capsys, tmp_path, command):
    extra = {"train": [], "suite": ["exercise-1"], "tune": ["--trials", "1"]}[command]
    out = tmp_path / "o"
    args = [command, *extra, "--data", "/nowhere", "--out", str(out), "--time-budget", "10m"]
    assert main([*args, "--epochs", "2"]) == 2
    assert "--time-budget chooses the run's length" in capsys.readouterr().err
    assert not out.exists()


def test_an_epochs_flag_below_one_is_refused_before_the_run_starts(tmp_path, capsys):
    from cifarlab.cli import main

    assert main(["train", "--out", str(tmp_path / "o"), "--epochs", "0", "--data", "/nowhere"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: --epochs: 'epochs' must be >= 1") and not (tmp_path / "o").exists()
    )
