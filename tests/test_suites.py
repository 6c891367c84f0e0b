import dataclasses
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cifarlab.cli import main
from cifarlab.errors import Interrupted, TrainingFailed, UserError
from cifarlab.suites import SuiteOptions, list_suites, load_suite, run_suite
from tests.conftest import disk_full_midway, write_synthetic_folder

SUITE = """
description: two tiny runs
reference: plain
runs:
  - {name: plain, recipe: fast, changes: "no augmentation, {epochs} epoch", set: {crop_padding: 0, flip: false, alt_flip: false}}
  - {name: flip, recipe: fast, changes: + flip, set: {crop_padding: 0}}
"""
TINY = {
    "batch_size": 50,
    "val_size": 100,
    "subset": 300,
    "progress": False,
    "threads": 1,
    "tta": "none",
    "warmup_epochs": 0.0,
}


def test_every_shipped_suite_parses_into_valid_configs():
    for name in list_suites():
        suite = load_suite(name, {"data": "x"})
        assert suite.runs and suite.reference in [r.name for r in suite.runs]


def test_a_runs_changes_give_the_length_it_trains_under_epochs_or_budget():
    for name in list_suites():  # a length in `changes` is the run's, e.g. "{epochs} epochs"
        for run in load_suite(name, {"data": "x"}, epochs=3).runs:
            assert all(int(n) <= 3 for n in re.findall(r"(\d+) epoch", run.changes)), run.changes
    one = load_suite("exercise-1", {"data": "x"}, epochs=2).runs[0]
    assert one.changes.endswith(", 2 epochs") and "50" not in one.changes
    staged = load_suite("exercise-4", {"data": "x"}, budget=0.1).runs[2]
    assert staged.changes.endswith("only fc trains for 1 epochs, then all layers to epoch 3")
    assert load_suite("exercise-1", {"data": "x"}).runs[0].changes.endswith(", 50 epochs")
    speed = load_suite("speed-ingredients", {"data": "x"}, epochs=2).runs[0].changes
    assert speed.startswith("fast-sgd over 2 epochs (0.5 of warm-up) +")


