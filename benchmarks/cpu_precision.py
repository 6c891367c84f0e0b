"""CPU training-step throughput: bf16 autocast and flushed denormals against plain fp32.

A benchmark, not a test. Per model, the variants run the training loop's `train_step`
alternately (ABAB...) in one process on a synthetic batch, channels_last, all cores; the table gives median images/s and the ratio to
fp32. It answers two questions of docs/benchmarks.md: does bf16 pay on this CPU (why `amp`
stays off on the CPU), and are slow first epochs denormal arithmetic (fresh vs trained weights).

    python benchmarks/cpu_precision.py [--trained runs/fast-cpu/last.pt] [--rounds 4]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from cifarlab.checkpoint import load_checkpoint
from cifarlab.hardware import Hardware
from cifarlab.models import create_model
from cifarlab.step import bare_run, train_step


def step_time(run, x, y, bf16: bool) -> float:
    """Seconds of the training loop's `train_step` (forward and backward) in fp32 or bf16."""
    run.hw = Hardware(torch.device("cpu"), torch.bfloat16 if bf16 else None, channels_last=True)
    t0 = time.perf_counter()
    train_step(run, x, y, rand=None)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--trained", help="a fastnet checkpoint for the trained-weights rows")
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = [("cnn", 128, None), ("fastnet", 512, None)]
    if args.trained:
        state = load_checkpoint(Path(args.trained))
        cases.append(("fastnet", 512, state))
    print("| model | batch | weights | fp32 img/s | bf16 (ratio) | flush denormals (ratio) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, batch, ckpt in cases:
        width = ckpt["config"].get("width", 1.0) if ckpt else 1.0
        model = create_model(name, 10, width)
        if ckpt:
            model.load_state_dict(ckpt["model"])
        model = model.to(memory_format=torch.channels_last)
        run = bare_run(model, hw=None)
        x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,))
        times = {"fp32": [], "bf16": [], "flush": []}
        for variant in times:  # warm-up: oneDNN builds its kernels on first use
            torch.set_flush_denormal(variant == "flush")
            step_time(run, x, y, variant == "bf16")
        for _ in range(args.rounds):
            for variant in times:
                torch.set_flush_denormal(variant == "flush")
                times[variant].append(step_time(run, x, y, variant == "bf16"))
        torch.set_flush_denormal(False)
        ips = {k: batch / statistics.median(v) for k, v in times.items()}
        print(
            f"| {name} | {batch} | {'trained' if ckpt else 'fresh'} | {ips['fp32']:.0f} | "
            f"{ips['bf16']:.0f} ({ips['bf16'] / ips['fp32']:.2f}x) | "
            f"{ips['flush']:.0f} ({ips['flush'] / ips['fp32']:.2f}x) |"
        )


if __name__ == "__main__":
    main()
