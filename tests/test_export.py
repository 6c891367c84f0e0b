import json
import os
import stat
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import cifarlab
from cifarlab.cli import main
from cifarlab.data import load_source
from cifarlab.errors import UserError
from cifarlab.export import export_model
from cifarlab.hardware import inference_hardware
from cifarlab.predict import (
    OnnxPredictor,
    Predictor,
    Pt2Predictor,
    SafetensorsPredictor,
    TorchScriptPredictor,
)
from cifarlab.train import train
from tests.conftest import make_config, read_only_folder


@pytest.fixture(scope="module")
def runs(real_jpegs, fastnet_run, tmp_path_factory):
    """A cnn and a resnet18 at quarter width trained one epoch on 300 real images, the session's
    fastnet run, and every 20th training image."""
    root = tmp_path_factory.mktemp("export")
    out = {"fastnet": fastnet_run}
    for model in ("cnn", "resnet18"):
        config = make_config(data=str(real_jpegs), data_root=str(root / "d"), model=model, epochs=1,
                             batch_size=50, val_size=100, subset=300, width=0.25)  # fmt: skip
        train(config, root / model, log=lambda s: None)
        out[model] = root / model
    images = load_source(str(real_jpegs), root / "d", 32).train.images[::20]
    return out, images


EXPORTS = (("onnx", OnnxPredictor), ("pt2", Pt2Predictor), ("safetensors", SafetensorsPredictor))


@pytest.mark.parametrize("model", ["cnn", "resnet18", "fastnet"])
def test_onnx_pt2_and_safetensors_match_pytorch_on_real_images(runs, model, tmp_path, capsys):
    run_dirs, images = runs
    reference = Predictor(str(run_dirs[model]))
    reference.hardware = inference_hardware(torch.device("cpu"), "off")  # as exports compute
    expected = reference.probabilities(images, 64)
    for fmt, cls in EXPORTS:
        out = tmp_path / f"m.{fmt}"
        assert main(["export", str(run_dirs[model]), "--format", fmt, "--out", str(out)]) == 0
        exported = cls(str(out))
        assert exported.classes == reference.classes and exported.size == 32
        got = exported.probabilities(images, 7)  # odd batch: the batch axis is dynamic
        assert np.abs(got - expected).max() < 1e-4, fmt
    assert (tmp_path / "m.json").is_file()  # the safetensors export's sidecar
    capsys.readouterr()


def test_exports_carry_the_checkpoint_temperature(runs, tmp_path):
    from cifarlab.checkpoint import atomic_save, load_checkpoint

    run_dirs, images = runs
    ckpt = load_checkpoint(run_dirs["cnn"] / "best.pt")
    ckpt["temperature"] = 2.5
    atomic_save(ckpt, tmp_path / "hot.pt")
    hot, plain = Predictor(str(tmp_path / "hot.pt")), Predictor(str(run_dirs["cnn"]))
    hot.hardware = plain.hardware = inference_hardware(torch.device("cpu"), "off")  # as exports
    expected, plain = hot.probabilities(images, 64), plain.probabilities(images, 64)
    assert np.abs(expected - plain).max() > 0.01  # the temperature changes the probabilities
    for fmt, cls in EXPORTS:
        exported = cls(str(export_model(str(tmp_path / "hot.pt"), fmt, tmp_path / f"hot.{fmt}")))
        assert exported.temperature == 2.5, fmt
        assert np.abs(exported.probabilities(images, 64) - expected).max() < 1e-4, fmt
    meta = json.loads((tmp_path / "hot.json").read_text())
    assert meta["temperature"] == 2.5 and meta["model_args"]["name"] == "cnn"
    assert meta["torchvision"] is None and len(meta["classes"]) == 10


