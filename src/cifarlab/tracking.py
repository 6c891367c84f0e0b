"""Experiment tracking: MLflow and TensorBoard copies of a run's record (its files stay the record).

MLflow's default store is `<runs folder>/mlflow.db` (SQLite; MLflow 3 refuses its file store),
artifacts in `<runs folder>/mlartifacts/`. `mlflow.json` in a run directory names its MLflow
run, so a resumed run and a later evaluation log into the same one.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cifarlab.config import TrainConfig, quoted_name
from cifarlab.errors import Interrupted, import_extra
from cifarlab.rundir import RECORD_FILES, RESULT_ALWAYS, RESULT_OPTIONAL

MLFLOW_LINK = "mlflow.json"  # in the run directory: which store and MLflow run it logs to
DEFAULT_EXPERIMENT = "cifarlab"


class Trackers(list):
    """A run's trackers, each called in turn: `start(config, history)`, `log_epoch(row)`,
    `finish(result)` once the run's files are complete, and `close(error)` last."""

    def __getattr__(self, method: str):
        return lambda *args: [getattr(t, method)(*args) for t in self]


@contextlib.contextmanager
def open_trackers(config: TrainConfig, run_dir: Path, enabled: bool = True) -> Iterator[Trackers]:
    """The trackers `config` asks for (none when not `enabled`: torchrun's other ranks)."""
    group = Trackers()
    if enabled and config.tensorboard:
        group.append(TensorBoardTracker(run_dir))
    if enabled and config.tracking == "mlflow":
        group.append(MLflowTracker(config, run_dir))
    try:
        yield group
    except BaseException as exc:
        for t in group:
            with contextlib.suppress(Exception):  # a tracker's failure must not hide the error
                t.close(exc)
        raise
    group.close(None)


def flat_params(config: TrainConfig) -> dict[str, str | int | float | bool]:
    """The config as flat scalars: lists become one comma-separated row (`"a,b",cat`), so a
    class name holding a comma, a quote or edge spaces reads back as one name, as `--classes`
    takes it."""
    return {
        k: ",".join(quoted_name(str(i)) for i in v) if isinstance(v, list) else v
        for k, v in config.to_dict().items()
    }


EPOCH_SCALARS = (
    "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "images_per_s",
)  # fmt: skip
HPARAM_METRICS = ("val_acc", "val_loss", "train_loss", "best_val_acc", "final_val_acc")


class TensorBoardTracker:
    """Scalars per epoch under `<run>/tensorboard/`, the config and final accuracies as HParams."""

    def __init__(self, run_dir: Path):
        tensorboard = import_extra("torch.utils.tensorboard", "tensorboard", "tensorboard: true")
        self.writer = tensorboard.SummaryWriter(str(run_dir / "tensorboard"))

    def start(self, config: TrainConfig, history: list[dict]) -> None:
        from torch.utils.tensorboard.summary import hparams

        # HParams summaries: experiment and session-start info now, session end at `finish`
        *begin, self.end = hparams(flat_params(config), dict.fromkeys(HPARAM_METRICS, 0.0))
        for summary in begin:
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def log_epoch(self, row: dict) -> None:
        for key in EPOCH_SCALARS:
            if not math.isnan(row.get(key, math.nan)):  # no test split: no test scalars
                self.writer.add_scalar(key, row[key], row["epoch"])
        self.writer.flush()

    def finish(self, result: Any) -> None:
        for key in RESULT_ALWAYS:
            if getattr(result, key) is not None:  # no validation split: no val accuracy
                self.writer.add_scalar(key, getattr(result, key), result.epochs)
        self.writer.file_writer.add_summary(self.end)  # the run ended well

    def close(self, error: BaseException | None) -> None:
        self.writer.close()


def default_tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir.resolve().parent / 'mlflow.db').as_posix()}"


