"""cifarlab: train, analyse and compare image classifiers on CIFAR-10/100 and folders of small images.

The Python API (docs/guide.md, "Python API"; the functions live in `cifarlab.api`):

    import cifarlab
    config = cifarlab.recipe("fast-cpu", epochs=2, data="cifar10")   # a checked TrainConfig
    result = cifarlab.train_model(config, "runs/fast")               # Result: accuracies, history
    report = cifarlab.evaluate_model(result)                         # the report as a dict
    model = cifarlab.load_model(result)                              # a Classifier
    model.top_k(["cat.png", pil_image, uint8_tensor], k=3)

The names are `train_model`/`evaluate_model`, not `train`/`evaluate`: those are the modules
`cifarlab.train` and `cifarlab.evaluate`, and Python rebinds a package's attribute to its
submodule when that is first imported, so a function of the same name would turn into a
module depending on import order.
"""

from __future__ import annotations

import importlib
import time

from cifarlab.memory import use_huge_pages

__version__ = "0.1.0"
IMPORTED = time.perf_counter()  # a command's --time-budget counts from here (torch's import in)
use_huge_pages()  # before anything imports torch: its allocator reads the choice once

# Imported on first use: the API needs torch, which takes ~2 s to import (2.1 s measured on
# this 2-core machine), and `cifarlab --help` or `import cifarlab` should not wait for it.
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