def test_braces_in_changes_that_name_no_config_key_are_kept(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text('runs:\n  - {name: a, recipe: fast, changes: "{lr} x2 {nope} {}"}\n')
    assert load_suite(str(path), {"data": "x"}).runs[0].changes == "1.66 x2 {nope} {}"


def test_ablation_is_cumulative():
    runs = load_suite("exercise-5", {"data": "x"}).runs
    assert runs[0].config.model == "cnn" and not runs[0].config.flip
    assert (
        runs[-1].config.model == "resnet18"
        and runs[-1].config.label_smoothing == 0.1
        and runs[-1].config.flip
    )


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("runs: 3\n", "'runs' must be a non-empty list"),
        ("runs:\n  - {name: a, recipe: seed-cnn, set: {lr: -1}}\n", "'lr' must be > 0"),
        (
            "runs:\n  - {name: a, recipe: seed-cnn}\nreference: b\n",
            "reference 'b' is not one of the runs",
        ),
        ("runz: []\n", "unknown suite keys"),
        ("runs: [\n", "not valid YAML"),
    ],
)
def test_malformed_suite_is_a_one_line_error(tmp_path, capsys, text, needle):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    assert main(["suite", str(path), "--data", "x", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_list_and_unknown_suite(capsys):
    assert main(["suite", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(
        name in out
        for name in (*(f"exercise-{i}" for i in range(1, 6)), "cutmix", "speed-ingredients")
    )
    assert main(["suite", "nope", "--data", "x", "--out", "y"]) == 2


@pytest.fixture(scope="module")
def finished(real_jpegs, tmp_path_factory):
    """SUITE trained (1 epoch a run) into `<root>/out`: (its file, its options, its rows, what
    it said). Tests that write into --out copy it first."""
    root = tmp_path_factory.mktemp("suite")
    (root / "s.yaml").write_text(SUITE)
    overrides = {**TINY, "data": str(real_jpegs), "data_root": str(root / "d")}
    opts = SuiteOptions(root / "out", epochs=1, overrides=overrides)
    messages = []
    rows = run_suite(str(root / "s.yaml"), opts, log=messages.append)
    return root / "s.yaml", opts, rows, messages


def test_suite_writes_table_plot_index_and_skips_finished_runs(finished, tmp_path):
    path, opts, rows, _ = finished
    assert [r["run"] for r in rows] == ["plain", "flip"] and rows[0]["gain"] == 0.0
    for name in ("results.csv", "results.md", "curves.png", "index.html"):
        assert (opts.out / name).is_file()
    assert "| flip | + flip |" in (opts.out / "results.md").read_text()
    assert "| plain | no augmentation, 1 epoch |" in (opts.out / "results.md").read_text()
    opts = dataclasses.replace(opts, out=shutil.copytree(opts.out, tmp_path / "out"))
    messages = []
    run_suite(str(path), opts, log=messages.append)
    assert sum("finished earlier" in m for m in messages) == 2
    # killed during its evaluation: a report without report.json is evaluated again, not skipped
    (opts.out / "flip" / "eval-val" / "report.json").unlink()
    messages = []
    run_suite(str(path), opts, log=messages.append)
    assert sum("finished earlier" in m for m in messages) == 1
    assert (opts.out / "flip" / "eval-val" / "report.json").is_file()


def test_a_suite_says_its_precision_decision_once_not_once_a_run(finished):
    said = finished[3]
    amp = [m for m in said if "amp: " in m]
    assert amp == ["amp: auto -> fp32 (this CPU has no bf16 instructions)"], said
    assert said.index(amp[0]) > said.index("[plain] training: no augmentation, 1 epoch")


def test_a_run_deciding_its_precision_otherwise_says_it_under_its_name():
    """Said once without a run's name, a second run's own `amp:` line (its `--set amp=bf16`)
    read as the suite's decision changing for every run after it."""
    from cifarlab.suites import _say

    said, once = [], set()
    for run, line in [("a", "amp: auto -> fp32 (no bf16)"), ("b", "amp: auto -> fp32 (no bf16)"),
                      ("c", "amp: bf16 (set)"), ("d", "amp: auto -> fp32 (no bf16)"),
                      ("e", "amp: bf16 (set)")]:  # fmt: skip
        _say(said.append, f"  [{run}] ", once, line)
    assert said == ["amp: auto -> fp32 (no bf16)", "  [c] amp: bf16 (set)", "  [e] amp: bf16 (set)"]


def test_a_rerun_of_a_finished_suite_writes_its_tables_without_reading_the_data(
    finished, tmp_path, monkeypatch
):
    """Every run finished earlier: nothing reads the data (decoding a large set takes minutes),
    and Mixup examples drawn from it before are kept."""
    _path, opts, *_ = finished
    opts = dataclasses.replace(opts, out=shutil.copytree(opts.out, tmp_path / "out"))
    (opts.out / "mixup_examples.png").write_bytes(b"drawn before")
    (tmp_path / "s.yaml").write_text("examples: mixup\n" + SUITE)  # its runs are the same

    def unread(*args, **kwargs):
        raise AssertionError("the data was read")

    monkeypatch.setattr("cifarlab.data.load_splits", unread)
    monkeypatch.setattr("cifarlab.data.splits.load_splits", unread)
    messages = []
    rows = run_suite(str(tmp_path / "s.yaml"), opts, log=messages.append)
    assert sum("finished earlier" in m for m in messages) == 2 and "best_val_acc" in rows[1]
    assert (opts.out / "mixup_examples.png").read_bytes() == b"drawn before"
    assert "mixup_examples.png" in (opts.out / "index.html").read_text()


def test_more_seeds_keep_the_run_trained_under_one_seed_instead_of_training_it_again(
    finished, tmp_path
):
    path, opts, *_ = finished
    opts = dataclasses.replace(opts, out=shutil.copytree(opts.out, tmp_path / "out"), seeds=[0, 1])
    messages = []
    run_suite(str(path), dataclasses.replace(opts, only="plain"), log=messages.append)
    assert any("[plain-seed0] finished earlier" in m for m in messages), messages
    assert any("[plain-seed1] training" in m for m in messages), messages
    names = sorted(p.name for p in opts.out.iterdir() if p.is_dir())
    assert names == ["flip-seed0", "plain-seed0", "plain-seed1"]  # no `plain` left behind
    assert not (opts.out / "plain-seed0" / ".lock").exists()  # the lock moved and was let go
    messages = []  # and back to one seed: seed 0's folder is `plain` again
    rows = run_suite(str(path), dataclasses.replace(opts, seeds=[0]), log=messages.append)
    assert sum("finished earlier" in m for m in messages) == 2 and rows[0]["seeds"] == 1
    assert (opts.out / "plain" / "last.pt").is_file() and (opts.out / "flip" / "last.pt").is_file()
    (opts.out / "plain-seed1").rename(opts.out / "kept")  # seed 1 trains again below
    (opts.out / "plain" / "last.pt").write_bytes(b"damaged")  # a leftover the suite does not use
    messages = []
    run_suite(str(path), dataclasses.replace(opts, only="plain"), log=messages.append)
    assert any("[plain-seed0] training" in m for m in messages), messages
    assert (opts.out / "plain" / "last.pt").read_bytes() == b"damaged"


def test_a_run_another_suite_renamed_first_is_not_an_error(finished, tmp_path, monkeypatch):
    from cifarlab import train

    path, opts, *_ = finished
    opts = dataclasses.replace(opts, out=shutil.copytree(opts.out, tmp_path / "out"), seeds=[0, 1])
    read = train.saved_config

    def raced(run_dir):  # a second suite on this --out renames `plain` as this one reads it
        saved = read(run_dir)
        if run_dir.name == "plain" and saved[0]:
            run_dir.rename(run_dir.with_name("plain-seed0"))
        return saved

    monkeypatch.setattr(train, "saved_config", raced)
    messages = []  # it was "cannot lock the run directory ...; make out/plain writable"
    run_suite(str(path), dataclasses.replace(opts, only="plain"), log=messages.append)
    assert any("[plain-seed0] finished earlier" in m for m in messages), messages
    assert not (opts.out / "flip-seed0" / ".lock").exists()  # the lock went with the rename


def test_a_run_stopped_before_its_first_checkpoint_is_renamed_too(finished, tmp_path):
    path, opts, *_ = finished
    opts = dataclasses.replace(opts, out=shutil.copytree(opts.out, tmp_path / "out"), seeds=[0, 1])
    for file in (opts.out / "plain").iterdir():  # stopped in its first epoch: config.yaml alone
        if file.name != "config.yaml":
            shutil.rmtree(file) if file.is_dir() else file.unlink()
    run_suite(str(path), dataclasses.replace(opts, only="plain"), log=lambda s: None)
    assert not (opts.out / "plain").exists()  # not left beside the run trained as plain-seed0
    assert (opts.out / "plain-seed0" / "result.json").is_file()


def test_a_run_another_process_trains_is_not_trained_again_under_its_new_name(finished, tmp_path):
    from cifarlab.rundir import RunLock

    path, opts, *_ = finished
    opts = dataclasses.replace(opts, out=shutil.copytree(opts.out, tmp_path / "out"), seeds=[0, 1])
    with RunLock(opts.out / "plain"), pytest.raises(UserError, match="plain is in use"):
        run_suite(str(path), dataclasses.replace(opts, only="plain"), log=lambda s: None)
    assert not (opts.out / "plain-seed0").exists()  # it was trained from scratch beside `plain`


def test_a_run_named_after_its_recipe_takes_the_name_of_the_recipe_that_replaces_it(
    real_jpegs, tmp_path
):
    assert load_suite("exercise-1", {}).runs[0].name == "seed-cnn"  # the recipe it trains
    overrides = {**TINY, "data": str(real_jpegs), "data_root": str(tmp_path / "d"), "width": 0.25}
    opts = SuiteOptions(tmp_path / "out", epochs=1, overrides=overrides, recipe="lesson-cnn")
    rows = run_suite("exercise-1", opts, log=lambda s: None)
    assert [r["run"] for r in rows] == ["lesson-cnn"] and rows[0]["gain"] == 0.0  # the reference
    (opts.out / "lesson-cnn").rename(opts.out / "seed-cnn")  # as trained before the rename
    messages = []
    run_suite("exercise-1", opts, log=messages.append)
    assert any("[lesson-cnn] finished earlier" in m for m in messages), messages
    assert not (opts.out / "seed-cnn").exists()


def test_only_takes_a_runs_name_under_recipe_or_its_name_in_the_suite_file(real_jpegs, tmp_path):
    """`--only seed-cnn --recipe lesson-cnn` was refused: "no such run ...; runs: lesson-cnn"."""
    overrides = {**TINY, "data": str(real_jpegs), "data_root": str(tmp_path / "d"), "width": 0.25}
    opts = SuiteOptions(tmp_path / "out", epochs=1, overrides=overrides, recipe="lesson-cnn")
    with pytest.raises(UserError, match=r"--only nope: .*; runs: lesson-cnn \(or seed-cnn\)$"):
        run_suite("exercise-1", dataclasses.replace(opts, only="nope"), log=lambda s: None)
    messages = []
    for only in ("seed-cnn", "lesson-cnn"):
        rows = run_suite("exercise-1", dataclasses.replace(opts, only=only), log=messages.append)
        assert [r["run"] for r in rows] == ["lesson-cnn"] and rows[0]["seeds"] == 1
    assert any("[lesson-cnn] finished earlier" in m for m in messages), messages


def test_suite_killed_mid_run_finishes_without_repeating_runs(real_jpegs, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SUITE)
    args = [sys.executable, "-m", "cifarlab", "suite", str(path), "--data", str(real_jpegs), "--out", str(tmp_path / "o"),
            "--epochs", "2", "--no-progress"] + [a for k, v in TINY.items() if k != "progress" for a in ("--set", f"{k}={v}")]  # fmt: skip
    args += ["--set", f"data_root={tmp_path / 'd'}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (tmp_path / "o" / "flip" / "last.pt").exists() and time.time() < deadline:
        assert proc.poll() is None, "the suite ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "no last.pt yet" not in proc.stdout.read()  # a first run is not called a resume
    assert (tmp_path / "o" / "plain" / "result.json").is_file()
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "[plain] finished earlier" in again.stdout and "[flip] resuming" in again.stdout
    assert (tmp_path / "o" / "flip" / "result.json").is_file()


def test_unknown_only_run_is_an_error(tmp_path):
    with pytest.raises(UserError, match="--only nope"):
        run_suite(
            "exercise-4",
            SuiteOptions(tmp_path, only="nope", overrides={"data": "x"}),
            log=lambda s: None,
        )


def test_a_bad_seed_is_refused_before_the_suites_folder_is_made(tmp_path):
    with pytest.raises(UserError, match="--seeds: 'seed' must be >= 0, got -1"):
        run_suite("cutmix", SuiteOptions(tmp_path / "o", seeds=[0, -1], overrides={"data": "x"}),
                  log=lambda s: None)  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_a_seed_in_set_or_in_a_runs_set_is_refused_not_dropped(tmp_path):
    with pytest.raises(UserError, match="seeds come from --seeds"):  # seed 0 was trained
        load_suite("cutmix", {"data": "x", "seed": 3})
    path = tmp_path / "s.yaml"
    path.write_text(SUITE.replace("set: {crop_padding: 0}", "set: {crop_padding: 0, seed: 7}"))
    with pytest.raises(UserError, match="run 2: a suite's seeds come from --seeds"):
        load_suite(str(path), {"data": "x"})


def test_a_suite_stopped_mid_run_says_to_run_the_suite_again(tmp_path, monkeypatch):
    def stopped(config, run_dir, **kw):
        raise Interrupted(f"stopped at epoch 1 step 3; saved {run_dir}/last.pt. Resume with: "
                          f"cifarlab train --out {run_dir} --resume", 130)  # fmt: skip

    monkeypatch.setattr("cifarlab.train.train", stopped)
    monkeypatch.setattr("cifarlab.suites._refuse_bad_data", lambda jobs: {})  # data "x"
    with pytest.raises(
        Interrupted,
        match=r"no-cutmix: stopped at epoch 1 step 3; saved .*last.pt; run the same suite",
    ) as stop:
        run_suite(
            "cutmix", SuiteOptions(tmp_path / "o", overrides={"data": "x"}), log=lambda s: None
        )
    assert stop.value.exit_code == 130 and "cifarlab train" not in str(stop.value)


def test_a_divergence_cut_short_while_recorded_leaves_no_diverged_txt(tmp_path, monkeypatch):
    """A half-written diverged.txt made every later suite command skip the run as diverged."""

    def diverges(config, run_dir, **kw):
        run_dir.mkdir(parents=True)
        raise TrainingFailed("diverged: non-finite loss at epoch 1 step 3; the last good ...")

    monkeypatch.setattr("cifarlab.train.train", diverges)
    monkeypatch.setattr("cifarlab.suites._refuse_bad_data", lambda jobs: {})  # data "x"
    disk_full_midway(monkeypatch, "diverged")
    opts = SuiteOptions(tmp_path / "o", overrides={"data": "x"})
    with pytest.raises(OSError, match="No space left"):
        run_suite("cutmix", opts, log=lambda s: None)
    assert not [p.name for p in (tmp_path / "o").rglob("*diverged*")]  # nor a temporary file


def test_a_run_that_cannot_start_is_reported_and_the_suite_goes_on(finished, tmp_path):
    _path, opts, *_ = finished
    shutil.copytree(opts.out / "plain", tmp_path / "o" / "plain")  # finished: skipped
    path = tmp_path / "s.yaml"
    path.write_text(
        SUITE.replace(
            "set: {crop_padding: 0}}",
            "set: {crop_padding: 0, classes: [cat, unicorn]}}",
        )
    )
    messages = []
    rows = run_suite(str(path), dataclasses.replace(opts, out=tmp_path / "o"), log=messages.append)
    assert any(
        "[flip] cannot start: " in m and "unknown classes ['unicorn']" in m for m in messages
    )
    assert "cannot start" in rows[1]["status"] and "best_val_acc" in rows[0]
    assert "cannot start" in (tmp_path / "o" / "results.md").read_text()


def test_a_run_another_process_is_training_is_no_result_in_the_table_and_exit_1(
    finished, tmp_path, capsys
):
    """A second `suite` on the same --out while the first trains a run: that run "cannot start"
    here, and its metrics.csv so far was tabulated as its result, with exit 0."""
    from cifarlab.cli import main
    from cifarlab.rundir import RunLock

    path, opts, *_ = finished
    out = shutil.copytree(opts.out, tmp_path / "out")
    (out / "flip" / "result.json").unlink()  # unfinished: its next suite resumes it
    argv = ["suite", str(path), "--out", str(out), "--epochs", "1"]
    argv += ["--data", opts.overrides["data"], "--data-root", opts.overrides["data_root"]]
    for key, value in TINY.items():
        argv += ["--set", f"{key}={value}"]
    with RunLock(out / "flip"):  # as the process training it holds it
        assert main(argv) == 1
    assert "1 run(s) could not start: flip" in capsys.readouterr().err
    table = (out / "results.md").read_text()
    assert "| flip | + flip | cannot start: " in table and "is in use by" in table


def test_a_run_that_diverges_is_shown_as_diverged_and_the_suite_goes_on(real_jpegs, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SUITE.replace("set: {crop_padding: 0}}", "set: {crop_padding: 0, lr: 1.0e+4}}"))
    opts = SuiteOptions(
        tmp_path / "o",
        epochs=1,
        only="flip",
        overrides={**TINY, "data": str(real_jpegs), "data_root": str(tmp_path / "d")},
    )
    rows = run_suite(str(path), opts, log=lambda s: None)  # no exception: the table is written
    assert rows[1]["status"].startswith("diverged: ") and "at epoch 1 step" in rows[1]["status"]
    assert "best_val_acc" not in rows[1] and "gain" not in rows[1]  # no number for it
    assert "| flip | + flip | diverged: " in (tmp_path / "o" / "results.md").read_text()
    messages = []
    run_suite(str(path), opts, log=messages.append)  # it would diverge again: not retrained
    assert any("[flip] diverged earlier" in m for m in messages)


def test_mixup_examples_show_four_mixed_images_per_alpha(real_jpegs, tmp_path):
    from cifarlab.report.suite import mixup_examples

    suite = load_suite(
        "exercise-3", {"data": str(real_jpegs), "data_root": str(tmp_path / "d"), "val_size": 100}
    )
    assert sorted(r.config.mixup_alpha for r in suite.runs) == [0.0, 0.2, 0.5, 1.0]
    mixup_examples(suite, tmp_path / "mixup_examples.png")
    assert (tmp_path / "mixup_examples.png").stat().st_size > 30_000


def test_weights_for_a_suite_without_pretrained_runs_are_refused_not_ignored():
    with pytest.raises(UserError, match="--weights.*no run of suite exercise-2"):
        load_suite("exercise-2", {"weights": "imagenet.pth"})


def test_unquoted_numbers_in_a_suite_read_as_their_text(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "runs:\n  - {name: 0.1, recipe: fast, changes: 0.5}\n  - {name: b, recipe: fast}\n"
    )
    suite = load_suite(str(path), {"data": "x"})
    assert suite.runs[0].name == "0.1" and suite.runs[0].changes == "0.5"


def test_a_runs_recipe_file_is_found_beside_the_suite_file_from_any_folder(tmp_path, monkeypatch):
    """As a recipe's `base:` file is: `cifarlab suite my/s.yaml` said "r.yaml does not exist"."""
    (tmp_path / "my").mkdir()
    (tmp_path / "my" / "r.yaml").write_text("base: fast\nlr: 0.5\n")
    (tmp_path / "my" / "s.yaml").write_text("runs:\n  - {name: a, recipe: r.yaml}\n")
    monkeypatch.chdir(tmp_path)
    assert load_suite("my/s.yaml", {"data": "x"}).runs[0].config.lr == 0.5


def test_an_unquoted_number_as_a_runs_recipe_is_a_recipe_name_not_a_traceback(tmp_path, capsys):
    """`recipe: 5` passed the type check as text and reached `load_recipe` as an int."""
    path = tmp_path / "s.yaml"
    path.write_text("runs:\n  - {name: a, recipe: fast}\n  - {name: b, recipe: 5}\n")
    assert main(["suite", str(path), "--data", "x", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "run 2" in err and "'5'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_missing_weights_file_stops_a_suite_before_any_run_trains(tmp_path, capsys):
    with pytest.raises(UserError, match="weights /no/such.pth: no such file"):
        load_suite("exercise-4", {"data": "x", "weights": "/no/such.pth"})
    args = [
        "suite",
        "exercise-4",
        "--data",
        "x",
        "--weights",
        "/no/such.pth",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(args) == 2 and not (tmp_path / "o").exists()
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(UserError, match="weights .* is a folder"):
        load_suite("exercise-4", {"data": "x", "weights": str(tmp_path)})
    named = load_suite("exercise-4", {"data": "x", "weights": "IMAGENET1K_V1"})  # torchvision's
    assert {r.config.weights for r in named.runs if r.config.pretrained} == {"IMAGENET1K_V1"}


@pytest.mark.parametrize(
    "name",
    ["x" * 300, "''", "null", '"a\\nb"', '"a\\tb"', "' a'", "true"],
    ids=["too-long", "empty", "null", "newline", "tab", "leading-space", "boolean"],
)
def test_a_suite_run_name_that_is_no_plain_line_is_refused_before_training(tmp_path, capsys, name):
    path = tmp_path / "s.yaml"
    path.write_text(f"runs:\n  - {{name: {name}, recipe: fast}}\n  - {{name: ok, recipe: fast}}\n")
    out = tmp_path / "out"
    assert main(["suite", str(path), "--data", "x", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{path} run 1: run name" in err and "plain folder name" in err
    assert len(err.splitlines()) == 1 and len(err) < 300 and not out.exists()


@pytest.mark.parametrize(
    "name", ["index.html", "results.csv", "curves_val_acc.png", "result.json", "last.pt"]
)
def test_a_suite_run_named_like_a_file_beside_it_is_refused(tmp_path, capsys, name):
    path = tmp_path / "s.yaml"  # its folder would stand where the suite's table or a run file goes
    path.write_text(f"runs:\n  - {{name: ok, recipe: fast}}\n  - {{name: {name}, recipe: fast}}\n")
    assert main(["suite", str(path), "--data", "x", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"run 2: run name '{name}' is a file" in err and len(err.splitlines()) == 1


def test_a_suite_run_named_like_another_runs_seed_folder_is_refused(tmp_path, capsys):
    path = tmp_path / "s.yaml"  # under --seeds 0,1 run a trains into a-seed0/
    path.write_text("runs:\n  - {name: a-seed0, recipe: fast}\n  - {name: a, recipe: fast}\n")
    assert main(["suite", str(path), "--data", "x", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "run name 'a-seed0' is the folder of run 'a'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('cumulative: "false"', "'cumulative' must be true or false"),
        ("description: yes", "'description' must be a string"),
        ("reference: [a]", "'reference' must be a run's name"),
        ("examples: {a: 1}", "'examples' must be a string"),
    ],
)
def test_suite_keys_of_the_wrong_type_are_refused(tmp_path, capsys, line, needle):
    path = tmp_path / "s.yaml"
    path.write_text(f"{line}\nruns:\n  - {{name: a, recipe: fast}}\n")
    assert main(["suite", str(path), "--data", "x", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and str(path) in err and len(err.splitlines()) == 1


def test_suite_run_keys_of_the_wrong_type_are_refused(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "runs:\n  - {name: a, recipe: fast}\n  - {name: b, recipe: fast, changes: no}\n"
    )
    with pytest.raises(UserError, match=r"run 2: 'changes' must be a string, got False"):
        load_suite(str(path), {"data": "x"})


def test_val_size_zero_on_data_without_a_test_split_is_refused_before_any_run_trains(
    tmp_path, capsys
):
    """With no validation split a suite compares on test: data without one would train every
    run for a table with no accuracy in it."""
    data = write_synthetic_folder(tmp_path / "plain" / "train")
    (tmp_path / "s.yaml").write_text(SUITE)
    out = tmp_path / "o"
    args = ["suite", str(tmp_path / "s.yaml"), "--data", str(data.parent), "--out", str(out)]
    tiny = ["--data-root", str(tmp_path / "d"), "--epochs", "1", "--batch-size", "8"]
    code = main([*args, *tiny, "--val-size", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "no test split" in err and "--val-size" in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--val-size", "36"], "val_size=36 leaves no training images out of 36"),
        (["--subset", "30", "--val-size", "6", "--batch-size", "50"], "batch_size=50 is larger"),
        (["--subset", "300", "--val-size", "6"], "subset=300 is larger than the 36"),
        (["--val-size", "2"], "--val-size 2 holds out fewer images than the 3 classes"),
        (["--data", "no-such-folder"], "no-such-folder: no such file or folder"),
    ],
)
def test_data_too_small_or_missing_for_every_run_is_refused_before_the_suite_starts(
    synthetic_images, tmp_path, capsys, flags, needle
):
    """A learner's --val-size, --subset or --data that no run can train with: one line and exit 2,
    no --out (it was exit 1, each run "cannot start", a table of empty rows left in --out)."""
    out = tmp_path / "o"
    argv = ["suite", "exercise-2", "--data", str(synthetic_images), "--out", str(out)]
    argv += ["--data-root", str(tmp_path / "d"), "--epochs", "1", "--batch-size", "8", *flags]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert needle in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
    assert "cannot start" not in captured.out and not out.exists()


def test_an_out_among_the_class_folders_is_refused_before_it_is_made(
    synthetic_images, tmp_path, capsys
):
    """Every run would be refused there, and the folder left behind read as an empty class."""
    data = shutil.copytree(synthetic_images / "train", tmp_path / "data")
    out = data / "suite"
    argv = ["suite", "exercise-2", "--data", str(data), "--val-size", "6", "--out", str(out)]
    assert main(argv) == 2  # it was 1: each run "cannot start", the suite's tables in --out
    assert "whose folders are read as classes" in capsys.readouterr().err and not out.exists()


def test_an_out_holding_a_training_run_is_refused_before_anything_is_written(
    synthetic_images, tmp_path, capsys
):
    run = tmp_path / "run"  # a training run's folder: the suite's tables would sit among its files
    run.mkdir()
    (run / "metrics.csv").write_text("epoch\n")
    argv = ["suite", "exercise-2", "--data", str(synthetic_images), "--val-size", "6", "--out"]
    assert main([*argv, str(run)]) == 2
    assert "holds a training run (metrics.csv)" in capsys.readouterr().err
    assert [p.name for p in run.iterdir()] == ["metrics.csv"]


def test_an_out_holding_another_suites_tables_is_refused_before_anything_is_written(
    synthetic_images, tmp_path, capsys
):
    """exercise-3 into exercise-2's --out replaced exercise-2's results.md, results.csv and
    index.html with its own, the runs of both suites mixed in one folder."""
    out = tmp_path / "ex"
    out.mkdir()
    table = "# Suite `exercise-2`\n\n| run |\n"
    (out / "results.md").write_text(table)
    argv = ["suite", "exercise-3", "--data", str(synthetic_images), "--val-size", "6"]
    assert main([*argv, "--epochs", "1", "--batch-size", "8", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds suite exercise-2's runs and tables" in err and "exercise-3" in err
    assert [p.name for p in out.iterdir()] == ["results.md"]
    assert (out / "results.md").read_text() == table


def test_a_report_older_than_the_runs_end_is_scored_again(tmp_path):
    import os
    from types import SimpleNamespace

    from cifarlab.suites import _skipped

    run = SimpleNamespace(requires="")
    result = {"seconds": 1.0, "images_per_s": 1.0, "epochs": 1, "final_val_acc": 0.5}
    (tmp_path / "eval-val").mkdir()
    (tmp_path / "eval-val" / "report.json").write_text("{}")  # an evaluate while it trained
    (tmp_path / "result.json").write_text(json.dumps({**result, "best_val_acc": 0.5}))
    os.utime(tmp_path / "eval-val" / "report.json", (1e9, 1e9))
    assert _skipped(run, tmp_path) == ""  # trained on after that report: evaluated again
    (tmp_path / "eval-val" / "report.json").write_text("{}")
    assert "finished earlier" in _skipped(run, tmp_path)
    # without a validation split its report is eval-test/: none yet
    (tmp_path / "result.json").write_text(json.dumps({**result, "best_val_acc": None}))
    assert _skipped(run, tmp_path) == ""


@pytest.mark.parametrize("val_folder", [True, False])
def test_a_val_size_0_run_is_scored_on_its_datas_val_folder_if_any_and_then_skipped(
    synthetic_images, tmp_path, val_folder
):
    data = shutil.copytree(synthetic_images, tmp_path / "data")
    if val_folder:
        write_synthetic_folder(data / "val", per_class=4)
    (tmp_path / "s.yaml").write_text("runs:\n  - {name: plain, recipe: fast}\n")
    overrides = {**TINY, "data": str(data), "data_root": str(tmp_path / "d"), "val_size": 0,
                 "subset": 0, "batch_size": 12}  # fmt: skip
    opts = SuiteOptions(tmp_path / "out", epochs=1, overrides=overrides)
    run_suite(str(tmp_path / "s.yaml"), opts, log=lambda s: None)
    split = "val" if val_folder else "test"
    assert [p.name for p in (opts.out / "plain").glob("eval-*")] == [f"eval-{split}"]
    messages = []
    run_suite(str(tmp_path / "s.yaml"), opts, log=messages.append)
    assert any("[plain] finished earlier" in m for m in messages), messages
