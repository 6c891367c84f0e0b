"""The speed-record ingredients as switches on any model: alternating flip, lookahead,
whitening with a bias that stops training after N epochs."""

import copy

import numpy as np
import pytest
import torch

from cifarlab.augment import BatchAugment, Normalize
from cifarlab.checkpoint import load_checkpoint
from cifarlab.data.loaders import DeviceBatches
from cifarlab.data.sources import ImageSet
from cifarlab.errors import UserError
from cifarlab.lookahead import Lookahead
from cifarlab.models import create_model
from cifarlab.models.whitening import first_conv
from cifarlab.muon import MuonSGD, orthogonalize
from cifarlab.train import train
from cifarlab.training_run import make_optimizer
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


def test_muon_groups_are_the_conv_filters_and_sgd_groups_follow_torchs_sgd():
    model = create_model("fastnet", 10)
    opt = make_optimizer(
        model, make_config(optimizer="muon", lr=1.5, muon_lr=0.24, weight_decay=1e-3)
    )
    muon = [g for g in opt.param_groups if g["muon"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(muon) == 1 and muon[0]["params"] == [p for p in trainable if p.ndim == 4]
    assert muon[0]["lr"] == 0.24 and muon[0]["momentum"] == 0.6 and muon[0]["weight_decay"] == 0
    slower = make_optimizer(model, make_config(optimizer="muon", lr=1.5, backbone_lr_mult=0.1))
    assert [g["lr"] for g in slower.param_groups if g["muon"]] == [pytest.approx(0.024)]
    others = {id(p) for g in opt.param_groups if not g["muon"] for p in g["params"]}
    assert others == {id(p) for p in trainable if p.ndim != 4}
    # the non-Muon groups: step for step what torch.optim.SGD does
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    ref, ours = _sgd_and_muonsgd(a, b)
    for _ in range(4):
        x = torch.randn(8, 5)
        for net, o in ((a, ref), (b, ours)):
            o.zero_grad()
            net(x).pow(2).sum().backward()
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("shape", [(64, 576), (576, 64)])
def test_orthogonalize_brings_every_singular_value_near_one(shape):
    torch.manual_seed(0)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k))
    g = u @ torch.diag(torch.logspace(0, 1, k)) @ v.T  # singular values from 1 to 10
    s = torch.linalg.svdvals(orthogonalize(g))
    assert s.min() > 0.5 and s.max() < 1.3  # the 3-step quintic lands in about [0.6, 1.2]


def test_a_muon_step_rescales_filters_and_moves_them_by_lr(tmp_path):
    conv = torch.nn.Conv2d(4, 8, 3, bias=False)
    opt = MuonSGD([{"params": [conv.weight], "muon": True}], lr=0.1, momentum=0.6, nesterov=True)
    torch.manual_seed(0)
    (conv(torch.randn(2, 4, 6, 6)) * torch.randn(2, 8, 4, 4)).sum().backward()
    before = conv.weight.detach().clone()
    opt.step()
    rescaled = before * (8**0.5 / before.norm())
    update = (rescaled - conv.weight.detach()).reshape(8, -1) / 0.1
    s = torch.linalg.svdvals(update)
    assert (s > 0.3).all() and (s < 1.3).all()  # an orthogonalised step, whatever the grad's scale


def test_muon_on_a_model_without_trainable_filters_is_one_line():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    with pytest.raises(UserError, match="optimizer: muon needs convolution filters"):
        make_optimizer(model, make_config(optimizer="muon"))


def test_muon_lowers_the_loss_and_resumes_exactly(synthetic_images, tmp_path):
    config = make_config(
        data=str(synthetic_images), data_root=str(tmp_path / "d"), val_size=6, batch_size=8,
        epochs=3, model="cnn", width=0.25, optimizer="muon", muon_lr=0.1, lr=0.05,
        schedule="linear", threads=1,
    )  # fmt: skip

    class Crash(Exception):
        pass

    def crash(row):
        if row["epoch"] == 2:
            raise Crash

    full = train(config, tmp_path / "full", log=lambda s: None)
    assert full.history[-1]["train_loss"] < full.history[0]["train_loss"]
    with pytest.raises(Crash):
        train(config, tmp_path / "cut", log=lambda s: None, on_epoch=crash)
    train(config, tmp_path / "cut", resume=True, log=lambda s: None)
    a = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_micro_batches_add_up_to_the_whole_batch_and_train(
    synthetic_images, real_jpegs, data_root, tmp_path
):
    from cifarlab.distributed import init_distributed
    from cifarlab.train import train_step
    from cifarlab.training_run import build_run

    def gradients(micro_batch: int) -> list[torch.Tensor]:
        config = make_config(
            data=str(synthetic_images), data_root=str(tmp_path / "d"), val_size=6,
            batch_size=30, model="cnn", width=0.25, micro_batch=micro_batch, amp="off",
        )  # fmt: skip
        run = build_run(config, lambda s: None, init_distributed())
        run.model.eval()  # BatchNorm on running statistics: the chunks must add up exactly
        x, y, rand = next(run.batches.epoch(0))
        loss, logits = train_step(run, x, y, rand)
        assert logits.shape == (30, 3)
        return [loss] + [p.grad for p in run.model.parameters() if p.grad is not None]

    whole, chunked = gradients(0), gradients(12)  # chunks of 12, 12 and 6 images
    assert len(whole) == len(chunked) > 1
    assert all(
        torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(whole, chunked, strict=True)
    )

    config = make_config(
        data=str(real_jpegs), data_root=str(data_root), val_size=100, subset=600, epochs=3,
        batch_size=50, model="cnn", width=0.25, micro_batch=20, lr=0.05, threads=1,
    )  # fmt: skip
    history = train(config, tmp_path / "r", log=lambda s: None).history
    assert history[-1]["train_loss"] < history[0]["train_loss"]


