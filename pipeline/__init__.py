"""Dataset-versioned image normalization: exact statistics, Zarr stores with lineage."""

from __future__ import annotations

__version__ = "0.1.0"

from pipeline.reader import NormalizedDataset, open_normalized
from pipeline.statsfile import Stats, load_stats

__all__ = ["NormalizedDataset", "Stats", "__version__", "load_stats", "open_normalized"]
