"""airbench94 (its own script) on this CPU in fp32, on cifarlab's split of the same images.

A measured anchor for issue 16, not part of cifarlab: the script is read from a copy of the
airbench repository kept outside this project (`fetch` KellerJordan/cifar10-airbench, file
legacy/airbench94.py) and run unchanged but for the device: fp16 -> fp32, CUDA -> CPU, CUDA
events -> a wall clock. It trains on the 45,000 training images of a cifarlab split and is
tested on its 5,000 validation images, so its accuracy and time sit beside cifarlab's runs on
the same data. `--epochs` shortens it (a timing run); airbench94's own length is 9.9 epochs.

    python benchmarks/airbench_anchor.py --airbench /path/to/legacy/airbench94.py \\
        --data ../shared/data/cifar10-train-jpg.tar.gz [--epochs 9.9]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from cifarlab.config import TrainConfig
from cifarlab.data import load_splits

CPU_PATCHES = [  # (what airbench94.py says, what it says here)
    (".half()", ".float()"),
    ("torch.half", "torch.float"),
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


def write_airbench_data(folder: Path, data: str) -> tuple[int, int]:
    """cifarlab's train/val split of `data` as airbench's cifar10/train.pt and test.pt."""
    splits = load_splits(TrainConfig(data=data))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--airbench", required=True, help="path to legacy/airbench94.py")
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=float, default=9.9)
    args = parser.parse_args()
    source = Path(args.airbench).read_text()
    for old, new in CPU_PATCHES:
        if old not in source:
            raise SystemExit(
                f"{args.airbench}: '{old}' not found; this script expects airbench94.py"
            )
        source = source.replace(old, new)
    source = source.replace("'train_epochs': 9.9", f"'train_epochs': {args.epochs}")
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        n_train, n_val = write_airbench_data(Path(tmp) / "cifar10", args.data)
        os.chdir(tmp)
        namespace = {"__name__": "airbench94"}
        exec(compile(WALL_CLOCK + source, args.airbench, "exec"), namespace)
        namespace["print_columns"](namespace["logging_columns_list"], is_head=True)
        t0 = time.perf_counter()
        acc = namespace["main"](0)
        wall = time.perf_counter() - t0
    steps_per_epoch = n_train // 1024
    images = round(steps_per_epoch * args.epochs) * 1024
    print(
        f"airbench94 on {n_train} train / {n_val} val images, {args.epochs} epochs "
        f"({images} training images): {acc:.2%} with its TTA; {wall:.0f} s wall "
        f"(its own timer, training and TTA only, is the last column above)"
    )


if __name__ == "__main__":
    main()
