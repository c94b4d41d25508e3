"""Stats stage: one chunked Dask pass over the fit split of a prepared store."""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
import zarr

from pipeline import __version__
from pipeline.cache.entries import Cache, open_cache
from pipeline.core.digests import check_digests
from pipeline.core.errors import PipelineError
from pipeline.core.location import Location, parse_location
from pipeline.core.outputs import check_output
from pipeline.core.publish import publish
from pipeline.core.reach import require_reachable
from pipeline.core.runner import run_tasks
from pipeline.params import Params
from pipeline.stats.document import (
    METRICS_JSON,
    STATS_JSON,
    STATS_SCHEMA,
    STATS_ZARR,
    channel_names,
    compact_metrics,
    tree_sha256,
    write_arrays,
)
from pipeline.stats.incremental import Reuse, fit_files, moments_key, reuse_moments, save_moments
from pipeline.stats.moments import FitResult, Moments, aggregate, block_moments, combine
from pipeline.zarrstore.store import dumps_json, open_prepared, read_samples

__all__ = ["StatsRun", "fit_range", "run_stats"]


@dataclass(frozen=True, kw_only=True)
class StatsRun:
    """The stats.json document written, and the earlier fit reused (None: fitted from scratch)."""

    document: dict[str, Any]
    reused: Reuse | None


def fit_range(splits: dict[str, tuple[int, int]], fit_split: str) -> tuple[int, int]:
    """Sample range of the fit split (splits are contiguous: train, val, test)."""
    if fit_split == "all":
        return (0, max(stop for _, stop in splits.values()))
    return splits[fit_split]


def _read_moments(images_path: str, start: int, stop: int, digests: np.ndarray) -> Moments:
    """Chunk task: read samples [start, stop), check them against the digests ingest recorded
    (so a fit, which the cache keeps, is always of the pixels ingest wrote), reduce them."""
    block = read_samples(images_path, start, stop, reuse_buffer=True)
    check_digests(block, digests, start, images_path)
    return block_moments(block)


