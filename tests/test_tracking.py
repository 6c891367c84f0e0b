"""Tracking: an MLflow run read back through MLflow's own client, TensorBoard's event files read
back through TensorBoard's own loader; tiny runs on the synthetic colour images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cifarlab.config import (
    TrainConfig,
    apply_overrides,
    parse_names,
    read_yaml_mapping,
    validate_config,
)
from cifarlab.errors import UserError
from cifarlab.evaluate import EvalOptions, evaluate
from cifarlab.rundir import read_metrics
from cifarlab.tracking import MLFLOW_LINK, default_tracking_uri, flat_params
from cifarlab.train import train
from tests.conftest import make_config

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

quiet = lambda s: None  # noqa: E731


def tiny(synthetic_images: Path, tmp_path: Path, **overrides):
    base = dict(
        data=str(synthetic_images), data_root=str(tmp_path / "d"), epochs=2, batch_size=8,
        val_size=6, lr=0.01, warmup_epochs=0.0, threads=1,
    )  # fmt: skip
    return make_config(**{**base, **overrides})


def test_mlflow_run_holds_the_config_every_epoch_the_checkpoint_and_the_report(
    synthetic_images, tmp_path
):
    config = tiny(synthetic_images, tmp_path, tracking="mlflow", experiment="colours")
    run_dir = tmp_path / "runs" / "first"
    train(config, run_dir, log=quiet)
    evaluate(EvalOptions(str(run_dir), split="val", device="cpu"), log=quiet)

    link = json.loads((run_dir / MLFLOW_LINK).read_text())
    assert link["tracking_uri"] == default_tracking_uri(run_dir)  # sqlite beside the runs
    assert (tmp_path / "runs" / "mlflow.db").is_file()
    client = mlflow.tracking.MlflowClient(link["tracking_uri"])
    run = client.get_run(link["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    assert client.get_experiment(run.info.experiment_id).name == "colours"
    resolved = apply_overrides(TrainConfig(), read_yaml_mapping(run_dir / "config.yaml"), "test")
    assert run.data.params == {k: str(v) for k, v in flat_params(resolved).items()}
    assert run.data.params["experiment"] == "colours" and run.data.params["amp"] == "off"

    rows = read_metrics(run_dir / "metrics.csv")
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"):
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(r["epoch"], r[key]) for r in rows]
    assert "best_val_acc" in run.data.metrics and "val_accuracy" in run.data.metrics

    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.csv", "result.json", "checkpoint", "report"} <= top
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == [
        "checkpoint/best.pt"
    ]
    report = {a.path for a in client.list_artifacts(run.info.run_id, "report/eval-val")}
    assert {"report/eval-val/report.html", "report/eval-val/report.json"} <= report
    assert run.info.artifact_uri.startswith((tmp_path / "runs" / "mlartifacts").as_uri())


def test_a_run_that_fails_leaves_its_mlflow_run_marked_failed(synthetic_images, tmp_path):
    config = tiny(synthetic_images, tmp_path, tracking="mlflow", epochs=1)

    def explode(row):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        train(config, tmp_path / "runs" / "x", log=quiet, on_epoch=explode)
    link = json.loads((tmp_path / "runs" / "x" / MLFLOW_LINK).read_text())
    client = mlflow.tracking.MlflowClient(link["tracking_uri"])
    assert client.get_run(link["run_id"]).info.status == "FAILED"


def test_tensorboard_events_hold_the_config_as_hparams_beside_the_epoch_scalars(
    synthetic_images, tmp_path
):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import metadata

    config = tiny(synthetic_images, tmp_path, tensorboard=True, epochs=1)
    train(config, tmp_path / "run", log=quiet)

    events = [
        e for f in sorted((tmp_path / "run" / "tensorboard").glob("events.*"))
        for e in EventFileLoader(str(f)).Load()
    ]  # fmt: skip
    values = [v for e in events for v in e.summary.value]
    starts = [v for v in values if v.tag == metadata.SESSION_START_INFO_TAG]
    assert len(starts) == 1
    data = metadata.parse_session_start_info_plugin_data(starts[0].metadata.plugin_data.content)
    assert data.hparams["model"].string_value == "cnn"
    assert data.hparams["lr"].number_value == pytest.approx(0.01)
    assert data.hparams["epochs"].number_value == 1
    assert any(v.tag == metadata.SESSION_END_INFO_TAG for v in values)
    assert {"val_acc", "train_loss", "best_val_acc"} <= {v.tag for v in values}


def test_class_names_with_commas_and_quotes_read_back_from_the_params_one_name_each():
    """Lists were joined with "," alone: classes a,b and cat read back as a, b and cat; a name
    with edge spaces (a folder named "cat ") lost them."""
    names = ["a,b", 'say "hi"', "café", "x y", " cat ", "dog "]
    params = flat_params(make_config(classes=names))
    assert next(csv.reader([params["classes"]])) == names
    assert parse_names(params["classes"]) == names  # as --classes takes them
    assert flat_params(make_config(classes=["cat", "dog"]))["classes"] == "cat,dog"


def test_a_tracking_uri_without_tracking_is_refused_with_the_fix():
    with pytest.raises(UserError, match="add --set tracking=mlflow"):
        validate_config(make_config(tracking_uri="sqlite:///x.db"))


def test_a_suite_logs_its_runs_under_one_experiment_named_for_it(synthetic_images, tmp_path):
    from cifarlab.suites import SuiteOptions, run_suite

    (tmp_path / "colours.yaml").write_text(
        "description: two tiny runs\nruns:\n"
        "  - {name: plain, recipe: seed-cnn, changes: none, set: {flip: false}}\n"
        "  - {name: flip, recipe: seed-cnn, changes: + flip}\n"
    )
    base = dict(
        data=str(synthetic_images), data_root=str(tmp_path / "d"), batch_size=8, val_size=6,
        progress=False, device="cpu", threads=1, tracking="mlflow",
    )  # fmt: skip
    run_suite(str(tmp_path / "colours.yaml"), SuiteOptions(tmp_path / "out", epochs=1, overrides=base), log=quiet)  # fmt: skip

    client = mlflow.tracking.MlflowClient(default_tracking_uri(tmp_path / "out" / "plain"))
    experiment = client.get_experiment_by_name("colours")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["flip", "plain"]
    for run in runs:
        assert run.info.status == "FINISHED" and "val_accuracy" in run.data.metrics
        assert "report/eval-val" in {
            a.path for a in client.list_artifacts(run.info.run_id, "report")
        }
