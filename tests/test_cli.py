import os
import shutil
import subprocess
import sys

import pytest

from cifarlab.cli import main
from tests.conftest import write_synthetic_folder


def _cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_and_recipes_list_their_names(capsys):
    code, out, _ = _cli(capsys, "models")
    assert code == 0 and "cnn" in out and "resnet18" in out and "tv-resnet18" in out
    code, out, _ = _cli(capsys, "recipes")
    assert code == 0 and "seed-cnn" in out


def _assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--data", "/no/such/place"], "no such file or folder"),
        (["--recipe", "nope"], "unknown recipe 'nope'"),
        (["--set", "model=vgg"], "unknown model 'vgg'"),
        (["--set", "model=tv"], "unknown model 'tv'; valid models:"),
        (["--budget", "-1"], "--budget: budget -1.0 must be a positive fraction"),
        (["--lr", "-0.1"], "'lr' must be > 0"),
        (["--set", "mixup_alpha=-1"], "'mixup_alpha' must be >= 0"),
        (["--set", "batchsize=3"], "did you mean 'batch_size'"),
        (["--seed", "-1"], "'seed' must be >= 0"),
        (["--set", "learning_rate=0.1"], "did you mean 'lr'"),
        (["--set", "crop_padding=100"], "crop_padding 100 is not below the image side (32 px)"),
        (["--set", "seed=99999999999999999999"], "'seed' must be <= 4294967295"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, args, needle):
    code, _, err = _cli(
        capsys, "train", "--out", str(tmp_path / "r"), "--data", str(tmp_path), *args
    )
    _assert_one_line_error(code, err, needle)


