"""Zarr layout of the stores, atomic publish of outputs, and opening a prepared store."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import shutil
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs
import zarr.errors
from zarr.core.buffer import default_buffer_prototype

from pipeline.core.digests import digests_sha256
from pipeline.core.documents import HEX64, OneOf, check_document
from pipeline.core.errors import StoreError
from pipeline.core.location import Location, parse_location
from pipeline.zarrstore.shardindex import read_shard_index
from pipeline.zarrstore.shardread import open_shard_reader

__all__ = [
    "IMAGE_DIMS",
    "PREPARED_SCHEMA",
    "PreparedStore",
    "atomic_output",
    "check_complete",
    "create_images_array",
    "dumps_json",
    "open_prepared",
    "prepared_fingerprint",
    "read_array",
    "read_samples",
    "read_selection",
    "sha256_file",
    "thread_buffer",
    "write_json",
    "write_small_array",
]

PREPARED_SCHEMA = "pipeline.prepared/2"  # /2: per-image crc32c digests
IMAGE_DIMS = ("sample", "y", "x", "channel")
# zarr's default (False) checks every chunk for emptiness and halved write speed here.
WRITE_CONFIG: Any = {"write_empty_chunks": True}


def dumps_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, fixed indentation, ASCII only, trailing newline."""
    return json.dumps(value, sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False) + "\n"


def write_json(path: Path | Location, value: Any) -> None:
    """Write ``value`` as deterministic JSON."""
    path.write_bytes(dumps_json(value).encode("ascii"))


