"""``pipeline verify``: check a store against what it was made from.

A normalized store is recomputed from its prepared store and stats; a prepared store's pixels
are checked against the digests ingest recorded. With a source folder, a seeded sample of the
source files is decoded afresh and compared with the stored pixels: the one check that also
catches a store (or the cache that filled it) written wrong with consistent digests.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import dask
import numpy as np
import zarr

from pipeline.core.digests import image_digests
from pipeline.core.errors import PipelineError, StoreError
from pipeline.core.location import Location, parse_location
from pipeline.core.runner import run_tasks
from pipeline.ingest.images import DecodeError, decode_image
from pipeline.normalize.modes import PER_IMAGE_MODES, Normalization
from pipeline.normalize.stage import expected_block
from pipeline.params import BaseParams, IngestParams
from pipeline.reader.dataset import (
    check_lineage,
    lineage_only,
    lineage_target,
    normalized_store_path,
)
from pipeline.stats.document import load_stats
from pipeline.zarrstore.store import PREPARED_SCHEMA, PreparedStore, open_prepared, read_samples

__all__ = ["VerifyReport", "verify_store"]

MAX_SOURCE_BYTES = 2**31  # a source file larger than this is reported, not read


@dataclass
class VerifyReport:
    """What was checked and what did not match."""

    store: Location
    checked: int = 0
    decoded: int = 0  # source files decoded afresh and compared
    mismatched: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the lineage checks out and every checked sample matches."""
        return not self.mismatched and not self.problems


def _check_block(
    prepared: str,
    normalized: str | None,
    indices: list[int],
    digests: np.ndarray,
    how: Normalization | None,
    offset: np.ndarray | None,
    scale: np.ndarray | None,
) -> tuple[list[int], list[int]]:
    """(samples whose normalized values differ, samples whose prepared pixels no longer match
    their digests) among ``indices``, one contiguous run of one shard."""
    start, stop = indices[0], indices[-1] + 1
    try:
        raw = read_samples(prepared, start, stop)  # a new array: no copy needed
        stored = (
            None
            if normalized is None
            else np.asarray(zarr.open_array(normalized, mode="r")[start:stop])
        )
    except Exception:  # a damaged shard: every sample in it counts as a mismatch
        return list(indices), []
    wanted = np.asarray(indices) - start
    picked = raw if len(wanted) == len(raw) else raw[wanted]  # a whole run: no copy
    changed = [int(i) for i in np.asarray(indices)[image_digests(picked) != digests]]
    if how is None or (stored is None and how.mode not in PER_IMAGE_MODES):
        return [], changed  # a lineage-only store of a dataset mode: its values are on read
    want, used = expected_block(raw, how.mode, how.constants, how.eps, how.divisor, how.dtype)
    bad = []
    for i in indices:
        k = i - start
        same = stored is None or np.array_equal(want[k], stored[k], equal_nan=True)
        if how.mode in PER_IMAGE_MODES and offset is not None and scale is not None:
            same = same and np.array_equal(used.offset[k], offset[i])
            same = same and np.array_equal(used.scale[k], scale[i])
        if not same:
            bad.append(i)
    return bad, changed


def _chosen(n: int, sample: int | None, seed: int) -> list[int]:
    if sample is None or sample >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=sample, replace=False).tolist())


