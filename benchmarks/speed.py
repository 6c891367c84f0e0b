"""Training and evaluation images/s: our device-resident pipeline against the lesson's DataLoader.

A benchmark, not a test: it takes minutes. For each model, two runs are built as training
builds them (`seed-cnn` with that model, one per pipeline) and timed through the loop's own
`train_step` and `optimizer_step`, alternately (ABAB...) in one process so machine noise hits
both alike; the table reports medians and the ratio, and is appended to docs/benchmarks.md
with the machine's description.

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

from cifarlab.config import apply_overrides, load_recipe
from cifarlab.distributed import init_distributed
from cifarlab.hardware import synchronize
from cifarlab.inference import predict_logits
from cifarlab.step import optimizer_step, train_step
from cifarlab.training_run import build_run

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


def time_steps(run, steps: int, epoch: int) -> float:
    """Seconds per training step of `run` (`train_step` and `optimizer_step`, the batch drawn
    from its pipeline) over `steps` steps, after one warm-up step."""
    it = run.batches.epoch(epoch)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        x, y, rand = next(it)
        train_step(run, x, y, rand)
        optimizer_step(run, epoch * len(run.batches) + i + 1)
        synchronize(run.hw.device)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_model(name: str, args) -> dict:
    """Two runs of `seed-cnn` with `name`, one per pipeline, built as training builds them."""
    runs = {}
    for loader in ("device", "torchvision"):
        config = apply_overrides(
            load_recipe("seed-cnn"),
            {"model": name, "batch_size": args.batch_size, "workers": args.workers,
             "data": args.data, "progress": False, "loader": loader},
            "bench",
        )  # fmt: skip
        runs[loader] = build_run(config, lambda s: None, init_distributed())
    ours, lesson = runs["device"], runs["torchvision"]
    t_ours, t_lesson = [], []
    for rnd in range(args.rounds):  # alternate so drift and noise hit both pipelines alike
        t_ours.append(time_steps(ours, args.steps, rnd))
        t_lesson.append(time_steps(lesson, args.steps, rnd))
    # the data pipeline's own share of a step: batches drawn without the model
    it = ours.batches.epoch(99)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        next(it)
    data_s = (time.perf_counter() - t0) / args.steps
    images = ours.val_images[: args.eval_images]
    predict_logits(ours.model, images[:256], ours.normalize, 256, hardware=ours.hw)
    t0 = time.perf_counter()
    predict_logits(ours.model, images, ours.normalize, 500, hardware=ours.hw)
    eval_ips = len(images) / (time.perf_counter() - t0)
    bs = ours.batches.batch_size
    return {
        "model": name,
        "ours": bs / statistics.median(t_ours),
        "lesson": bs / statistics.median(t_lesson),
        "data_share": data_s / statistics.median(t_ours),
        "eval": eval_ips,
        "hw": ours.hw.describe(),
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
    rows = [bench_model(m.strip(), args) for m in args.models.split(",") if m.strip()]
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
