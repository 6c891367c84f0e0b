import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cifarlab.checkpoint import load_checkpoint
from cifarlab.errors import UserError
from cifarlab.rundir import read_metrics
from cifarlab.train import TrainingFailed, train
from tests.conftest import make_config


def _tiny(synthetic_images, tmp_path, **kw):
    """The lesson's CNN at quarter width on the three colour classes: 30 images, 4 steps an epoch."""
    base = dict(data=str(synthetic_images), data_root=str(tmp_path / "d"), model="cnn", width=0.25,
                epochs=1, batch_size=8, val_size=6, lr=0.02, threads=1)  # fmt: skip
    return make_config(**{**base, **kw})


def _config(real_jpegs, data_root, **kw):
    base = dict(
        data=str(real_jpegs), data_root=str(data_root), val_size=100, batch_size=50, epochs=3,
        lr=0.05, jitter_brightness=0.2, jitter_contrast=0.2,
    )  # fmt: skip
    return make_config(**{**base, **kw})


def test_a_few_epochs_on_real_images_lower_the_loss(fastnet_run):
    history = read_metrics(fastnet_run / "metrics.csv")
    losses = [float(row["train_loss"]) for row in history]
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.85, losses
    assert max(float(row["val_acc"]) for row in history) > 0.2  # 10 classes: chance is 0.1
    for name in ("config.yaml", "metrics.csv", "last.pt", "best.pt", "result.json"):
        assert (fastnet_run / name).is_file()
    ckpt = load_checkpoint(fastnet_run / "best.pt")
    assert (
        ckpt["classes"][0] == "airplane"
        and len(ckpt["mean"]) == 3
        and ckpt["config"]["model"] == "fastnet"
    )


@pytest.mark.parametrize(
    "extra",
    [
        {"loader": "torchvision", "workers": 0},
        {"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "label_smoothing": 0.1, "ema": True},
        {
            "schedule": "onecycle",
            "nesterov": True,
            "no_decay_norm_bias": True,
            "cutout": 8,
            "tta": "flip-translate",
        },
    ],
)
def test_pipeline_variants_train_end_to_end(synthetic_images, tmp_path, extra):
    result = train(_tiny(synthetic_images, tmp_path, **extra), tmp_path / "r", log=lambda s: None)
    assert len(result.history) == 1
    assert result.final_val_acc == pytest.approx(result.history[-1]["val_acc"])
    assert (result.tta_val_acc is not None) == ("tta" in extra)
    ckpt = load_checkpoint(tmp_path / "r" / "last.pt")
    if extra.get("ema"):  # the EMA weights are their own average, not a copy of the model's
        ema = {
            k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")
        }
        floats = [k for k, v in ckpt["model"].items() if v.is_floating_point()]
        assert any(not torch.equal(ema[k], ckpt["model"][k]) for k in floats)


def test_mixup_and_cutmix_reach_the_loss_as_soft_targets(synthetic_images, tmp_path, monkeypatch):
    import cifarlab.step as step

    seen = []

    def recording_loss(logits, targets, smoothing):
        seen.append((targets.ndim, targets.dtype, smoothing))
        return step.F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)

    monkeypatch.setattr(step, "loss_fn", recording_loss)
    config = _tiny(
        synthetic_images, tmp_path, mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1
    )
    train(config, tmp_path / "mix", log=lambda s: None)
    assert seen and all(n == 2 and d == torch.float32 and s == 0.1 for n, d, s in seen)


def _run_cli(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "cifarlab", *args], env=env, **kw)


def _weights(path: Path) -> dict:
    return load_checkpoint(path)["model"]


