"""Training side: open a normalized store, check its lineage, and index it like a dataset."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr

from pipeline.core.documents import HEX64, Maybe, OneOf, check_document
from pipeline.core.errors import StoreError
from pipeline.core.lineage import NORMALIZED_SCHEMA
from pipeline.core.location import Location, parse_location
from pipeline.normalize.modes import (
    DATASET_MODES,
    PER_IMAGE_MODES,
    Constants,
    dataset_constants,
    invert,
)
from pipeline.params import NormalizeParams
from pipeline.reader.batches import Batches, BatchSampler, make_plan
from pipeline.reader.onread import OnRead, on_read_params, open_fitted, prepared_lineage
from pipeline.stats.document import load_stats
from pipeline.zarrstore.shardread import open_shard_reader
from pipeline.zarrstore.store import (
    PREPARED_SCHEMA,
    check_complete,
    check_image_shape,
    check_splits,
    read_array,
    sha256_file,
)

__all__ = ["NormalizedDataset", "open_normalized"]

SPLIT_NAMES = ("train", "val", "test")


def normalized_store_path(path: str | os.PathLike[str] | Location) -> Location:
    p = parse_location(path)
    return p / "images.zarr" if (p / "images.zarr" / "zarr.json").is_file() else p


class NormalizedDataset:
    """Samples ``[start, stop)`` of a normalized store: ``ds[i] -> (image, label)``.

    A map-style dataset in PyTorch's sense (``__len__`` and ``__getitem__`` returning numpy
    arrays, which the default collate turns into tensors) without importing torch. It pickles
    by path, so DataLoader worker processes reopen the store themselves.
    """

    def __init__(
        self,
        path: Location,
        attrs: dict[str, Any],
        start: int,
        stop: int,
        channels_first: bool,
        on_read: OnRead | None = None,
    ) -> None:
        self.path = path
        self._attrs = attrs
        self.start, self.stop = start, stop
        self.channels_first = channels_first
        # Set: values computed from a prepared store (pipeline.reader.onread).
        self.on_read = on_read
        self._arrays: dict[str, Any] | None = None

    def _open(self) -> dict[str, Any]:
        if self._arrays is None and self.on_read is not None:
            self._arrays = self.on_read.open()
        if self._arrays is None:
            group = zarr.open_group(self.path.zarr(), mode="r")
            images = group["images"]
            assert isinstance(images, zarr.Array)
            local = self.path.local
            self._arrays = {
                "images": images,
                "direct": open_shard_reader(images, None if local is None else local / "images"),
                "labels": read_array(group, "label"),
                "offset": read_array(group, "offset"),
                "scale": read_array(group, "scale"),
            }
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = None
        return state

    def __len__(self) -> int:
        return self.stop - self.start

    def _absolute(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        return self.start + (index % n)

    def _rows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Absolute store rows of view positions ``indices`` (negative ones count from the end)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        bad = (idx < -n) | (idx >= n)
        if bad.any():
            raise IndexError(f"index {int(idx[bad][0])} out of range for {n} samples")
        return self.start + (idx % n) if n else idx

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """The images at view positions ``indices``, in that order, as one array.

        (n, H, W, C), or (n, C, H, W) for a ``channels_first`` view. Each chunk the batch
        needs is read once: uncompressed local stores straight from the shard files into the
        batch (see :mod:`pipeline.zarrstore.shardread`), other layouts by one zarr selection.
        """
        rows = self._rows(indices)
        arrays = self._open()
        if self.channels_first and self.on_read is None and arrays["direct"] is not None:
            return self._read_raw(rows, channels_first=True)  # transposed in cache-sized parts
        batch = self._read_raw(rows)
        if self.on_read is not None:
            batch = self.on_read.normalize(arrays, rows, batch)
        if self.channels_first:
            batch = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
        return batch

    def _read_raw(self, rows: np.ndarray, *, channels_first: bool = False) -> np.ndarray:
        """The stored values of store rows ``rows`` (prepared integers when on read).

        ``channels_first`` (direct reader only): (n, C, H, W), staged by the shard reader.
        """
        arrays = self._open()
        try:
            if channels_first:
                return np.asarray(arrays["direct"].read_channels_first(rows))
            return self._read_rows(arrays, rows)
        except (StoreError, IndexError):
            raise
        except Exception as exc:  # zarr and the codecs raise many types for damaged shards
            where = self.on_read.prepared if self.on_read is not None else self.path
            raise StoreError(
                f"cannot read samples of {where}/images: {exc}. The store is damaged; "
                f"rebuild it (dvc repro) or `dvc checkout` it."
            ) from exc

    @staticmethod
    def _read_rows(arrays: dict[str, Any], rows: np.ndarray) -> np.ndarray:
        direct = arrays["direct"]
        if direct is not None:
            return direct.read(rows)
        unique, inverse = np.unique(rows, return_inverse=True)
        block = np.asarray(arrays["images"].get_orthogonal_selection(unique))
        return block if len(unique) == len(rows) and (unique == rows).all() else block[inverse]

    def read_labels(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """The labels (int64, -1: no class) at view positions ``indices``."""
        return self._open()["labels"][self._rows(indices)].astype(np.int64)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        i = self._absolute(int(index)) - self.start
        return self.read([i])[0], int(self.read_labels([i])[0])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[np.ndarray, int]]:
        """PyTorch's batched fetch: the same ``(image, label)`` items as ``ds[i]`` per index.

        The images are views into one batch read by :meth:`read`, so the default collate
        stacks exactly the batch that per-item fetching gives.
        """
        batch, labels = self.read(indices), self.read_labels(indices)
        return [(batch[k], int(labels[k])) for k in range(len(batch))]

    @property
    def chunk_samples(self) -> int:
        """Samples per store chunk: the unit that a chunk-local shuffle permutes."""
        return int(self._open()["images"].chunks[0])

    def batch_sampler(
        self,
        batch_size: int,
        *,
        shuffle: bool | str = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        buffer: int | None = None,
    ) -> BatchSampler:
        """Shuffled batches of positions for ``DataLoader(ds, batch_sampler=...)``.

        ``shuffle``: True (``"chunks"``: chunks permuted, samples mixed within windows of
        ``buffer`` chunks), ``"uniform"`` (exact, reads scattered) or False. See
        :mod:`pipeline.reader.batches` for the order, ranks, ``drop_last`` and resuming.
        """
        plan = make_plan(
            self, batch_size, shuffle=shuffle, seed=seed, rank=rank,
            world_size=world_size, drop_last=drop_last, buffer=buffer,
        )  # fmt: skip
        return BatchSampler(plan, epoch)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool | str = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        buffer: int | None = None,
    ) -> Batches:
        """One epoch of ``(images, labels)`` numpy batches (labels int64), in the order of
        :meth:`batch_sampler` with the same arguments; each batch is one :meth:`read`."""
        sampler = self.batch_sampler(
            batch_size, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank,
            world_size=world_size, drop_last=drop_last, buffer=buffer,
        )  # fmt: skip
        return Batches(self, sampler)

    @property
    def labels(self) -> np.ndarray:
        """Label index of every sample in this view (-1: no class)."""
        return self._open()["labels"][self.start : self.stop]

    @property
    def classes(self) -> list[str]:
        """Class names that labels index into."""
        return list(self._attrs["classes"])

    @property
    def lineage(self) -> dict[str, Any]:
        """How the store was made, as a plain dict to log to an experiment tracker."""
        info = copy.deepcopy(self._attrs)
        info["store"] = str(self.path if self.on_read is None else self.on_read.prepared)
        info["samples"] = [self.start, self.stop]
        return info

    def split(self, name: str) -> NormalizedDataset:
        """The samples of one split (``train``, ``val`` or ``test``)."""
        if name not in SPLIT_NAMES:
            raise KeyError(f"unknown split {name!r}; expected one of {', '.join(SPLIT_NAMES)}")
        start, stop = self._attrs["splits"][name]
        start = max(start, self.start)
        stop = max(start, min(stop, self.stop))  # a split of a disjoint split is empty
        return NormalizedDataset(
            self.path, self._attrs, start, stop, self.channels_first, self.on_read
        )

    def dask(self) -> Any:
        """The images of this view as a dask array, one block per store chunk."""
        import dask.array as da

        if self.on_read is not None:
            raise ValueError("dask() serves stored float images; this view normalizes on read")
        return da.from_zarr(self._open()["images"])[self.start : self.stop]

    def denormalize(self, x: np.ndarray, index: int | None = None) -> np.ndarray:
        """Map normalized pixels back to the original integers.

        ``x`` is one (H, W, C) image (``channels_first`` views take (C, H, W)) or a batch of
        them. Per-image modes need ``index``, the sample's position in this view.
        """
        arrays = self._open()
        y = np.asarray(x)
        if self.channels_first:
            y = np.moveaxis(y, -3, -1)
        offset, scale = arrays["offset"], arrays["scale"]
        if self._attrs["mode"] in PER_IMAGE_MODES:
            if index is None:
                raise ValueError("per-image modes need the sample index to denormalize")
            i = self._absolute(index)
            if self.on_read is not None:
                raw = self._read_raw(np.array([i])) if offset is None else None
                offset, scale = self.on_read.per_image(arrays, i, raw)
            else:
                offset, scale = offset[i : i + 1], scale[i : i + 1]
        batch = y if y.ndim == 4 else y[None]
        k = Constants(offset=offset, scale=scale, divisor=float(self._attrs["divisor"]))
        out = invert(batch, k, int(self._attrs["pixel_max"]))
        out = out if y.ndim == 4 else out[0]
        return np.moveaxis(out, -1, -3) if self.channels_first else out


_RANGE = (int, int)
LINEAGE_ATTRS = {
    "schema": str,
    "mode": str,
    "eps": float,
    "dtype": OneOf(("float32", "float16")),
    "input_scale": str,
    "divisor": float,
    "constants": {"offset": Maybe([float]), "scale": Maybe([float])},
    "channel_names": [str],
    "pixel_max": OneOf((255, 65535)),
    "classes": [str],
    "splits": {"train": _RANGE, "val": _RANGE, "test": _RANGE},
    "stats": {
        "path": str,
        "sha256": HEX64,
        "fit_split": str,
        "count": int,
        "mean": [float],
        "std": [float],
        "params": dict,
    },
    "prepared": {"path": str, "fingerprint": HEX64, "decode": dict, "versions": dict},
    "params": {"normalize": dict},
    "versions": dict,
}
FIX = "Re-run `dvc repro`, or pass verify=False to open it anyway."


def lineage_target(
    store: Location, attrs: dict[str, Any], key: str, *, allow_outside: bool = False
) -> Location:
    """The file or folder that lineage entry ``key`` (``stats`` or ``prepared``) names.

    The recorded path is untrusted input: it must be relative and, unless ``allow_outside``,
    stay inside the folder that holds the normalized output (``data/`` for
    ``data/normalized``), so a store from elsewhere cannot make a reader open arbitrary files.
    """
    rel = attrs[key]["path"]
    if not rel or rel.startswith("/") or "://" in rel or "\\" in rel or "\0" in rel:
        raise StoreError(f"{store}: its lineage path {rel[:80]!r} for {key} is not relative. {FIX}")
    target = store / rel
    if not allow_outside:
        root = _lexical(store.parent.parent)
        inside = _lexical(target)
        if inside != root and not inside.startswith(root.rstrip("/") + "/"):
            raise StoreError(
                f"{store}: its lineage names {key} at {rel[:80]!r}, outside {store.parent.parent} "
                f"(the folder holding the store). Open it with allow_outside=True if you trust "
                f"where it came from. {FIX}"
            )
    return target


def _lexical(loc: Location) -> str:
    """An absolute, normalized path string without resolving symlinks."""
    if loc.local is not None:
        return os.path.normpath(os.path.abspath(loc.local))
    return loc.url


def lineage_only(attrs: dict[str, Any]) -> bool:
    """True for a store written with ``normalize.store: lineage`` (no images array)."""
    return attrs.get("params", {}).get("normalize", {}).get("store", "float") == "lineage"


def check_lineage(path: Location, attrs: dict[str, Any], *, allow_outside: bool = False) -> None:
    """Refuse a store whose recorded stats hash, params, fingerprint or constants do not match."""
    check_document(attrs, LINEAGE_ATTRS, path, FIX)
    stats_json = lineage_target(path, attrs, "stats", allow_outside=allow_outside).resolve()
    hint = FIX
    if not stats_json.is_file():
        raise StoreError(f"{path}: its stats file {stats_json} is missing. {hint}")
    digest = sha256_file(stats_json)
    if digest != attrs["stats"]["sha256"]:
        raise StoreError(
            f"{path} was normalized with stats sha256 {attrs['stats']['sha256'][:12]}, but "
            f"{stats_json} now has sha256 {digest[:12]}. {hint}"
        )
    stats = load_stats(stats_json)
    if stats.fingerprint != attrs["prepared"]["fingerprint"]:
        raise StoreError(f"{path}: stats were fitted on other data than this store. {hint}")
    if stats.doc.get("params", {}) != attrs["stats"].get("params"):
        raise StoreError(f"{path}: recorded stats params differ from {stats_json}. {hint}")
    group = zarr.open_group(path.zarr(), mode="r")
    check_splits(path, group, attrs.get("splits"))
    if lineage_only(attrs):  # no images array: the values are computed on read
        n, c, dtype = len(read_array(group, "label")), len(stats.channels), attrs.get("dtype")
    else:
        images = zarr.open_array((path / "images").zarr(), mode="r")
        n, c, dtype = int(images.shape[0]), int(images.shape[-1]), str(images.dtype)
    offset, scale = read_array(group, "offset"), read_array(group, "scale")
    mode, scale_kind = attrs.get("mode"), attrs.get("input_scale")
    recorded = attrs.get("constants") or {}
    # Every attribute that follows from the stats file and the mode must equal what it implies.
    implied: dict[str, tuple[Any, Any]] = {
        "dtype": (attrs.get("dtype"), dtype),
        "pixel_max": (attrs.get("pixel_max"), stats.pixel_max),
        "divisor": (attrs.get("divisor"), float(stats.pixel_max) if scale_kind == "unit" else 1.0),
        "channel_names": (attrs.get("channel_names"), stats.channels),
        "stats.mean": (attrs["stats"].get("mean"), stats.mean.tolist()),
        "stats.std": (attrs["stats"].get("std"), stats.std.tolist()),
        "stats.fit_split": (attrs["stats"].get("fit_split"), stats.fit_split),
        "stats.count": (attrs["stats"].get("count"), stats.count),
        "eps": (attrs.get("eps"), attrs.get("params", {}).get("normalize", {}).get("eps")),
    }
    if mode in PER_IMAGE_MODES:
        shape = (n, c)
        implied["offset shape"] = (offset.shape, shape)
        implied["scale shape"] = (scale.shape, shape)
        implied["constants"] = ((recorded.get("offset"), recorded.get("scale")), (None, None))
    elif mode in DATASET_MODES and scale_kind in ("pixel", "unit"):
        want = dataset_constants(mode, stats, scale_kind)
        implied["offset"] = (offset.tolist(), want.offset.tolist())
        implied["scale"] = (scale.tolist(), want.scale.tolist())
        if want.offset.ndim == 1:
            implied["constants"] = (
                (recorded.get("offset"), recorded.get("scale")),
                (want.offset.tolist(), want.scale.tolist()),
            )
    else:
        implied["mode, input_scale"] = ((mode, scale_kind), "a known mode and input_scale")
    wrong = [name for name, (have, want) in implied.items() if have != want]
    if wrong:
        raise StoreError(
            f"{path}: lineage and constants check failed for {', '.join(wrong)}: the recorded "
            f"values do not match what {stats_json} and the mode imply (the store or its "
            f"attributes were changed). {hint}"
        )


def open_normalized(
    path: str | os.PathLike[str] | Location,
    *,
    stats: str | os.PathLike[str] | Location | None = None,
    mode: str | None = None,
    dtype: str | None = None,
    eps: float | None = None,
    input_scale: str | None = None,
    verify: bool = True,
    channels_first: bool = False,
    allow_outside: bool = False,
) -> NormalizedDataset:
    """Open a normalized store for training, after checking its lineage.

    Parameters
    ----------
    path
        ``data/normalized`` or ``data/normalized/images.zarr``: a local path or an fsspec
        URL (``s3://bucket/normalized``; credentials from the environment). A store written
        with ``normalize.store: lineage`` is served from the prepared store it names. A
        prepared store (``data/prepared``) with ``stats`` is normalized on read.
    stats
        The stats folder (``data/stats``) fitted on the prepared store ``path``; only for a
        prepared store.
    mode, dtype, eps, input_scale
        The ``normalize`` params to apply on read (defaults as in params.yaml); only for a
        prepared store: a normalized store records its own.
    verify
        Check the recorded stats hash, params, data fingerprint and constants against the
        stats file the store names, and refuse the store when they differ.
    channels_first
        Return images as (C, H, W), as PyTorch models expect, instead of (H, W, C).
    allow_outside
        Follow lineage paths that lead outside the folder holding the store (refused by
        default: a store from elsewhere is untrusted input).
    """
    given = parse_location(path)
    prepared = given / "images.zarr" if (given / "images.zarr" / "zarr.json").is_file() else given
    if _schema(prepared) == PREPARED_SCHEMA:
        if stats is None:
            raise StoreError(
                f"{prepared} is a prepared store, not a normalized store: pass stats= (the "
                f"stats folder fitted on it, like data/stats) to normalize it on read."
            )
        params = on_read_params(mode, dtype, eps, input_scale)
        store, fitted, how = open_fitted(prepared, parse_location(stats, "stats"), params)
        attrs = prepared_lineage(store, fitted, params, how)
        on_read = OnRead(store.path, how)
        return NormalizedDataset(
            store.path, attrs, 0, int(store.images.shape[0]), channels_first, on_read
        )
    if stats is not None or any(v is not None for v in (mode, dtype, eps, input_scale)):
        raise StoreError(
            f"{given}: stats, mode, dtype, eps and input_scale are for a prepared store; a "
            f"normalized store records its own. Drop them, or pass the prepared store."
        )
    return _open_store(normalized_store_path(given), verify, channels_first, allow_outside)


def _schema(store: Location) -> object:
    try:
        doc = json.loads((store / "zarr.json").read_bytes())
        return doc.get("attributes", {}).get("schema") if isinstance(doc, dict) else None
    except (OSError, ValueError, AttributeError):
        return None


def _open_store(
    store: Location, verify: bool, channels_first: bool, allow_outside: bool
) -> NormalizedDataset:
    """Open a normalized store: a float one, or a lineage-only one served on read."""
    try:
        if not (store / "zarr.json").is_file():
            raise FileNotFoundError(f"no zarr.json under {store}")
        attrs = dict(zarr.open_group(store.zarr(), mode="r").attrs)
    except (FileNotFoundError, zarr.errors.BaseZarrError, ValueError) as exc:
        raise StoreError(f"{store} is not a readable normalized store: {exc}") from exc
    except (TypeError, KeyError, RecursionError, MemoryError) as exc:
        kind = type(exc).__name__
        raise StoreError(f"{store} is not a readable normalized store ({kind}). {FIX}") from exc
    if attrs.get("schema") != NORMALIZED_SCHEMA:
        raise StoreError(
            f"{store} is not a normalized store (schema {str(attrs.get('schema'))[:40]!r}); "
            f"make one with `pipeline normalize`."
        )
    check_document(attrs, LINEAGE_ATTRS, store, FIX)
    if verify:
        check_lineage(store, attrs, allow_outside=allow_outside)
    if lineage_only(attrs):
        return _open_lineage_only(store, attrs, verify, channels_first, allow_outside)
    try:
        images = zarr.open_array((store / "images").zarr(), mode="r")
    except (zarr.errors.BaseZarrError, ValueError, TypeError, KeyError) as exc:
        raise StoreError(f"{store}/images is not a readable array: {exc}. {FIX}") from exc
    if images.ndim != 4:
        raise StoreError(f"{store}/images is not a 4-D (sample, y, x, channel) array. {FIX}")
    check_image_shape(store, images)
    check_complete(images, store / "images")
    n = int(images.shape[0])
    return NormalizedDataset(store, attrs, 0, n, channels_first)


def _open_lineage_only(
    store: Location,
    attrs: dict[str, Any],
    verify: bool,
    channels_first: bool,
    allow_outside: bool,
) -> NormalizedDataset:
    """Serve a lineage-only store from the prepared store and stats its lineage names."""
    prepared = lineage_target(store, attrs, "prepared", allow_outside=allow_outside).resolve()
    stats_json = lineage_target(store, attrs, "stats", allow_outside=allow_outside).resolve()
    params = NormalizeParams.from_dict(attrs["params"]["normalize"])
    source, _, how = open_fitted(prepared, stats_json, params)
    if verify and source.fingerprint != attrs["prepared"]["fingerprint"]:
        raise StoreError(
            f"{store}: its lineage names prepared data {attrs['prepared']['fingerprint'][:12]}, "
            f"but {prepared} now holds {source.fingerprint[:12]} (the prepared store changed "
            f"since normalize ran). {FIX}"
        )
    constants = store if how.constants is None else None
    n = int(source.images.shape[0])
    return NormalizedDataset(
        store, attrs, 0, n, channels_first, OnRead(source.path, how, constants)
    )
