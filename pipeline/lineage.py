"""Lineage facts recorded in a normalized store: library versions and the git revision."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

__all__ = ["git_revision", "library_versions"]

PACKAGE_DIR = Path(__file__).resolve().parent


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
