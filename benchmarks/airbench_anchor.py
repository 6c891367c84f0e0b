"""airbench94 (its own script) on cifarlab's splits of the same images, on the CPU or a GPU.

A measured anchor for issue 16, not part of cifarlab: the script is read from a copy of the
airbench repository kept outside this project (`fetch` KellerJordan/cifar10-airbench, file
legacy/airbench94.py) and run unchanged but for the device. On the CPU: fp16 -> fp32, CUDA ->
CPU, CUDA events -> a wall clock. On a GPU (`--device cuda`) it runs as published (fp16), or in
fp32 with `--fp32`. It trains on the 45,000 training images of the cifarlab split of `--seeds`
(the split `cifarlab train --seed S` holds out) and is tested on its 5,000 validation images,
so its accuracy and time sit beside cifarlab's runs on the same data. `--epochs` shortens it
(a timing run); airbench94's own length is 9.9 epochs.

    python benchmarks/airbench_anchor.py --airbench /path/to/legacy/airbench94.py \\
        --data ../shared/data/cifar10-train-jpg.tar.gz [--epochs 9.9] [--seeds 0,1,2] \\
        [--device cuda [--fp32]]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cifarlab.config import TrainConfig
from cifarlab.data import load_splits

TIMER_PATCH = [  # main() returns its own timer too (training and the final TTA, CUDA events)
    ("    return tta_val_acc\n", "    return tta_val_acc, total_time_seconds\n"),
]
FP32_PATCHES = [  # (what airbench94.py says, what it says here)
    (".half()", ".float()"),
    ("torch.half", "torch.float"),
]
CPU_PATCHES = [
    *FP32_PATCHES,
    (".cuda()", ""),
    ("torch.device(gpu)", "torch.device('cpu')"),
    ("torch.cuda.Event(enable_timing=True)", "_WallClock()"),
    ("torch.cuda.synchronize()", "None"),
    ("torch.backends.cudnn.benchmark = True", "None"),
]

WALL_CLOCK = """
import time as _time
class _WallClock:
    def record(self):
        self.t = _time.perf_counter()
    def elapsed_time(self, end):
        return 1e3 * (end.t - self.t)
"""


def write_airbench_data(folder: Path, data: str, seed: int, subset: int = 0, val_size: int = 5000):
    """cifarlab's train/val split `seed` of `data` as airbench's cifar10/train.pt and test.pt
    (as `cifarlab train --seed S [--subset N --val-size M]` splits it): (train, val) counts."""
    splits = load_splits(TrainConfig(data=data, seed=seed, subset=subset, val_size=val_size))
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.pt", splits.train), ("test.pt", splits.val)):
        torch.save(
            {
                "images": torch.from_numpy(part.images),  # N, H, W, C uint8 as torchvision's
                "labels": torch.from_numpy(part.labels).long(),
                "classes": list(splits.classes),
            },
            folder / name,
        )
    return len(splits.train), len(splits.val)


def patched(path: str, patches: list[tuple[str, str]]) -> str:
    source = Path(path).read_text()
    for old, new in patches:
        if old not in source:
            raise SystemExit(f"{path}: '{old}' not found; this script expects airbench94.py")
        source = source.replace(old, new)
    return source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--airbench", required=True, help="path to legacy/airbench94.py")
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=float, default=9.9)
    parser.add_argument("--seeds", default="0", help="cifarlab split seeds, e.g. 0,1,2")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--fp32", action="store_true", help="on cuda: fp32 instead of fp16")
    parser.add_argument(
        "--subset", type=int, default=0, help="as cifarlab's --subset (a quick try)"
    )
    parser.add_argument("--val-size", type=int, default=5000)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.device == "cpu":
        patches, precision = CPU_PATCHES, "fp32"
        torch.set_num_threads(os.cpu_count() or 1)
    else:
        patches, precision = (FP32_PATCHES, "fp32") if args.fp32 else ([], "fp16")
    source = patched(args.airbench, [*TIMER_PATCH, *patches])
    source = source.replace("'train_epochs': 9.9", f"'train_epochs': {args.epochs}")
    accs, data = [], str(Path(args.data).resolve()) if Path(args.data).exists() else args.data
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        namespace = {"__name__": "airbench94"}
        exec(compile(WALL_CLOCK + source, args.airbench, "exec"), namespace)
        namespace["print_columns"](namespace["logging_columns_list"], is_head=True)
        for seed in seeds:
            t0 = time.perf_counter()
            n_train, n_val = write_airbench_data(
                Path(tmp) / "cifar10", data, seed, args.subset, args.val_size
            )
            written = time.perf_counter() - t0
            if args.device == "cuda" and not accs:
                namespace["main"]("warmup")  # cudnn's autotuning, on shuffled labels (its own)
            t0 = time.perf_counter()
            acc, timer = namespace["main"](seed)
            wall = time.perf_counter() - t0
            accs.append(acc)
            images = round(n_train // 1024 * args.epochs) * 1024
            print(
                f"airbench94 ({args.device}, {precision}) on split {seed}: {n_train} train / "
                f"{n_val} val images, {args.epochs} epochs ({images} training images): "
                f"{acc:.2%} with its TTA; {timer:.2f} s by its own timer (training and TTA), "
                f"{wall:.1f} s wall; the split written in {written:.1f} s"
            )
            # one line for benchmarks/gpu_fast.sh's side-by-side table
            print(f"RESULT\tairbench94\t{seed}\t{timer:.3f}\t{written:.3f}\t{acc:.4f}")
    if len(accs) > 1:
        mean, std = statistics.mean(accs), statistics.stdev(accs)
        print(f"airbench94 over splits {args.seeds}: mean {mean:.2%}, std {std:.2%} (TTA)")


if __name__ == "__main__":
    main()