def test_resume_after_sigkill_matches_uninterrupted_run(real_jpegs, data_root, tmp_path):
    args = [
        "train", "--data", str(real_jpegs), "--data-root", str(data_root), "--recipe", "seed-cnn",
        "--epochs", "3", "--batch-size", "50", "--val-size", "100", "--no-progress",
        "--set", "width=0.25", "--set", "save_every_steps=2", "--set", "threads=1",
        # the speed-record switches carry state across a resume too
        "--set", "whitening=true", "--set", "whiten_bias_epochs=1", "--set", "lookahead=true",
        "--set", "lookahead_every=3", "--set", "alt_flip=true",
    ]  # fmt: skip
    assert _run_cli([*args, "--out", str(tmp_path / "full")]).wait(timeout=300) == 0

    killed = tmp_path / "killed"
    proc = _run_cli([*args, "--out", str(killed)])
    deadline = time.time() + 120
    while not (killed / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.15)  # soon after the first mid-epoch save: a fast machine
    # finishes the 3 epochs within a second or two of it, and the kill must land mid-run
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before the kill: nothing was tested"
    cut = load_checkpoint(killed / "last.pt")
    assert (cut["epoch"], cut["next_step"]) < (3, 0), "the kill must land before the end"
    resumed = _run_cli([*args, "--out", str(killed), "--resume"])
    assert resumed.wait(timeout=300) == 0

    full, again = _weights(tmp_path / "full" / "last.pt"), _weights(killed / "last.pt")
    assert all(torch.equal(full[k], again[k]) for k in full)
    with open(killed / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]


def test_resume_without_a_checkpoint_starts_over_and_says_so(synthetic_images, tmp_path):
    messages = []
    train(_tiny(synthetic_images, tmp_path), tmp_path / "r", resume=True, log=messages.append)
    assert any("no last.pt yet; starting from the beginning" in m for m in messages)


def test_existing_run_is_not_overwritten_without_resume(synthetic_images, tmp_path):
    config = _tiny(synthetic_images, tmp_path)
    train(config, tmp_path / "r", log=lambda s: None)
    before = (tmp_path / "r" / "last.pt").read_bytes()
    with pytest.raises(UserError, match="already holds a run"):
        train(config, tmp_path / "r", log=lambda s: None)
    assert (tmp_path / "r" / "last.pt").read_bytes() == before
    (tmp_path / "r" / "last.pt").unlink()  # to save room: the finished run cannot resume,
    best = (tmp_path / "r" / "best.pt").read_bytes()  # and --resume must not retrain over it
    with pytest.raises(UserError, match="a finished run"):
        train(config, tmp_path / "r", resume=True, log=lambda s: None)
    assert (tmp_path / "r" / "best.pt").read_bytes() == best


def test_an_open_model_that_cannot_take_the_image_side_leaves_no_out(synthetic_images, tmp_path):
    config = _tiny(synthetic_images, tmp_path, model="tv:alexnet", image_size=8)
    with pytest.raises(UserError, match="tv:alexnet cannot take 8 px images"):
        train(config, tmp_path / "r", log=lambda s: None)
    assert not (tmp_path / "r").exists()  # nothing that would refuse the retry


def test_a_validation_split_smaller_than_the_classes_is_refused_before_anything_is_written(
    synthetic_images, tmp_path, capsys
):
    from cifarlab.cli import main

    out = tmp_path / "r"
    args = ["train", "--data", str(synthetic_images), "--data-root", str(tmp_path / "d"), "--out", str(out),
            "--epochs", "1", "--batch-size", "8", "--no-progress", "--set", "model=cnn", "--set", "width=0.25"]  # fmt: skip
    assert main([*args, "--val-size", "2"]) == 2  # 3 classes
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--val-size 2" in err and "3 classes" in err
    assert "--val-size 3" in err and not out.exists()
    assert main([*args, "--val-size", "3"]) == 0  # one image a class is enough to train


