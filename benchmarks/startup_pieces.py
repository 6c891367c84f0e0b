"""The start-up pieces `fast` runs before its first step, each against the way it was done
before, on the cached training images: channel statistics (torch's bincount of uint8 against
numpy's, which copies to int64 first), the whitening filters (patch sums block by block against
all patches stacked at once: time, and distance from an all-double computation) and one batch's
gather and augmentation (from a channels_last view of the images against an NCHW copy).

    python benchmarks/startup_pieces.py --data ../shared/data/cifar10-train-jpg.tar.gz
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from cifarlab.augment import BatchAugment, Normalize
from cifarlab.config import data_root, load_recipe
from cifarlab.data import load_splits
from cifarlab.data.splits import channel_stats
from cifarlab.models.whitening import patch_whitening_filters


def numpy_channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """The numpy version: np.bincount casts each chunk to int64 before it counts."""
    counts = np.zeros((3, 256), dtype=np.int64)
    pixels = images.reshape(-1, 3)
    for start in range(0, len(pixels), 1 << 22):
        part = pixels[start : start + (1 << 22)]
        for c in range(3):
            counts[c] += np.bincount(part[:, c], minlength=256)
    value, n = np.arange(256) / 255.0, max(len(pixels), 1)
    mean = counts @ value / n
    std = np.sqrt(np.maximum(counts @ value**2 / n - mean**2, 1e-12))
    return mean.round(6).tolist(), std.round(6).tolist()


def stacked_filters(images: torch.Tensor, kernel: tuple[int, int], eps: float = 5e-4):
    """The stacked version: every patch of every image in one float32 array, centred, then
    its covariance summed in double over blocks of 2^18 patches."""
    kh, kw = kernel
    _, c, h, w = images.shape
    rows = [images[:, ch, dy : h - kh + 1 + dy, dx : w - kw + 1 + dx]
            for ch in range(c) for dy in range(kh) for dx in range(kw)]  # fmt: skip
    patches = torch.stack(rows).reshape(c * kh * kw, -1).float()
    patches -= patches.mean(1, keepdim=True)
    cov = sum((p @ p.T).double() for p in patches.split(1 << 18, dim=1)) / patches.shape[1]
    return _filters(cov, c, kh, kw, eps).float()


def double_filters(images: torch.Tensor, kernel: tuple[int, int], eps: float = 5e-4):
    kh, kw = kernel
    x = images.double()
    _, c, h, w = x.shape
    rows = [x[:, ch, dy : h - kh + 1 + dy, dx : w - kw + 1 + dx]
            for ch in range(c) for dy in range(kh) for dx in range(kw)]  # fmt: skip
    patches = torch.stack(rows).reshape(c * kh * kw, -1)
    patches -= patches.mean(1, keepdim=True)
    return _filters(patches @ patches.T / patches.shape[1], c, kh, kw, eps)


def _filters(cov: torch.Tensor, c: int, kh: int, kw: int, eps: float) -> torch.Tensor:
    eigvals, eigvecs = torch.linalg.eigh(cov)
    eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
    return (eigvecs.T / torch.sqrt(eigvals.clamp(min=0) + eps)[:, None]).reshape(-1, c, kh, kw)


def relative_error(filters: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest distance of a filter from the reference's, relative to its size (an
    eigenvector's sign is arbitrary, so each is compared with the sign that fits)."""
    f, r = filters.double().flatten(1), reference.flatten(1)
    f = f * torch.sign((f * r).sum(1, keepdim=True))
    return float(((f - r).norm(dim=1) / r.norm(dim=1)).max())


def median_seconds(fn, *args, rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--data-root", default="")
    a = p.parse_args()
    torch.set_num_threads(2)
    config = load_recipe("fast")
    config = type(config)(**{**config.to_dict(), "data": a.data, "data_root": a.data_root})
    print(f"data: {a.data} (cache under {data_root(config)})")
    splits = load_splits(config)
    images = splits.train.images
    print(f"channel stats of {len(images)} images, median of 5 (s): torch.bincount "
          f"{median_seconds(channel_stats, images):.3f}, numpy bincount "
          f"{median_seconds(numpy_channel_stats, images):.3f}; same values: "
          f"{channel_stats(images) == numpy_channel_stats(images)}")  # fmt: skip
    normalize = Normalize(splits.mean, splits.std)
    sample = normalize(torch.from_numpy(images[:5000]).permute(0, 3, 1, 2).contiguous())
    reference = double_filters(sample, (2, 2))
    print(f"whitening filters of 5000 images, median of 5 (s): blocks "
          f"{median_seconds(patch_whitening_filters, sample, (2, 2)):.3f}, stacked "
          f"{median_seconds(stacked_filters, sample, (2, 2)):.3f}; largest relative distance "
          f"from all-double: blocks {relative_error(patch_whitening_filters(sample, (2, 2)), reference):.1e}, "
          f"stacked {relative_error(stacked_filters(sample, (2, 2)), reference):.1e}")  # fmt: skip
    augment = BatchAugment(load_recipe("fast-cpu"), normalize)
    view = torch.from_numpy(images).permute(0, 3, 1, 2)
    copy = view.contiguous()
    batch, times = load_recipe("fast-cpu").batch_size, {"view": [], "copy": []}
    for r in range(8):
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(r))[:batch]
        for name, source in (("view", view), ("copy", copy)):
            t = time.perf_counter()
            augment(source[idx], torch.Generator().manual_seed(r))
            times[name].append(time.perf_counter() - t)
    same = torch.equal(augment(view[:100], torch.Generator().manual_seed(0)),
                       augment(copy[:100], torch.Generator().manual_seed(0)))  # fmt: skip
    print(
        f"gather + augment of a batch of {batch}, median of 8 (ms): channels_last view "
        f"{statistics.median(times['view']) * 1e3:.1f}, NCHW copy "
        f"{statistics.median(times['copy']) * 1e3:.1f}; same values: {same}"
    )


if __name__ == "__main__":
    main()
