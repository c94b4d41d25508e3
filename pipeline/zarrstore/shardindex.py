"""The index at the end of a Zarr v3 shard file, read and checked as untrusted input.

A shard with ``index_location: end`` ends with one (offset, nbytes) pair of little-endian
uint64 per inner chunk (2**64-1 twice for a chunk that is not stored) and the CRC-32C of those
bytes (Zarr v3 sharding codec spec). Reading only that tail lets a stage check every shard of
a store for truncation or damage with one small read per shard, before it trusts a cached
result instead of reading the pixels.
"""

from __future__ import annotations

import os
from pathlib import Path

import google_crc32c
import numpy as np

from pipeline.core.errors import StoreError

__all__ = ["EMPTY", "parse_shard_index", "read_shard_index"]

EMPTY = 2**64 - 1  # index entry of a chunk that is not stored


def parse_shard_index(tail: bytes, size: int, chunks: int, where: object) -> np.ndarray:
    """The (chunks, 2) uint64 index from the last ``chunks * 16 + 4`` bytes of a shard file of
    ``size`` bytes, or StoreError naming ``where``: the CRC-32C must match and every stored chunk
    lie inside the file before the index."""
    index_bytes = chunks * 16
    if size < index_bytes + 4 or len(tail) != index_bytes + 4:
        raise StoreError(f"{where} is truncated: {size} bytes, less than its shard index.")
    raw, checksum = tail[:index_bytes], tail[index_bytes:]
    if google_crc32c.value(raw) != int.from_bytes(checksum, "little"):
        raise StoreError(
            f"{where} is damaged or truncated: its shard index fails its CRC-32C check."
        )
    index = np.frombuffer(raw, dtype="<u8").reshape(chunks, 2)
    stored = ~((index[:, 0] == EMPTY) & (index[:, 1] == EMPTY))
    end = index[stored, 0].astype(object) + index[stored, 1].astype(object)
    if stored.any() and max(end) > size - index_bytes - 4:
        raise StoreError(f"{where} is truncated: its index names bytes past the end of the file.")
    return index


def read_shard_index(path: Path, chunks: int) -> np.ndarray:
    """The (chunks, 2) uint64 index of the shard file ``path``, or StoreError naming the damage."""
    index_bytes = chunks * 16 + 4
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - index_bytes))
            tail = f.read(index_bytes)
    except OSError as exc:
        raise StoreError(f"cannot read the shard {path}: {exc.strerror or exc}") from exc
    return parse_shard_index(tail, size, chunks, path)
