"""Lineage facts recorded in a normalized store: library versions and the git revision."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

__all__ = [
    "FORMULA",
    "NORMALIZED_SCHEMA",
    "git_revision",
    "library_versions",
    "normalized_lineage",
]

def library_versions() -> dict[str, str]:
    """Versions of everything that can change the output bytes."""
    import dask
    import numpy as np
    import PIL
    import tifffile
    import zarr
    from PIL import features

    from pipeline import __version__

    return {
        "pipeline": __version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "libjpeg": str(features.version("jpg")),
        "zlib": str(features.version("zlib")),
        "tifffile": tifffile.__version__,
        "zarr": zarr.__version__,
        "dask": dask.__version__,
    }


def git_revision(cwd: Path) -> dict[str, Any] | None:
    """HEAD commit of the repository around ``cwd`` and whether the work tree is dirty."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": head, "dirty": bool(dirty.strip())}


NORMALIZED_SCHEMA = "pipeline.normalized/1"
FORMULA = (
    "y = dtype(((x / d) - offset) / scale), evaluated in float64 and rounded once; "
    "d = 1 for input_scale pixel, pixel_max for unit; x = round((y * scale + offset) * d)"
)


def normalized_lineage(
    normalize: Any,
    stats: Any,
    prepared_attrs: Any,
    constants: Any,
    paths: tuple[str, str],
    code_sha256: str,
) -> dict[str, Any]:
    """Plain-JSON attributes of a normalized store: how it was made (DESIGN.md invariant 8).

    ``normalize`` is the stage's NormalizeParams, ``stats`` a Stats, ``constants`` the
    dataset Constants or None (per-image modes); ``paths`` the (stats.json, prepared store)
    paths relative to the store (typed loosely: ingest imports this module, and must not
    depend on the normalization code). Normalize-on-read builds the same dict for the values it
    computes (see :mod:`pipeline.reader.onread`).
    """
    small = constants is not None and constants.offset.ndim == 1
    return {
        "schema": NORMALIZED_SCHEMA,
        "mode": normalize.mode,
        "eps": normalize.eps,
        "dtype": normalize.dtype,
        "input_scale": normalize.input_scale,
        "divisor": float(stats.pixel_max) if normalize.input_scale == "unit" else 1.0,
        "formula": FORMULA,
        "constants": {
            "offset": constants.offset.tolist() if small and constants else None,
            "scale": constants.scale.tolist() if small and constants else None,
            "arrays": "offset and scale arrays in this group",
        },
        "channel_names": stats.channels,
        "pixel_max": stats.pixel_max,
        "classes": prepared_attrs["classes"],
        "splits": prepared_attrs["splits"],
        "stats": {
            "path": paths[0],
            "sha256": stats.sha256,
            "fit_split": stats.fit_split,
            "count": stats.count,
            "mean": stats.mean.tolist(),
            "std": stats.std.tolist(),
            "params": stats.doc.get("params", {}),
        },
        "prepared": {
            "path": paths[1],
            "fingerprint": prepared_attrs["fingerprint"],
            "decode": prepared_attrs["decode"],
            "versions": prepared_attrs["versions"],
        },
        "params": {"normalize": dict(vars(normalize))},
        "versions": library_versions(),
        "code_sha256": code_sha256,  # the files dvc.yaml lists as the normalize stage's deps
    }
