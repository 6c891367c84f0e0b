import shutil

import numpy as np
import pytest
import torch

from cifarlab.calibration import calibrate_run, fit_temperature
from cifarlab.checkpoint import atomic_save, load_checkpoint
from cifarlab.cli import main
from cifarlab.errors import UserError
from cifarlab.evaluate import EvalOptions, evaluate
from cifarlab.inference import load_model, predict_logits
from cifarlab.models import head_name
from cifarlab.predict import Predictor
from cifarlab.train import train
from tests.conftest import make_config, write_synthetic_folder


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(20_000, 10, generator=gen)
    labels = torch.multinomial(torch.softmax(logits / 2.0, 1), 1, generator=gen).squeeze(1)
    assert fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.05)
    assert fit_temperature(logits / 2.0, labels) == pytest.approx(1.0, rel=0.05)


@pytest.fixture(scope="module")
def trained_run(fastnet_run):
    """The session's fastnet run: trained on 500 real images, its temperature fitted on 100 others;
    `unseen_jpegs` holds 200 more that neither training nor calibration sees."""
    return fastnet_run


def _miscalibrated_copy(run, scale: float, dest):
    """`run` with its logits multiplied by `scale` through the head's weights: >1 is the
    over-confidence of a net trained far past its data (without minutes of training), <1 the
    under-confidence heavy label smoothing gives."""
    shutil.copytree(run, dest)
    for name in ("best.pt", "last.pt"):
        ckpt = load_checkpoint(dest / name)
        head = head_name(load_model(ckpt).model)
        for key in ckpt["model"]:
            if key.startswith(head + "."):
                ckpt["model"][key] = ckpt["model"][key] * scale
        for key in ("temperature", "temperature_ema"):  # training fitted one for the old weights
            ckpt.pop(key, None)
        atomic_save(ckpt, dest / name)
    return dest


def _predicted(folder) -> list[str]:
    return [row.split(",")[3] for row in (folder / "predictions.csv").read_text().splitlines()]


@pytest.mark.parametrize(
    ("scale", "most"), [(4.0, 0.6), (0.25, 0.75)], ids=["over-confident", "under-confident"]
)
def test_calibration_cuts_held_out_ece_and_keeps_accuracy(
    trained_run, unseen_jpegs, scale, most, tmp_path
):
    run = _miscalibrated_copy(trained_run, scale, tmp_path / "run")
    test = dict(split="test", data=str(unseen_jpegs))
    before = evaluate(EvalOptions(str(run), out=tmp_path / "b", **test), log=lambda s: None)
    temperature = calibrate_run(run, log=lambda s: None)
    after = evaluate(EvalOptions(str(run), out=tmp_path / "a", **test), log=lambda s: None)

    assert (temperature > 1) == (scale > 1)  # over-confident: softened; under-: sharpened
    ece_before, ece_after = (
        before["expected_calibration_error"],
        after["expected_calibration_error"],
    )
    assert ece_after <= most * ece_before, (ece_before, ece_after)
    assert after["expected_calibration_error_before"] == pytest.approx(ece_before)
    assert after["accuracy"] == before["accuracy"]  # the argmax does not move
    assert _predicted(tmp_path / "a") == _predicted(tmp_path / "b")
    for name in ("best.pt", "last.pt"):
        assert (load_checkpoint(run / name)["temperature"] > 1) == (scale > 1)
    page = (tmp_path / "a" / "report.html").read_text()
    assert f"{temperature:.3f}" in page


def test_predict_prints_probabilities_at_the_checkpoint_temperature(trained_run, tmp_path):
    run = _miscalibrated_copy(trained_run, 4.0, tmp_path / "run")
    temperature = calibrate_run(run, log=lambda s: None)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    predictor = Predictor(str(run))
    assert predictor.temperature == temperature
    loaded = load_model(load_checkpoint(run / "best.pt"))
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)  # in the run's precision, as predict
    logits = predict_logits(loaded.model, nchw, loaded.normalize, hardware=loaded.hardware)
    expected = torch.softmax(logits / temperature, 1).numpy()
    np.testing.assert_allclose(predictor.probabilities(images, 4), expected, atol=1e-6)


def _tiny_run(tmp_path, val_size: int, **more):
    write_synthetic_folder(tmp_path / "data" / "train")
    config = make_config(
        data=str(tmp_path / "data"), data_root=str(tmp_path / "d"), model="cnn", width=0.25,
        epochs=1, batch_size=8, val_size=val_size, lr=0.01, warmup_epochs=0.0, tta="none", **more,
    )  # fmt: skip
    train(config, tmp_path / "run", log=lambda s: None)