class MLflowTracker:
    """Params (the resolved config), every epoch's metrics, the run's files and `best.pt`."""

    def __init__(self, config: TrainConfig, run_dir: Path):
        mlflow = import_extra("mlflow", "mlflow", "tracking: mlflow")
        self.run_dir = run_dir
        self.uri = config.tracking_uri or default_tracking_uri(run_dir)
        self.experiment = config.experiment or DEFAULT_EXPERIMENT
        self.client = mlflow.tracking.MlflowClient(self.uri)
        self.run_id: str | None = None

    def start(self, config: TrainConfig, history: list[dict]) -> None:
        self.run_id = _linked_run(self.client, self.run_dir, self.uri)
        if self.run_id is not None:  # resumed: the same MLflow run goes on
            self.client.update_run(self.run_id, status="RUNNING")
            return
        run = self.client.create_run(
            self._experiment_id(), run_name=self.run_dir.name,
            tags={"cifarlab.run_dir": str(self.run_dir.resolve()), "cifarlab.recipe": config.recipe},
        )  # fmt: skip
        self.run_id = run.info.run_id
        link = {"tracking_uri": self.uri, "run_id": self.run_id, "experiment": self.experiment}
        (self.run_dir / MLFLOW_LINK).write_text(json.dumps(link, indent=1) + "\n")
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in flat_params(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        for row in history:  # epochs trained before tracking was turned on
            self.log_epoch(row)

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        # a SQLite store's artifacts beside its database, not in the working folder's ./mlruns
        artifacts = None
        if self.uri.startswith("sqlite:///"):
            db = Path(self.uri.removeprefix("sqlite:///")).resolve()
            artifacts = (db.parent / "mlartifacts").as_uri()
        return self.client.create_experiment(self.experiment, artifact_location=artifacts)

    def log_epoch(self, row: dict) -> None:
        values = {k: v for k, v in row.items() if k != "epoch" and not math.isnan(v)}
        _log_metrics(self.client, self.run_id, values, row["epoch"])

    def finish(self, result: Any) -> None:
        values = {k: getattr(result, k) for k in RESULT_OPTIONAL}  # its accuracies
        _log_metrics(self.client, self.run_id, values, result.epochs)
        for name in RECORD_FILES:
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        if (self.run_dir / "best.pt").is_file():
            self.client.log_artifact(self.run_id, str(self.run_dir / "best.pt"), "checkpoint")
        for report in sorted(self.run_dir.glob("eval-*/")):  # reports made before a resume
            self.client.log_artifacts(self.run_id, str(report), f"report/{report.name}")
        self.client.set_terminated(self.run_id, "FINISHED")

    def close(self, error: BaseException | None) -> None:
        if error is None or self.run_id is None:
            return
        stopped = isinstance(error, Interrupted | KeyboardInterrupt)
        self.client.set_terminated(self.run_id, "KILLED" if stopped else "FAILED")


def _log_metrics(client, run_id: str, values: dict[str, float | None], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None]
    client.log_batch(run_id, metrics=metrics)


def _link(run_dir: Path) -> dict | None:
    path = run_dir / MLFLOW_LINK
    return json.loads(path.read_text()) if path.is_file() else None


def _linked_run(client, run_dir: Path, uri: str) -> str | None:
    """The MLflow run this run directory logged to before, when it is in the same store."""
    link = _link(run_dir)
    if link is None or link.get("tracking_uri") != uri:
        return None
    try:
        return client.get_run(link["run_id"]).info.run_id
    except Exception:  # deleted from the store, or another store at the same URI: start anew
        return None


def log_report(run_dir: Path, report_dir: Path, report: dict, log=print) -> None:
    """Attach an evaluation report to the run's MLflow run (when it has one): the report's files
    as artifacts `report/<folder>/`, its accuracy and calibration error as metrics."""
    link = _link(run_dir)
    if link is None:
        return
    try:
        import mlflow
    except ImportError:
        log(f"note: {run_dir} logs to MLflow, but mlflow is not installed; report not attached")
        return
    client = mlflow.tracking.MlflowClient(link["tracking_uri"])
    client.log_artifacts(link["run_id"], str(report_dir), f"report/{report_dir.name}")
    split = report.get("split", "val")
    values = {"accuracy": report["accuracy"], "ece": report["expected_calibration_error"]}
    _log_metrics(client, link["run_id"], {f"{split}_{k}": v for k, v in values.items()}, 0)
