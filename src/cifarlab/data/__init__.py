"""Data: sources to uint8 arrays (+ cache), splits, and the batch iterators that feed training."""

from cifarlab.data.sources import ImageSet, SourceData, load_source
from cifarlab.data.splits import Splits, load_splits

__all__ = ["ImageSet", "SourceData", "Splits", "load_source", "load_splits"]