def test_calibrate_command_writes_the_temperature_into_both_checkpoints(tmp_path, capsys):
    _tiny_run(tmp_path, val_size=9)
    for name in ("best.pt", "last.pt"):  # as a run trained before calibration existed
        ckpt = load_checkpoint(tmp_path / "run" / name)
        del ckpt["temperature"]
        atomic_save(ckpt, tmp_path / "run" / name)
    assert main(["calibrate", str(tmp_path / "run")]) == 0
    said = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in said] == ["best.pt", "last.pt"]
    for name, line in zip(("best.pt", "last.pt"), said, strict=True):  # the figure it printed
        assert f"temperature {load_checkpoint(tmp_path / 'run' / name)['temperature']:.3f}" in line


def test_calibrating_a_run_without_validation_split_says_how_to_get_one(tmp_path):
    _tiny_run(tmp_path, val_size=0)
    with pytest.raises(UserError, match="val_size"):
        calibrate_run(tmp_path / "run", log=lambda s: None)
    assert "temperature" not in load_checkpoint(tmp_path / "run" / "best.pt")


def test_calibrating_a_folder_without_checkpoints_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="no best.pt or last.pt"):
        calibrate_run(tmp_path)


def test_training_ends_with_the_nll_minimising_temperature_in_both_checkpoints(trained_run):
    from cifarlab.calibration import _load_val, _val_logits

    for name in ("best.pt", "last.pt"):
        ckpt = load_checkpoint(trained_run / name)
        val = _load_val(ckpt, trained_run / name, torch.device("cpu"))
        logits, labels = _val_logits(ckpt, False, torch.device("cpu"), val), val.labels.long()
        nll = lambda t: torch.nn.functional.cross_entropy(logits / t, labels).item()  # noqa: B023, E731
        t = ckpt["temperature"]
        assert nll(t) < nll(1.0) and nll(t) <= min(nll(t * 1.1), nll(t / 1.1)), (name, t)


def test_training_fits_its_temperatures_on_the_split_it_holds(tmp_path, monkeypatch):
    """The end of training calibrates on the validation split in memory, EMA weights too (no
    second load of the data); `cifarlab calibrate` reloads the split from the run's config:
    the same images, so the same temperatures."""
    import cifarlab.calibration

    def reload(*args, **kwargs):
        raise AssertionError("the end of training loaded the data again")

    monkeypatch.setattr(cifarlab.calibration, "load_eval_set", reload)
    _tiny_run(tmp_path, val_size=9, ema=True)
    monkeypatch.undo()
    at_training = load_checkpoint(tmp_path / "run" / "best.pt")
    calibrate_run(tmp_path / "run", log=lambda s: None)
    reloaded = load_checkpoint(tmp_path / "run" / "best.pt")
    for key in ("temperature", "temperature_ema"):
        assert reloaded[key] == pytest.approx(at_training[key], rel=0.02)


def test_calibrating_a_run_being_trained_is_refused(tmp_path):
    import subprocess
    import sys

    _tiny_run(tmp_path, val_size=9)
    before = (tmp_path / "run" / "best.pt").read_bytes()
    hold = f"from cifarlab.rundir import RunLock as L; import pathlib, time\nwith L(pathlib.Path({str(tmp_path / 'run')!r})):\n print('held', flush=True); time.sleep(30)"
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for target in (tmp_path / "run", tmp_path / "run" / "best.pt"):
            with pytest.raises(UserError, match=rf"in use by process {holder.pid}; wait for it"):
                calibrate_run(target, log=lambda s: None)
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "run" / "best.pt").read_bytes() == before


def test_last_pt_holding_best_pt_weights_is_fitted_once_and_gets_its_temperature(
    synthetic_images, tmp_path
):
    config = make_config(data=str(synthetic_images), data_root=str(tmp_path / "d"), model="cnn",
                         width=0.25, epochs=1, batch_size=8, val_size=6, tta="none", threads=1)  # fmt: skip
    train(config, tmp_path / "run", log=lambda s: None)
    lines = []
    calibrate_run(tmp_path / "run", log=lines.append)
    assert len(lines) == 2 and "same weights as best.pt" in lines[1]
    best, last = (load_checkpoint(tmp_path / "run" / n) for n in ("best.pt", "last.pt"))
    assert last["temperature"] == best["temperature"] != 1.0


class _StopAfterOneEpoch(Exception):
    pass