def _check_samples(
    report: VerifyReport,
    source: PreparedStore,
    normalized: Location | None,
    how: Normalization | None,
    arrays: tuple[np.ndarray, np.ndarray] | None,
    chosen: list[int],
    base: BaseParams,
) -> None:
    """Compare ``chosen`` samples, a Dask task per shard."""
    per_shard = (source.images.shards or source.images.chunks)[0]
    groups: dict[int, list[int]] = {}
    for i in chosen:
        groups.setdefault(i // per_shard, []).append(i)
    prepared = (source.path.resolve() / "images").zarr()
    target = None if normalized is None else (normalized / "images").zarr()
    offset, scale = arrays if arrays is not None else (None, None)
    tasks = [
        dask.delayed(_check_block, pure=True)(
            prepared, target, idx, source.digests[idx], how, offset, scale
        )
        for idx in groups.values()
    ]
    changed: list[int] = []
    shared = [source.path] + ([normalized] if normalized is not None else [])
    for bad, moved in run_tasks(tasks, base, kind="io", shared=shared):
        report.mismatched.extend(bad)
        changed.extend(moved)
    if changed:
        shown = ", ".join(str(i) for i in changed[:10])
        report.problems.append(
            f"{source.path}: the pixels of {len(changed)} sample(s) ({shown}) no longer match the "
            f"digests ingest recorded: the prepared store was changed after it was written"
        )
        report.mismatched.extend(i for i in changed if i not in report.mismatched)
    report.checked = len(chosen)


def _redecode(
    report: VerifyReport, store: PreparedStore, source: Location, count: int, seed: int
) -> None:
    """Decode ``count`` seeded source files afresh and compare them with the stored pixels."""
    manifest = store.path.parent / "manifest.jsonl"
    if not manifest.is_file():
        report.problems.append(f"no manifest beside {store.path}: cannot re-decode its sources")
        return
    rows = [json.loads(line) for line in manifest.read_bytes().decode("ascii").splitlines()]
    ip = IngestParams.from_dict(store.attrs["decode"])
    channels = int(store.images.shape[-1])
    for i in _chosen(len(rows), count, seed):
        rel, sha = str(rows[i]["path"]), str(rows[i]["sha256"])
        where = source / rel
        try:
            data = where.read_bytes() if where.local is None else _read_bounded(where)
        except OSError as exc:
            report.problems.append(f"{where}: cannot read the source file ({exc})")
            continue
        if hashlib.sha256(data).hexdigest() != sha:
            report.problems.append(
                f"{where} changed since ingest (its sha256 is not the manifest's): re-run "
                f"ingest, or verify against the source version the store was made from"
            )
            continue
        try:
            decoded = decode_image(data, ip, channels=channels, name=rel)
        except DecodeError as exc:
            report.problems.append(f"{where}: decoding it afresh failed ({exc})")
            continue
        report.decoded += 1
        if not np.array_equal(decoded.pixels, np.asarray(store.images[i])):
            report.mismatched.append(i)
            report.problems.append(
                f"sample {i} ({rel}): the stored pixels differ from a fresh decode of the source "
                f"file: the store, or the cache that filled it, holds other pixels"
            )


def _read_bounded(where: Location) -> bytes:
    assert where.local is not None
    if where.local.stat().st_size > MAX_SOURCE_BYTES:
        raise OSError(f"larger than {MAX_SOURCE_BYTES} bytes")
    return where.local.read_bytes()


def _open_normalized(store: Location, report: VerifyReport) -> tuple[Any, ...] | None:
    """(attrs, prepared store, how, offset/scale) of a normalized store, or None (a problem)."""
    try:
        group = zarr.open_group(store.zarr(), mode="r")
        attrs: dict[str, Any] = dict(group.attrs)
        offset = np.asarray(group["offset"][...])  # type: ignore[index]
        scale = np.asarray(group["scale"][...])  # type: ignore[index]
    except Exception as exc:
        raise StoreError(f"{store} is not a readable normalized store: {exc}") from exc
    try:
        check_lineage(store, attrs)
        stats = load_stats(lineage_target(store, attrs, "stats"))
        prepared = lineage_target(store, attrs, "prepared").resolve()
    except PipelineError as exc:
        report.problems.append(str(exc))
        return None
    if not (prepared / "zarr.json").is_file():
        report.problems.append(f"the prepared store {prepared} named in the lineage is missing")
        return None
    try:
        source = open_prepared(prepared)
    except PipelineError as exc:
        report.problems.append(str(exc))
        return None
    if source.fingerprint != attrs["prepared"]["fingerprint"]:
        report.problems.append(
            f"the lineage names prepared data {attrs['prepared']['fingerprint'][:12]}, but "
            f"{prepared} holds {source.fingerprint[:12]}"
        )
        return None
    how = Normalization.from_stats(
        attrs["mode"], stats, attrs["input_scale"], float(attrs["eps"]), str(attrs["dtype"])
    )
    return attrs, source, how, (offset, scale)


def verify_store(
    path: str | os.PathLike[str] | Location,
    *,
    sample: int | None = None,
    seed: int = 0,
    base: BaseParams | None = None,
    source: str | os.PathLike[str] | Location | None = None,
    decode: int = 0,
) -> VerifyReport:
    """Check a normalized store (lineage, then every value recomputed) or a prepared store (every
    pixel against its digest); ``sample`` checks that many seeded samples only. With ``source``
    (the image folder the prepared data was made from), ``decode`` seeded source files are also
    decoded afresh and compared with the stored pixels."""
    base = base or BaseParams()
    given = parse_location(path)
    prepared_path = given / "images.zarr" if (given / "images.zarr").is_dir() else given
    if _schema(prepared_path) == PREPARED_SCHEMA:
        report = VerifyReport(store=prepared_path.resolve())
        store = open_prepared(prepared_path)
        n = int(store.images.shape[0])
        _check_samples(report, store, None, None, None, _chosen(n, sample, seed), base)
    else:
        normalized = normalized_store_path(given).resolve()
        report = VerifyReport(store=normalized)
        opened = _open_normalized(normalized, report)
        if opened is None:
            return report
        attrs, store, how, arrays = opened
        n = int(store.images.shape[0])
        chosen = _chosen(n, sample, seed)
        values = None if lineage_only(attrs) else normalized  # lineage: no stored values
        _check_samples(report, store, values, how, arrays, chosen, base)
    if source is not None and decode > 0:
        _redecode(report, store, parse_location(source, "--source"), decode, seed)
    return report


def _schema(store: Location) -> object:
    try:
        return json.loads((store / "zarr.json").read_bytes()).get("attributes", {}).get("schema")
    except (OSError, ValueError, AttributeError):
        return None
