import numpy as np
import pytest
import torch

from cifarlab.augment import Normalize
from cifarlab.gradcam import gradcam_maps, last_conv_layer
from cifarlab.inference import LoadedModel
from cifarlab.models import MODELS, ModelArgs, build_model

VARIANTS = [(name, "cifar") for name in MODELS] + [
    (name, "imagenet") for name, spec in MODELS.items() if spec.backbone
]


def _loaded(name: str, stem: str) -> LoadedModel:
    torch.manual_seed(0)
    args = ModelArgs(name, 3, 0.25 if name in ("cnn", "resnet18", "resnet34") else 1.0, 32,
                     stem, 48 if stem == "imagenet" else 0)  # fmt: skip
    return LoadedModel(
        build_model(args).eval(), Normalize([0.5] * 3, [0.25] * 3), list("abc"), args
    )


@pytest.mark.parametrize(("name", "stem"), VARIANTS, ids=[f"{n}-{s}" for n, s in VARIANTS])
def test_every_registry_model_gets_an_image_sized_heat_map(name, stem):
    loaded = _loaded(name, stem)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    maps, layer = gradcam_maps(loaded, images, torch.tensor([0, 1, 2]))
    assert maps.shape == (3, 32, 32) and np.isfinite(maps).all()
    peaks = maps.reshape(3, -1).max(1)  # each map scaled by its own peak; one is not all zero
    assert maps.min() >= 0 and set(peaks) <= {0.0, 1.0} and peaks.max() == 1
    assert isinstance(layer.module, torch.nn.Conv2d) and layer.side > 1


def test_the_layer_is_the_last_conv_run_not_the_last_registered():
    # in our ResNet a block's 1x1 shortcut conv is registered after conv2; the last block has none,
    # so module order and execution order agree only because of that: check execution order wins
    loaded = _loaded("resnet18", "cifar")
    layer = last_conv_layer(loaded.model, torch.zeros(1, 3, 32, 32))
    assert layer.name == "layers.7.conv2" and layer.side == 4
    tv = _loaded("tv-resnet18", "imagenet")
    assert last_conv_layer(tv.model, torch.zeros(1, 3, 32, 32)).name == "1.layer4.1.conv2"
