"""fastnet's training throughput per image against the size of the chunk each pass sees.

A benchmark, not a test. One batch of 2,000 synthetic images (`fast`'s batch) goes through the
training loop's `train_step` whole and in `micro_batch` chunks, the variants alternating (ABAB...) in one
process, channels_last, all cores, in fp32 and bf16 autocast; the table gives median images/s
and the ratio to the whole batch. It answers why `fast` sets `micro_batch` on the CPU: a big
batch's activations fall out of the CPU's caches.

    python benchmarks/micro_batch.py [--chunks 0,1000,500,250] [--rounds 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cifarlab.config import TrainConfig
from cifarlab.hardware import Hardware
from cifarlab.models import create_model
from cifarlab.step import bare_run, train_step

BATCH = 2000


def batch_time(run, x, y, chunk: int, bf16: bool) -> float:
    """Seconds of the training loop's `train_step` (forward and backward) on the whole batch in
    chunks of `chunk` (0 = at once)."""
    run.config = TrainConfig(model="fastnet", micro_batch=chunk)
    run.hw = Hardware(torch.device("cpu"), torch.bfloat16 if bf16 else None, channels_last=True)
    t0 = time.perf_counter()
    train_step(run, x, y, rand=None)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", default="0,1000,500,250")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    chunks = [int(c) for c in args.chunks.split(",")]
    torch.manual_seed(0)
    model = create_model("fastnet", num_classes=10).to(memory_format=torch.channels_last)
    run = bare_run(model, hw=None)  # batch_time sets its config and precision
    x = torch.randn(BATCH, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (BATCH,))
    print(f"fastnet, batch {BATCH}, {torch.get_num_threads()} threads, median of {args.rounds}")
    print("| precision | chunk | img/s | vs whole batch |")
    print("| --- | --- | --- | --- |")
    for bf16 in (False, True):
        times = {c: [] for c in chunks}
        for c in chunks:  # warm-up: oneDNN picks its kernels per shape
            batch_time(run, x, y, c, bf16)
        for _ in range(args.rounds):
            for c in chunks:
                times[c].append(batch_time(run, x, y, c, bf16))
        base = statistics.median(times[chunks[0]])
        for c in chunks:
            t = statistics.median(times[c])
            print(
                f"| {'bf16' if bf16 else 'fp32'} | {c or BATCH} | {BATCH / t:.0f} | {base / t:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
