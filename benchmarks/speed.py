"""Training and evaluation images/s: our device-resident pipeline against the lesson's DataLoader.

A benchmark, not a test: it takes minutes. For each model, the two pipelines are measured
alternately (ABAB...) in one process so machine noise hits both alike; the table reports
medians and the ratio, and is appended to docs/benchmarks.md with the machine's description.

    python benchmarks/speed.py --data ../shared/data/cifar10-train-jpg.tar.gz [--models cnn,resnet18]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from cifarlab.augment import BatchAugment, Normalize
from cifarlab.config import apply_overrides, load_recipe
from cifarlab.data import load_splits
from cifarlab.data.loaders import DeviceBatches, TorchvisionBatches, to_device_uint8
from cifarlab.hardware import setup_hardware
from cifarlab.inference import predict_logits
from cifarlab.models import create_model

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}"


def time_steps(batches, model, optimizer, hw, steps: int, epoch: int) -> float:
    """Seconds per training step over `steps` steps (after one warm-up step)."""
    it = batches.epoch(epoch)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        x, y, _ = next(it)
        if hw.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with hw.autocast():
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if hw.device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_model(name: str, splits, args) -> dict:
    config = apply_overrides(
        load_recipe("seed-cnn"),
        {"model": name, "batch_size": args.batch_size, "workers": args.workers},
        "bench",
    )
    hw = setup_hardware(config)
    normalize = Normalize(splits.mean, splits.std)
    model = create_model(name, len(splits.classes)).to(hw.device)
    if hw.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ours = DeviceBatches(splits.train, config, hw.device, BatchAugment(config, normalize))
    lesson = TorchvisionBatches(splits.train, config, hw.device, normalize)
    t_ours, t_lesson = [], []
    for rnd in range(args.rounds):  # alternate so drift and noise hit both pipelines alike
        t_ours.append(time_steps(ours, model, optimizer, hw, args.steps, rnd))
        t_lesson.append(time_steps(lesson, model, optimizer, hw, args.steps, rnd))
    # the data pipeline's own share of a step: batches drawn without the model
    it = ours.epoch(99)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        next(it)
    data_s = (time.perf_counter() - t0) / args.steps
    images = to_device_uint8(splits.val.images[: args.eval_images], hw.device)
    predict_logits(model, images[:256], normalize, 256, hardware=hw)
    t0 = time.perf_counter()
    predict_logits(model, images, normalize, 500, hardware=hw)
    eval_ips = len(images) / (time.perf_counter() - t0)
    bs = ours.batch_size
    return {
        "model": name,
        "ours": bs / statistics.median(t_ours),
        "lesson": bs / statistics.median(t_lesson),
        "data_share": data_s / statistics.median(t_ours),
        "eval": eval_ips,
        "hw": hw.describe(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--models", default="cnn,resnet18")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=6, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per pipeline")
    p.add_argument(
        "--workers", type=int, default=2, help="DataLoader workers for the lesson's pipeline"
    )
    p.add_argument("--eval-images", type=int, default=2000)
    p.add_argument(
        "--no-write", action="store_true", help="print only, do not append to docs/benchmarks.md"
    )
    args = p.parse_args()
    config = apply_overrides(
        load_recipe("seed-cnn"), {"data": args.data, "progress": False}, "bench"
    )
    splits = load_splits(config)
    rows = [bench_model(m.strip(), splits, args) for m in args.models.split(",") if m.strip()]
    lines = [
        f"### Speed, {date.today()}: {machine()}",
        "",
        f"`python benchmarks/speed.py --data {args.data} --models {args.models}` — batch {args.batch_size}, "
        f"median of {args.rounds} alternating rounds x {args.steps} steps; lesson pipeline with {args.workers} workers.",
        "",
        "| model | ours train img/s | lesson train img/s | ratio | data share of our step | eval img/s | device |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['ours']:.0f} | {r['lesson']:.0f} | {r['ours'] / r['lesson']:.2f}x | "
            f"{r['data_share']:.1%} | {r['eval']:.0f} | {r['hw']} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        DOC.parent.mkdir(exist_ok=True)
        with open(DOC, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
