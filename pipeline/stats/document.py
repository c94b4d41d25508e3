"""The stats outputs on disk: stats.json (the full document), metrics.json (its numbers, the DVC
metrics), stats.zarr (arrays), and load_stats."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import zarr

from pipeline.core.documents import HEX64, OneOf, check_document
from pipeline.core.errors import StoreError
from pipeline.core.location import Location, parse_location
from pipeline.stats.moments import FitResult, Moments
from pipeline.zarrstore.store import read_array, sha256_file, write_small_array

__all__ = [
    "METRICS_JSON",
    "STATS_SCHEMA",
    "Stats",
    "channel_names",
    "compact_metrics",
    "load_stats",
    "tree_sha256",
    "write_arrays",
]

STATS_SCHEMA = "pipeline.stats/1"
STATS_JSON = "stats.json"
STATS_ZARR = "stats.zarr"
METRICS_JSON = "metrics.json"
MAX_STATS_JSON = 64 * 2**20  # ours are a few kB; a larger file is not read
CHANNEL = {"mean": float, "std": float, "min": int, "max": int}
STATS_DOCUMENT = {
    "schema": str,
    "fit_split": str,
    "fingerprint": HEX64,
    "pixel_max": OneOf((255, 65535)),
    "channel_names": [str],
    "count": {"images": int, "pixels_per_channel": int, "prepared_images": int},
    "channels": dict,
    "global": {"mean": float, "std": float},
    "arrays": {"path": str, "sha256": HEX64},
    "params": dict,
}


def channel_names(channels: int) -> list[str]:
    """Names used as keys in stats.json: R, G, B for colour, L for gray."""
    return (
        ["R", "G", "B"]
        if channels == 3
        else ["L"]
        if channels == 1
        else [f"C{i}" for i in range(channels)]
    )


def compact_metrics(doc: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a stats.json document a person compares across versions, nested by fit
    split, then channel (``train.R.mean``), so ``dvc metrics show/diff`` and ``dvc exp show``
    read like a table: no strings, digests or paths (those stay in stats.json)."""
    count = doc["count"]
    split: dict[str, Any] = {
        "images": count["images"],
        "pixels_per_channel": count["pixels_per_channel"],
        "prepared_images": count["prepared_images"],
    }
    for name, ch in doc["channels"].items():
        split[name] = {key: ch[key] for key in ("mean", "std", "min", "max")}
    return {doc["fit_split"]: split}


