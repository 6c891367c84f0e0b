# ruff: noqa: I001  (cifarlab first: it sets the allocator's huge pages before torch loads)
"""torch.compile on the CPU: fastnet's training step compiled against eager.

A benchmark, not a test. The training loop's `train_step` (forward and backward) on 4 chunks
of 500 synthetic images (`fast`'s batch as it trains on a CPU), channels_last, all cores; compiled and eager alternate after
warm-ups, median of `--rounds`. It answers whether `compile: true` should be the CPU default.

    python benchmarks/compile_cpu.py [--bf16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import cifarlab  # noqa: F401
import torch

from cifarlab.config import TrainConfig
from cifarlab.hardware import Hardware
from cifarlab.models import create_model
from cifarlab.step import bare_run, train_step

CHUNK, CHUNKS = 500, 4


def step_time(run, model, x, y) -> float:
    """Seconds of the training loop's `train_step` (CHUNKS chunks of CHUNK) through `model`."""
    run.step_model = model
    t0 = time.perf_counter()
    train_step(run, x, y, rand=None)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    eager = create_model("fastnet", num_classes=10).to(memory_format=torch.channels_last)
    compiled = torch.compile(eager)
    x = torch.randn(CHUNK * CHUNKS, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (CHUNK * CHUNKS,))
    hw = Hardware(torch.device("cpu"), torch.bfloat16 if args.bf16 else None, channels_last=True)
    run = bare_run(eager, hw, TrainConfig(model="fastnet", micro_batch=CHUNK))
    t0 = time.perf_counter()
    step_time(run, compiled, x, y)
    print(f"compilation and first step: {time.perf_counter() - t0:.1f} s")
    for model in (compiled, eager, eager):  # warm-ups
        step_time(run, model, x, y)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        times["eager"].append(step_time(run, eager, x, y))
        times["compiled"].append(step_time(run, compiled, x, y))
    e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
    images = CHUNK * CHUNKS
    print(
        f"{'bf16' if args.bf16 else 'fp32'}, {torch.get_num_threads()} threads: eager "
        f"{images / e:.0f} img/s, compiled {images / c:.0f} img/s ({e / c:.2f}x)"
    )


if __name__ == "__main__":
    main()