def test_a_class_left_without_training_images_is_refused_before_anything_is_written(
    synthetic_images, tmp_path, capsys
):
    from cifarlab.cli import main

    out = tmp_path / "r"
    args = ["train", "--data", str(synthetic_images), "--data-root", str(tmp_path / "d"), "--out", str(out),
            "--epochs", "1", "--batch-size", "1", "--no-progress", "--set", "model=cnn", "--set", "width=0.25",
            "--subset", "6"]  # fmt: skip
    assert main([*args, "--val-size", "4"]) == 2  # 2 images a class, 4 held out: 2 of 2 classes
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no image of 1 of the 3 classes" in err, err
    assert "--val-size 4 holds out 4, leaving 2" in err and "lower --val-size" in err
    assert "Traceback" not in err and not out.exists()
    assert main([*args, "--val-size", "3"]) == 0  # one image of each class is enough


def test_nan_loss_stops_with_the_step_and_keeps_best(synthetic_images, tmp_path, monkeypatch):
    import cifarlab.step as step

    real = step.loss_fn  # every batch's loss NaN (an lr that overflows is refused upfront)
    monkeypatch.setattr(step, "loss_fn", lambda *a: real(*a) * float("nan"))
    config = _tiny(synthetic_images, tmp_path, epochs=2, schedule="constant")
    with pytest.raises(TrainingFailed, match="non-finite loss at epoch 1 step"):
        train(config, tmp_path / "r", log=lambda s: None)
    assert not (tmp_path / "r" / "best.pt").exists()


def test_a_non_finite_validation_loss_stops_before_any_checkpoint(
    synthetic_images, tmp_path, monkeypatch
):
    import cifarlab.train as train_module

    real = train_module.validate  # outputs blown up by the last steps: training's loss was finite
    monkeypatch.setattr(
        train_module, "validate", lambda run, *a, **k: (float("nan"), real(run, *a, **k)[1])
    )
    config = _tiny(synthetic_images, tmp_path, epochs=1)
    with pytest.raises(TrainingFailed, match="validation loss after epoch 1 is nan"):
        train(config, tmp_path / "r", log=lambda s: None)
    assert not (tmp_path / "r" / "best.pt").exists()


def test_a_finite_but_exploding_loss_stops_as_diverged(
    real_jpegs, data_root, tmp_path, monkeypatch
):
    import cifarlab.step as step

    real = step.loss_fn  # every batch's loss 100x: about 230, twice the 115 that means diverged
    monkeypatch.setattr(step, "loss_fn", lambda *a: real(*a) * 100)
    config = _config(real_jpegs, data_root, epochs=1, model="fastnet")
    with pytest.raises(
        TrainingFailed, match=r"diverged: loss [\d.]+ \(over 115.* at epoch 1 step 1"
    ) as failed:
        train(config, tmp_path / "r", log=lambda s: None)
    assert "no checkpoint saved yet" in str(failed.value)  # not a last.pt that is not there
    assert not (tmp_path / "r" / "last.pt").exists()


