"""Every registry model (both stems where it has them) trains, saves, and comes back the same
through evaluate, predict and export: the one constructor is the only way back from a file."""

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cifarlab.calibration import calibrate_run
from cifarlab.checkpoint import load_checkpoint
from cifarlab.evaluate import EvalOptions, evaluate
from cifarlab.export import export_model
from cifarlab.inference import load_model, predict_logits
from cifarlab.models import MODELS
from cifarlab.predict import OnnxPredictor, Predictor, Pt2Predictor, SafetensorsPredictor
from cifarlab.train import train
from tests.conftest import make_config

VARIANTS = [(name, "cifar") for name in MODELS] + [
    (name, "imagenet") for name, spec in MODELS.items() if spec.backbone
]


@pytest.mark.parametrize(("name", "stem"), VARIANTS, ids=[f"{n}-{s}" for n, s in VARIANTS])
def test_every_model_round_trips_through_evaluate_predict_and_export(
    name, stem, synthetic_images, tmp_path
):
    config = make_config(
        data=str(synthetic_images), data_root=str(tmp_path / "d"), model=name, stem=stem,
        input_size=48 if stem == "imagenet" else 0, epochs=1, batch_size=8, val_size=6,
        lr=0.01, warmup_epochs=0.0, tta="none", threads=1,
    )  # fmt: skip
    result = train(config, tmp_path / "run", log=lambda s: None)
    assert result.test_acc is not None  # the folder has test/: the selected checkpoint is scored
    temperature = calibrate_run(tmp_path / "run", log=lambda s: None)

    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt["model_args"]["stem"] == stem and ckpt["model_args"]["name"] == name
    loaded = load_model(ckpt)
    images = np.stack([np.full((32, 32, 3), v, dtype=np.uint8) for v in (30, 120, 220)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    assert loaded.temperature == temperature
    logits = predict_logits(loaded.model, x, loaded.normalize)
    reference = torch.softmax(logits / temperature, 1).numpy()

    report = evaluate(
        EvalOptions(str(tmp_path / "run"), split="test", out=tmp_path / "eval"), log=lambda s: None
    )
    assert report["num_images"] == 12 and abs(report["accuracy"] - result.test_acc) < 1e-6
    assert report["gradcam"]["images"] > 0, report["gradcam"]  # Grad-CAM found a layer and ran

    predictor = Predictor(str(tmp_path / "run"))
    np.testing.assert_allclose(predictor.probabilities(images, 2), reference, atol=1e-5)
    for fmt, cls in (("onnx", OnnxPredictor), ("pt2", Pt2Predictor),
                     ("safetensors", SafetensorsPredictor)):  # fmt: skip
        out = export_model(str(tmp_path / "run"), fmt, tmp_path / f"model.{fmt}")
        exported = cls(str(out))
        assert exported.temperature == temperature, fmt
        np.testing.assert_allclose(exported.probabilities(images, 2), reference, atol=1e-4)
    exports = {p.name for p in tmp_path.iterdir() if p.is_file()}
    assert exports == {
        "model.onnx",
        "model.pt2",
        "model.safetensors",
        "model.json",
    }  # no temp files
    if name.startswith("tv-"):
        got = _plain_torchvision_probabilities(tmp_path, images)
        np.testing.assert_allclose(got, reference, atol=1e-4)


def _readme_snippet() -> str:
    """The guide's plain-torchvision loading code: the 5 lines with the cifar-stem edit inside."""
    readme = (Path(__file__).parents[1] / "docs" / "guide.md").read_text()
    section = readme[readme.index("### `cifarlab export`") :]
    load, stem = re.findall(r"```python\n(.*?)```", section, re.S)[:2]
    lines = load.splitlines()
    return "\n".join([*lines[:4], stem, lines[4]])


def _plain_torchvision_probabilities(folder: Path, images: np.ndarray) -> np.ndarray:
    """Run the guide's snippet on `folder/model.safetensors` as a user without cifarlab would."""
    (folder / "fast.json").write_text((folder / "model.json").read_text())
    (folder / "fast.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    cwd, scope = os.getcwd(), {}
    os.chdir(folder)
    try:
        exec(_readme_snippet(), scope)
    finally:
        os.chdir(cwd)
    meta, tv, net = scope["meta"], scope["tv"], scope["net"]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(
        1, 3, 1, 1
    )
    if tv["stem"] == "imagenet":
        x = F.interpolate(x, size=tv["input_size"], mode="bilinear", align_corners=False)
    with torch.no_grad():
        return torch.softmax(net(x) / meta["temperature"], 1).numpy()
