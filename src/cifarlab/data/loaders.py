"""Batch iterators: `DeviceBatches` (uint8 data on the device, augmented a batch at a time) and
`TorchvisionBatches` (the lesson's PIL per sample in `DataLoader` workers: slower, kept for
comparison).

Every draw of step s of epoch e is seeded by (seed, e, s): a run resumed mid-epoch sees exactly
the batches and augmentations the uninterrupted run saw.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from cifarlab.augment import BatchAugment, Normalize
from cifarlab.config import TrainConfig
from cifarlab.data.sources import ImageSet


def step_seed(seed: int, epoch: int, step: int, rank: int = 0) -> int:
    entropy = [seed, epoch, step] + ([rank] if rank else [])  # rank 0 draws as a single process
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    # step index 2**31 - 1 is never a real step, so the order draws apart from every batch
    gen = torch.Generator().manual_seed(step_seed(seed, epoch, 2**31 - 1))
    return torch.randperm(n, generator=gen)


def flip_phase(n: int, seed: int) -> torch.Tensor:
    """Alternating flip (airbench): image i is mirrored in the epochs where this bit XOR the
    epoch's parity is set, so every image is seen both ways in any two consecutive epochs."""
    gen = torch.Generator().manual_seed(step_seed(seed, 2**31 - 1, 0))
    return torch.rand(n, generator=gen) < 0.5


@dataclass
class StepRandom:
    """One step's randomness: per-image draws on the device (`gen`), per-batch ones on the host
    (`rng`), `global_draws()` for torch's global generators (dropout, torchvision's policies)."""

    gen: torch.Generator
    rng: np.random.Generator
    seed: int

    @classmethod
    def for_step(
        cls, seed: int, epoch: int, step: int, device: torch.device, rank: int = 0
    ) -> StepRandom:
        s = step_seed(seed, epoch, step, rank)
        return cls(torch.Generator(device=device).manual_seed(s), np.random.default_rng(s), s)

    @contextlib.contextmanager
    def global_draws(self):
        """Torch's global CPU and device generators seeded for this step, restored afterwards."""
        device = self.gen.device
        accelerated = device.type in ("cuda", "mps")
        index = device.index or 0
        with torch.random.fork_rng([index] if accelerated else [], device_type=device.type if accelerated else None):  # fmt: skip
            torch.default_generator.manual_seed(self.seed)
            if device.type == "cuda":
                torch.cuda.default_generators[index].manual_seed(self.seed)
            elif device.type == "mps":
                torch.mps.manual_seed(self.seed)
            yield


Batches = Iterator[tuple[torch.Tensor, torch.Tensor, StepRandom]]  # (images, labels, randomness)


def to_device_uint8(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, 3, H, W) uint8 on `device`; on the CPU a channels_last view of `images`, no copy."""
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    return nchw if device.type == "cpu" else nchw.contiguous().to(device)


class DeviceBatches:
    """Under DDP (`world` > 1) every rank walks the same permutation and takes rank::world of
    each global batch of `batch_size`, so the global batch matches a single process's."""

    def __init__(
        self, data: ImageSet, config: TrainConfig, device: torch.device, augment: BatchAugment,
        rank: int = 0, world: int = 1,
    ):  # fmt: skip
        self.images = to_device_uint8(data.images, device)
        self.labels = torch.from_numpy(data.labels).to(device)
        self.config, self.device, self.augment = config, device, augment
        self.batch_size = min(config.batch_size, len(data))
        self.rank, self.world = rank, world
        self.flip_phase = flip_phase(len(data), config.seed).to(device) if config.alt_flip else None

    def __len__(self) -> int:
        return len(self.labels) // self.batch_size  # drop_last: every step sees a full batch

    def epoch(self, epoch: int, start_step: int = 0) -> Batches:
        order = epoch_order(len(self.labels), self.config.seed, epoch).to(self.device)
        for step in range(start_step, len(self)):
            start = step * self.batch_size
            idx = order[start : start + self.batch_size][self.rank :: self.world]
            rand = StepRandom.for_step(self.config.seed, epoch, step, self.device, self.rank)
            flips = None if self.flip_phase is None else self.flip_phase[idx] ^ bool(epoch % 2)
            with rand.global_draws():  # a `policy` draws from torch's generator
                x = self.augment(self.images[idx], rand.gen, flips)
            yield x, self.labels[idx], rand


class _LessonDataset(torch.utils.data.Dataset):
    def __init__(self, data: ImageSet, transform):
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int | None]):
        i, seed = key  # a batch's first image carries its step's seed
        if seed is not None:
            torch.default_generator.manual_seed(seed)
        return self.transform(Image.fromarray(self.data.images[i])), int(self.data.labels[i])


def lesson_transform(config: TrainConfig, normalize: Normalize):
    """The seed lesson's per-sample torchvision pipeline, with this config's strengths."""
    from torchvision import transforms as T

    steps = []
    if config.crop_padding:
        mode = "reflect" if config.padding_mode == "reflect" else "constant"
        steps.append(T.RandomCrop(config.image_size, config.crop_padding, padding_mode=mode))
    if config.flip:
        steps.append(T.RandomHorizontalFlip())
    if any(jitter := (config.jitter_brightness, config.jitter_contrast, config.jitter_saturation)):
        steps.append(T.ColorJitter(*jitter))
    steps += [T.ToTensor(), T.Normalize(normalize.mean, normalize.std)]
    return T.Compose(steps)


class TorchvisionBatches:
    def __init__(
        self, data: ImageSet, config: TrainConfig, device: torch.device, normalize: Normalize
    ):
        self.dataset = _LessonDataset(data, lesson_transform(config, normalize))
        self.config, self.device = config, device
        self.batch_size = min(config.batch_size, len(data))

    def __len__(self) -> int:
        whole, part = divmod(len(self.dataset), self.batch_size)
        return whole + (1 if part and not self.config.drop_last else 0)

    def epoch(self, epoch: int, start_step: int = 0) -> Batches:
        order, size = epoch_order(len(self.dataset), self.config.seed, epoch), self.batch_size
        # the transforms draw from the step's seed in whichever worker takes the batch (a resumed
        # epoch hands its first batch to worker 0): the same draws as without workers
        steps = [
            [(i, step_seed(self.config.seed, epoch, s) if j == 0 else None)
             for j, i in enumerate(order[s * size : (s + 1) * size].tolist())]
            for s in range(start_step, len(self))
        ]  # fmt: skip
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=steps, num_workers=self.config.workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            generator=torch.Generator().manual_seed(step_seed(self.config.seed, epoch, 2**31 - 2)),
        )  # fmt: skip
        batches = iter(loader)  # `generator`: torch's global one is left as it was
        for step in range(start_step, start_step + len(loader)):
            rand = StepRandom.for_step(self.config.seed, epoch, step, self.device)
            with rand.global_draws():  # without workers the transforms draw here
                x, y = next(batches)
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), rand
