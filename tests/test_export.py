import numpy as np
import pytest
import torch

from cifarlab.cli import main
from cifarlab.data import load_source
from cifarlab.predict import OnnxPredictor, Predictor, TorchScriptPredictor
from cifarlab.train import train
from tests.conftest import make_config


@pytest.fixture(scope="module")
def runs(real_jpegs, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    out = {}
    for model in ("cnn", "resnet18", "fastnet"):
        config = make_config(data=str(real_jpegs), data_root=str(root / "d"), model=model, epochs=1,
                             batch_size=50, val_size=100, subset=300, width=0.25 if model != "fastnet" else 1.0)  # fmt: skip
        train(config, root / model, log=lambda s: None)
        out[model] = root / model
    images = load_source(str(real_jpegs), root / "d", 32).train.images[::20]
    return out, images


@pytest.mark.parametrize("model", ["cnn", "resnet18", "fastnet"])
def test_onnx_and_torchscript_match_pytorch_on_real_images(runs, model, tmp_path, capsys):
    run_dirs, images = runs
    reference = Predictor(str(run_dirs[model]))
    expected = reference.probabilities(images, 64)
    for fmt, cls in (("onnx", OnnxPredictor), ("torchscript", TorchScriptPredictor)):
        out = tmp_path / f"m.{'onnx' if fmt == 'onnx' else 'ts'}"
        assert main(["export", str(run_dirs[model]), "--format", fmt, "--out", str(out)]) == 0
        exported = cls(str(out))
        assert exported.classes == reference.classes and exported.size == 32
        got = exported.probabilities(images, 7)  # odd batch: the batch axis is dynamic
        assert np.abs(got - expected).max() < 1e-4, fmt
    capsys.readouterr()


def test_predict_with_onnx_prints_the_same_classes_as_the_checkpoint(
    runs, real_jpegs, tmp_path, capsys
):
    run_dirs, _ = runs
    onnx_file = tmp_path / "fast.onnx"
    assert main(["export", str(run_dirs["fastnet"]), "--out", str(onnx_file)]) == 0
    folder = str(real_jpegs / "train" / "ship")
    capsys.readouterr()
    assert main(["predict", str(run_dirs["fastnet"]), folder, "--json"]) == 0
    from_ckpt = capsys.readouterr().out
    assert main(["predict", str(onnx_file), folder, "--json"]) == 0
    from_onnx = capsys.readouterr().out
    import json

    top = lambda text: [json.loads(line)["top_k"][0]["class"] for line in text.splitlines()]  # noqa: E731
    assert top(from_ckpt) == top(from_onnx) and len(top(from_onnx)) == 60


def test_deployable_takes_plain_unit_range_images(runs):
    from cifarlab.checkpoint import load_checkpoint
    from cifarlab.export import Deployable
    from cifarlab.inference import load_model

    run_dirs, images = runs
    loaded = load_model(load_checkpoint(run_dirs["cnn"] / "best.pt"))
    net = Deployable(loaded.model, loaded.normalize.mean, loaded.normalize.std).eval()
    x = torch.from_numpy(images[:4]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        assert net(x).shape == (4, 10)


def _fake_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"the checkpoint")
    return run


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_export_never_overwrites_the_checkpoint_it_reads(tmp_path, capsys, force):
    run = _fake_run(tmp_path)
    args = ["export", str(run / "best.pt"), "--out", str(run / "best.pt"), *force]
    assert main(args) == 2
    assert "is the checkpoint being exported" in capsys.readouterr().err
    assert (run / "best.pt").read_bytes() == b"the checkpoint"


def test_export_over_an_existing_file_needs_force(tmp_path, capsys):
    run = _fake_run(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"keep me")
    assert main(["export", str(run), "--out", str(tmp_path / "model.onnx")]) == 2
    assert "already exists; add --force to overwrite it" in capsys.readouterr().err
    assert (tmp_path / "model.onnx").read_bytes() == b"keep me"


def test_export_out_that_is_a_folder_or_read_only_is_one_line(tmp_path, capsys, monkeypatch):
    import os
    from pathlib import Path

    run = _fake_run(tmp_path)
    assert main(["export", str(run), "--out", str(tmp_path)]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access  # root ignores mode bits: deny as a read-only mount would
    monkeypatch.setattr(os, "access", lambda p, m: Path(p) != read_only and real_access(p, m))
    assert main(["export", str(run), "--out", str(read_only / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and "Traceback" not in err


def test_export_with_force_replaces_an_existing_file(runs, tmp_path):
    run_dirs, _ = runs
    out = tmp_path / "model.ts"
    out.write_bytes(b"old")
    assert main(["export", str(run_dirs["cnn"]), "--format", "torchscript", "--out", str(out), "--force"]) == 0  # fmt: skip
    assert TorchScriptPredictor(str(out)).classes[0] == "airplane"
    assert [p.name for p in tmp_path.iterdir()] == ["model.ts"]  # no temporary file left
