"""`lesson-cnn` is the lesson's code: its torchvision pipeline in the lesson's order, fp32, all
training images, the last partial batch kept; and its best.pt loads into the lesson's own class."""

import numpy as np
import torch
from torch import nn

from cifarlab.augment import Normalize
from cifarlab.checkpoint import load_checkpoint
from cifarlab.config import apply_overrides, load_recipe
from cifarlab.data.imageset import ImageSet
from cifarlab.data.loaders import TorchvisionBatches, lesson_transform
from cifarlab.inference import load_model
from cifarlab.models.cnn import lesson_state_dict
from cifarlab.train import train


class LessonCIFAR10CNN(nn.Module):
    """The lesson's class as a lesson writes it: one flat Sequential of layers, then a head."""

    def __init__(self, num_classes=10):
        super().__init__()
        layers, cin = [], 3
        for cout in (64, 128, 256):
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.MaxPool2d(2), nn.Dropout2d(0.25),
            ]  # fmt: skip
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(256 * 4 * 4, 512), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(512, num_classes),
        )  # fmt: skip

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.view(x.size(0), -1))


def test_lesson_cnn_is_fp32_on_all_images_through_the_lessons_transforms_in_order():
    config = load_recipe("lesson-cnn")
    assert (config.amp, config.channels_last, config.val_size) == ("off", "off", 0)
    steps = lesson_transform(config, Normalize(config_mean := [0.4914, 0.4822, 0.4465],
                                               [0.2470, 0.2435, 0.2616])).transforms  # fmt: skip
    names = [type(t).__name__ for t in steps]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "ColorJitter", "ToTensor", "Normalize"]
    assert steps[0].padding == 4 and steps[2].brightness == (0.8, 1.2)
    assert list(steps[-1].mean) == config_mean


def test_the_lesson_loader_keeps_the_last_partial_batch():
    data = ImageSet(np.zeros((300, 32, 32, 3), np.uint8), np.zeros(300, np.int64), ["a"])
    norm = Normalize([0.5] * 3, [0.5] * 3)
    exact = apply_overrides(load_recipe("lesson-cnn"), {"workers": 0}, where="test")
    batches = TorchvisionBatches(data, exact, torch.device("cpu"), norm)
    sizes = [len(x) for x, _, _ in batches.epoch(0)]
    assert len(batches) == 3 and sizes == [128, 128, 44]
    dropping = apply_overrides(exact, {"drop_last": True}, where="test")
    assert len(TorchvisionBatches(data, dropping, torch.device("cpu"), norm)) == 2


def test_lesson_cnn_best_checkpoint_loads_into_the_lessons_class_with_the_same_logits(
    real_jpegs, data_root, tmp_path
):
    config = apply_overrides(
        load_recipe("lesson-cnn"),
        {"data": str(real_jpegs), "data_root": str(data_root), "subset": 150, "epochs": 1,
         "workers": 0, "device": "cpu", "threads": 2, "progress": False},
        where="test",
    )  # fmt: skip
    train(config, tmp_path / "run", log=lambda s: None)
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    lesson = LessonCIFAR10CNN()
    lesson.load_state_dict(lesson_state_dict(ckpt), strict=True)
    ours = load_model(ckpt).model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(lesson.eval()(x), ours(x), atol=1e-5)
        assert not torch.allclose(LessonCIFAR10CNN().eval()(x), ours(x), atol=1e-3)
