"""Batched augmentation on the training device, with per-image randomness from one generator.

Written here because torchvision's v2 transforms draw one set of parameters per call (per batch);
the policies (AutoAugment, RandAugment, TrivialAugmentWide) are torchvision's, run per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cifarlab.config import TrainConfig


def random_crop(x: torch.Tensor, padding: int, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Per-image random crop of a padded batch back to its size (the padding is `mode`)."""
    n, _c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4, mode="reflect" if mode == "reflect" else "constant")
    dy = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=gen)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=gen)
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # (n, c, dy, dx, h, w), a view
    return windows[torch.arange(n, device=x.device), :, dy, dx]


def mirror(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    return torch.where(flips[:, None, None, None], x.flip(3), x)


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return mirror(x, torch.rand(x.shape[0], device=x.device, generator=gen) < 0.5)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, as torchvision's rgb_to_grayscale."""
    weights = torch.tensor((0.299, 0.587, 0.114), device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def _factor(n: int, strength: float, like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, device=like.device, generator=gen, dtype=like.dtype)
    return (1 - strength + 2 * strength * u)[:, None, None, None]


def color_jitter(
    x: torch.Tensor, brightness: float, contrast: float, saturation: float, gen
) -> torch.Tensor:
    """torchvision's ColorJitter maths per image on [0, 1] floats, in place on one copy of `x`."""
    n = x.shape[0]
    x = x.clone()
    if brightness:
        x.mul_(_factor(n, brightness, x, gen)).clamp_(0, 1)
    if contrast:
        mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        x.sub_(mean).mul_(_factor(n, contrast, x, gen)).add_(mean).clamp_(0, 1)
    if saturation:
        gray = _gray(x)
        x.sub_(gray).mul_(_factor(n, saturation, x, gen)).add_(gray).clamp_(0, 1)
    return x


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Zero one `size`x`size` square per image (centre anywhere, square may leave the image)."""
    n, _c, h, w = x.shape
    top = torch.randint(0, h, (n, 1, 1), device=x.device, generator=gen) - size // 2
    left = torch.randint(0, w, (n, 1, 1), device=x.device, generator=gen) - size // 2
    ys = torch.arange(h, device=x.device)[:, None]
    xs = torch.arange(w, device=x.device)
    mask = (ys >= top) & (ys < top + size) & (xs >= left) & (xs < left + size)
    return x.masked_fill(mask[:, None], 0.0)


def _policy(name: str):
    from torchvision.transforms import v2

    return {
        "autoaugment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10),
        "randaugment": v2.RandAugment,
        "trivialaugment": v2.TrivialAugmentWide,
    }[name]()


@dataclass
class Normalize:
    """(x - mean) / std per channel; uint8 input is scaled to [0, 1] first (the one place)."""

    mean: list[float]
    std: list[float]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        fresh = x.dtype == torch.uint8  # a new float tensor: normalised in place
        if fresh:
            x = x.float().div_(255)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype)[None, :, None, None]
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype)[None, :, None, None]
        return x.sub_(mean).div_(std) if fresh else (x - mean) / std


class BatchAugment:
    """uint8 NCHW batch -> augmented, normalised float batch, as the config asks."""

    def __init__(self, config: TrainConfig, normalize: Normalize):
        self.c = config
        self.normalize = normalize
        self.policy = _policy(config.policy) if config.policy != "none" else None

    def __call__(
        self, x: torch.Tensor, gen: torch.Generator, flips: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`flips` (bool per image) replaces the flip coin, for the alternating flip."""
        c = self.c
        if self.policy is not None:  # per image: each draws its own operations
            x = torch.stack([self.policy(img) for img in x])
        x = x.float().div_(255)
        if c.crop_padding:
            x = random_crop(x, c.crop_padding, c.padding_mode, gen)
        if c.flip:
            x = random_flip(x, gen) if flips is None else mirror(x, flips)
        if any(jitter := (c.jitter_brightness, c.jitter_contrast, c.jitter_saturation)):
            x = color_jitter(x, *jitter, gen)
        x = self.normalize(x)
        if c.cutout:
            x = cutout(x, c.cutout, gen)
        return x


# --- Mixup / CutMix: soft targets -----------------------------------------------------------


def mix_batch(
    x: torch.Tensor, targets: torch.Tensor, config: TrainConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix of a batch and its (N, K) probability targets, paired with the batch
    reversed (as timm); CutMix's lambda is the area actually pasted. `rng` is on the host so
    drawing lambda never waits for the device."""
    use_mixup, use_cutmix = config.mixup_alpha > 0, config.cutmix_alpha > 0
    if not (use_mixup or use_cutmix) or rng.random() >= config.mix_prob:
        return x, targets
    cut = use_cutmix and (not use_mixup or rng.random() < config.switch_prob)
    lam = float(rng.beta(*(2 * [config.cutmix_alpha if cut else config.mixup_alpha])))
    partner = x.flip(0)
    if cut:
        h, w = x.shape[2:]
        ch, cw = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = torch.lerp(partner, x, lam)
    return x, torch.lerp(targets.flip(0), targets, lam)
