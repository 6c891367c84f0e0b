"""Device, precision, memory format and thread choices, made once per run from the config."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from dataclasses import dataclass

import torch

from cifarlab.config import TrainConfig, default_data_root
from cifarlab.distributed import all_sum
from cifarlab.errors import UserError
from cifarlab.memory import ENV
from cifarlab.models import create_model
from cifarlab.rundir import replaced_when_complete
from cifarlab.step import bare_run, train_step

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtypes
AMP_NAMES = {dtype: name for name, dtype in AMP_DTYPES.items()}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall clock times it (CUDA and MPS run ahead)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass
class Hardware:
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None = full precision
    channels_last: bool
    amp_reason: str = ""  # why this precision (said in the log)
    threads_warning: str = ""  # more CPU threads asked for than there are cores (said in the log)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def describe(self) -> str:
        amp = AMP_NAMES[self.amp_dtype] if self.amp_dtype else "fp32"
        threads = ""
        if self.device.type == "cpu":
            pages = ", huge pages" if os.environ.get(ENV) == "1" else ""
            threads = f", {torch.get_num_threads()} threads{pages}"
        return f"{self.device} ({amp}{', channels_last' if self.channels_last else ''}{threads})"


def pick_device(name: str, cpu_hint: str = "--set device=cpu") -> torch.device:
    """The device `name` names, refused where this machine lacks it (`cpu_hint`: how the
    command asks for the CPU instead)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(
            f"device '{name}' is not a device; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    missing = None
    if device.type == "cuda" and not torch.cuda.is_available():
        missing = "CUDA is not available here"
    elif device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        missing = f"this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
    elif device.type == "mps" and not torch.backends.mps.is_available():
        missing = "MPS (Apple's GPU) is not available here"
    if missing:
        raise UserError(f"device '{name}' asked for, but {missing}; use {cpu_hint}")
    return device


def setup_hardware(config: TrainConfig, d=None) -> Hardware:
    """The run's device, threads, precision and memory format; under torchrun (`d`, a
    `distributed.Dist`) every rank takes rank 0's timing of bf16, so all train alike."""
    device = pick_device(config.device)
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's, on this machine
    if device.type == "cuda" and device.index is None and local_procs > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    threads_warning = ""
    if device.type == "cpu":
        # Linux: the cores this process may run on
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        share = max(1, (cores or 1) // local_procs)  # each torchrun process on this machine
        threads = config.threads or share
        if cores and threads > share:  # threads beyond the cores only wait on each other
            threads_warning = (
                f"warning: threads={config.threads} is more than the {share} core(s) each "
                f"process of this run may use; using {share} (0 = all cores)"
            )
            threads = share
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    speedup = None
    if d is not None and d.active:
        # rank 0 alone times (and writes the kept file); the others add 0 and take its answer
        speedup = lambda: all_sum([bf16_speedup() if d.main else 0.0], d, device)[0]  # noqa: E731
    amp, reason = choose_amp(config.amp, device, speedup=speedup)
    if amp == "fp16" and device.type != "cuda":
        raise UserError(f"amp: fp16 needs a CUDA device; this run is on {device} (use bf16 or off)")
    channels_last = _channels_last(config.channels_last, device)
    return Hardware(device, AMP_DTYPES[amp], channels_last, reason, threads_warning)


def _channels_last(setting: str, device: torch.device) -> bool:
    """channels_last: training img/s 1.4x for cnn, 1.18x for fastnet on a 2-core CPU (oneDNN's
    NHWC kernels), a win with cuDNN too; off on MPS under `auto` (its support is patchy)."""
    return setting == "on" or (setting == "auto" and device.type != "mps")


def _cpuinfo(name: str) -> str:
    """The first `name` line's value in Linux's /proc/cpuinfo; "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(name)), "")
    except OSError:
        return ""


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (none elsewhere)."""
    return set(_cpuinfo("flags").split())


BF16_PAYS = 1.15  # bf16 must time at least this much faster than fp32 to be chosen


def choose_amp(
    requested: str, device: torch.device, flags: set[str] | None = None, speedup=None
) -> tuple[str, str]:
    """(off | bf16 | fp16, reason). `auto` on CUDA is bf16 where supported. On the CPU: bf16
    with AMX tiles (about 3x fp32); with AVX512-BF16 but no AMX, bf16 is slower than fp32 on
    some CPUs and twice as fast on others (benchmarks/cpu_precision.py), so `speedup()` decides
    (default `bf16_speedup`); else fp32. `flags` and `speedup` stand in for the CPU's."""
    if requested != "auto":
        return requested, f"amp: {requested} as configured"
    amp, why = _auto_amp(device, flags, speedup)
    return amp, f"amp: auto -> {'fp32' if amp == 'off' else amp} ({why})"


def _auto_amp(device: torch.device, flags: set[str] | None, speedup) -> tuple[str, str]:
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):  # not emulated (pre-Ampere)
            return "bf16", "CUDA device with bf16 support"
        return "off", "this CUDA device has no bf16"
    if device.type != "cpu":
        return "off", f"on {device.type}"
    flags = cpu_flags() if flags is None else flags
    if {"amx_bf16", "amx_tile"} <= flags:
        return "bf16", "this CPU has AMX tiles: bf16 trains ~3x faster than fp32"
    if "avx512_bf16" not in flags:
        return "off", "this CPU has no bf16 instructions"
    ratio = (speedup or bf16_speedup)()
    path = default_data_root() / KEPT
    kept = f"timed once, kept in {path}"
    if str(path) in _NOT_KEPT:
        kept = f"not kept ({path}: {_NOT_KEPT[str(path)]}), so each run times it again"
    return "bf16" if ratio >= BF16_PAYS else "off", (
        f"no AMX, but AVX512-BF16: a fastnet training step timed {ratio:.2f}x as fast in bf16 "
        f"as in fp32 on this CPU; {kept}"
    )


KEPT = "hardware.json"  # in the default data root: this machine's bf16 timing, by CPU
_NOT_KEPT: dict[str, str] = {}  # a `KEPT` path this process could not write -> why


@functools.cache
def bf16_speedup() -> float:
    """`time_bf16_speedup` once per CPU model and torch version, kept in `hardware.json` in the
    default data root, so later runs here choose alike whatever the load. Delete it to retime."""
    path = default_data_root() / KEPT
    key = f"{_cpuinfo('model name') or 'cpu'} | torch {torch.__version__}"  # not the threads: evaluate and predict
    # run with torch's default count, training with its own, and they must choose alike
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or damaged: timed (again)
        kept = {}
    kept = kept if isinstance(kept, dict) else {}
    if isinstance(kept.get(key), float):
        return kept[key]
    ratio = time_bf16_speedup()
    try:  # where it cannot be kept (a read-only data root), each process times for itself
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_when_complete(path) as tmp:
            tmp.write_text(json.dumps({**kept, key: ratio}, indent=1))
        _NOT_KEPT.pop(str(path), None)
    except OSError as exc:
        _NOT_KEPT[str(path)] = (exc.strerror or str(exc)).lower()
    return ratio


def time_bf16_speedup(rounds: int = 4, batch: int = 64) -> float:
    """How many times faster `step.train_step` runs fastnet on `batch` random images in bf16
    than in fp32 here: alternating after a warm-up, the fastest of `rounds` each (other work
    only ever slows a step); the global random state is left as it was."""
    # callers may be scoring under inference mode (predict_logits): this times a backward pass
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(0)
        model = create_model("fastnet", 10).to(memory_format=torch.channels_last)
        cpu = torch.device("cpu")
        run = bare_run(model, Hardware(cpu, None, channels_last=True), TrainConfig(model="fastnet"))
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        times: dict[bool, list[float]] = {False: [], True: []}
        for i in range(rounds + 1):
            for bf16 in (False, True) if i % 2 else (True, False):
                run.hw = Hardware(cpu, torch.bfloat16 if bf16 else None, channels_last=True)
                t0 = time.perf_counter()
                train_step(run, x, y, rand=None)
                if i:
                    times[bf16].append(time.perf_counter() - t0)
    return min(times[False]) / min(times[True])


def inference_hardware(device: torch.device, amp: str = "auto") -> Hardware:
    """What evaluate, predict and calibrate run with: the run's own precision (`amp` as its
    config resolved it) where this device runs it, else training's rule for the device; and
    training's memory format. In bf16 either moves a logit enough to flip an image now and then,
    so this is what makes evaluate reproduce training's own figures."""
    bf16_here = device.type == "cpu" or _auto_amp(device, None, None)[0] == "bf16"
    runs_here = (
        amp == "off" or (amp == "bf16" and bf16_here) or (amp == "fp16" and device.type == "cuda")
    )
    amp, reason = choose_amp(amp if runs_here else "auto", device)
    return Hardware(device, AMP_DTYPES[amp], _channels_last("auto", device), reason)
