"""``pipeline verify``: recompute a normalized store from its prepared store and stats."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import dask
import numpy as np
import zarr

from pipeline.errors import PipelineError, StoreError
from pipeline.location import Location
from pipeline.normalize import expected_block
from pipeline.params import BaseParams
from pipeline.reader import check_lineage, normalized_store_path
from pipeline.runner import run_tasks
from pipeline.statsfile import load_stats
from pipeline.store import open_prepared
from pipeline.transform import PER_IMAGE_MODES, Constants, dataset_constants

__all__ = ["VerifyReport", "verify_store"]


@dataclass
class VerifyReport:
    """What was checked and what did not match."""

    store: Location
    checked: int = 0
    mismatched: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the lineage checks out and every checked sample matches."""
        return not self.mismatched and not self.problems


def _check_block(
    prepared: str,
    normalized: str,
    indices: list[int],
    mode: str,
    constants: Constants | None,
    eps: float,
    divisor: float,
    dtype: str,
    offset: np.ndarray,
    scale: np.ndarray,
) -> list[int]:
    """Indices among ``indices`` (one contiguous run) whose stored values differ."""
    start, stop = indices[0], indices[-1] + 1
    try:
        raw = np.asarray(zarr.open_array(prepared, mode="r")[start:stop])
        stored = np.asarray(zarr.open_array(normalized, mode="r")[start:stop])
    except Exception:  # a damaged shard: every sample in it counts as a mismatch
        return list(indices)
    want, used = expected_block(raw, mode, constants, eps, divisor, dtype)
    bad = []
    for i in indices:
        k = i - start
        same = np.array_equal(want[k], stored[k], equal_nan=True)
        if mode in PER_IMAGE_MODES:
            same = same and np.array_equal(used.offset[k], offset[i])
            same = same and np.array_equal(used.scale[k], scale[i])
        if not same:
            bad.append(i)
    return bad


def verify_store(
    path: str | os.PathLike[str] | Location,
    *,
    sample: int | None = None,
    seed: int = 0,
    base: BaseParams | None = None,
) -> VerifyReport:
    """Check lineage, then recompute all samples (or ``sample`` seeded ones) and compare."""
    store = normalized_store_path(path).resolve()
    report = VerifyReport(store=store)
    try:
        group = zarr.open_group(store.zarr(), mode="r")
        attrs: dict[str, Any] = dict(group.attrs)
        offset = np.asarray(group["offset"][...])  # type: ignore[index]
        scale = np.asarray(group["scale"][...])  # type: ignore[index]
    except Exception as exc:
        raise StoreError(f"{store} is not a readable normalized store: {exc}") from exc
    try:
        check_lineage(store, attrs)
    except PipelineError as exc:
        report.problems.append(str(exc))
        return report
    stats = load_stats(store / attrs["stats"]["path"])
    prepared = (store / attrs["prepared"]["path"]).resolve()
    if not (prepared / "zarr.json").is_file():
        report.problems.append(f"the prepared store {prepared} named in the lineage is missing")
        return report
    try:
        source = open_prepared(prepared)
    except PipelineError as exc:
        report.problems.append(str(exc))
        return report
    if source.fingerprint != attrs["prepared"]["fingerprint"]:
        report.problems.append(
            f"the lineage names prepared data {attrs['prepared']['fingerprint'][:12]}, but "
            f"{prepared} holds {source.fingerprint[:12]}"
        )
        return report
    n = int(zarr.open_array((store / "images").zarr(), mode="r").shape[0])
    if sample is None or sample >= n:
        chosen = list(range(n))
    else:
        chosen = sorted(np.random.default_rng(seed).choice(n, size=sample, replace=False).tolist())
    shard = zarr.open_array((store / "images").zarr(), mode="r")
    per_shard = (shard.shards or shard.chunks)[0]
    groups: dict[int, list[int]] = {}
    for i in chosen:
        groups.setdefault(i // per_shard, []).append(i)
    mode = attrs["mode"]
    constants = (
        None if mode in PER_IMAGE_MODES else dataset_constants(mode, stats, attrs["input_scale"])
    )
    tasks = [
        dask.delayed(_check_block, pure=True)(
            (prepared / "images").zarr(),
            (store / "images").zarr(),
            idx,
            mode,
            constants,
            float(attrs["eps"]),
            float(attrs["divisor"]),
            attrs["dtype"],
            offset,
            scale,
        )
        for idx in groups.values()
    ]
    for bad in run_tasks(tasks, base or BaseParams(), kind="io", shared=[prepared, store]):
        report.mismatched.extend(bad)
    report.checked = len(chosen)
    return report
