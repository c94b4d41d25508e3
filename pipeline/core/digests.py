"""Per-image CRC-32C digests of stored pixels: what ties every later use to the bytes ingest wrote.

Ingest records the digest of each stored image (its C-order bytes, as the store and the cache
packs hold them) in the prepared store's ``crc32c`` array, and the store's fingerprint covers
those digests. Every reader of prepared pixels (stats, normalize, verify, the cache packs)
checks what it read against them, and a fitted result kept in the cache names the digests of
the pixels it was computed from, so it can only be reused for exactly those pixels.

CRC-32C because it is cheap enough to check on every read: with the hardware instruction
google-crc32c (already a dependency of zarr, for its shard index) ran at 7.7 GB/s per 224x224
image on these machines, zlib's CRC-32 at 2.1 GB/s and sha256 at 1.6 GB/s, against about 1 GB/s
for the stats kernel on one core. The digests are computed with the ``crc32c`` package: the
same CRC-32C, at 22 GB/s per 256x256x3 image here (2.3 ms per 256-image block, against 6.9 ms
with google-crc32c), and it releases the GIL, where google-crc32c holds it (two stats threads
checking blocks ran no faster than one: bench/bench_stats_read.py, bench/RESULTS.md "Stats read
speed"). It detects damage and in-place edits, not a forger who can
write the store: whoever can write a store can replace it whole anyway (README, "Trust and
safety").
"""

from __future__ import annotations

import hashlib

import crc32c
import numpy as np

from pipeline.core.errors import StoreError

__all__ = ["check_digests", "digests_sha256", "image_digest", "image_digests"]


def image_digest(image: np.ndarray) -> int:
    """CRC-32C of one image's bytes in C order."""
    data = np.ascontiguousarray(image).reshape(-1).view(np.uint8)
    return int(crc32c.crc32c(data.data))


def image_digests(block: np.ndarray) -> np.ndarray:
    """CRC-32C of each image of an (n, ...) block, as uint32."""
    return np.fromiter((image_digest(image) for image in block), dtype=np.uint32, count=len(block))


def digests_sha256(digests: np.ndarray) -> str:
    """sha256 of a digest array's little-endian bytes: what the fingerprint covers."""
    return hashlib.sha256(np.asarray(digests, dtype="<u4").tobytes()).hexdigest()


def check_digests(block: np.ndarray, expected: np.ndarray, start: int, where: object) -> None:
    """Raise StoreError unless samples [start, start + len(block)) match ``expected``."""
    got = image_digests(block)
    bad = np.flatnonzero(got != np.asarray(expected, dtype=np.uint32))
    if bad.size:
        shown = ", ".join(str(start + int(i)) for i in bad[:5])
        more = f" and {bad.size - 5} more" if bad.size > 5 else ""
        raise StoreError(
            f"{where}: the pixels of sample(s) {shown}{more} do not match the digests ingest "
            f"recorded: the store was changed after it was written. Restore it with "
            f"`dvc checkout`, or re-run `pipeline ingest` (dvc repro -f -s ingest)."
        )
