"""How fast this machine scores images with a recipe's model, against the work that takes:
floating-point operations per image (torch's FlopCounterMode, a multiply-add counted as two)
and the rate reached, in the precision and memory format a run would choose here. It answers
whether an end-of-run pass can get faster on this machine, or is at the arithmetic's limit.

    python benchmarks/eval_flops.py --recipe fast --images 5000
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from cifarlab.config import load_recipe
from cifarlab.hardware import choose_amp
from cifarlab.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="fast")
    parser.add_argument("--images", type=int, default=5000, help="images in the pass to price")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    config = load_recipe(args.recipe)
    model = create_model(config.model, 10, config.width).eval()
    x = torch.randn(args.batch, 3, 32, 32)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    flops = counter.get_total_flops() / args.batch

    amp, why = choose_amp(config.amp, torch.device("cpu"))
    print(why)
    model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float32
    times = []
    with torch.inference_mode(), torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
        model(x)
        for _ in range(args.rounds):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) / args.batch)
    per_image = statistics.median(times)
    print(f"{config.model} (recipe {args.recipe}), {dtype}, {torch.get_num_threads()} threads")
    print(f"  {flops / 1e9:.3f} GFLOP per image forward; {per_image * 1e3:.3f} ms per image")
    print(f"  {flops / per_image / 1e9:.0f} GFLOP/s reached (median of {args.rounds} batches)")
    total = flops * args.images
    print(
        f"  {args.images} images: {total / 1e12:.2f} TFLOP, {per_image * args.images:.2f} s here;"
    )
    print(f"  2 s would need {total / 2 / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
