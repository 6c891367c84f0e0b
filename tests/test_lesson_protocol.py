"""The lesson's protocol: test accuracy recorded every epoch (never used to select), suites
compared on test under `--val-size 0`, and Exercise 1's confused pairs in both directions."""

import json
import math
import shutil

import numpy as np
import pytest

from cifarlab import metrics
from cifarlab.rundir import read_metrics
from cifarlab.suites import SuiteOptions, run_suite
from cifarlab.train import train
from tests.conftest import make_config


@pytest.fixture(scope="module")
def train_and_test(real_jpegs, tmp_path_factory):
    """The real JPEGs split per class: 45 images to train/, 15 to test/."""
    root = tmp_path_factory.mktemp("lesson-split")
    for folder in sorted((real_jpegs / "train").iterdir()):
        for i, image in enumerate(sorted(folder.iterdir())):
            dest = root / ("test" if i % 4 == 0 else "train") / folder.name / image.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, dest)
    return root


def _tiny(data, tmp_path, **more):
    return make_config(
        data=str(data), data_root=str(tmp_path / "d"), model="cnn", width=0.25,
        batch_size=50, subset=200, threads=1, **more,
    )  # fmt: skip


def test_suite_under_val_size_0_compares_every_run_on_test(train_and_test, tmp_path):
    overrides = {"data": str(train_and_test), "data_root": str(tmp_path / "d"), "val_size": 0,
                 "batch_size": 50, "threads": 1, "progress": False, "width": 0.25, "subset": 200}  # fmt: skip
    out = tmp_path / "out"
    rows = run_suite("exercise-2", SuiteOptions(out, overrides=overrides, epochs=1), log=print)
    assert len(rows) == 3
    for r in rows:
        assert 0.0 < r["best_test_acc"] < 1.0 and not math.isnan(r["final_test_acc"])
        assert "best_val_acc" not in r  # no validation split: no validation figures at all
        history = read_metrics(out / r["run"] / "metrics.csv")
        assert history and all(not math.isnan(e["test_acc"]) for e in history)
        saved = json.loads((out / r["run"] / "result.json").read_text())
        assert saved["best_test_acc"] == pytest.approx(max(e["test_acc"] for e in history))
    table = (out / "results.md").read_text()
    assert "best test acc" in table and "chosen on test" in table
    assert "val acc" not in table
    cells = [line.split(" | ") for line in table.splitlines() if line.startswith("| ")][1:]
    assert all(any(c.strip(" |") != "–" for c in column) for column in zip(*cells, strict=True))
    assert (out / "curves_test_acc.png").is_file()
    assert not (out / "curves_val_acc.png").exists()
    assert "curves_test_acc.png" in (out / "index.html").read_text()
    report = (out / "none" / "eval-test" / "report.html").read_text()
    assert "chosen on test: optimistic" in report and "both directions" in report


def test_test_accuracy_is_recorded_every_epoch_but_never_selects(train_and_test, tmp_path):
    lines = []
    result = train(_tiny(train_and_test, tmp_path, epochs=2, val_size=50), tmp_path / "run",
                   log=lines.append)  # fmt: skip
    history = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [not math.isnan(e["test_acc"]) and e["test_loss"] > 0 for e in history] == [True, True]
    assert result.best_test_acc is None  # selected on validation: no best-on-test figure
    assert any("test loss" in m and m.startswith("epoch 2/2") for m in lines)


def test_resumed_run_keeps_test_accuracy_on_every_row(train_and_test, tmp_path):
    config = _tiny(train_and_test, tmp_path, epochs=2, val_size=0)

    def stop_after_first(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "run", on_epoch=stop_after_first, log=lambda s: None)
    assert len(read_metrics(tmp_path / "run" / "metrics.csv")) == 1
    result = train(config, tmp_path / "run", resume=True, log=lambda s: None)
    history = read_metrics(tmp_path / "run" / "metrics.csv")
    assert len(history) == 2 and all(not math.isnan(e["test_acc"]) for e in history)
    assert result.best_test_acc == max(e["test_acc"] for e in history)


def test_confused_pairs_sum_both_directions():
    cm = np.array([[10, 3, 0], [4, 8, 1], [0, 5, 9]])  # cat, dog, frog
    pairs = metrics.most_confused_pairs(cm, ["cat", "dog", "frog"])
    assert pairs[0]["classes"] == ["cat", "dog"] and pairs[0]["count"] == 7
    assert (pairs[0]["forward"], pairs[0]["backward"]) == (3, 4)
    assert pairs[1]["classes"] == ["dog", "frog"] and pairs[1]["count"] == 6
    assert len(pairs) == 2  # cat and frog are never confused
    one_way = metrics.most_confused(cm, ["cat", "dog", "frog"])
    assert (one_way[0]["true"], one_way[0]["predicted"]) == ("frog", "dog")
