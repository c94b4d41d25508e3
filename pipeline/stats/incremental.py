"""Exact statistics of a changed dataset from an earlier fit: add what is new, subtract what left.

The statistics are exact integer sums (:mod:`pipeline.stats.moments`), so the sums over a new data
version are the sums over an earlier version plus those of the added images minus those of
the removed ones, exactly: the result is bit-identical to a fit from scratch. The earlier sums
are kept in the cache (``moments`` entries, with the sha256 of every file they cover, in
store order); the pixels of added images come from the prepared store, those of removed
images from the packs of decoded images that ingest keeps in the cache. When
anything needed is missing, :func:`reuse_moments` returns None and the caller fits from
scratch.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np

from pipeline.cache.entries import Cache, Entry, cache_key
from pipeline.cache.packs import Packed, decoded_key, load_index, mark_used, read_packed
from pipeline.core.digests import check_digests
from pipeline.core.runner import run_tasks
from pipeline.params import Params
from pipeline.stats.moments import INT64_MAX, Moments, block_moments, combine
from pipeline.zarrstore.store import PreparedStore, read_selection

__all__ = ["Reuse", "fit_files", "moments_key", "reuse_moments", "save_moments"]

BATCH_IMAGES = 256  # images per task when reducing added or removed images
# The modules whose code computes moments: a change to any of them invalidates cached fits.
MOMENTS_CODE = ("moments.py", "kernel.py", "kernel_numpy.py")
STATS_DIR = Path(__file__).resolve().parent


def _code_sha256(names: Sequence[str]) -> str:
    """sha256 over the named modules of this package, in order."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + (STATS_DIR / name).read_bytes())
    return h.hexdigest()


def _identity(sha256: str, digest: int) -> str:
    """One stored image: its source file's sha256 and the CRC-32C of its stored pixels."""
    return f"{sha256}:{int(digest):08x}"


def _split_identity(identity: str) -> tuple[str, int]:
    sha, digest = identity.split(":")
    return sha, int(digest, 16)