@pytest.mark.parametrize("micro_batch", [7, 1])
def test_a_micro_batch_leaving_one_image_chunks_is_one_line(micro_batch):
    from cifarlab.config import validate_config

    with pytest.raises(UserError, match=f"micro_batch={micro_batch} leaves a chunk of one image"):
        validate_config(make_config(batch_size=50, micro_batch=micro_batch))  # 7 x 7 + 1
    validate_config(make_config(batch_size=50, micro_batch=500))  # not below the batch: whole


def test_chunks_too_small_for_batchnorm_are_warned_about():
    from cifarlab.models import create_model
    from cifarlab.training_run import _warn_small_chunks

    def said(batch_size: int, micro_batch: int, world: int = 1) -> list[str]:
        out = []
        config = make_config(batch_size=batch_size, micro_batch=micro_batch)
        _warn_small_chunks(config, create_model("fastnet", 10), out.append, world)
        return out

    assert said(2000, 2)[0].startswith("warning: micro_batch=2 makes chunks as small as 2 images")
    assert "as small as 8 images" in said(2000, 996)[0]  # 996, 996 and 8
    assert said(2000, 500) == said(2000, 0) == said(2000, 1000, world=2) == []
    assert said(8, 4)  # a small batch is the user's choice; its chunks of 4 still warn


def test_sgd_groups_match_torchs_sgd_when_a_parameter_starts_training_later():
    """A parameter without gradients for the first steps (a frozen backbone, then unfrozen)
    gets its momentum buffer at its first gradient; the others keep theirs."""
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    b = copy.deepcopy(a)
    ref, ours = _sgd_and_muonsgd(a, b)
    for step in range(5):
        x = torch.randn(8, 5)
        for net, o in ((a, ref), (b, ours)):
            net[0].requires_grad_(step >= 2)
            o.zero_grad()
            net(x).pow(2).sum().backward()
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def _muon_reference(p, state, lr, momentum):
    """Muon's step on one filter bank as first written: Nesterov momentum, the filters
    rescaled to norm sqrt(outputs), the orthogonalised step."""
    g = p.grad
    if "buf" not in state:
        state["buf"] = g.clone()
    else:
        state["buf"].mul_(momentum).add_(g)
    g = g.add(state["buf"], alpha=momentum)
    p.mul_(len(p) ** 0.5 / p.norm().clamp(min=1e-12))
    p.add_(orthogonalize(g.reshape(len(g), -1)).view_as(p), alpha=-lr)


def test_muon_groups_step_as_the_per_filter_bank_rule():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
    b = copy.deepcopy(a)
    ours = MuonSGD([{"params": list(b.parameters()), "muon": True}], lr=0.2, momentum=0.6,
                   nesterov=True)  # fmt: skip
    states = [{} for _ in a.parameters()]
    for _ in range(4):
        x = torch.randn(2, 3, 9, 9)
        for net in (a, b):
            net.zero_grad()
            net(x).pow(2).sum().backward()
        with torch.no_grad():
            for p, s in zip(a.parameters(), states, strict=True):
                _muon_reference(p, s, 0.2, 0.6)
        ours.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def _sgd_and_muonsgd(a: torch.nn.Module, b: torch.nn.Module):
    """torch.optim.SGD on `a` and MuonSGD's SGD group on `b`, with the same settings."""
    ref = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.85, nesterov=True, weight_decay=1e-2)
    ours = MuonSGD([{"params": list(b.parameters()), "weight_decay": 1e-2}], lr=0.1, momentum=0.85,
                   nesterov=True)  # fmt: skip
    return ref, ours
