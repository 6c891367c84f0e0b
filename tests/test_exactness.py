"""Pieces checked against independent references: metrics against scikit-learn, schedules
against their closed forms, DDP sharding against the single-process batch, and the exported
models' normalisation against hand-computed values."""

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as sk

from cifarlab import metrics
from cifarlab.augment import BatchAugment, Normalize
from cifarlab.data.imageset import ImageSet
from cifarlab.data.loaders import DeviceBatches
from cifarlab.export import Deployable
from cifarlab.schedules import make_scheduler, stretch
from tests.conftest import make_config


def test_metrics_match_scikit_learn_on_random_predictions():
    rng = np.random.default_rng(0)
    k, n = 7, 2000
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 2.0 * np.eye(k)[labels] * rng.random((n, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    preds = probs.argmax(1)
    cm = metrics.confusion_matrix(labels, preds, k)
    np.testing.assert_array_equal(cm, sk.confusion_matrix(labels, preds, labels=range(k)))
    pc = metrics.per_class(cm)
    p, r, f, support = sk.precision_recall_fscore_support(
        labels, preds, labels=range(k), zero_division=0
    )
    np.testing.assert_allclose(pc["precision"], p)
    np.testing.assert_allclose(pc["recall"], r)
    np.testing.assert_allclose(pc["f1"], f)
    np.testing.assert_array_equal(pc["support"], support)
    for top in (1, 3, 5):
        assert metrics.top_k_accuracy(probs, labels, top) == pytest.approx(
            sk.top_k_accuracy_score(labels, probs, k=top, labels=range(k))
        )


def _lrs(name, total, warmup, per_epoch=1):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return _run(make_scheduler(name, opt, total, warmup, per_epoch), opt, total)


def _run(sched, opt, steps):
    """The lr of each of the next `steps` optimiser steps."""
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("name", ["cosine", "linear", "onecycle"])
@pytest.mark.parametrize("new_total", [90, 36])  # a budget's correction: longer, shorter
def test_a_re_planned_schedule_continues_from_its_lr_and_survives_a_checkpoint(name, new_total):
    params = [torch.zeros(1, requires_grad=True)]
    opt = torch.optim.SGD(params, lr=1.0)
    sched = make_scheduler(name, opt, 60, 6)
    before = _run(sched, opt, 20)
    assert before == pytest.approx(_lrs(name, 60, 6)[:20])  # untouched until re-planned
    stretch(sched, new_total)
    saved = sched.state_dict()
    after = _run(sched, opt, new_total - 20)
    lrs = before + after
    steps = np.diff(lrs[6:])  # after the warm-up
    assert (steps <= 1e-12).all(), "the lr turned back up"
    assert np.abs(steps).max() <= 2.5 * max(1 / 54, 1 / (new_total - 20)) + 1e-12  # no jump
    assert 0.0 <= lrs[-1] <= 1.5 * before[-1] / (new_total - 20)  # it anneals, to the new end
    # a resumed run rebuilds the scheduler from the corrected length, then loads its state
    opt2 = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    resumed = make_scheduler(name, opt2, new_total, round(6 * new_total / 60))
    resumed.load_state_dict(saved)
    opt2.param_groups[0]["lr"] = resumed.get_last_lr()[0]
    assert _run(resumed, opt2, new_total - 20) == after


@pytest.mark.parametrize("name", ["cosine", "linear", "onecycle"])
def test_a_schedule_re_planned_during_its_warm_up_never_passes_the_peak(name):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = make_scheduler(name, opt, 207, 46)  # warm-up of 2 epochs of 23 steps
    lrs = _run(sched, opt, 23)
    stretch(sched, 322)  # a budget's correction after the first epoch: a longer run
    lrs += _run(sched, opt, 322 - 23)
    assert max(lrs) <= 1.0 + 1e-12 and max(np.abs(np.diff(lrs))) < 0.03


def test_schedules_follow_their_closed_forms():
    total, warm = 50, 10
    cosine = [(t + 1) / warm if t < warm else 0.5 * (1 + math.cos(math.pi * (t - warm) / (total - warm)))
              for t in range(total)]  # fmt: skip
    np.testing.assert_allclose(_lrs("cosine", total, warm), cosine, atol=1e-12)
    onecycle = [
        0.1 + 0.9 * t / warm if t < warm else (total - t) / (total - warm) for t in range(total)
    ]
    np.testing.assert_allclose(_lrs("onecycle", total, warm), onecycle, atol=1e-12)
    linear = [(t + 1) / warm if t < warm else (total - t) / (total - warm) for t in range(total)]
    np.testing.assert_allclose(_lrs("linear", total, warm), linear, atol=1e-12)
    np.testing.assert_allclose(_lrs("linear", total, 0), [1 - t / total for t in range(total)])
    constant = [min(1.0, (t + 1) / warm) for t in range(total)]
    np.testing.assert_allclose(_lrs("constant", total, warm), constant, atol=1e-12)


def test_ddp_shards_are_exactly_the_single_process_batch():
    rng = np.random.default_rng(1)
    data = ImageSet(
        rng.integers(0, 255, (64, 8, 8, 3), dtype=np.uint8), rng.integers(0, 4, 64), list("abcd")
    )
    config = make_config(batch_size=16, crop_padding=0, flip=False)  # no random augmentation
    augment = BatchAugment(config, Normalize([0.0] * 3, [1.0] * 3))
    cpu = torch.device("cpu")
    single = list(DeviceBatches(data, config, cpu, augment).epoch(3))
    shards = [list(DeviceBatches(data, config, cpu, augment, rank, 2).epoch(3)) for rank in (0, 1)]
    assert len(single) == len(shards[0]) == len(shards[1]) == 4
    for step, (x, y, _r) in enumerate(single):
        for rank in (0, 1):
            xs, ys, _ = shards[rank][step]
            assert torch.equal(xs, x[rank::2]) and torch.equal(ys, y[rank::2])


def test_deployable_normalises_plain_unit_range_images_as_trained():
    net = Deployable(torch.nn.Identity(), mean=[0.5, 0.25, 0.0], std=[0.25, 0.5, 1.0]).eval()
    x = torch.tensor([0.75, 0.75, 0.75]).view(1, 3, 1, 1)
    np.testing.assert_allclose(net(x).flatten().tolist(), [1.0, 1.0, 0.75])
    assert torch.equal(Normalize([0.5, 0.25, 0.0], [0.25, 0.5, 1.0])(torch.full((1, 3, 1, 1), 191, dtype=torch.uint8)),
                       net(torch.full((1, 3, 1, 1), 191 / 255)))  # fmt: skip