def sha256_file(path: Path | Location) -> str:
    """Hex sha256 of a file's bytes."""
    if isinstance(path, Location):
        if path.local is None:
            return hashlib.sha256(path.read_bytes()).hexdigest()
        path = path.local
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_output(dest: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; on success it replaces ``dest`` by rename.

    The whole time, ``dest``'s lock (:mod:`pipeline.core.locks`) is held: a second run writing the
    same output stops with a StoreError naming this one. Leftovers of killed earlier runs
    (``.NAME.tmp-<12 hex>``, ``.NAME.old-<12 hex>``, exactly) are removed first. On any
    exception the temporary folder is removed and ``dest`` is left as it was.
    """
    from pipeline.core.locks import hold, sweep_leftovers

    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    # Absolute, so tasks on workers with another working directory find it too.
    dest = Path(dest).parent.resolve() / Path(dest).name
    with hold(dest):
        sweep_leftovers(dest)
        tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = None
        if dest.exists() or dest.is_symlink():
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:12]}"
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()


def compressors_for(codec: str, level: int) -> Any:
    """Zarr v3 byte codecs for ``ingest.codec``."""
    if codec == "none":
        return None
    if codec == "zstd":
        return zarr.codecs.ZstdCodec(level=level)
    return zarr.codecs.BloscCodec(cname="lz4", clevel=level, shuffle="shuffle")


def create_images_array(
    group: zarr.Group,
    name: str,
    *,
    shape: tuple[int, int, int, int],
    dtype: str,
    chunk_images: int,
    shard_images: int,
    codec: str = "none",
    codec_level: int = 1,
) -> zarr.Array:
    """Create a (sample, y, x, channel) array, ``chunk_images`` per chunk in shards."""
    _, h, w, c = shape
    return group.create_array(
        name,
        shape=shape,
        dtype=dtype,
        chunks=(chunk_images, h, w, c),
        shards=(shard_images, h, w, c),
        compressors=compressors_for(codec, codec_level),
        fill_value=0,
        dimension_names=IMAGE_DIMS,
        config=WRITE_CONFIG,
    )


def check_complete(array: zarr.Array, array_dir: Path | Location) -> None:
    """Raise StoreError if any shard file of ``array`` is missing, empty, truncated or damaged.

    Zarr reads a missing (or zero-byte) shard as fill values: a store damaged that way would
    otherwise pass as black images. Our writers always write every shard. For local stores each
    shard's index is read and checked too (one small read per shard), so a truncated shard is
    found even by a stage that takes its result from the cache instead of reading the pixels.
    """
    shard = array.shards or array.chunks
    grid = [range(math.ceil(s / c)) for s, c in zip(array.shape, shard, strict=True)]
    keys = ["/".join(("c", *map(str, index))) for index in itertools.product(*grid)]
    if isinstance(array_dir, Location) and array_dir.local is not None:
        array_dir = array_dir.local
    if isinstance(array_dir, Location):  # one listing instead of a request per shard
        sizes = {rel: info.get("size") or 0 for rel, info in array_dir.files().items()}
        bad = [key for key in keys if not sizes.get(key)]
    else:
        bad = []
        for key in keys:
            file = array_dir / key
            if not file.is_file() or file.stat().st_size == 0:
                bad.append(key)
    if bad:
        raise StoreError(
            f"{array_dir} is incomplete: {len(bad)} shard file(s) missing or empty "
            f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}). Re-run the stage that "
            f"wrote it (dvc repro), or `dvc checkout` it."
        )
    if isinstance(array_dir, Path) and array.shards is not None:
        chunks = math.prod(s // c for s, c in zip(array.shards, array.chunks, strict=True))
        for key in keys:
            try:
                read_shard_index(array_dir / key, chunks)
            except StoreError as exc:
                raise StoreError(
                    f"{exc} Re-run the stage that wrote it (dvc repro), or `dvc checkout` it."
                ) from exc


def prepared_fingerprint(manifest_sha256: str, decode: Any, digests: np.ndarray) -> str:
    """sha256 identifying prepared data: its manifest, the params that changed pixels and the
    digest of every stored image (so an edit of the pixels' digests changes it too)."""
    doc = {"manifest_sha256": manifest_sha256, "decode": decode, "pixels": digests_sha256(digests)}
    return hashlib.sha256(dumps_json(doc).encode()).hexdigest()


def split_ranges(codes: np.ndarray, names: tuple[str, ...] = ("train", "val", "test")) -> dict:
    """{name: [start, stop]} of a split-code array ordered by split (what the attrs record)."""
    bounds, start = {}, 0
    for code, name in enumerate(names):
        count = int(np.count_nonzero(codes == code))
        bounds[name] = [start, start + count]
        start += count
    return bounds


def check_splits(path: Path | Location, group: zarr.Group, recorded: Any) -> None:
    """Raise StoreError unless the ``splits`` attribute describes the ``split`` array."""
    codes = read_array(group, "split")
    ordered = bool(np.all(codes[:-1] <= codes[1:])) if codes.size else True
    if not ordered or split_ranges(codes) != recorded:
        raise StoreError(
            f"{path}: the splits attribute {recorded!r} does not match its split array; the "
            f"store was edited. Re-run the stage that wrote it (dvc repro) or `dvc checkout` it."
        )


_local = threading.local()


def thread_buffer(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A per-thread buffer reused across shards: a fresh 50 MB array per shard cost about
    0.7 ms per image in page faults on these machines (glibc hands blocks this size to mmap).

    The caller must be done with it before its thread asks for the next one.
    """
    buf = getattr(_local, "buffer", None)
    if buf is None or buf.shape != tuple(shape) or buf.dtype != np.dtype(dtype):
        buf = _local.buffer = np.empty(shape, dtype=dtype)
    return buf


def read_samples(
    images_path: str, start: int, stop: int, *, reuse_buffer: bool = False
) -> np.ndarray:
    """Samples [start, stop) of a prepared images array, or StoreError naming the damage.

    ``reuse_buffer``: read into this thread's :func:`thread_buffer` (valid until the thread's
    next read); measured 10-20 % faster for the stats pass, which only reduces each block.
    """
    return _read(images_path, slice(start, stop), f"{start}..{stop - 1}", reuse_buffer)


def read_selection(images_path: str, indices: Sequence[int]) -> np.ndarray:
    """Samples at ``indices`` (ascending) of a prepared images array, or StoreError."""
    selection = np.asarray(indices, dtype=np.int64)
    return _read(images_path, selection, f"{indices[0]}..{indices[-1]}")


def _read(
    images_path: str, selection: slice | np.ndarray, shown: str, reuse: bool = False
) -> np.ndarray:
    try:
        array = zarr.open_array(images_path, mode="r")
        direct = _direct_read(array, images_path, selection, reuse)
        if direct is not None:
            return direct
        if isinstance(selection, slice) and reuse:
            n = len(range(*selection.indices(array.shape[0])))
            buf = thread_buffer((n, *array.shape[1:]), array.dtype)
            out = default_buffer_prototype().nd_buffer.from_numpy_array(buf)
            array.get_basic_selection(selection, out=out)
            return buf
        if isinstance(selection, slice):
            return np.asarray(array[selection])
        return np.asarray(array.get_orthogonal_selection(selection))
    except Exception as exc:  # zarr and the codecs raise many types for damaged shards
        raise StoreError(
            f"cannot read samples {shown} of {images_path}: {exc}. The store is damaged or "
            f"incomplete; re-run `pipeline ingest` (or `dvc checkout`)."
        ) from exc


def _direct_read(
    array: zarr.Array, images_path: str, selection: slice | np.ndarray, reuse: bool
) -> np.ndarray | None:
    """The samples read at their shard offsets (local plain layout), else None for zarr.

    Measured by bench/bench_stats_read.py: zarr's whole-shard read copies each chunk twice
    and held the stats pass at about 0.45x a plain 2-thread read; this one reads in place.
    """
    reader = open_shard_reader(array, parse_location(images_path).local)
    if reader is None:
        return None
    if isinstance(selection, slice):
        rows = np.arange(*selection.indices(array.shape[0]), dtype=np.int64)
    else:
        rows = selection
    shape = (len(rows), *array.shape[1:])
    out = thread_buffer(shape, array.dtype) if reuse else np.empty(shape, dtype=array.dtype)
    try:
        return reader.read_into(rows, out)
    finally:
        reader.close()


def write_small_array(
    group: zarr.Group, name: str, data: np.ndarray, dims: tuple[str, ...]
) -> None:
    """Store ``data`` (a few MB at most) as one uncompressed chunk with dimension names."""
    arr = group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=data.shape,
        dimension_names=dims,
        compressors=None,
    )
    arr[...] = data


def read_array(group: zarr.Group, name: str) -> np.ndarray:
    """The whole array ``name`` of ``group`` as numpy, or StoreError when it is missing."""
    try:
        node = group[name]
    except KeyError as exc:
        raise StoreError(f"{group.store_path}/{name} is missing.") from exc
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{group.store_path}/{name} is not an array.")
    return np.asarray(node[...])


SPLIT_RANGE = (int, int)
PREPARED_ATTRS = {
    "schema": str,
    "classes": [str],
    "splits": {"train": SPLIT_RANGE, "val": SPLIT_RANGE, "test": SPLIT_RANGE},
    "fingerprint": HEX64,
    "manifest_sha256": HEX64,
    "pixel_max": OneOf((255, 65535)),
    "channels": int,
    "decode": dict,
    "decode_config": HEX64,
    "versions": dict,
}
# Bounds on what a store from elsewhere may claim, so absurd shapes are one clear error
# instead of a MemoryError: our params allow at most these (pipeline/params.py).
MAX_SIDE = 65535
MAX_IMAGES = 2**31 - 1


@dataclass(frozen=True)
class PreparedStore:
    """An opened prepared store: the image array, its per-sample metadata and pixel digests."""

    path: Location
    images: zarr.Array
    attrs: Mapping[str, Any]
    digests: np.ndarray  # (N,) uint32: CRC-32C of each stored image (pipeline.core.digests)

    @property
    def splits(self) -> dict[str, tuple[int, int]]:
        """Contiguous sample range ``[start, stop)`` of each split."""
        return {k: (int(v[0]), int(v[1])) for k, v in self.attrs["splits"].items()}

    @property
    def classes(self) -> list[str]:
        """Class names; ``label`` values index into this list (-1: no class folder)."""
        return list(self.attrs["classes"])

    @property
    def fingerprint(self) -> str:
        """sha256 identifying the prepared data (manifest, decode params, pixel digests)."""
        return str(self.attrs["fingerprint"])

    def labels(self) -> np.ndarray:
        """Label index per sample."""
        return np.asarray(zarr.open_array(str(self.path / "label"), mode="r")[:])

    def paths(self) -> list[str]:
        """Source path (relative to the source folder) per sample."""
        return [str(p) for p in np.asarray(zarr.open_array(str(self.path / "path"), mode="r")[:])]


def check_image_shape(path: object, images: zarr.Array) -> None:
    """Raise StoreError for an images array no stage of ours would write."""
    n, h, w, c = images.shape
    if not (0 < n <= MAX_IMAGES and 0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE and c in (1, 3)):
        raise StoreError(
            f"{path}/images has shape {images.shape}: not a (sample, y, x, channel) image array "
            f"with 1 or 3 channels and sides of at most {MAX_SIDE}. Re-run the stage that wrote it."
        )
    chunk = math.prod(images.chunks) * images.dtype.itemsize
    if chunk > 2**31:
        raise StoreError(f"{path}/images has chunks of {chunk} bytes; at most 2 GiB are read.")


def open_prepared(path: str | os.PathLike[str] | Location) -> PreparedStore:
    """Open ``path`` (a local path or URL) as a prepared store, or raise StoreError."""
    path = parse_location(path)
    if not (path / "zarr.json").is_file():
        raise StoreError(f"{path} is not a Zarr store (no zarr.json). Run `pipeline ingest` first.")
    fix = "Re-run `pipeline ingest` (dvc repro), or `dvc checkout` it."
    try:
        group = zarr.open_group(path.zarr(), mode="r")
        attrs = dict(group.attrs)
        if attrs.get("schema") != PREPARED_SCHEMA:
            raise StoreError(
                f"{path} is not a prepared store of this version (schema "
                f"{str(attrs.get('schema'))[:40]!r}, expected {PREPARED_SCHEMA!r}). Run "
                f"`pipeline ingest` to make one."
            )
        check_document(attrs, PREPARED_ATTRS, path, fix)
        images = group["images"]
        if not isinstance(images, zarr.Array) or images.ndim != 4:
            raise StoreError(f"{path}/images is not a 4-D (sample, y, x, channel) array. {fix}")
        check_image_shape(path, images)
        digests = read_array(group, "crc32c")
    except StoreError:
        raise
    except (KeyError, TypeError, AttributeError, RecursionError, MemoryError) as exc:
        kind = type(exc).__name__
        raise StoreError(f"{path} is not a readable prepared store ({kind}). {fix}") from exc
    except (zarr.errors.BaseZarrError, json.JSONDecodeError, ValueError) as exc:
        raise StoreError(f"{path} is not a readable prepared store: {exc}") from exc
    pixel_max = {"uint8": 255, "uint16": 65535}.get(str(images.dtype))
    if pixel_max is None or attrs.get("pixel_max") != pixel_max:
        raise StoreError(
            f"{path}/images holds {images.dtype} with pixel_max {attrs.get('pixel_max')!r}; a "
            f"prepared store holds uint8 (255) or uint16 (65535). Re-run `pipeline ingest`."
        )
    if digests.dtype != np.uint32 or digests.shape != images.shape[:1]:
        raise StoreError(f"{path}/crc32c does not hold one uint32 digest per image. {fix}")
    check_complete(images, path / "images")
    check_splits(path, group, attrs.get("splits"))
    if (
        prepared_fingerprint(str(attrs["manifest_sha256"]), attrs["decode"], digests)
        != attrs["fingerprint"]
    ):
        raise StoreError(
            f"{path}: its fingerprint does not match its manifest digest, decode params and "
            f"pixel digests; the store was edited. {fix}"
        )
    manifest = path.parent / "manifest.jsonl"
    if manifest.is_file() and sha256_file(manifest) != attrs["manifest_sha256"]:
        # beside the store in a prepared folder: it must be the manifest the store names
        raise StoreError(
            f"{path}: {manifest} is not the manifest the store was written with. {fix}"
        )
    return PreparedStore(path=path, images=images, attrs=attrs, digests=digests)