def test_torchscript_export_is_refused_with_the_way_forward(runs, tmp_path, capsys):
    run_dirs, _ = runs
    out = str(tmp_path / "m.ts")
    assert main(["export", str(run_dirs["cnn"]), "--format", "torchscript", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "--format pt2" in err and "still reads old .ts" in err and err.count("\n") == 1


def test_predict_still_reads_torchscript_files_of_earlier_versions(runs, tmp_path):
    from cifarlab.checkpoint import load_checkpoint
    from cifarlab.export import Deployable
    from cifarlab.inference import load_model, predict_logits

    run_dirs, images = runs
    ckpt = load_checkpoint(run_dirs["cnn"] / "best.pt")
    loaded = load_model(ckpt)
    net = Deployable(loaded.model, loaded.normalize.mean, loaded.normalize.std).eval()
    old_meta = {"classes": json.dumps(ckpt["classes"]), "image_size": "32", "producer": "cifarlab"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what export did before: trace + metadata as strings
        traced = torch.jit.trace(net, torch.rand(2, 3, 32, 32))
        torch.jit.save(traced, str(tmp_path / "old.ts"),
                       _extra_files={"cifarlab.json": json.dumps(old_meta)})  # fmt: skip
    old = TorchScriptPredictor(str(tmp_path / "old.ts"))
    x = torch.from_numpy(images).permute(
        0, 3, 1, 2
    )  # old files hold no temperature: compare untempered
    expected = torch.softmax(predict_logits(loaded.model, x, loaded.normalize), 1).numpy()
    assert old.temperature == 1.0 and old.classes == list(ckpt["classes"])
    assert np.abs(old.probabilities(images, 7) - expected).max() < 1e-4


def test_safetensors_without_its_json_is_a_one_line_error(runs, tmp_path, capsys):
    run_dirs, _ = runs
    out = tmp_path / "w.safetensors"
    assert main(["export", str(run_dirs["cnn"]), "--format", "safetensors", "--out", str(out)]) == 0
    (tmp_path / "w.json").unlink()
    capsys.readouterr()
    assert main(["predict", str(out), str(tmp_path)]) == 2
    assert "no w.json beside it" in capsys.readouterr().err
    (tmp_path / "w.json").write_text("{bad")
    assert main(["predict", str(out), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "w.json" in err and "JSON" in err and "Traceback" not in err


def test_an_export_whose_metadata_was_edited_is_one_line_naming_the_key(runs, tmp_path, capsys):
    run_dirs, _ = runs
    out = tmp_path / "w.safetensors"
    assert main(["export", str(run_dirs["cnn"]), "--format", "safetensors", "--out", str(out)]) == 0
    meta = json.loads((tmp_path / "w.json").read_text())
    edits = [("classes", "cat"), ("mean", [0.5]), ("image_size", "big"), ("image_size", True),
             ("temperature", None), ("temperature", 0), ("model_args.name", 7),
             ("temperature", -20), ("image_size", 100_000), ("std", [0, 0.25, 0.25])]  # fmt: skip
    # a temperature of 0 gave NaN probabilities, -20 reversed the ranking; 100000 ran out of memory
    for key, value in edits:
        edited = json.loads(json.dumps(meta))
        parent, _, name = key.rpartition(".")
        (edited[parent] if parent else edited)[name] = value
        (tmp_path / "w.json").write_text(json.dumps(edited))
        capsys.readouterr()
        assert main(["predict", str(out), str(out)]) == 2, key  # one line, not a traceback
        err = capsys.readouterr().err.strip()
        assert f"{key} is " in err and "export the model again" in err, err
        assert len(err.splitlines()) == 1, err


def test_an_export_naming_fewer_or_more_classes_than_it_scores_is_one_line(runs, tmp_path, capsys):
    from PIL import Image

    run_dirs, images = runs
    out, image = tmp_path / "w.safetensors", tmp_path / "i.png"
    assert main(["export", str(run_dirs["cnn"]), "--format", "safetensors", "--out", str(out)]) == 0
    Image.fromarray(images[0]).save(image)
    meta = json.loads((tmp_path / "w.json").read_text())
    for classes in (["a"], [*meta["classes"], "extra"]):  # an IndexError, or names unscored
        (tmp_path / "w.json").write_text(json.dumps({**meta, "classes": classes}))
        capsys.readouterr()
        assert main(["predict", str(out), str(image)]) == 2
        err = capsys.readouterr().err
        assert f"names {len(classes)}" in err and "Traceback" not in err
        with pytest.raises(UserError, match=f"names {len(classes)}"):  # the Python API alike
            cifarlab.load_model(out).predict(images[0])
    onnx = pytest.importorskip("onnx")  # a graph run as is: found on its first batch
    onnx_out = tmp_path / "w.onnx"
    assert main(["export", str(run_dirs["cnn"]), "--format", "onnx", "--out", str(onnx_out)]) == 0
    proto = onnx.load(str(onnx_out))
    entry = next(e for e in proto.metadata_props if e.key == "classes")
    entry.value = json.dumps(["a"])
    onnx.save(proto, str(onnx_out))
    with pytest.raises(UserError, match="names 1"):
        cifarlab.load_model(onnx_out).predict(images[0])


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_safetensors_export_has_the_mode_of_every_other_file(runs, tmp_path, umask):
    import os

    run_dirs, _ = runs
    before = os.umask(umask)
    try:
        out = tmp_path / "model.safetensors"
        assert main(["export", str(run_dirs["cnn"]), "--out", str(out)]) == 0
    finally:
        os.umask(before)
    for name in ("model.safetensors", "model.json"):  # save_file alone makes it 0600
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_predict_on_a_damaged_pt2_writes_only_its_one_line(tmp_path, capfd):
    (tmp_path / "bad.pt2").write_bytes(b"junk\n")
    assert main(["predict", str(tmp_path / "bad.pt2"), str(tmp_path)]) == 2
    err = capfd.readouterr().err  # torch's logger writes past capsys, to the process's stderr
    assert err.count("\n") == 1 and "not a loadable torch.export program" in err, err


def test_an_out_suffix_names_the_format_and_a_mismatch_is_refused(runs, tmp_path, capsys):
    run_dirs, _ = runs
    assert main(["export", str(run_dirs["cnn"]), "--out", str(tmp_path / "m.pt2")]) == 0
    assert Pt2Predictor(str(tmp_path / "m.pt2")).classes[0] == "airplane"  # not ONNX in disguise
    args = [
        "export",
        str(run_dirs["cnn"]),
        "--format",
        "pt2",
        "--out",
        str(tmp_path / "new" / "m.onnx"),
    ]
    assert main(args) == 2
    assert "onnx" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    args = ["export", str(run_dirs["cnn"]), "--format", "pt2", "--out", str(tmp_path / "m.pt")]
    assert main(args) == 2  # predict would take a .pt for a checkpoint
    assert "m.pt2" in capsys.readouterr().err


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
    assert "being exported" in capsys.readouterr().err
    assert (run / "best.pt").read_bytes() == b"the checkpoint"


@pytest.mark.parametrize("force", [[], ["--force"]])
@pytest.mark.parametrize(("out", "clobbered"), [("result.safetensors", "result.json"),
                                                ("metrics.csv", "metrics.csv")])  # fmt: skip
def test_export_never_replaces_a_file_of_another_run(tmp_path, capsys, force, out, clobbered):
    run = _fake_run(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "best.pt").write_bytes(b"its checkpoint")
    (other / "result.json").write_text('{"best_val_acc": 0.5}')
    args = ["export", str(run), "--format", "safetensors", "--out", str(other / out), *force]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"would replace {clobbered} of the training run in {other}" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (other / "result.json").read_text() == '{"best_val_acc": 0.5}'
    assert sorted(p.name for p in other.iterdir()) == ["best.pt", "result.json"]


def test_export_over_an_existing_file_needs_force(tmp_path, capsys):
    run = _fake_run(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"keep me")
    assert main(["export", str(run), "--out", str(tmp_path / "model.onnx")]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "model.onnx").read_bytes() == b"keep me"


def test_export_never_replaces_a_device_or_a_pipe_even_with_force(runs, tmp_path, capsys):
    """`--out /dev/null --force` replaced the device itself with the export, as root."""
    run_dirs, _ = runs
    pipe = tmp_path / "pipe.pt2"
    os.mkfifo(pipe)
    (tmp_path / "s.json").symlink_to(pipe)  # where a safetensors export's metadata would go
    for out in ("pipe.pt2", "s.safetensors"):
        assert main(["export", str(run_dirs["cnn"]), "--out", str(tmp_path / out), "--force"]) == 2
        err = capsys.readouterr().err
        assert "not a regular file" in err and len(err.strip().splitlines()) == 1
    assert stat.S_ISFIFO(pipe.lstat().st_mode) and not (tmp_path / "s.safetensors").exists()


def test_export_out_that_is_a_folder_or_read_only_is_one_line(tmp_path, capsys, monkeypatch):

    run = _fake_run(tmp_path)
    assert main(["export", str(run), "--out", str(tmp_path)]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err
    (tmp_path / "s.json").mkdir()  # where a safetensors export's metadata would go
    assert (
        main(
            [
                "export",
                str(run),
                "--format",
                "safetensors",
                "--out",
                str(tmp_path / "s.safetensors"),
            ]
        )
        == 2
    )
    assert "metadata file" in capsys.readouterr().err and (tmp_path / "s.json").is_dir()
    read_only = read_only_folder(monkeypatch, tmp_path / "ro")
    assert main(["export", str(run), "--out", str(read_only / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and "Traceback" not in err


@pytest.mark.parametrize("fmt", ["pt2", "safetensors"])
def test_export_with_force_replaces_an_existing_file(runs, tmp_path, fmt):
    run_dirs, _ = runs
    out = tmp_path / f"model.{fmt}"
    out.write_bytes(b"old")
    args = ["export", str(run_dirs["cnn"]), "--format", fmt, "--out", str(out)]
    assert main(args) == 2  # safetensors: its model.json is checked as well
    assert main([*args, "--force"]) == 0
    cls = Pt2Predictor if fmt == "pt2" else SafetensorsPredictor
    assert cls(str(out)).classes[0] == "airplane"
    written = {"pt2": ["model.pt2"], "safetensors": ["model.json", "model.safetensors"]}[fmt]
    assert sorted(p.name for p in tmp_path.iterdir()) == written  # no temporary file left


@pytest.mark.parametrize("fmt", ["pt2", "safetensors"])
def test_an_export_racing_another_to_one_out_is_refused_not_replacing_its_file(
    runs, tmp_path, monkeypatch, capsys, fmt
):
    # the other export writes its file after this one's check_out, while this one loads
    import cifarlab.export

    load, out = cifarlab.export.load_model, tmp_path / f"m.{fmt}"

    def the_other_export_finishes_first(ckpt):
        out.write_bytes(b"the other export's")
        return load(ckpt)

    monkeypatch.setattr(cifarlab.export, "load_model", the_other_export_finishes_first)
    assert main(["export", str(runs[0]["cnn"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "by another process meanwhile; add --force" in err and err.count("\n") == 1
    assert out.read_bytes() == b"the other export's" and not list(tmp_path.glob(".*tmp*"))


def test_sigterm_during_an_export_leaves_no_temporary_file(runs, tmp_path, monkeypatch):
    import os
    import signal

    import cifarlab.export as export

    def write_then_sigterm(net, example, out, meta):
        out.write_bytes(b"half an export")
        os.kill(os.getpid(), signal.SIGTERM)  # the default would end the process here, file and all

    monkeypatch.setattr(export, "_export_onnx", write_then_sigterm)
    run_dirs, _ = runs
    with pytest.raises(SystemExit) as stop:
        main(["export", str(run_dirs["cnn"]), "--out", str(tmp_path / "m.onnx")])
    assert stop.value.code == 143 and list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main put the default back


def test_a_pt2_export_on_a_full_disk_is_one_line_not_an_abort(runs, tmp_path):
    """torch's .pt2 file writer printed a traceback, then aborted the process (exit 134)."""
    run_dirs, _ = runs
    out = tmp_path / "m.pt2"
    code = f"""import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
from cifarlab.cli import main
sys.exit(main(["export", {str(run_dirs["cnn"])!r}, "--out", {str(out)!r}]))"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "m.pt2: cannot write it" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and list(tmp_path.iterdir()) == []


def test_each_exported_suffix_goes_to_its_reader_from_the_one_list(tmp_path):
    """evaluate and calibrate send the suffixes of `checkpoint.EXPORTED` to predict, whose
    table is built from that list: a suffix added there without a reader stops the import."""
    import re
    import subprocess
    import sys

    from cifarlab.checkpoint import EXPORTED, load_checkpoint
    from cifarlab.errors import UserError
    from cifarlab.predict import load_predictor

    says = {".onnx": "ONNX", ".pt2": "torch.export", ".safetensors": ".json beside it",
            ".ts": "TorchScript"}  # fmt: skip
    assert set(says) == set(EXPORTED)
    for suffix in EXPORTED:
        path = tmp_path / f"m{suffix}"
        path.write_bytes(b"\x08\x07 not a model")
        with pytest.raises(UserError, match="exported model"):
            load_checkpoint(path)
        with pytest.raises(UserError, match=re.escape(says[suffix])):
            load_predictor(str(path))
    code = "import cifarlab.checkpoint as c; c.EXPORTED += ('.new',); import cifarlab.predict"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "ValueError" in done.stderr
