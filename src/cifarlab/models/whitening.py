"""Patch-whitening initialisation of a model's first convolution (airbench, arXiv 2404.00498).

The first conv's filters are set to the eigenvectors of the training patches' covariance, scaled
by 1/sqrt(eigenvalue), in +/- pairs, so its outputs start decorrelated with unit variance; the
weights are then frozen. Works for any model whose first layer is a 3-channel `nn.Conv2d`.
"""

from __future__ import annotations

import torch
from torch import nn

from cifarlab.errors import UserError


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The model's first convolution on the RGB input (in module order)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3 and module.groups == 1:
            return module
    raise UserError(
        f"whitening: {type(model).__name__} has no 3-channel first convolution to whiten; "
        "use --set whitening=false"
    )


def patch_whitening_filters(images: torch.Tensor, kernel: tuple[int, int], eps: float = 5e-4):
    """Whitening filters for `kernel`-sized patches of normalised NCHW `images`, the
    largest-variance direction first: shape (3*kh*kw, 3, kh, kw). Sums and products over blocks
    of ~2^18 patches in float32, added up in double: no copy of all the patches at once (slicing
    beats F.unfold twice over on the CPU), within 7e-4 (relative) of an all-double computation."""
    kh, kw = kernel
    images = images.contiguous()  # NCHW: each patch row below is read in long runs
    n, c, h, w = images.shape
    per_image = (h - kh + 1) * (w - kw + 1)
    total, products = torch.zeros(c * kh * kw, dtype=torch.float64), 0.0
    for block in images.split(max(1, (1 << 18) // per_image)):
        rows = [
            block[:, ch, dy : h - kh + 1 + dy, dx : w - kw + 1 + dx]
            for ch in range(c)
            for dy in range(kh)
            for dx in range(kw)
        ]
        patches = torch.stack(rows).reshape(c * kh * kw, -1).float()
        total += patches.sum(1).double()
        products = products + (patches @ patches.T).double()
    count = n * per_image
    mean = total / count
    cov = products / count - torch.outer(mean, mean)
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
    filters = eigvecs.T / torch.sqrt(eigvals.clamp(min=0) + eps)[:, None]
    return filters.reshape(-1, c, kh, kw).float()


@torch.no_grad()
def init_whitening(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> int:
    """Whiten `conv` from `images` and freeze its weight; returns how many channels were set:
    as many leading filters as fit, each as a +/- pair (airbench's layout); the rest keep
    their initialisation."""
    filters = patch_whitening_filters(images, conv.kernel_size, eps)
    keep = min(len(filters), conv.out_channels // 2)
    if keep == 0:
        raise UserError(f"whitening: the first conv has {conv.out_channels} channel(s); need >= 2")
    pairs = torch.cat([filters[:keep], -filters[:keep]])
    conv.weight[: 2 * keep] = pairs.to(conv.weight.dtype)
    if conv.bias is not None:
        conv.bias.zero_()
    conv.weight.requires_grad_(False)
    return 2 * keep