def fit_files(store: PreparedStore, start: int, stop: int) -> list[str] | None:
    """The identity of each sample in [start, stop): its source file's sha256 (from the manifest)
    and its recorded pixel digest, so a kept fit is tied to the exact pixels it covers."""
    manifest = store.path.parent / "manifest.jsonl"
    if not manifest.is_file() or "decode_config" not in store.attrs:
        return None
    rows = []
    with open(manifest, encoding="ascii", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
                rows.append(str(row["sha256"]))
            except (ValueError, KeyError, TypeError):
                return None  # the stage fits from scratch; open_prepared checked the digest
    if len(rows) != store.images.shape[0]:
        return None
    return [
        _identity(sha, d)
        for sha, d in zip(rows[start:stop], store.digests[start:stop], strict=True)
    ]


def moments_key(store: PreparedStore) -> str:
    """Entry name for fits on prepared data of this decode configuration and layout."""
    return cache_key(
        {
            "moments": store.attrs["decode_config"],
            "shape": list(store.images.shape[1:]),
            "dtype": str(store.images.dtype),
            "code": _code_sha256(MOMENTS_CODE),
        }
    )


def save_moments(cache: Cache, key: str, files: Sequence[str], moments: Moments) -> None:
    """Keep ``moments`` (of ``files``, in order) for the next fit to start from."""
    arrays = {
        "pixel_sum": moments.pixel_sum,
        "pixel_sumsq": moments.pixel_sumsq,
        "histogram": moments.histogram,
        "image_std": moments.image_std,
    }
    if any(a.dtype == object for a in arrays.values()):
        return  # totals beyond int64: rare enough to always fit from scratch
    header = {"images": list(files), "pixel_max": moments.pixel_max}
    cache.put("moments", key, Entry(header=header, arrays=arrays))


@dataclass(frozen=True, kw_only=True)
class Reuse:
    """Moments obtained from an earlier fit, and how many images differed from it."""

    moments: Moments
    added: int
    removed: int


def _load(cache: Cache, key: str, shape: tuple[int, ...]) -> tuple[list[str], Moments] | None:
    """The kept fit, checked as untrusted input: anything malformed is a miss."""
    entry = cache.get("moments", key)
    if entry is None:
        return None
    try:
        files = entry.header["images"]
        pixel_max = entry.header["pixel_max"]
        a = entry.arrays
        c = shape[-1]
        ok = (
            isinstance(files, list)
            and all(isinstance(f, str) and len(f) == 73 for f in files)
            and pixel_max in (255, 65535)
            and a["pixel_sum"].shape == shape
            and a["pixel_sumsq"].shape == shape
            and a["histogram"].shape == (c, pixel_max + 1)
            and a["image_std"].shape == (len(files), c)
            and all(a[k].dtype == np.int64 for k in ("pixel_sum", "pixel_sumsq", "histogram"))
            and a["image_std"].dtype == np.float64
        )
        for f in files if ok else ():
            _split_identity(f)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    if not ok:
        return None
    return files, Moments(
        n_images=len(files),
        pixel_max=int(pixel_max),
        pixel_sum=a["pixel_sum"],
        pixel_sumsq=a["pixel_sumsq"],
        histogram=a["histogram"],
        image_std=a["image_std"],
    )


def _batch_moments(
    work: bytes,
    indices: Sequence[int] | None,
    path: str,
    shape: tuple[int, ...],
    dtype: str,
) -> Moments | None:
    """Moments of a batch of images, read from cache packs where they are.

    ``work`` is the pickled list of (where each image lies in the cache or None, the digest
    its pixels must have). Images a pack cannot give (missing, damaged, or other pixels) are
    read from samples ``indices`` of the prepared images array at ``path`` and checked against
    their digests; with no ``indices``, such an image means None.
    """
    located: list[tuple[Packed | None, int]] = pickle.loads(work)
    block = np.empty((len(located), *shape), dtype=dtype)
    missing = [
        i
        for i, (w, digest) in enumerate(located)
        if w is None or w.crc32 != digest or not read_packed(w, block[i])
    ]
    if missing:
        if indices is None:
            return None
        # Scattered samples through zarr decode whole chunks each: the slow path, measured
        # 10x the pack reads for 1,600 added images among 22,000.
        wanted = [indices[i] for i in missing]
        block[missing] = read_selection(path, wanted)
        for i, sample in zip(missing, wanted, strict=True):
            check_digests(block[i : i + 1], np.array([located[i][1]]), sample, path)
    return block_moments(block)


def _moments_of(
    located: Sequence[tuple[Packed | None, int]],
    indices: Sequence[int] | None,
    path: str,
    layout: tuple[tuple[int, ...], str],
    params: Params,
) -> Moments | None:
    """Combined moments of images kept in cache packs, a batch per Dask task.

    ``indices`` name the same images in the store at ``path``, for those a pack cannot give;
    None when one of them cannot be had at all.
    """
    tasks = [
        dask.delayed(_batch_moments, pure=False)(
            pickle.dumps(located[a : a + BATCH_IMAGES]),  # not walked by Dask
            None if indices is None else indices[a : a + BATCH_IMAGES],
            path,
            *layout,
        )
        for a in range(0, len(located), BATCH_IMAGES)
    ]
    parts = run_tasks(tasks, params.base, kind="reduce", shared=[Path(path)])
    mark_used(w for w, _ in located if w is not None)
    if any(p is None for p in parts):
        return None
    return combine(parts)


def _located(index: dict[str, Packed], identity: str, config: str) -> tuple[Packed | None, int]:
    """Where the cache holds the pixels of ``identity``, and the digest they must have."""
    sha, digest = _split_identity(identity)
    return index.get(decoded_key(sha, config)), digest


def _difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.subtract(a, b, dtype=np.int64)


def reuse_moments(
    store: PreparedStore,
    start: int,
    stop: int,
    params: Params,
    cache: Cache,
    files: Sequence[str],
) -> Reuse | None:
    """Moments of samples [start, stop) from the cached earlier fit, or None.

    ``files`` holds the identity of each of those samples (:func:`fit_files`). None when there
    is no earlier fit, when more images changed than stayed, or when a removed image's pixels
    are gone.
    """
    base = _load(cache, moments_key(store), tuple(store.images.shape[1:]))
    if base is None:
        return None
    base_files, before = base
    if before.pixel_max != int(store.attrs["pixel_max"]):
        return None
    now, then = Counter(files), Counter(base_files)
    added, removed = now - then, then - now
    n = len(files)
    changed = sum(added.values()) + sum(removed.values())
    if changed >= n or 2 * n * before.pixel_max**2 > INT64_MAX:
        return None
    config = str(store.attrs["decode_config"])
    path = str(store.path.resolve() / "images")
    rows = dict(zip(base_files, before.image_std, strict=True))
    layout = (tuple(store.images.shape[1:]), str(store.images.dtype))
    index = load_index(cache, config) if added or removed else {}
    result = before
    if added:
        picked: list[tuple[str, int]] = []
        wanted = dict(added)
        for offset, sha in enumerate(files):
            if wanted.get(sha, 0) > 0:
                wanted[sha] -= 1
                picked.append((sha, start + offset))
        located = [_located(index, sha, config) for sha, _ in picked]
        plus = _moments_of(located, [i for _, i in picked], path, layout, params)
        if plus is None:
            return None
        rows.update(zip((s for s, _ in picked), plus.image_std, strict=True))
        result = combine([result, plus])
    if removed:
        gone = [sha for sha, k in sorted(removed.items()) for _ in range(k)]
        located = [_located(index, sha, config) for sha in gone]
        if any(where is None or where.crc32 != digest for where, digest in located):
            return None
        minus = _moments_of(located, None, path, layout, params)
        if minus is None:
            return None
        result = Moments(
            n_images=result.n_images - minus.n_images,
            pixel_max=result.pixel_max,
            pixel_sum=_difference(result.pixel_sum, minus.pixel_sum),
            pixel_sumsq=_difference(result.pixel_sumsq, minus.pixel_sumsq),
            histogram=_difference(result.histogram, minus.histogram),
            image_std=result.image_std,
        )
    moments = Moments(
        n_images=n,
        pixel_max=result.pixel_max,
        pixel_sum=np.asarray(result.pixel_sum, dtype=np.int64),
        pixel_sumsq=np.asarray(result.pixel_sumsq, dtype=np.int64),
        histogram=np.asarray(result.histogram, dtype=np.int64),
        image_std=np.stack([rows[sha] for sha in files]),
    )
    if not _consistent(moments):
        return None
    return Reuse(moments=moments, added=sum(added.values()), removed=sum(removed.values()))


def _consistent(m: Moments) -> bool:
    """Invariants any true fit satisfies: a reuse that breaks them is dropped, not trusted."""
    h, w, _ = m.pixel_sum.shape
    per_channel = m.histogram.sum(axis=1, dtype=object)
    return not (
        m.histogram.min(initial=0) < 0
        or any(int(c) != m.n_images * h * w for c in per_channel)
        or m.pixel_sum.min(initial=0) < 0
        or m.pixel_sumsq.min(initial=0) < 0
    )
