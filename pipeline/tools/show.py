"""``pipeline show``: raw, normalized and denormalized samples side by side, as PNG files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr
from PIL import Image

from pipeline.core.location import Location
from pipeline.core.outputs import check_outside
from pipeline.reader.dataset import lineage_target, open_normalized

__all__ = ["show_samples"]


def _to_uint8(image: np.ndarray, pixel_max: int) -> np.ndarray:
    """Integer pixels to uint8 for display (16-bit values are scaled)."""
    if pixel_max == 255:
        return image.astype(np.uint8)
    return ((image.astype(np.uint32) * 255 + pixel_max // 2) // pixel_max).astype(np.uint8)


def _rescaled(y: np.ndarray) -> np.ndarray:
    """Normalized values stretched to 0..255 (their own min and max) so they can be seen."""
    y = y.astype(np.float64)
    lo, hi = float(y.min()), float(y.max())
    if hi <= lo:
        return np.full(y.shape, 128, dtype=np.uint8)
    return np.rint((y - lo) / (hi - lo) * 255).astype(np.uint8)


def show_samples(
    store: str | os.PathLike[str] | Location, indices: list[int], out_dir: Path
) -> list[Path]:
    """Write one PNG per index: raw | normalized (rescaled) | denormalized."""
    check_outside(out_dir, {"STORE": store}, out_name="--out")
    ds = open_normalized(store, verify=False)
    prepared_dir = lineage_target(ds.path, ds.lineage, "prepared")
    check_outside(out_dir, {"STORE": ds.path, "its prepared store": prepared_dir}, out_name="--out")
    prepared = zarr.open_array((prepared_dir / "images").zarr(), mode="r")
    pixel_max = int(ds.lineage["pixel_max"])
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index in indices:
        y, _ = ds[index]
        raw = np.asarray(prepared[ds.start + (index % len(ds))])
        panels = [
            _to_uint8(raw, pixel_max),
            _rescaled(y),
            _to_uint8(ds.denormalize(y, index=index), pixel_max),
        ]
        row = np.concatenate([p if p.shape[-1] == 3 else np.repeat(p, 3, -1) for p in panels], 1)
        path = out_dir / f"sample-{index:06d}.png"
        Image.fromarray(row).save(path)
        written.append(path)
    return written