def _blocks(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) cut at multiples of ``size`` so blocks align with shards."""
    edges = [start, *range((start // size + 1) * size, stop, size), stop]
    return [(a, b) for a, b in itertools.pairwise(edges) if b > a]


def _tree(parts: Sequence[Any], split_every: int) -> Any:
    """Combine delayed partials in a tree, ``split_every`` at a time."""
    parts = list(parts)
    while len(parts) > 1:
        parts = [
            dask.delayed(combine, pure=True)(parts[i : i + split_every])
            for i in range(0, len(parts), split_every)
        ]
    return parts[0]


def compute_moments(
    images_path: Path | Location,
    start: int,
    stop: int,
    params: Params,
    *,
    digests: np.ndarray,
    block_images: int,
    progress: bool = False,
) -> Moments:
    """Exact moments of samples [start, stop) with one Dask pass; ``digests`` holds the
    recorded CRC-32C of every sample of the store."""
    images_path = parse_location(images_path).resolve()
    chunks = [
        dask.delayed(_read_moments, pure=True)(images_path.zarr(), a, b, digests[a:b])
        for a, b in _blocks(start, stop, block_images)
    ]
    (result,) = run_tasks(
        [_tree(chunks, params.stats.split_every)],
        params.base,
        kind="reduce",
        progress=progress,
        shared=[images_path],
    )
    return result  # type: ignore[no-any-return]


def _document(fit: FitResult, params: Params, fingerprint: str, total: int) -> dict[str, Any]:
    """The stats.json content (arrays digest added on publish)."""
    sp = params.stats
    names = channel_names(len(fit.channels))
    pm = fit.pixel_max
    channels = {}
    for name, ch in zip(names, fit.channels, strict=True):
        zero = ch.std == 0
        std = ch.std if not zero else (1.0 if sp.zero_std == "one" else sp.eps)
        channels[name] = {
            "mean": ch.mean,
            "std": std,
            "raw_std": ch.std,
            "zero_std": zero,
            "min": ch.minimum,
            "max": ch.maximum,
            "mean_01": ch.mean / pm,
            "std_01": std / pm,
            "percentiles": {f"p{q:g}": v for q, v in ch.percentiles.items()},
            "mean_of_image_stds": ch.mean_of_image_stds,
        }
    global_std = fit.global_std or (1.0 if sp.zero_std == "one" else sp.eps)
    return {
        "schema": STATS_SCHEMA,
        "fit_split": sp.fit_split,
        "non_train_fit": sp.fit_split != "train",
        "fingerprint": fingerprint,
        "pixel_max": pm,
        "channel_names": names,
        "count": {
            "images": fit.n_images,
            "pixels_per_channel": fit.channels[0].count,
            "prepared_images": total,
        },
        "channels": channels,
        "global": {
            "mean": fit.global_mean,
            "std": global_std,
            "raw_std": fit.global_std,
            "mean_01": fit.global_mean / pm,
            "std_01": global_std / pm,
        },
        "params": {
            "stats": {
                "fit_split": sp.fit_split,
                "zero_std": sp.zero_std,
                "eps": sp.eps,
                "percentiles": list(sp.percentiles),
            }
        },
        "versions": {
            "pipeline": __version__,
            "numpy": np.__version__,
            "zarr": zarr.__version__,
            "dask": dask.__version__,
        },
    }


def run_stats(
    prepared: str | os.PathLike[str] | Location,
    out_dir: str | os.PathLike[str] | Location,
    params: Params,
    *,
    progress: bool = False,
    cache: Cache | None = None,
) -> StatsRun:
    """Run the stats stage; return the stats.json document and what was reused, if anything.

    When ``cache`` (default: the one :func:`pipeline.cache.entries.open_cache` names) holds an
    earlier
    fit on data decoded the same way, only the images added or removed since are reduced; the
    result is bit-identical to a fit from scratch. ``prepared`` (the images.zarr store) and
    ``out_dir`` may be local paths or fsspec URLs; with a URL the cache is not used.
    """
    prepared = parse_location(prepared, "PREPARED")
    out = parse_location(out_dir, "OUT_DIR")
    check_output(out, "stats", {"PREPARED": prepared}, out_name="OUT_DIR")
    cache = cache if cache is not None else open_cache()
    if not (prepared.is_local and out.is_local):
        cache = dataclasses.replace(cache, enabled=False)
        require_reachable([prepared], [out])
    store = open_prepared(prepared)
    start, stop = fit_range(store.splits, params.stats.fit_split)
    if stop <= start:
        raise PipelineError(
            f"The {params.stats.fit_split!r} split of {prepared} is empty: nothing to fit "
            f"statistics on. Check ingest.split, or choose another stats.fit_split."
        )
    files = fit_files(store, start, stop) if cache.enabled else None
    reused = reuse_moments(store, start, stop, params, cache, files) if files else None
    if reused is not None:
        moments = reused.moments
    else:
        block = params.stats.block_images or (store.images.shards or store.images.chunks)[0]
        moments = compute_moments(
            prepared / "images",
            start,
            stop,
            params,
            digests=store.digests,
            block_images=block,
            progress=progress,
        )
    if files:
        save_moments(cache, moments_key(store), files, moments)
        cache.trim()
    fit = aggregate(moments, params.stats.percentiles)
    doc = _document(fit, params, store.fingerprint, store.images.shape[0])
    # The folder is published with one rename, so stats.json and stats.zarr always match.
    with publish(out) as tmp:
        ignore = out / ".gitignore"  # written by DVC: not ours, carried over
        if ignore.local is not None and tmp.local is not None:
            if ignore.local.is_file():
                shutil.copy2(ignore.local, tmp.local / ".gitignore")
        elif ignore.is_file():
            (tmp / ".gitignore").write_bytes(ignore.read_bytes())
        write_arrays(
            tmp / STATS_ZARR, fit, moments, zero_std=params.stats.zero_std, eps=params.stats.eps
        )
        doc["arrays"] = {"path": STATS_ZARR, "sha256": tree_sha256(tmp / STATS_ZARR)}
        (tmp / STATS_JSON).write_bytes(dumps_json(doc).encode("ascii"))
        (tmp / METRICS_JSON).write_bytes(dumps_json(compact_metrics(doc)).encode("ascii"))
    return StatsRun(document=doc, reused=reused)
