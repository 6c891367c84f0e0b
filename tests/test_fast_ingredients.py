"""The speed-record ingredients as switches on any model: alternating flip, lookahead,
whitening with a bias that stops training after N epochs."""

import numpy as np
import pytest
import torch

from cifarlab.augment import BatchAugment, Normalize
from cifarlab.checkpoint import load_checkpoint
from cifarlab.data.loaders import DeviceBatches
from cifarlab.data.sources import ImageSet
from cifarlab.errors import UserError
from cifarlab.lookahead import Lookahead
from cifarlab.models.whitening import first_conv
from cifarlab.train import train
from tests.conftest import make_config


def _orientations(alt_flip: bool, epochs: int = 4, n: int = 64) -> np.ndarray:
    """(epochs, n): whether each image came out mirrored in each epoch."""
    images = np.zeros((n, 4, 4, 3), np.uint8)
    images[:, :, 0] = 255  # bright left column: mirrored images have it on the right
    config = make_config(alt_flip=alt_flip, crop_padding=0, batch_size=16, seed=3)
    augment = BatchAugment(config, Normalize([0.0] * 3, [1.0] * 3))
    batches = DeviceBatches(
        ImageSet(images, np.arange(n), ["x"]), config, torch.device("cpu"), augment
    )
    seen = np.zeros((epochs, n), bool)
    for epoch in range(epochs):
        for x, index, _ in batches.epoch(epoch):
            seen[epoch, index.numpy()] = x[:, 0, 0, -1].numpy() > 0.5
    return seen


def test_alternating_flip_shows_every_image_both_ways_in_consecutive_epochs():
    seen = _orientations(alt_flip=True)
    assert (seen[0] != seen[1]).all() and (seen[1] != seen[2]).all()
    assert 0.25 < seen[0].mean() < 0.75  # the phase is random per image
    coin = _orientations(alt_flip=False)
    assert (coin[0] == coin[1]).any()  # a fresh coin repeats orientations


def test_lookahead_pulls_every_k_steps_and_ends_on_the_slow_average():
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    look = Lookahead(model, every=2, decay=0.9, total_steps=10)
    with torch.no_grad():
        model.weight.fill_(1.0)
    look.after_step(model, 1)  # not a multiple of k: untouched
    assert torch.all(model.weight == 1.0)
    look.after_step(model, 4)
    keep = 0.9**2 * (4 / 10) ** 3
    assert torch.allclose(model.weight, torch.full((1, 2), 1.0 - keep))
    assert torch.equal(look.slow["weight"], model.weight)
    with torch.no_grad():
        model.weight.fill_(5.0)
    look.after_step(model, 10)  # the last step lands on the slow copy, not the live weights
    assert torch.equal(model.weight, look.slow["weight"])
    assert torch.allclose(model.weight, torch.full((1, 2), 1.0 - keep))


def test_whitening_on_a_cnn_freezes_weights_and_the_bias_after_its_epochs(
    real_jpegs, data_root, tmp_path
):
    config = make_config(
        data=str(real_jpegs), data_root=str(data_root), val_size=100, batch_size=50, epochs=3,
        lr=0.02, model="cnn", width=0.25, whitening=True, whiten_bias_epochs=1, lookahead=True,
        alt_flip=True,
    )  # fmt: skip
    states = []
    train(config, tmp_path / "r", log=lambda s: None,
          on_epoch=lambda row: states.append(load_checkpoint(tmp_path / "r" / "last.pt")))  # fmt: skip
    conv = next(k for k in states[0]["model"] if k.endswith("weight"))
    bias = conv.replace("weight", "bias")
    assert all(torch.equal(s["model"][conv], states[0]["model"][conv]) for s in states)
    assert states[0]["model"][bias].abs().sum() > 0  # trained in epoch 1 (whitening zeroed it)
    assert torch.equal(states[1]["model"][bias], states[0]["model"][bias])
    assert torch.equal(states[2]["model"][bias], states[0]["model"][bias])
    last = states[-1]
    assert all(torch.equal(last["model"][k], v) for k, v in last["lookahead"].items())


def test_whitening_refuses_to_overwrite_pretrained_weights(real_jpegs, data_root, tmp_path):
    config = make_config(
        data=str(real_jpegs), data_root=str(data_root), model="tv-resnet18", whitening=True,
        val_size=100, weights=str(tmp_path / "w.pt"),
    )  # fmt: skip
    with pytest.raises(UserError, match="whitening"):
        train(config, tmp_path / "r", log=lambda s: None)


def test_alt_flip_needs_the_device_loader(real_jpegs, data_root, tmp_path):
    config = make_config(
        data=str(real_jpegs),
        data_root=str(data_root),
        loader="torchvision",
        alt_flip=True,
        val_size=100,
    )
    with pytest.raises(UserError, match="alt_flip needs loader: device"):
        train(config, tmp_path / "r", log=lambda s: None)


def test_first_conv_is_found_in_each_model_family():
    from cifarlab.models import create_model

    for name in ("cnn", "resnet18", "fastnet", "tv-resnet18"):
        assert first_conv(create_model(name, 10)).in_channels == 3
