"""Dataset-versioned image normalization: exact statistics, Zarr stores with lineage."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["NormalizedDataset", "Stats", "__version__", "load_stats", "open_normalized"]

# Imported on first use (PEP 562), so a stage command loads only the code it runs: the stages'
# recorded code digests (pipeline/core/stagecode.py) then cover just that code.
_LAZY = {
    "NormalizedDataset": "pipeline.reader.dataset",
    "open_normalized": "pipeline.reader.dataset",
    "Stats": "pipeline.stats.document",
    "load_stats": "pipeline.stats.document",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
