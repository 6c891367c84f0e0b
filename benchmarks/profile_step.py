"""Where a `fast` training step's time goes: torch.profiler over N steps of the real step code
(`train_step` + `optimizer_step`, the run built as `cifarlab train` builds it), after warm-up.

    python benchmarks/profile_step.py --data DATA [--steps 20] [--warmup 5] [--device cuda] \\
        [--set micro_batch=0 ...] [--trace trace.json]

Prints the wall time per step, how much of it the device was busy (kernel time), the CPU-side
time per step (Python, dispatch, launches), the top operators by device time and by CPU self
time, and the host-device syncs seen (cudaStreamSynchronize / cudaDeviceSynchronize /
cudaMemcpy calls). On the CPU the device and CPU columns are the same work."""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from cifarlab.config import apply_overrides, load_recipe, parse_set_options
from cifarlab.distributed import Dist
from cifarlab.hardware import synchronize
from cifarlab.step import optimizer_step, train_step
from cifarlab.training_run import apply_freeze, build_run

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaEventSynchronize")


def steps(run, n: int, start: int = 0):
    """`n` training steps of the real step code, cycling over the epoch's batches."""
    done = 0
    while done < n:
        for x, y, rand in run.batches.epoch(0):
            train_step(run, x, y, rand)
            optimizer_step(run, start + done + 1)
            done += 1
            if done == n:
                return


def device_time(event) -> float:
    """Microseconds the event's kernels ran on the device (attribute names vary by torch version)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return getattr(event, name)
    return 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--recipe", default="fast")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--subset", type=int, default=0)
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE config overrides")
    p.add_argument("--trace", help="also write a Chrome trace here")
    p.add_argument("--rows", type=int, default=15)
    a = p.parse_args()
    overrides = {"data": a.data, "device": a.device, "subset": a.subset, "val_size": a.val_size,
                 "progress": False, **parse_set_options(a.set)}  # fmt: skip
    config = apply_overrides(load_recipe(a.recipe), overrides, where="profile_step")
    run = build_run(config, print, Dist())
    run.model.train()
    apply_freeze(run, 0, print)
    device = run.hw.device
    print(
        f"{a.recipe} on {run.hw.describe()}, batch {config.batch_size}, micro_batch {config.micro_batch}"
    )
    steps(run, a.warmup)
    synchronize(device)
    t = time.perf_counter()
    steps(run, a.steps, a.warmup)
    synchronize(device)
    plain = (time.perf_counter() - t) / a.steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        steps(run, a.steps, a.warmup + a.steps)
        synchronize(device)
        profiled = (time.perf_counter() - t) / a.steps
    if a.trace:
        prof.export_chrome_trace(a.trace)
    report(prof, a, plain, profiled, device)


def report(prof, a, plain: float, profiled: float, device: torch.device) -> None:
    events = prof.key_averages()
    on_device = sum(device_time(e) for e in events) / 1e6 / a.steps
    cpu_self = sum(e.self_cpu_time_total for e in events) / 1e6 / a.steps
    print(
        f"\nper step over {a.steps} steps: {plain * 1e3:.1f} ms wall ({profiled * 1e3:.1f} ms profiled)"
    )
    if device.type == "cuda":
        print(
            f"  device busy (kernels):   {on_device * 1e3:8.1f} ms ({on_device / profiled:.0%} of the profiled step)"
        )
        print(f"  CPU side (self times):   {cpu_self * 1e3:8.1f} ms (Python, dispatch, launches)")
        kernels = sum(
            e.count for e in events if device_time(e) > 0 and not e.key.startswith("aten::")
        )
        print(f"  device kernels launched: {kernels / a.steps:8.0f} per step")
        syncs = {e.key: e.count for e in events if e.key.startswith(SYNCS)}
        print(f"  host-device syncs: {syncs or 'none'} over {a.steps} steps")
        print("\ntop operators by device time:")
        key = next(
            (
                k
                for k in ("self_device_time_total", "self_cuda_time_total")
                if hasattr(events[0], k)
            ),
            None,
        )
        print(events.table(sort_by=key, row_limit=a.rows))
    print("\ntop operators by CPU self time:")
    print(events.table(sort_by="self_cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