def test_sigterm_saves_last_and_exits_143(real_jpegs, data_root, tmp_path):
    out = tmp_path / "r"
    proc = _run_cli(
        ["train", "--data", str(real_jpegs), "--data-root", str(data_root), "--out", str(out), "--epochs", "50",
         "--batch-size", "50", "--val-size", "100", "--no-progress", "--set", "model=cnn", "--set", "width=0.25"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while not (out / "metrics.csv").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    cut = load_checkpoint(out / "last.pt")  # saved at the signal: after epoch 1, before the end
    assert "--resume" in err and (1, 0) <= (cut["epoch"], cut["next_step"]) < (50, 0)
    assert not (out / ".lock").exists()


def test_ctrl_c_while_the_data_loads_stops_before_training_and_leaves_no_run(
    synthetic_images, tmp_path, monkeypatch
):
    import cifarlab.train as train_module
    from cifarlab.errors import Interrupted

    build = train_module.build_run

    def build_then_ctrl_c(*args):
        run = build(*args)
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the run is being built
        return run

    monkeypatch.setattr(train_module, "build_run", build_then_ctrl_c)
    config = make_config(data=str(synthetic_images), data_root=str(tmp_path / "d"), model="cnn", width=0.25,
                         epochs=1, batch_size=8, val_size=6, threads=1)  # fmt: skip
    with pytest.raises(
        Interrupted, match="stopped before training started; nothing was saved"
    ) as stop:
        train(config, tmp_path / "run", log=lambda s: None)
    assert stop.value.exit_code == 130 and not (tmp_path / "run").exists()
    (tmp_path / "mine").mkdir()  # a folder the user made is kept
    with pytest.raises(Interrupted):
        train(config, tmp_path / "mine", log=lambda s: None)
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


def test_param_groups_apply_backbone_and_bias_multipliers_with_decoupled_decay():
    from cifarlab.models import create_model
    from cifarlab.training_run import param_groups

    model = create_model("cnn", 10)
    config = make_config(lr=0.1, weight_decay=1e-3, bias_lr_mult=64.0, backbone_lr_mult=0.1)
    groups = {round(g["lr_mult"], 6): g for g in param_groups(model, config)}
    assert set(groups) == {
        1.0,
        64.0,
        0.1,
        6.4,
    }  # head weight, head bias, backbone weights, backbone 1-D
    assert groups[0.1]["lr"] == pytest.approx(0.01) and groups[64.0]["lr"] == pytest.approx(6.4)
    for g in groups.values():  # the decay per step (lr x decay) of 1-D parameters is not scaled up
        assert g["lr"] * g["weight_decay"] == pytest.approx(
            0.1 * 1e-3 * (0.1 if g["lr_mult"] in (0.1, 6.4) else 1.0)
        )
    head = model.classifier[-1]
    assert any(p is head.weight for p in groups[1.0]["params"])


def test_lr_mults_scale_parameters_by_name_prefix_longest_first():
    from cifarlab.models import create_model
    from cifarlab.training_run import param_groups

    model = create_model("cnn", 10)
    config = make_config(lr=0.1, lr_mults=["classifier=0.1", "classifier.4=0.5"])
    by_id = {id(p): g["lr_mult"] for g in param_groups(model, config) for p in g["params"]}
    mults = {n: by_id[id(p)] for n, p in model.named_parameters()}
    assert mults["features.0.0.weight"] == 1.0
    assert mults["classifier.1.weight"] == pytest.approx(0.1)
    assert mults["classifier.4.weight"] == pytest.approx(0.5)  # the longer prefix wins
    said = []
    param_groups(model, make_config(lr_mults=["head=0.1"]), log=said.append)
    assert "'head'" in said[0] and "ignored" in said[0]
    assert "classifier, features" in said[0]
    with pytest.raises(UserError, match="name-prefix=positive-number"):
        make_config(lr_mults=["classifier=-1"])


def _estimates(monkeypatch, config, paces: dict[int, float]) -> list[str]:
    """What `_Eta` says over the first 12 steps of each epoch in `paces` (seconds a step after a
    10 s first step), on a run of 20 steps an epoch."""
    import types

    from cifarlab import train as train_module

    now = [0.0]
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: now[0])
    run = types.SimpleNamespace(
        batches=[None] * 20, val_labels=[], splits=types.SimpleNamespace(test=None), hw=types.SimpleNamespace(device=torch.device("cpu")),
        config=config,
    )  # fmt: skip
    said = []
    for epoch, pace in paces.items():
        eta = train_module._Eta(run, epoch, 0, said.append)
        for step in range(1, 13):
            now[0] += 10.0 if step == 1 else pace
            eta.tick(step)
    return said


def test_the_run_length_estimate_leaves_out_the_first_step(monkeypatch):
    """On a GPU the first step (allocations, cuDNN's autotuning) took seconds, the pace was
    ~0.013 s: an estimate that counted it said about 81 s for a run that trained in 7."""
    from cifarlab.config import TrainConfig

    said = _estimates(monkeypatch, TrainConfig(epochs=3, batch_size=100), {0: 0.5, 1: 0.5})
    assert said == ["expected: about 30 s for 3 epochs (0.50 s/step, 20 steps per epoch)"]


def test_a_staged_runs_estimate_times_its_dearer_fine_tune_epochs_when_they_start(monkeypatch):
    """With the backbone frozen a step skips most of the backward pass: the first epochs' pace
    says little of the fine-tune epochs', so each stage is estimated at its own pace."""
    from cifarlab.config import TrainConfig

    staged = TrainConfig(epochs=3, batch_size=100, freeze="backbone", freeze_epochs=1)
    said = _estimates(monkeypatch, staged, {0: 0.5, 1: 1.5, 2: 1.5})
    assert len(said) == 2
    assert "about 10 s for 1 epoch of 3, the backbone frozen (0.50 s/step" in said[0]
    assert "about 60 s for 2 epochs of 3, all layers training (1.50 s/step" in said[1]


MUON_STEPS_WITHOUT_DYNAMO = """
import sys, torch
from cifarlab.config import TrainConfig, apply_overrides
from cifarlab.models import create_model
from cifarlab.training_run import make_optimizer
torch.manual_seed(0)
model = create_model("cnn", 10)
opt = make_optimizer(model, apply_overrides(TrainConfig(), {"optimizer": "muon", "compile": COMPILE}, where="t"))
for _ in range(2):
    opt.zero_grad(set_to_none=True)
    model(torch.rand(4, 3, 32, 32)).logsumexp(1).mean().backward()
    opt.step()
opt.load_state_dict(opt.state_dict())
print("dynamo" if "torch._dynamo" in sys.modules else "none",
      round(sum(p.double().sum().item() for p in model.parameters()), 6))
"""


def test_the_optimizer_does_not_import_torch_dynamo_unless_compiling():
    """torch.optim's zero_grad/add_param_group/state_dict import torch._dynamo (about as long as
    torch's own import) on their first call; a run that compiles nothing skips it, and its
    steps are the same."""

    def run(compile_: bool) -> list[str]:
        code = MUON_STEPS_WITHOUT_DYNAMO.replace("COMPILE", str(compile_))
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
        )
        return out.stdout.split()

    plain, compiling = run(False), run(True)
    assert plain[0] == "none" and compiling[0] == "dynamo"
    assert plain[1] == compiling[1]


