"""cifarlab: train, analyse and compare image classifiers on CIFAR-10/100 and folders of small images.

The Python API (`recipe`, `train_model`, `evaluate_model`, `load_model`) lives in `cifarlab.api`
(docs/guide.md, "Python API"). Its functions are not named `train`/`evaluate`: Python rebinds a
package's attribute to the submodule of that name once it is imported.
"""

from __future__ import annotations

import importlib
import time

from cifarlab.memory import use_huge_pages

__version__ = "0.1.0"
IMPORTED = time.perf_counter()  # a command's --time-budget counts from here (torch's import in)
use_huge_pages()  # before anything imports torch: its allocator reads the choice once

# Imported on first use: the API needs torch (~2 s to import); `cifarlab --help` should not wait.
_API = {
    "TrainConfig": "cifarlab.config",
    "recipe": "cifarlab.api",
    "train_model": "cifarlab.api",
    "evaluate_model": "cifarlab.api",
    "load_model": "cifarlab.api",
    "Classifier": "cifarlab.api",
    "Result": "cifarlab.train",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'cifarlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
