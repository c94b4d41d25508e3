"""Files with more than 8 bits per colour channel, which Pillow 13 reduces to 8 bits.

Pillow 13 opens 16-bit RGB/RGBA PNG (colour types 2 and 6) and TIFF (BitsPerSample 16,16,16[,16])
as mode "RGB"/"RGBA" and keeps only the high byte of every sample (checked: 33375 reads as 130).
Per format:

- TIFF is decoded again with tifffile (maintained with scikit-image, a dependency already), which
  returns the stored uint16 samples exactly. Its version is part of the decode configuration.
- PNG is rejected: no installed decoder keeps 16 bits (imageio reads PNG through Pillow), and a
  PNG decoder written here would be new code in the one place bytes become pixels.

The pixel work is numpy in integers: alpha compositing and the gray conversion are correctly
rounded for 16-bit values. Resizing is done per channel as Pillow "I" images (see images.py).
"""

from __future__ import annotations

import io

import numpy as np
import tifffile
from PIL import Image

__all__ = ["flatten_alpha16", "read_tiff16", "source_bits", "to_gray16"]

PNG_IHDR = slice(12, 16)
# Bits per sample that a Pillow mode keeps, for formats with no header to read it from.
MODE_BITS = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}


def source_bits(im: Image.Image, data: bytes) -> int:
    """Bits per sample of the file itself (not of Pillow's decoded mode)."""
    if im.format == "PNG" and data[PNG_IHDR] == b"IHDR":
        depth, colour_type = data[24], data[25]
        return 8 if colour_type == 3 else depth  # palette: the index depth is not a sample depth
    if im.format == "TIFF":
        bits = getattr(im, "tag_v2", {}).get(258)  # BitsPerSample
        if isinstance(bits, tuple) and bits:
            return int(max(bits))
        if isinstance(bits, int):
            return bits
    return MODE_BITS.get(im.mode, 8)


def read_tiff16(data: bytes) -> np.ndarray:
    """First page of a 16-bit RGB/RGBA TIFF as (y, x, 3 or 4) uint16, exactly as stored.

    Raises ValueError with the reason for layouts this does not read exactly.
    """
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages.first
        extra = tuple(page.extrasamples or ())
        a = page.asarray()
        axes = page.axes
    if a.dtype != np.uint16:
        raise ValueError(f"16-bit colour TIFF decoded as {a.dtype}, not uint16")
    if axes.startswith("S"):  # planar configuration 2: one plane per channel
        a = np.moveaxis(a, 0, -1)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"16-bit colour TIFF with samples shaped {a.shape} ({axes})")
    if a.shape[2] == 4 and extra and extra[0] == 1:
        raise ValueError("16-bit TIFF with premultiplied (associated) alpha")
    return np.ascontiguousarray(a)


def flatten_alpha16(a: np.ndarray, alpha: str, background: tuple[int, int, int]) -> np.ndarray:
    """(y, x, 4) uint16 -> (y, x, 3): alpha dropped, or composited over ``background`` (8-bit).

    out = round((c * A + b * 257 * (65535 - A)) / 65535), in integers.
    """
    rgb = a[..., :3].astype(np.int64)
    if alpha == "drop":
        return rgb.astype(np.uint16)
    al = a[..., 3:4].astype(np.int64)
    bg = np.asarray(background, dtype=np.int64) * 257
    return ((rgb * al + bg * (65535 - al) + 32767) // 65535).astype(np.uint16)


def to_gray16(a: np.ndarray) -> np.ndarray:
    """(y, x, 3) uint16 -> (y, x, 1) with Pillow's "L" weights (ITU-R 601-2), correctly rounded."""
    r, g, b = (a[..., i].astype(np.int64) for i in range(3))
    return ((r * 299 + g * 587 + b * 114 + 500) // 1000).astype(np.uint16)[..., None]
