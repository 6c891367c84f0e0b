"""Every registry model (both stems where it has them) trains, saves, and comes back the same
through evaluate, predict and export: the one constructor is the only way back from a file."""

import numpy as np
import pytest
import torch

from cifarlab.checkpoint import load_checkpoint
from cifarlab.evaluate import EvalOptions, evaluate
from cifarlab.export import export_model
from cifarlab.inference import load_model, predict_logits
from cifarlab.models import MODELS
from cifarlab.predict import OnnxPredictor, Predictor, TorchScriptPredictor
from cifarlab.train import train
from tests.conftest import make_config

VARIANTS = [(name, "cifar") for name in MODELS] + [
    (name, "imagenet") for name, spec in MODELS.items() if spec.has_stems
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

    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt["model_args"]["stem"] == stem and ckpt["model_args"]["name"] == name
    loaded = load_model(ckpt)
    images = np.stack([np.full((32, 32, 3), v, dtype=np.uint8) for v in (30, 120, 220)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    reference = torch.softmax(predict_logits(loaded.model, x, loaded.normalize), 1).numpy()

    report = evaluate(
        EvalOptions(str(tmp_path / "run"), split="test", out=tmp_path / "eval"), log=lambda s: None
    )
    assert report["num_images"] == 12 and abs(report["accuracy"] - result.test_acc) < 1e-6

    predictor = Predictor(str(tmp_path / "run"))
    np.testing.assert_allclose(predictor.probabilities(images, 2), reference, atol=1e-5)
    for fmt, suffix, cls in (
        ("onnx", ".onnx", OnnxPredictor),
        ("torchscript", ".ts", TorchScriptPredictor),
    ):
        out = export_model(str(tmp_path / "run"), fmt, tmp_path / f"model{suffix}")
        np.testing.assert_allclose(cls(str(out)).probabilities(images, 2), reference, atol=1e-4)