@pytest.mark.parametrize("during", ["last validation", "final TTA pass"])
def test_a_stop_signal_while_the_run_ends_exits_143_and_resume_does_the_end(
    synthetic_images, tmp_path, monkeypatch, during
):
    import cifarlab.train as train_module
    from cifarlab.errors import Interrupted

    validate, sent = train_module.validate, []

    def validate_then_sigterm(run, tta="none", split="val"):
        if not sent and split == "val" and (tta != "none") == (during == "final TTA pass"):
            sent.append(os.kill(os.getpid(), signal.SIGTERM))  # arrives while the pass runs
        return validate(run, tta, split)

    monkeypatch.setattr(train_module, "validate", validate_then_sigterm)
    config = make_config(data=str(synthetic_images), data_root=str(tmp_path / "d"), model="cnn", width=0.25,
                         epochs=1, batch_size=8, val_size=6, threads=1, tta="flip")  # fmt: skip
    with pytest.raises(Interrupted, match="Resume with: cifarlab train --out") as stop:
        train(config, tmp_path / "run", log=lambda s: None)
    assert stop.value.exit_code == 143
    assert (tmp_path / "run" / "last.pt").is_file() and not (
        tmp_path / "run" / "result.json"
    ).exists()
    monkeypatch.setattr(train_module, "validate", validate)
    result = train(None, tmp_path / "run", resume=True, log=lambda s: None)
    assert result.tta_val_acc is not None and (tmp_path / "run" / "result.json").is_file()