def test_empty_class_folder_and_corrupt_jpeg_are_one_line_errors(capsys, real_jpegs, tmp_path):
    src = tmp_path / "d"
    shutil.copytree(real_jpegs, src)
    (src / "train" / "emu").mkdir()
    base = [
        "train",
        "--out",
        str(tmp_path / "r"),
        "--data-root",
        str(tmp_path / "root"),
        "--data",
        str(src),
    ]
    _assert_one_line_error(*_cli(capsys, *base)[::2], "emu: class folder holds no images")
    assert not (tmp_path / "r").exists()  # the run never started: no empty --out to refuse a retry
    (src / "train" / "emu").rmdir()
    (src / "train" / "dog" / "0001.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    _assert_one_line_error(*_cli(capsys, *base)[::2], "0001.jpg: not a readable image")
    assert not (tmp_path / "r").exists()
    nested = [*base[:1], "--out", str(tmp_path / "new" / "a" / "b"), *base[3:]]
    _assert_one_line_error(*_cli(capsys, *nested)[::2], "0001.jpg")
    assert not (tmp_path / "new").exists()  # the folders above it that it made went too
    (tmp_path / "mine").mkdir()  # a folder the user made stays, even empty
    _assert_one_line_error(
        *_cli(capsys, *base[:1], "--out", str(tmp_path / "mine"), *base[3:])[::2], "0001.jpg"
    )
    assert (tmp_path / "mine").is_dir()


def test_unknown_subcommand_is_usage_error(capsys):
    code, _, err = _cli(capsys, "trian")
    _assert_one_line_error(code, err, "invalid choice")


def test_debug_shows_the_traceback(capsys, tmp_path):
    code, _, err = _cli(capsys, "--debug", "train", "--out", str(tmp_path), "--recipe", "nope")
    assert code == 2 and "Traceback" in err


def test_console_entry_point_runs_as_module():
    proc = subprocess.run(
        [sys.executable, "-m", "cifarlab", "models"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "fastnet" in proc.stdout


def test_an_out_below_a_file_and_a_bare_resume_are_one_line(capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    code, _, err = _cli(
        capsys, "train", "--data", str(tmp_path), "--out", str(tmp_path / "afile" / "sub")
    )
    _assert_one_line_error(code, err, "afile is a file, not a folder")
    code, _, err = _cli(capsys, "train", "--out", str(tmp_path / "typo"), "--resume")
    _assert_one_line_error(code, err, "holds no run to continue; drop --resume")
    assert not (tmp_path / "typo").exists()


def test_output_into_a_closed_pipe_stops_quietly():
    """`cifarlab models | head -1`: the reader has gone before the listing is written."""
    p = subprocess.Popen([sys.executable, "-m", "cifarlab", "models", "--all"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and "Traceback" not in err and "Error" not in err, err


def test_sigterm_caught_and_rewrapped_inside_a_library_still_exits_143(monkeypatch):
    """torch's exporter turns the SystemExit that SIGTERM raises mid-import into its own error."""
    import os
    import signal

    from cifarlab import cli

    def exporter_like(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except SystemExit as exc:
            raise RuntimeError("Failed to export the model") from exc

    monkeypatch.setitem(cli.COMMANDS, "models", exporter_like)
    monkeypatch.setattr(cli, "_STOPPED", [])
    with pytest.raises(SystemExit) as stop:
        main(["models"])
    assert stop.value.code == 143


def test_ctrl_c_caught_and_rewrapped_inside_a_library_exits_130_without_a_traceback(
    monkeypatch, capsys
):
    """Ctrl-C while torch.export imports torch._dynamo left it half-imported, and the exporter
    raised its own TorchExportError ("module 'torch._dynamo' has no attribute 'exc'"): a
    traceback and exit 1."""
    import contextlib
    import os
    import signal

    from cifarlab import cli

    def exporter_like(args):
        with contextlib.suppress(KeyboardInterrupt):  # the half-done import, forgotten
            os.kill(os.getpid(), signal.SIGINT)
        raise AttributeError("module 'torch._dynamo' has no attribute 'exc'")

    monkeypatch.setitem(cli.COMMANDS, "models", exporter_like)
    monkeypatch.setattr(cli, "_STOPPED", [])
    # a command in a terminal starts with Python's own handler; a test worker's may differ
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(["models"]) == 130
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, before)
    assert capsys.readouterr().err.strip() == "interrupted"


def test_a_run_that_diverged_before_its_first_checkpoint_is_retried_with_a_lower_lr(
    capsys, synthetic_images, tmp_path
):
    """Its config.yaml was kept, so the retry the error advises (a lower --lr, same --out) was
    refused as a run to --resume, and --resume refused the changed lr."""
    argv = ["train", "--out", str(tmp_path / "run"), "--data", str(synthetic_images),
            "--data-root", str(tmp_path / "d"), "--model", "cnn", "--epochs", "1",
            "--batch-size", "8", "--val-size", "6", "--set", "width=0.25", "--no-progress"]  # fmt: skip
    code, _, err = _cli(capsys, *argv, "--lr", "1e4")
    assert code == 1 and "no checkpoint saved yet (lower --lr" in err
    assert [p.name for p in (tmp_path / "run").iterdir()] == []
    code, _, err = _cli(capsys, *argv, "--lr", "1e4", "--resume")  # --resume keeps its config
    assert code == 1 and [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]
    (tmp_path / "run" / "config.yaml").unlink()
    code, out, err = _cli(capsys, *argv, "--lr", "0.01")
    assert code == 0 and "done: " in out, err


def test_profile_prints_start_up_and_end_phases_in_order(capsys, synthetic_images, tmp_path):
    code, out, _ = _cli(
        capsys, "train", "--out", str(tmp_path / "run"), "--data", str(synthetic_images),
        "--data-root", str(tmp_path / "d"), "--model", "cnn", "--epochs", "1", "--batch-size", "8",
        "--val-size", "6", "--set", "width=0.25", "--set", "tta=flip", "--no-progress", "--profile",
    )  # fmt: skip
    assert code == 0
    table = out[out.index("profile (seconds):") :]
    for name in ("import", "data (cache read, split)", "model build", "first step", "final TTA"):
        assert name in table
    marks = [
        float(line.split()[-1])
        for line in table.split("since the command started:")[1].splitlines()[1:]
    ]
    assert len(marks) == 3 and marks == sorted(marks)  # first step, last step, command done


def test_epochs_on_the_command_line_scale_a_staged_recipe_as_budget_does(tmp_path):
    from cifarlab.cli import _config_from_args, build_parser

    recipe = tmp_path / "staged.yaml"
    recipe.write_text(
        "base: resnet18\nmodel: tv-resnet18\nepochs: 4\nfreeze: backbone\nfreeze_epochs: 3\n"
    )
    configs = [
        _config_from_args(build_parser().parse_args(["train", "--recipe", str(recipe), "--out", "o", *flags]))
        for flags in (["--epochs", "1"], ["--budget", "0.25"])
    ]  # fmt: skip
    assert {(c.epochs, c.freeze_epochs) for c in configs} == {(2, 1)}  # head first, then all


def test_a_run_trained_on_a_relative_data_path_is_calibrated_from_another_folder(
    capsys, synthetic_images, tmp_path, monkeypatch
):
    monkeypatch.chdir(synthetic_images.parent)
    run = tmp_path / "run"
    code, _, err = _cli(
        capsys, "train", "--out", str(run), "--data", synthetic_images.name,
        "--data-root", str(tmp_path / "d"), "--model", "cnn", "--epochs", "1", "--batch-size", "8",
        "--val-size", "6", "--set", "width=0.25", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli(capsys, "calibrate", str(run))
    assert code == 0, err


def test_calibrate_in_a_read_only_run_directory_is_one_line(capsys, tmp_path, monkeypatch):
    """calibrate writes into the run: a folder it cannot write (a read-only mount; the tests run
    as root, so opening its lock file is denied here) is one line naming it, not a traceback."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"")
    real_open = os.open

    def denied(path, *args, **kw):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kw)

    monkeypatch.setattr(os, "open", denied)
    _assert_one_line_error(*_cli(capsys, "calibrate", str(run))[::2], str(run), "writable")


@pytest.mark.parametrize("flag", ["--out", "--data", "--data-root"])
@pytest.mark.parametrize("command", ["train", "suite", "tune"])
def test_an_empty_path_is_refused_not_taken_for_the_working_directory(
    capsys, tmp_path, monkeypatch, command, flag
):
    """`--data "$DATA"` with DATA unset: Path("") is the working directory, which was trained on
    (or trained into, for --out)."""
    write_synthetic_folder(tmp_path / "cat")  # the working directory looks like class folders
    monkeypatch.chdir(tmp_path)
    args = {"--out": "o", "--data": ".", "--data-root": "d", flag: ""}
    words = [command, *(["exercise-2"] if command == "suite" else []), "--epochs", "1"]
    words += ["--trials", "1"] if command == "tune" else []
    _assert_one_line_error(*_cli(capsys, *words, *sum(args.items(), ()))[::2], flag, "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat"]


@pytest.mark.parametrize(
    "words",
    [["evaluate", ""], ["predict", "", "x.png"], ["predict", "run", "x.png", ""],
     ["export", ""], ["calibrate", ""], ["suite", "", "--data", "d", "--out", "o"]],
)  # fmt: skip
def test_an_empty_positional_path_is_refused_not_taken_for_the_working_directory(
    capsys, tmp_path, monkeypatch, words
):
    """`cifarlab predict RUN "$IMG"` with IMG unset classified every image under the working
    directory (exit 1 on its first non-image); `evaluate ""` looked for a run in it."""
    write_synthetic_folder(tmp_path / "cat")
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli(capsys, *words)
    assert code == 2 and "empty; give a value" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("inside", ["run", "red/run", "train/run"])
def test_an_out_among_the_datas_class_folders_is_refused_before_it_is_made(
    capsys, tmp_path, inside
):
    """A run directory where the data's classes are read would be read as a class (it was:
    "<data>/run: class folder holds no images", about a folder the user never made)."""
    plain = write_synthetic_folder(tmp_path / "plain")
    split = write_synthetic_folder(tmp_path / "split" / "train").parent
    data = split if inside.startswith("train") else plain
    before = sorted(data.rglob("*"))
    args = ["train", "--data", str(data), "--out", str(data / inside), "--epochs", "1"]
    _assert_one_line_error(*_cli(capsys, *args)[::2], "inside", "--out")
    assert sorted(data.rglob("*")) == before
    # beside the split folders is no class folder: a run there trains
    args = ["--data-root", str(tmp_path / "d"), "--batch-size", "8", "--val-size", "6"]
    assert main(["train", "--data", str(split), "--out", str(split / "runs" / "a"), *args,
                 "--epochs", "1", "--no-progress", "--set", "width=0.25"]) == 0  # fmt: skip


def test_a_phase_inside_another_counts_only_in_its_own_row(monkeypatch):
    import time

    from cifarlab import phases

    monkeypatch.setattr(phases, "_phases", None)  # restored after the test: profiling off
    phases.enable(time.perf_counter())
    t = time.perf_counter()
    with phases.phase("outer"):
        time.sleep(0.02)
        with phases.phase("inner"):
            time.sleep(0.15)
        time.sleep(0.05)
        phases.record("step", 0.05)  # recorded inside: also left out of outer's row
    total = time.perf_counter() - t
    rows = {name: wall for name, wall, _ in phases._phases}
    assert 0.0 < rows["outer"] < 0.1 < 0.15 <= rows["inner"]
    assert abs(sum(rows.values()) - total) < 0.01


def test_a_quoted_tilde_in_a_path_flag_means_the_home_folder(tmp_path, monkeypatch):
    from cifarlab.cli import build_parser

    monkeypatch.setenv("HOME", str(tmp_path))
    args = build_parser().parse_args(["train", "--out", "~/runs/a"])
    assert args.out == tmp_path / "runs" / "a"


def test_a_quoted_tilde_names_a_run_in_every_command_that_takes_one(
    capsys, synthetic_images, tmp_path, monkeypatch
):
    """`~` is expanded where runs and checkpoints are resolved (`resolve_checkpoint`): evaluate,
    predict, export, calibrate, load_model and load_checkpoint said "no such run directory"; a
    str and a run folder are what load_checkpoint takes too (docs/lesson.md's snippet)."""
    import cifarlab
    from cifarlab.checkpoint import load_checkpoint

    monkeypatch.setenv("HOME", str(tmp_path))
    code, _, err = _cli(
        capsys, "train", "--out", "~/runs/t1", "--data", str(synthetic_images), "--data-root",
        str(tmp_path / "d"), "--epochs", "1", "--batch-size", "8", "--val-size", "6",
        "--set", "width=0.25", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    image = str(synthetic_images / "test" / "red" / "000.png")
    for args in (["evaluate", "~/runs/t1"], ["predict", "~/runs/t1", image],
                 ["export", "~/runs/t1", "--format", "safetensors"], ["calibrate", "~/runs/t1"]):  # fmt: skip
        code, _, err = _cli(capsys, *args)
        assert code == 0, (args, err)
    run = tmp_path / "runs" / "t1"
    assert (run / "eval-val" / "report.json").is_file() and (run / "model.safetensors").is_file()
    assert len(cifarlab.load_model("~/runs/t1").predict([image])) == 1
    for given in ("~/runs/t1/best.pt", str(run), run):
        assert load_checkpoint(given)["classes"] == ["blue", "green", "red"]


def test_predict_names_the_flag_below_one(capsys, tmp_path):
    for flag in ("--top-k", "--batch-size"):
        code, _, err = _cli(capsys, "predict", str(tmp_path), str(tmp_path), flag, "0")
        _assert_one_line_error(code, err, f"{flag} 0: give a whole number >= 1")
        assert ({"--top-k", "--batch-size"} - {flag}).pop() not in err  # said "--top-k and ..."


def test_train_into_a_folder_of_other_files_advises_another_out_not_resume(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, _, err = _cli(capsys, "train", "--out", str(tmp_path / "out"), "--data", str(tmp_path))
    _assert_one_line_error(code, err, "other files (keep.txt)", "pick a new --out, or remove")
    assert "--resume" not in err


def test_an_error_about_a_file_named_with_a_newline_is_one_line(capsys, tmp_path):
    data = write_synthetic_folder(tmp_path / "d", per_class=4)
    (data / "red" / "new\nline.png").write_bytes(b"not a png")
    code, _, err = _cli(
        capsys, "train", "--out", str(tmp_path / "r"), "--data", str(data),
        "--data-root", str(tmp_path / "root"),
    )  # fmt: skip
    _assert_one_line_error(code, err, "new\\nline.png: not a readable image")


def test_predict_given_a_safetensors_exports_json_names_its_weights_file(capsys, tmp_path):
    image = (
        write_synthetic_folder(tmp_path / "d", classes=("red",), per_class=1) / "red" / "000.png"
    )
    (tmp_path / "exp.safetensors").write_bytes(b"weights")
    (tmp_path / "exp.json").write_text('{"classes": ["red"]}\n')
    code, _, err = _cli(capsys, "predict", str(tmp_path / "exp.json"), str(image))
    _assert_one_line_error(
        code,
        err,
        f"{tmp_path / 'exp.json'}: the metadata of the safetensors export exp.safetensors",
        "give `cifarlab predict` the exp.safetensors beside it",
    )
