"""Per-image CRC-32C digests, against a plain-Python CRC-32C (Castagnoli) as the oracle."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pipeline.core.digests import check_digests, image_digest, image_digests
from pipeline.core.errors import StoreError


def crc32c_reference(data: bytes) -> int:
    """Bit-by-bit CRC-32C (reflected polynomial 0x82F63B78), as RFC 3720 defines it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_reference_matches_the_published_check_value() -> None:
    assert crc32c_reference(b"123456789") == 0xE3069283  # RFC 3720, B.4


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_digest_is_crc32c_of_the_c_order_bytes(dtype: str) -> None:
    block = np.random.default_rng(1).integers(0, 255, (3, 5, 4, 3)).astype(dtype)
    view = block[:, ::-1]  # not contiguous: digested as its C-order copy
    assert image_digest(view[1]) == crc32c_reference(np.ascontiguousarray(view[1]).tobytes())
    got = image_digests(block)
    assert got.dtype == np.uint32
    assert got.tolist() == [crc32c_reference(b.tobytes()) for b in block]


def test_check_names_the_changed_samples() -> None:
    block = np.zeros((4, 2, 2, 1), dtype=np.uint8)
    digests = image_digests(block)
    check_digests(block, digests, 10, "store")
    block[2, 0, 0, 0] = 1
    with pytest.raises(StoreError, match=r"store: the pixels of sample\(s\) 12 do not match"):
        check_digests(block, digests, 10, "store")


@pytest.mark.parametrize(
    ("dtype", "fill"), [("uint8", 0), ("uint8", 255), ("uint16", 0), ("uint16", 65535)]
)
def test_digest_of_extreme_images(dtype: str, fill: int) -> None:
    """All-0 and all-max images, one sample, odd sizes: the C-order bytes' CRC-32C."""
    block = np.full((1, 7, 5, 3), fill, dtype=dtype)
    block.flags.writeable = False  # read-only arrays (memory maps, shared buffers) are digested
    assert image_digests(block).tolist() == [crc32c_reference(block[0].tobytes())]


def test_digests_of_large_images_from_two_threads() -> None:
    """Images past the sizes where the hardware CRC runs interleaved streams (and releases the
    GIL), digested from two threads at once, match google-crc32c, an independent CRC-32C."""
    import google_crc32c

    rng = np.random.default_rng(3)
    blocks = [rng.integers(0, 256, (4, 129, 131, 3), dtype=np.uint8) for _ in range(4)]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(image_digests, blocks))
    for block, digests in zip(blocks, got, strict=True):
        assert digests.tolist() == [google_crc32c.value(b.tobytes()) for b in block]
