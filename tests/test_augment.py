import numpy as np
import pytest
import torch

from cifarlab.augment import (
    BatchAugment,
    Normalize,
    color_jitter,
    cutout,
    mix_batch,
    random_crop,
    random_flip,
)
from tests.conftest import make_config


def _batch(n=16, seed=0):
    return torch.randint(
        0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


def test_random_crop_returns_a_shifted_window_of_each_image():
    x = _batch().float()
    out = random_crop(x, 4, "zeros", _gen())
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):  # each output equals exactly one of the 81 windows
        windows = [padded[i, :, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[i], w) for w in windows)
    assert not torch.equal(out, x)


def test_random_crop_reflect_never_introduces_zeros():
    x = _batch().float() + 1
    assert (random_crop(x, 4, "reflect", _gen()) > 0).all()


def test_flip_mirrors_about_half_the_images_and_is_seeded():
    x = _batch(200).float()
    out = random_flip(x, _gen(3))
    flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(len(x))]
    assert 60 < sum(flipped) < 140
    assert torch.equal(out, random_flip(x, _gen(3)))


def test_color_jitter_stays_in_range_and_changes_images():
    x = _batch().float() / 255
    out = color_jitter(x, 0.4, 0.4, 0.4, _gen())
    assert out.min() >= 0 and out.max() <= 1 and out.shape == x.shape
    assert not torch.allclose(out, x)


def test_cutout_zeroes_one_square_per_image():
    x = torch.ones(8, 3, 32, 32)
    out = cutout(x, 8, _gen())
    zeros = (out == 0).all(1).sum(dim=(1, 2))
    assert (zeros > 0).all() and (zeros <= 64).all()


@pytest.mark.parametrize(("mixup", "cutmix"), [(1.0, 0.0), (0.0, 1.0), (0.5, 1.0)])
def test_mixing_keeps_label_mass_one_and_is_seeded(mixup, cutmix):
    config = make_config(mixup_alpha=mixup, cutmix_alpha=cutmix)
    x = _batch().float()
    y = torch.nn.functional.one_hot(torch.arange(16) % 10, 10).float()
    xm, ym = mix_batch(x, y, config, np.random.default_rng(0))
    assert xm.shape == x.shape and ym.shape == y.shape
    assert torch.allclose(ym.sum(1), torch.ones(16))
    assert (ym >= 0).all() and not torch.equal(ym, y)
    xm2, ym2 = mix_batch(x, y, config, np.random.default_rng(0))
    assert torch.equal(xm, xm2) and torch.equal(ym, ym2)


def test_cutmix_label_weight_matches_pasted_area():
    config = make_config(cutmix_alpha=1.0)
    x = torch.zeros(2, 1, 32, 32)
    x[1] = 1.0  # image 0 receives a patch of ones from its partner, image 1
    y = torch.eye(2)
    xm, ym = mix_batch(x, y, config, np.random.default_rng(5))
    pasted = xm[0].mean().item()
    assert ym[0, 1].item() == pytest.approx(pasted)


@pytest.mark.parametrize("policy", ["autoaugment", "randaugment", "trivialaugment"])
def test_policy_augmentations_run_per_image_on_uint8(policy):
    config = make_config(policy=policy, crop_padding=0, flip=False)
    aug = BatchAugment(config, Normalize([0.5] * 3, [0.25] * 3))
    torch.manual_seed(0)
    out = aug(_batch(), _gen())
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= -2.0 - 1e-6 and out.max() <= 2.0 + 1e-6
    # that range holds for any uint8 batch; the policy must also have changed most images
    plain = Normalize([0.5] * 3, [0.25] * 3)(_batch())
    changed = sum(not torch.equal(a, b) for a, b in zip(out, plain, strict=True))
    assert changed >= 8, f"the policy changed {changed} of 16 images"  # it changes 10 to 16


def test_full_pipeline_is_deterministic_for_a_seed():
    config = make_config(
        jitter_brightness=0.2, jitter_contrast=0.2, jitter_saturation=0.2, cutout=8
    )
    aug = BatchAugment(config, Normalize([0.5] * 3, [0.25] * 3))
    assert torch.equal(aug(_batch(), _gen(7)), aug(_batch(), _gen(7)))
    assert not torch.equal(aug(_batch(), _gen(7)), aug(_batch(), _gen(8)))
