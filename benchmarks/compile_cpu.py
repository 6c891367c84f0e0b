# ruff: noqa: I001  (cifarlab first: it sets the allocator's huge pages before torch loads)
"""torch.compile on the CPU: fastnet's training step compiled against eager.

A benchmark, not a test. Forward and backward of 4 chunks of 500 synthetic images (`fast`'s
batch as it trains on a CPU), channels_last, all cores; compiled and eager alternate after
warm-ups, median of `--rounds`. It answers whether `compile: true` should be the CPU default.

    python benchmarks/compile_cpu.py [--bf16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import cifarlab  # noqa: F401
import torch
import torch.nn.functional as F

from cifarlab.models import create_model

CHUNK, CHUNKS = 500, 4


def step_time(model, x, y, bf16: bool) -> float:
    t0 = time.perf_counter()
    for _ in range(CHUNKS):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    eager = create_model("fastnet", num_classes=10).to(memory_format=torch.channels_last)
    compiled = torch.compile(eager)
    x = torch.randn(CHUNK, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (CHUNK,))
    t0 = time.perf_counter()
    step_time(compiled, x, y, args.bf16)
    print(f"compilation and first step: {time.perf_counter() - t0:.1f} s")
    for model in (compiled, eager, eager):  # warm-ups
        step_time(model, x, y, args.bf16)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        times["eager"].append(step_time(eager, x, y, args.bf16))
        times["compiled"].append(step_time(compiled, x, y, args.bf16))
    e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
    images = CHUNK * CHUNKS
    print(
        f"{'bf16' if args.bf16 else 'fp32'}, {torch.get_num_threads()} threads: eager "
        f"{images / e:.0f} img/s, compiled {images / c:.0f} img/s ({e / c:.2f}x)"
    )


if __name__ == "__main__":
    main()
