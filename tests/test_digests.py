"""Per-image CRC-32C digests, against a plain-Python CRC-32C (Castagnoli) as the oracle."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.digests import check_digests, image_digest, image_digests
from pipeline.errors import StoreError


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
