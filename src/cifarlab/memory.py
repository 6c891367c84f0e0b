"""PyTorch's CPU allocator on huge pages; decided before torch is imported (`cifarlab/__init__`).

With transparent huge pages in `madvise` mode (most kernels' default), a training step spends
much of its time faulting in PyTorch's large CPU buffers on 4 KiB pages. THP_MEM_ALLOC_ENABLE=1,
read at torch's first allocation, asks for 2 MiB pages: `fast` trains ~6% more images/s on a
2-core CPU (docs/benchmarks.md). A user's own THP_MEM_ALLOC_ENABLE always wins.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
ENV = "THP_MEM_ALLOC_ENABLE"


def use_huge_pages(mode_file: Path = THP_MODE) -> bool:
    """Ask for huge pages (set THP_MEM_ALLOC_ENABLE=1) unless the user chose, torch is already
    loaded (too late to matter) or the kernel has them off; True when they are in use."""
    if ENV in os.environ:
        return os.environ[ENV] == "1"
    if "torch" in sys.modules:
        return False
    try:
        mode = mode_file.read_text()
    except OSError:  # not Linux, or no THP in this kernel
        return False
    if "[never]" in mode:
        return False
    os.environ[ENV] = "1"
    return True