def test_calibrate_holds_the_run_lock_so_a_resume_cannot_roll_last_pt_back(tmp_path, monkeypatch):
    import cifarlab.calibration as calibration
    from cifarlab.rundir import read_metrics

    def stop(row):
        raise _StopAfterOneEpoch

    write_synthetic_folder(tmp_path / "data" / "train")
    config = make_config(
        data=str(tmp_path / "data"), data_root=str(tmp_path / "d"), model="cnn", width=0.25,
        epochs=2, batch_size=8, val_size=9, lr=0.01, warmup_epochs=0.0, tta="none",
    )  # fmt: skip
    run = tmp_path / "run"
    with pytest.raises(_StopAfterOneEpoch):
        train(config, run, log=lambda s: None, on_epoch=stop)
    fit, raced = calibration.fit_temperature, []

    def fit_while_a_resume_starts(logits, labels):  # the resume starts while calibrate works
        try:
            train(None, run, resume=True, log=lambda s: None)
        except UserError as exc:
            raced.append(str(exc))
        return fit(logits, labels)

    monkeypatch.setattr(calibration, "fit_temperature", fit_while_a_resume_starts)
    calibrate_run(run / "last.pt", log=lambda s: None)  # the file the resume would rewrite
    assert raced and "in use by process" in raced[0]
    last_epoch = int(read_metrics(run / "metrics.csv")[-1]["epoch"])
    assert load_checkpoint(run / "last.pt")["epoch"] >= last_epoch


def test_the_end_of_training_reuses_the_last_validation_logits(
    synthetic_images, tmp_path, monkeypatch
):
    """The final TTA pass runs only the views the last validation did not (flip: one of two)
    and the temperature fit of the final weights runs no pass at all; the TTA accuracy and the
    temperature are those computed from scratch."""
    import cifarlab.calibration
    import cifarlab.train

    calls = []

    def spy(where):
        def counted(
            model, images, normalize, batch_size=500, tta="none", hardware=None, plain=None
        ):
            calls.append((where, tta, plain is not None))
            return predict_logits(model, images, normalize, batch_size, tta, hardware, plain)

        return counted

    monkeypatch.setattr(cifarlab.train, "predict_logits", spy("train"))
    monkeypatch.setattr(cifarlab.calibration, "predict_logits", spy("calibration"))
    config = make_config(data=str(synthetic_images), data_root=str(tmp_path / "d"), model="cnn",
                         width=0.25, epochs=1, batch_size=8, val_size=6, tta="flip", threads=1)  # fmt: skip
    result = train(config, tmp_path / "run", log=lambda s: None)
    assert calls.count(("train", "flip", True)) == 1  # the val TTA pass; the test pass runs whole
    assert not [c for c in calls if c[0] == "calibration"]
    monkeypatch.undo()
    at_training = load_checkpoint(tmp_path / "run" / "last.pt")["temperature"]
    assert calibrate_run(tmp_path / "run", log=lambda s: None) == pytest.approx(
        at_training, rel=1e-3
    )
    assert at_training != 1.0
    from cifarlab.data import load_splits

    val = load_splits(config).val
    loaded = load_model(load_checkpoint(tmp_path / "run" / "last.pt"))
    images = torch.from_numpy(val.images).permute(0, 3, 1, 2).contiguous()
    logits = predict_logits(loaded.model, images, loaded.normalize, config.eval_batch_size, "flip")
    acc = (logits.argmax(1) == torch.from_numpy(val.labels)).float().mean().item()
    assert result.tta_val_acc == pytest.approx(acc)


def test_tta_with_the_plain_views_logits_given_equals_tta_from_scratch(trained_run):
    loaded = load_model(load_checkpoint(trained_run / "best.pt"))
    images = torch.randint(0, 256, (37, 3, 32, 32), dtype=torch.uint8)
    plain = predict_logits(loaded.model, images, loaded.normalize, 16)
    for tta in ("flip", "flip-translate"):
        scratch = predict_logits(loaded.model, images, loaded.normalize, 16, tta)
        reused = predict_logits(loaded.model, images, loaded.normalize, 16, tta, plain=plain)
        assert torch.equal(scratch, reused)


def test_calibrating_after_the_data_changed_or_moved_is_refused_naming_the_runs_data(
    tmp_path, capsys
):
    _tiny_run(tmp_path, val_size=9)
    run, data = tmp_path / "run", tmp_path / "data"
    before = load_checkpoint(run / "best.pt")["temperature"]
    write_synthetic_folder(data / "train", classes=("red",), per_class=14)  # two images more
    assert main(["calibrate", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "data changed" in err and "training images" in err and "\n" not in err
    assert load_checkpoint(run / "best.pt")["temperature"] == before  # nothing fitted on it
    shutil.move(data, tmp_path / "moved")
    assert main(["calibrate", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"trained on {data}, which is no longer there" in err and "--data" not in err
