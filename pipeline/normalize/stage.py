"""Normalize stage: prepared store + fitted stats -> float store with lineage attributes."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any

import dask
import numpy as np
import zarr

from pipeline.core.digests import check_digests
from pipeline.core.errors import PipelineError
from pipeline.core.lineage import FORMULA, NORMALIZED_SCHEMA, git_revision, normalized_lineage
from pipeline.core.location import Location, parse_location
from pipeline.core.outputs import check_output
from pipeline.core.publish import publish
from pipeline.core.reach import require_reachable
from pipeline.core.runner import run_tasks
from pipeline.core.stagecode import stage_code_sha256
from pipeline.normalize.modes import (
    PER_IMAGE_MODES,
    Constants,
    Normalization,
    dataset_constants,
    per_image_constants,
)
from pipeline.params import Params
from pipeline.stats.document import load_stats
from pipeline.zarrstore.shardwrite import write_shard
from pipeline.zarrstore.store import (
    create_images_array,
    open_prepared,
    read_samples,
    write_small_array,
)

__all__ = ["FORMULA", "NORMALIZED_SCHEMA", "expected_block", "run_normalize"]


def expected_block(
    block: np.ndarray,
    mode: str,
    constants: Constants | None,
    eps: float,
    divisor: float,
    dtype: str,
) -> tuple[np.ndarray, Constants]:
    """Normalize one block of a prepared store; per-image modes compute their own constants."""
    how = Normalization(mode=mode, constants=constants, eps=eps, divisor=divisor, dtype=dtype)
    return how.block(block)


def _normalize_shard(
    src: str,
    dst: Location | None,
    start: int,
    stop: int,
    digests: np.ndarray,
    how: Normalization,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Read samples [start, stop), check them against the digests ingest recorded, normalize,
    and write them as one whole output shard (``dst`` None, a lineage-only store: no values
    are written, and only the per-image modes compute their constants)."""
    block = read_samples(src, start, stop)
    check_digests(block, digests, start, src)
    if dst is None:
        if how.mode not in PER_IMAGE_MODES:
            return None
        used = per_image_constants(block, how.mode, how.eps, how.divisor)
        return used.offset, used.scale
    out, used = expected_block(block, how.mode, how.constants, how.eps, how.divisor, how.dtype)
    write_shard(zarr.open_array(dst.zarr(), mode="r+"), dst.local, start, out)
    return (used.offset, used.scale) if how.mode in PER_IMAGE_MODES else None


def _relative(target: Location, start: Location) -> str:
    """``target`` relative to ``start``: both local, or both URLs on one filesystem."""
    if target.local is not None and start.local is not None:
        return Path(os.path.relpath(target.local.resolve(), start.local.resolve())).as_posix()
    return posixpath.relpath(target.path, start.path)


def _same_filesystem(prepared: Location, stats_dir: Location, out: Location) -> None:
    """The lineage records paths relative to the store: they must resolve on its filesystem."""
    if len({loc.protocol for loc in (prepared, stats_dir, out)}) > 1:
        raise PipelineError(
            f"normalize reads {prepared} and {stats_dir} and writes {out}: put all three on one "
            f"filesystem (all local, or all URLs of one scheme), because the store records the "
            f"paths of its inputs relative to itself and readers follow them."
        )


def _copy_sample_arrays(src: zarr.Group, dst: zarr.Group) -> None:
    for name in ("label", "split", "path"):
        a = src[name]
        assert isinstance(a, zarr.Array)
        b = dst.create_array(
            name,
            shape=a.shape,
            dtype=a.dtype,
            chunks=a.chunks,
            dimension_names=a.metadata.dimension_names,  # type: ignore[union-attr]
            attributes=dict(a.attrs),
            fill_value=a.fill_value,
        )
        b[...] = a[...]


def run_normalize(
    prepared: str | os.PathLike[str] | Location,
    stats_dir: str | os.PathLike[str] | Location,
    out: str | os.PathLike[str] | Location,
    params: Params,
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the normalize stage; return the lineage written into the store's attributes.

    The three folders may be local paths or fsspec URLs, all on one filesystem.
    """
    np_ = params.normalize
    prepared = parse_location(prepared, "PREPARED")
    stats_loc = parse_location(stats_dir, "STATS_DIR")
    dest = parse_location(out, "OUT")
    check_output(dest, "normalize", {"PREPARED": prepared, "STATS_DIR": stats_loc})
    _same_filesystem(prepared, stats_loc, dest)
    if not dest.is_local:
        require_reachable([prepared, stats_loc], [dest])
    store = open_prepared(prepared / "images.zarr")
    stats = load_stats(stats_loc)
    if stats.fingerprint != store.fingerprint:
        raise PipelineError(
            f"{stats.path / 'stats.json'} was fitted on other data (fingerprint "
            f"{stats.fingerprint[:12]}) than {prepared} ({store.fingerprint[:12]}). "
            f"Re-run `pipeline stats` on this prepared store (dvc repro)."
        )
    images = store.images
    n, h, w, c = images.shape
    if stats.mean_image.shape != (h, w, c):
        raise PipelineError(f"stats image shape {stats.mean_image.shape} != store {(h, w, c)}")
    divisor = float(stats.pixel_max) if np_.input_scale == "unit" else 1.0
    constants = None
    if np_.mode not in PER_IMAGE_MODES:
        constants = dataset_constants(np_.mode, stats, np_.input_scale)
    shard = (images.shards or images.chunks)[0]
    final_store = dest / "images.zarr"
    with publish(dest) as tmp:
        group = zarr.open_group((tmp / "images.zarr").zarr(), mode="w")
        values: Location | None = None  # lineage: no images array, values computed on read
        if np_.store == "float":
            values = tmp / "images.zarr" / "images"
            create_images_array(
                group,
                "images",
                shape=(n, h, w, c),
                dtype=np_.dtype,
                chunk_images=images.chunks[0],
                shard_images=shard,
                codec=np_.codec,
                codec_level=np_.codec_level,
            )
        how = Normalization(
            mode=np_.mode, constants=constants, eps=np_.eps, divisor=divisor, dtype=np_.dtype
        )
        tasks = [
            dask.delayed(_normalize_shard, pure=True)(
                (store.path.resolve() / "images").zarr(),
                values,
                a,
                min(a + shard, n),
                store.digests[a : a + shard],
                how,
            )
            for a in range(0, n, shard)
        ]
        results = run_tasks(
            tasks,
            params.base,
            kind="io",
            progress=progress,
            shared=[store.path, tmp],
            writes=[tmp],
        )
        _copy_sample_arrays(zarr.open_group(store.path.zarr(), mode="r"), group)
        if np_.mode in PER_IMAGE_MODES:
            offset = np.concatenate([r[0] for r in results])
            scale = np.concatenate([r[1] for r in results])
            write_small_array(group, "offset", offset, ("sample", "channel"))
            write_small_array(group, "scale", scale, ("sample", "channel"))
        else:
            assert constants is not None
            dims = ("y", "x", "channel") if constants.offset.ndim == 3 else ("channel",)
            write_small_array(group, "offset", constants.offset, dims)
            write_small_array(group, "scale", constants.scale, dims)
        paths = (
            _relative(stats.path / "stats.json", final_store),
            _relative(prepared / "images.zarr", final_store),
        )
        code = stage_code_sha256("normalize")
        lineage = normalized_lineage(np_, stats, store.attrs, constants, paths, code)
        if np_.record_git_revision:
            lineage["git"] = git_revision(Path.cwd())
        group.attrs.update(lineage)
    return lineage