def tree_sha256(root: Path | Location) -> str:
    """sha256 over the sorted relative paths and contents of every file under ``root``."""
    h = hashlib.sha256()
    if isinstance(root, Location) and root.local is not None:
        root = root.local
    if isinstance(root, Location):
        # Ordered as local paths sort (by PurePosixPath), so the digest is the same anywhere.
        for rel in sorted(root.files(), key=PurePosixPath):
            h.update(rel.encode() + b"\0")
            h.update(hashlib.sha256((root / rel).read_bytes()).hexdigest().encode() + b"\n")
        return h.hexdigest()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0")
            h.update(sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def _safe(std: np.ndarray, policy: str, eps: float) -> np.ndarray:
    """Replace zero std by 1 or by eps, so dividing by it is always defined."""
    return np.where(std > 0, std, 1.0 if policy == "one" else eps)


def write_arrays(
    path: Path | Location, fit: FitResult, moments: Moments, *, zero_std: str, eps: float
) -> None:
    """Write stats.zarr: mean/std images, histograms and the exact sufficient statistics."""
    group = zarr.open_group(str(path), mode="w")
    dims = ("y", "x", "channel")

    def put(name: str, data: np.ndarray, dimension_names: tuple[str, ...]) -> None:
        write_small_array(group, name, data, dimension_names)

    put("mean_image", fit.mean_image, dims)
    put("std_image", _safe(fit.std_image, zero_std, eps), dims)
    put("raw_std_image", fit.std_image, dims)
    put("histogram", np.asarray(moments.histogram, dtype=np.int64), ("channel", "value"))
    put("image_std", moments.image_std, ("image", "channel"))
    if moments.pixel_sumsq.dtype != object:  # int64 fits: store the exact partial sums too
        put("pixel_sum", moments.pixel_sum.astype(np.int64), dims)
        put("pixel_sumsq", moments.pixel_sumsq.astype(np.int64), dims)


@dataclass(frozen=True, kw_only=True)
class Stats:
    """Fitted statistics as a training job needs them (pixel units unless noted)."""

    mean: np.ndarray  # (C,) float64
    std: np.ndarray  # (C,) float64, zero std replaced per stats.zero_std
    pixel_max: int
    mean_image: np.ndarray  # (H, W, C) float64
    std_image: np.ndarray  # (H, W, C) float64, zero std replaced per stats.zero_std
    count: int  # images the statistics were fitted on
    fit_split: str
    fingerprint: str  # of the prepared data they were fitted on
    channels: list[str]
    global_mean: float
    global_std: float
    minimum: np.ndarray  # (C,) int
    maximum: np.ndarray  # (C,) int
    histogram: np.ndarray  # (C, pixel_max + 1) int64
    sha256: str  # of stats.json: what a normalized store records
    path: Location  # the stats folder
    doc: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Per-channel constants as plain JSON (pixel units and [0, 1] units)."""
        return {
            "channels": self.channels,
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "mean_01": (self.mean / self.pixel_max).tolist(),
            "std_01": (self.std / self.pixel_max).tolist(),
            "pixel_max": self.pixel_max,
            "count": self.count,
            "fit_split": self.fit_split,
            "fingerprint": self.fingerprint,
            "stats_sha256": self.sha256,
        }


def load_stats(path: str | os.PathLike[str] | Location) -> Stats:
    """Load the stats folder (or its stats.json), checking that its array file matches.

    Parameters
    ----------
    path
        ``data/stats`` or ``data/stats/stats.json``: a local path or an fsspec URL.

    Returns
    -------
    Stats
        Frozen value object with per-channel ``mean`` and ``std`` (float64, pixel units),
        ``pixel_max``, ``mean_image``, ``std_image``, ``count``, ``fit_split`` and
        ``fingerprint``.
    """
    p = parse_location(path, "the stats folder")
    json_path = p / STATS_JSON if p.is_dir() else p
    try:
        if json_path.local is not None and json_path.local.stat().st_size > MAX_STATS_JSON:
            raise StoreError(
                f"{json_path} is larger than {MAX_STATS_JSON} bytes: not a stats file."
            )
        raw = json_path.read_bytes()
        doc = json.loads(raw)
    except FileNotFoundError as exc:
        raise StoreError(
            f"No stats at {json_path}. Run `pipeline stats` (dvc repro) first."
        ) from exc
    except StoreError:
        raise
    except (OSError, ValueError, RecursionError) as exc:
        raise StoreError(f"{json_path} is not a readable stats file: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("schema") != STATS_SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else None
        raise StoreError(
            f"{json_path} has stats schema {found!r}; this version reads {STATS_SCHEMA!r}. "
            f"Re-run `pipeline stats` to rewrite it."
        )
    fix = "Re-run `pipeline stats` (dvc repro), or `dvc checkout` it."
    check_document(doc, STATS_DOCUMENT, json_path, fix)
    names = doc["channel_names"]
    for name in names:
        check_document(doc["channels"], {name: CHANNEL}, json_path, fix)
    if doc["arrays"]["path"] != STATS_ZARR:
        raise StoreError(f"{json_path}: arrays.path must be {STATS_ZARR!r}. {fix}")
    arrays = json_path.parent / doc["arrays"]["path"]
    if not arrays.is_dir() or tree_sha256(arrays) != doc["arrays"]["sha256"]:
        raise StoreError(
            f"{arrays} does not match {json_path} (missing, changed or from another run). "
            f"Re-run `pipeline stats` (or `dvc checkout`) to restore a matching pair."
        )
    group = zarr.open_group(arrays.zarr(), mode="r")
    per = doc["channels"]
    return Stats(
        mean=np.array([per[c]["mean"] for c in names], dtype=np.float64),
        std=np.array([per[c]["std"] for c in names], dtype=np.float64),
        pixel_max=int(doc["pixel_max"]),
        mean_image=np.asarray(read_array(group, "mean_image")),
        std_image=np.asarray(read_array(group, "std_image")),
        count=int(doc["count"]["images"]),
        fit_split=str(doc["fit_split"]),
        fingerprint=str(doc["fingerprint"]),
        channels=list(names),
        global_mean=float(doc["global"]["mean"]),
        global_std=float(doc["global"]["std"]),
        minimum=np.array([per[c]["min"] for c in names]),
        maximum=np.array([per[c]["max"] for c in names]),
        histogram=np.asarray(read_array(group, "histogram")),
        sha256=hashlib.sha256(raw).hexdigest(),
        path=json_path.parent,
        doc=doc,
    )
