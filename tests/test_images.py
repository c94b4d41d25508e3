"""decode_image, list_images and split_of, checked pixel by pixel against Pillow's own API.

Every image is made by Pillow in memory; the expected pixels are computed by an independent
chain of Pillow calls on the same bytes (the oracle), never by the code under test.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import uuid
import zlib
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps, features

from pipeline.core.errors import StoreError
from pipeline.core.location import parse_location
from pipeline.ingest.images import (
    Decoded,
    DecodeError,
    decode_image,
    list_images,
    list_remote_images,
    name_conflicts,
    nfc,
    output_channels,
    outside_source,
    split_of,
)
from pipeline.params import IngestParams, parse_params

Oracle = Callable[[Image.Image], Image.Image]
HAS_WEBP = features.check("webp")
needs_webp = pytest.mark.skipif(not HAS_WEBP, reason="Pillow built without WebP support")


# --- helpers ---------------------------------------------------------------------------------


def ingest(**overrides: Any) -> IngestParams:
    """IngestParams through the public parser; native size unless ``image_size`` is given."""
    raw = {"image_size": None, **overrides}
    return parse_params({"ingest": raw}).ingest


def encode(im: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def pillow_open(data: bytes) -> Image.Image:
    """Pillow's own decode of ``data``, fully loaded (the oracle's starting point)."""
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def as_hwc(im: Image.Image) -> np.ndarray:
    a = np.asarray(im)
    return a.reshape(a.shape[0], a.shape[1], -1)


def composite(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba)


def assert_pixels(decoded: Decoded, expected: np.ndarray) -> None:
    assert decoded.pixels.dtype == expected.dtype
    assert decoded.pixels.shape == expected.shape
    np.testing.assert_array_equal(decoded.pixels, expected)


def gradient_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth gradient plus noise, so crops, pads and filters all change pixel values."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    r = x * 255 // max(width - 1, 1)
    g = y * 255 // max(height - 1, 1)
    b = (x + y) * 255 // max(width + height - 2, 1)
    a = np.stack([r, g, b], axis=-1) + rng.integers(-20, 21, (height, width, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def alpha_ramp(width: int, height: int) -> Image.Image:
    """Alpha covering 0..255, including fully transparent and fully opaque pixels."""
    a = (np.arange(width * height) * 255 // (width * height - 1)).astype(np.uint8)
    return Image.fromarray(a.reshape(height, width))


def gray(width: int, height: int, seed: int = 1) -> Image.Image:
    return gradient_rgb(width, height, seed).convert("L")


RGB_SRC = gradient_rgb(37, 23)
RGB_PNG = encode(RGB_SRC, "PNG")
GRAY_PNG = encode(gray(37, 23), "PNG")
TALL_PNG = encode(gradient_rgb(11, 29, seed=2), "PNG")


# --- resize policies -------------------------------------------------------------------------

BILINEAR = Image.Resampling.BILINEAR


@pytest.mark.parametrize(
    ("data", "params", "channels", "oracle"),
    [
        pytest.param(
            RGB_PNG,
            {"image_size": [16, 16]},
            3,
            lambda im: ImageOps.fit(im.convert("RGB"), (16, 16), method=BILINEAR),
            id="crop-default-bilinear-square",
        ),
        pytest.param(
            RGB_PNG,
            {"image_size": [12, 20], "resample": "lanczos"},
            3,
            lambda im: ImageOps.fit(im.convert("RGB"), (20, 12), method=Image.Resampling.LANCZOS),
            id="crop-lanczos-wide",
        ),
        pytest.param(
            TALL_PNG,
            {"image_size": [9, 9], "resample": "bicubic"},
            3,
            lambda im: ImageOps.fit(im.convert("RGB"), (9, 9), method=Image.Resampling.BICUBIC),
            id="crop-bicubic-tall-source",
        ),
        pytest.param(
            RGB_PNG,
            {"image_size": [30, 10], "resize": "stretch", "resample": "bicubic"},
            3,
            lambda im: im.convert("RGB").resize((10, 30), Image.Resampling.BICUBIC),
            id="stretch-bicubic",
        ),
        pytest.param(
            RGB_PNG,
            {"image_size": [50, 60], "resize": "stretch", "resample": "nearest"},
            3,
            lambda im: im.convert("RGB").resize((60, 50), Image.Resampling.NEAREST),
            id="stretch-nearest-upscale",
        ),
        pytest.param(
            RGB_PNG,
            {"image_size": [32, 32], "resize": "pad", "pad_value": [10, 20, 30]},
            3,
            lambda im: ImageOps.pad(
                im.convert("RGB"), (32, 32), method=BILINEAR, color=(10, 20, 30)
            ),
            id="pad-bilinear-rgb-colour",
        ),
        pytest.param(
            TALL_PNG,
            {
                "image_size": [20, 40],
                "resize": "pad",
                "pad_value": [200, 5, 90],
                "resample": "hamming",
            },
            3,
            lambda im: ImageOps.pad(
                im.convert("RGB"), (40, 20), method=Image.Resampling.HAMMING, color=(200, 5, 90)
            ),
            id="pad-hamming-tall-into-wide",
        ),
        pytest.param(
            GRAY_PNG,
            {
                "image_size": [30, 30],
                "resize": "pad",
                "pad_value": 200,
                "color": "gray",
                "resample": "box",
            },
            1,
            lambda im: ImageOps.pad(
                im.convert("L"), (30, 30), method=Image.Resampling.BOX, color=200
            ),
            id="pad-box-gray",
        ),
        pytest.param(
            RGB_PNG,
            {"image_size": None},
            3,
            lambda im: im.convert("RGB"),
            id="size-none-keeps-native",
        ),
        pytest.param(
            RGB_PNG,
            {"image_size": [23, 37]},
            3,
            lambda im: im.convert("RGB"),
            id="size-equal-to-native-is-identity",
        ),
    ],
)
def test_resize_policy_matches_pillow(
    data: bytes, params: dict[str, Any], channels: int, oracle: Oracle
) -> None:
    decoded = decode_image(data, ingest(**params), channels=channels)
    expected = as_hwc(oracle(pillow_open(data)))
    assert_pixels(decoded, expected)
    if params["image_size"] is not None:
        assert decoded.pixels.shape[:2] == tuple(params["image_size"])
    # width/height record the source, not the output.
    assert (decoded.width, decoded.height) == pillow_open(data).size


def test_pad_rgb_border_is_pad_value_and_content_is_centred() -> None:
    """Independent of ImageOps.pad: a 37x23 image padded to 37x37 gets 7 rows top and bottom."""
    decoded = decode_image(
        RGB_PNG, ingest(image_size=[37, 37], resize="pad", pad_value=[1, 2, 3]), channels=3
    )
    px = decoded.pixels
    assert (px[:7] == [1, 2, 3]).all()
    assert (px[30:] == [1, 2, 3]).all()
    np.testing.assert_array_equal(px[7:30], as_hwc(RGB_SRC))


# --- formats ---------------------------------------------------------------------------------


def _animated_gif() -> bytes:
    frames = [gradient_rgb(20, 14, seed=s).quantize(64) for s in range(3)]
    frames[1].paste(7, (0, 0, 20, 14))  # make later frames clearly different from the first
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)


FORMAT_CASES = [
    pytest.param("JPEG", encode(RGB_SRC, "JPEG", quality=90), 1, id="jpeg"),
    pytest.param("PNG", RGB_PNG, 1, id="png"),
    pytest.param("TIFF", encode(RGB_SRC, "TIFF"), 1, id="tiff-raw"),
    pytest.param("TIFF", encode(RGB_SRC, "TIFF", compression="tiff_lzw"), 1, id="tiff-lzw"),
    pytest.param(
        "WEBP",
        encode(RGB_SRC, "WEBP", quality=80) if HAS_WEBP else b"",
        1,
        id="webp-lossy",
        marks=needs_webp,
    ),
    pytest.param(
        "WEBP",
        encode(RGB_SRC, "WEBP", lossless=True) if HAS_WEBP else b"",
        1,
        id="webp-lossless",
        marks=needs_webp,
    ),
    pytest.param("BMP", encode(RGB_SRC, "BMP"), 1, id="bmp"),
    pytest.param("GIF", encode(RGB_SRC.quantize(32), "GIF"), 1, id="gif-single"),
    pytest.param("GIF", _animated_gif(), 3, id="gif-animated-first-frame"),
]


@pytest.mark.parametrize(("fmt", "data", "frames"), FORMAT_CASES)
def test_format_decodes_like_pillow(fmt: str, data: bytes, frames: int) -> None:
    decoded = decode_image(data, ingest(), channels=3, name=f"x.{fmt.lower()}")
    oracle = pillow_open(data)  # a fresh open is positioned on the first frame
    assert_pixels(decoded, as_hwc(oracle.convert("RGB")))
    assert decoded.format == fmt == oracle.format
    assert decoded.mode == oracle.mode
    assert (decoded.width, decoded.height) == oracle.size
    assert decoded.frames == frames == getattr(oracle, "n_frames", 1)
    assert decoded.orientation == 1
    assert decoded.sha256 == hashlib.sha256(data).hexdigest()


def test_animated_gif_first_frame_differs_from_later_frames() -> None:
    """Guards the GIF case above: taking any other frame would fail it."""
    data = _animated_gif()
    im = Image.open(io.BytesIO(data))
    first = as_hwc(im.convert("RGB"))
    im.seek(1)
    assert not np.array_equal(first, as_hwc(im.convert("RGB")))
    np.testing.assert_array_equal(decode_image(data, ingest(), channels=3).pixels, first)


@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [
        pytest.param("PNG", {}, id="png"),
        pytest.param("TIFF", {}, id="tiff"),
        pytest.param("BMP", {}, id="bmp"),
        pytest.param("WEBP", {"lossless": True}, id="webp-lossless", marks=needs_webp),
    ],
)
def test_lossless_formats_give_back_the_source_pixels(fmt: str, kwargs: dict[str, Any]) -> None:
    decoded = decode_image(encode(RGB_SRC, fmt, **kwargs), ingest(), channels=3)
    assert_pixels(decoded, as_hwc(RGB_SRC))


# --- colour modes ----------------------------------------------------------------------------

BG = (10, 200, 30)


def _rgba() -> Image.Image:
    im = gradient_rgb(17, 13, seed=3).convert("RGBA")
    im.putalpha(alpha_ramp(17, 13))
    return im


def _la() -> Image.Image:
    alpha = alpha_ramp(17, 13).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return Image.merge("LA", [gray(17, 13, seed=4), alpha])


def _palette(transparency: int | bytes) -> bytes:
    im = gradient_rgb(17, 13, seed=5).quantize(8)
    return encode(im, "PNG", transparency=transparency)


def _one_bit() -> Image.Image:
    rng = np.random.default_rng(6)
    return Image.fromarray(rng.integers(0, 2, (13, 17)).astype(bool))


def _cmyk_jpeg() -> bytes:
    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, (13, 17, 4), dtype=np.uint8)
    return encode(Image.frombytes("CMYK", (17, 13), a.tobytes()), "JPEG", quality=95)


RGBA_PNG = encode(_rgba(), "PNG")
LA_PNG = encode(_la(), "PNG")
P_INDEX_PNG = _palette(2)
P_ALPHA_PNG = _palette(bytes([255, 0, 128, 64, 255, 10, 200, 255]))
ONE_BIT_PNG = encode(_one_bit(), "PNG")
CMYK_JPEG = _cmyk_jpeg()


def _rgb_with_colour_key() -> bytes:
    im = gradient_rgb(17, 13, seed=8)
    im.paste((1, 2, 3), (0, 0, 8, 6))
    return encode(im, "PNG", transparency=(1, 2, 3))


MODE_CASES = [
    pytest.param(RGB_PNG, "RGB", {}, 3, lambda im: im.convert("RGB"), id="rgb-to-rgb"),
    pytest.param(GRAY_PNG, "L", {}, 3, lambda im: im.convert("RGB"), id="L-to-rgb"),
    pytest.param(
        GRAY_PNG,
        "L",
        {"color": "gray"},
        1,
        lambda im: im,
        id="L-to-gray",
    ),
    pytest.param(
        RGB_PNG,
        "RGB",
        {"color": "gray"},
        1,
        lambda im: im.convert("L"),
        id="rgb-to-gray",
    ),
    pytest.param(
        RGBA_PNG,
        "RGBA",
        {"alpha": "drop"},
        3,
        lambda im: im.convert("RGB"),
        id="rgba-drop",
    ),
    pytest.param(
        RGBA_PNG,
        "RGBA",
        {"alpha": "composite", "background": list(BG)},
        3,
        lambda im: composite(im, BG).convert("RGB"),
        id="rgba-composite",
    ),
    pytest.param(
        RGBA_PNG,
        "RGBA",
        {},
        3,
        lambda im: composite(im, (255, 255, 255)).convert("RGB"),
        id="rgba-composite-default-white",
    ),
    pytest.param(
        RGBA_PNG,
        "RGBA",
        {"color": "gray", "background": list(BG)},
        1,
        lambda im: composite(im, BG).convert("L"),
        id="rgba-composite-to-gray",
    ),
    pytest.param(
        LA_PNG,
        "LA",
        {"background": list(BG)},
        3,
        lambda im: composite(im, BG).convert("RGB"),
        id="LA-composite",
    ),
    pytest.param(
        LA_PNG,
        "LA",
        {"alpha": "drop"},
        3,
        lambda im: im.convert("RGB"),
        id="LA-drop",
    ),
    pytest.param(
        LA_PNG,
        "LA",
        {"alpha": "drop", "color": "gray"},
        1,
        lambda im: im.convert("L"),
        id="LA-drop-to-gray",
    ),
    pytest.param(
        P_INDEX_PNG,
        "P",
        {"background": list(BG)},
        3,
        lambda im: composite(im, BG).convert("RGB"),
        id="P-transparent-index-composite",
    ),
    pytest.param(
        P_ALPHA_PNG,
        "P",
        {"background": list(BG)},
        3,
        lambda im: composite(im, BG).convert("RGB"),
        id="P-alpha-table-composite",
    ),
    pytest.param(
        P_ALPHA_PNG,
        "P",
        {"alpha": "drop"},
        3,
        lambda im: im.convert("RGBA").convert("RGB"),
        id="P-alpha-table-drop",
    ),
    pytest.param(
        P_INDEX_PNG,
        "P",
        {"color": "gray", "background": list(BG)},
        1,
        lambda im: composite(im, BG).convert("L"),
        id="P-transparent-to-gray",
    ),
    pytest.param(
        encode(RGB_SRC.quantize(16), "PNG"),
        "P",
        {},
        3,
        lambda im: im.convert("RGB"),
        id="P-opaque-to-rgb",
    ),
    pytest.param(ONE_BIT_PNG, "1", {}, 3, lambda im: im.convert("RGB"), id="1bit-to-rgb"),
    pytest.param(
        ONE_BIT_PNG,
        "1",
        {"color": "gray"},
        1,
        lambda im: im.convert("L"),
        id="1bit-to-gray",
    ),
    pytest.param(CMYK_JPEG, "CMYK", {}, 3, lambda im: im.convert("RGB"), id="cmyk-jpeg-to-rgb"),
    pytest.param(
        CMYK_JPEG,
        "CMYK",
        {"color": "gray"},
        1,
        lambda im: im.convert("RGB").convert("L"),
        id="cmyk-jpeg-to-gray",
    ),
    pytest.param(
        GRAY_PNG,
        "L",
        {"color": "keep"},
        1,
        lambda im: im,
        id="keep-L-stays-one-channel",
    ),
    pytest.param(
        RGB_PNG,
        "RGB",
        {"color": "keep"},
        3,
        lambda im: im.convert("RGB"),
        id="keep-rgb-stays-three-channels",
    ),
    pytest.param(
        _rgb_with_colour_key(),
        "RGB",
        {"background": list(BG)},
        3,
        lambda im: composite(im, BG).convert("RGB"),
        id="rgb-png-trns-colour-key-composite",
    ),
]


@pytest.mark.parametrize(("data", "mode", "params", "channels", "oracle"), MODE_CASES)
def test_mode_conversion_matches_pillow(
    data: bytes, mode: str, params: dict[str, Any], channels: int, oracle: Oracle
) -> None:
    source = pillow_open(data)
    assert source.mode == mode  # the fixture really is in the mode the case is about
    decoded = decode_image(data, ingest(**params), channels=channels)
    assert decoded.mode == mode
    assert_pixels(decoded, as_hwc(oracle(source)))
    assert decoded.pixels.shape[2] == channels


def test_gray_to_rgb_has_three_equal_channels() -> None:
    px = decode_image(GRAY_PNG, ingest(), channels=3).pixels
    np.testing.assert_array_equal(px[..., 0], px[..., 1])
    np.testing.assert_array_equal(px[..., 0], px[..., 2])
    np.testing.assert_array_equal(px[..., 0], np.asarray(pillow_open(GRAY_PNG)))


def test_alpha_cases_are_not_trivial() -> None:
    """The composite and drop oracles differ, so the alpha policy really is exercised."""
    for data in (RGBA_PNG, LA_PNG, P_INDEX_PNG, P_ALPHA_PNG):
        drop = decode_image(data, ingest(alpha="drop"), channels=3).pixels
        comp = decode_image(data, ingest(background=list(BG)), channels=3).pixels
        assert not np.array_equal(drop, comp)


@pytest.mark.parametrize(
    ("color", "mode", "channels"),
    [
        pytest.param("rgb", "L", 3, id="rgb-L"),
        pytest.param("gray", "RGB", 1, id="gray-RGB"),
        pytest.param("keep", "L", 1, id="keep-L"),
        pytest.param("keep", "LA", 1, id="keep-LA"),
        pytest.param("keep", "1", 1, id="keep-1"),
        pytest.param("keep", "I;16", 1, id="keep-I16"),
        pytest.param("keep", "RGB", 3, id="keep-RGB"),
        pytest.param("keep", "RGBA", 3, id="keep-RGBA"),
        pytest.param("keep", "P", 3, id="keep-P"),
        pytest.param("keep", "CMYK", 3, id="keep-CMYK"),
    ],
)
def test_output_channels(color: str, mode: str, channels: int) -> None:
    assert output_channels(color, mode) == channels


# --- bit depth -------------------------------------------------------------------------------

# Values spread over the whole 16-bit range, including both ends and the 8-bit rounding edges.
_SPECIAL = [0, 1, 128, 129, 256, 257, 32767, 32768, 65278, 65279, 65534, 65535]
_VALUES16 = np.array(
    _SPECIAL + [int(v) for v in np.linspace(0, 65535, 19 * 13 - len(_SPECIAL))], dtype=np.uint16
).reshape(13, 19)
SIXTEEN_PNG = encode(Image.fromarray(_VALUES16), "PNG")


def _to8(x: int) -> int:
    return round(Fraction(x * 255, 65535))


@pytest.mark.parametrize(
    ("params", "channels", "dtype", "convert"),
    [
        pytest.param({"bit_depth": 16, "color": "gray"}, 1, np.uint16, int, id="16-to-16-gray"),
        pytest.param({"bit_depth": 16}, 3, np.uint16, int, id="16-to-16-rgb"),
        pytest.param({"bit_depth": 16, "color": "keep"}, 1, np.uint16, int, id="16-to-16-keep"),
        pytest.param({"bit_depth": 8, "color": "gray"}, 1, np.uint8, _to8, id="16-to-8-gray"),
        pytest.param({"bit_depth": 8}, 3, np.uint8, _to8, id="16-to-8-rgb"),
    ],
)
def test_sixteen_bit_gray_png(
    params: dict[str, Any], channels: int, dtype: type, convert: Callable[[int], int]
) -> None:
    source = pillow_open(SIXTEEN_PNG)
    assert source.mode == "I;16"
    stored = [[int(v) for v in row] for row in np.asarray(source)]
    assert stored == _VALUES16.tolist()  # Pillow round-trips the 16-bit values
    decoded = decode_image(SIXTEEN_PNG, ingest(**params), channels=channels)
    assert decoded.mode == "I;16"
    expected = np.array([[[convert(v)] * channels for v in row] for row in stored], dtype=dtype)
    assert_pixels(decoded, expected)


def test_sixteen_to_eight_bit_covers_every_output_level() -> None:
    """Every 16-bit value at once: round(x * 255 / 65535), exactly, for x in 0..65535."""
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    data = encode(Image.fromarray(values), "PNG", compress_level=1)
    decoded = decode_image(data, ingest(color="gray", bit_depth=8), channels=1)
    table = np.array([_to8(x) for x in range(65536)], dtype=np.uint8)
    np.testing.assert_array_equal(decoded.pixels[..., 0], table[values])


@pytest.mark.parametrize(
    ("data", "params", "channels", "oracle"),
    [
        pytest.param(GRAY_PNG, {"color": "gray"}, 1, lambda im: im, id="L-gray"),
        pytest.param(GRAY_PNG, {}, 3, lambda im: im.convert("RGB"), id="L-rgb"),
        pytest.param(RGB_PNG, {}, 3, lambda im: im.convert("RGB"), id="RGB-rgb"),
        pytest.param(
            RGBA_PNG,
            {"background": list(BG)},
            3,
            lambda im: composite(im, BG).convert("RGB"),
            id="RGBA-composite",
        ),
    ],
)
def test_eight_bit_source_with_bit_depth_16_is_times_257(
    data: bytes, params: dict[str, Any], channels: int, oracle: Oracle
) -> None:
    decoded = decode_image(data, ingest(bit_depth=16, **params), channels=channels)
    eight = as_hwc(oracle(pillow_open(data)))
    expected = np.array(
        [[[int(v) * 257 for v in px] for px in row] for row in eight], dtype=np.uint16
    )
    assert_pixels(decoded, expected)
    assert decoded.pixels.max() <= 65535


@pytest.mark.parametrize(
    ("params", "expected_of"),
    [
        pytest.param(
            {
                "image_size": [26, 38],
                "resize": "stretch",
                "resample": "nearest",
                "bit_depth": 16,
                "color": "gray",
            },
            lambda a: a[np.arange(26) * 13 // 26][:, np.arange(38) * 19 // 38],
            id="stretch-nearest-2x-exact",
        ),
        pytest.param(
            {
                "image_size": [19, 19],
                "resize": "pad",
                "pad_value": 3,
                "resample": "nearest",
                "bit_depth": 16,
                "color": "gray",
            },
            lambda a: np.pad(a, ((3, 3), (0, 0)), constant_values=3 * 257),
            id="pad-16-bit-pad-value-scaled",
        ),
    ],
)
def test_sixteen_bit_resize_keeps_exact_values(
    params: dict[str, Any], expected_of: Callable[[np.ndarray], np.ndarray]
) -> None:
    decoded = decode_image(SIXTEEN_PNG, ingest(**params), channels=1)
    expected = expected_of(_VALUES16.astype(np.uint16))
    assert_pixels(decoded, expected[..., None].astype(np.uint16))


# --- EXIF orientation ------------------------------------------------------------------------


def _oriented_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(gradient_rgb(40, 24, seed=9), "JPEG", quality=95, exif=exif)


ALL_ORIENTATIONS = [pytest.param(o, id=f"orientation-{o}") for o in range(1, 9)]


@pytest.mark.parametrize("orientation", ALL_ORIENTATIONS)
def test_exif_orientation_matches_exif_transpose(orientation: int) -> None:
    data = _oriented_jpeg(orientation)
    decoded = decode_image(data, ingest(), channels=3)
    upright = ImageOps.exif_transpose(pillow_open(data)).convert("RGB")
    assert_pixels(decoded, as_hwc(upright))
    assert decoded.orientation == orientation
    assert (decoded.width, decoded.height) == (40, 24)  # stored size, not the upright one
    rotated = orientation in (5, 6, 7, 8)
    assert decoded.pixels.shape[:2] == ((40, 24) if rotated else (24, 40))


@pytest.mark.parametrize("orientation", [pytest.param(o, id=f"orientation-{o}") for o in (3, 6, 8)])
def test_exif_orientation_is_applied_before_resize(orientation: int) -> None:
    data = _oriented_jpeg(orientation)
    decoded = decode_image(data, ingest(image_size=[12, 20]), channels=3)
    upright = ImageOps.exif_transpose(pillow_open(data)).convert("RGB")
    assert_pixels(decoded, as_hwc(ImageOps.fit(upright, (20, 12), method=BILINEAR)))


def test_exif_orientation_changes_pixels() -> None:
    """Guards the orientation table: 3, 6 and 8 really differ from the stored pixels."""
    plain = decode_image(_oriented_jpeg(1), ingest(), channels=3).pixels
    for o in (3, 6, 8):
        assert not np.array_equal(
            decode_image(_oriented_jpeg(o), ingest(), channels=3).pixels, plain
        )


# --- unusable files --------------------------------------------------------------------------


def _png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims ``width`` x ``height`` (a cheap decompression bomb)."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = 8  # after the signature: length(4) type(4) data(13) crc(4)
    body = data[ihdr + 4 : ihdr + 8 + 13]
    body[4:8] = width.to_bytes(4, "big")
    body[8:12] = height.to_bytes(4, "big")
    data[ihdr + 4 : ihdr + 8 + 13] = body
    data[ihdr + 8 + 13 : ihdr + 12 + 13] = zlib.crc32(bytes(body)).to_bytes(4, "big")
    return bytes(data)


_JPEG = encode(gradient_rgb(64, 48), "JPEG", quality=90)
_PNG = encode(gradient_rgb(64, 48), "PNG")


@pytest.mark.parametrize(
    ("data", "params", "reason"),
    [
        pytest.param(b"", {}, r"empty file \(0 bytes\)", id="zero-bytes"),
        pytest.param(_JPEG[: len(_JPEG) // 2], {}, r"truncated", id="truncated-jpeg"),
        pytest.param(_PNG[: len(_PNG) // 2], {}, r"truncated", id="truncated-png"),
        pytest.param(_PNG[:40], {}, r"cannot decode|truncated|not an image", id="png-header-only"),
        pytest.param(b"just some notes\nnot an image\n", {}, r"not an image", id="text-file"),
        pytest.param(
            b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>"
            b"<body><h1>Not Found</h1></body></html>\n",
            {},
            r"not an image",
            id="html-saved-as-png",
        ),
        pytest.param(
            encode(gradient_rgb(20, 20), "PNG"),
            {"max_pixels": 399},
            r"decompression bomb: 20x20 = 400 pixels .*ingest\.max_pixels \(399\)",
            id="bomb-over-max-pixels",
        ),
        pytest.param(
            _png_with_size(10_000, 10_000),
            {},
            r"decompression bomb.*ingest\.max_pixels",
            id="bomb-header-default-limit",
        ),
        pytest.param(
            _png_with_size(100_000, 100_000),
            {},
            r"decompression bomb",
            id="bomb-header-beyond-pillow-limit",
        ),
    ],
)
def test_unusable_file_raises_decode_error(
    data: bytes, params: dict[str, Any], reason: str
) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode_image(data, ingest(**params), channels=3, name="bad.png")


def test_decode_error_is_a_value_error() -> None:
    assert issubclass(DecodeError, ValueError)


def test_max_pixels_is_inclusive() -> None:
    data = encode(gradient_rgb(20, 20), "PNG")
    decoded = decode_image(data, ingest(max_pixels=400), channels=3)
    assert decoded.pixels.shape == (20, 20, 3)


# --- list_images -----------------------------------------------------------------------------


def _touch(root: Path, *relpaths: str) -> None:
    for rel in relpaths:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


IMAGES = [
    "a.jpg",
    "b.png",
    "C.JPG",
    "d.JpEg",
    "e.TIFF",
    "f.tif",
    "g.webp",
    "h.BMP",
    "i.gif",
    "cats/001.png",
    "cats/deep/er/002.jpeg",
    "dogs/003.PNG",
    "dogs/z.jpg",
    "dogs/10.jpg",
]
IGNORED = [
    ".hidden.png",
    "._a.jpg",
    ".DS_Store",
    "Thumbs.db",
    "desktop.ini",
    "cats/.DS_Store",
    ".hiddendir/x.png",
    "__MACOSX/a.jpg",
    "__MACOSX/cats/._001.png",
    "cats/Thumbs.db",
    "notes.txt",
    "labels.json",
    "b.png.bak",
    "README",
    "cats/001.png.txt",
    "archive.zip",
    "image.jpg.part",
    "svg.svg",
    "heic.HEIC",
]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    _touch(root, *IMAGES, *IGNORED)
    return root


def test_list_images_finds_images_sorted_and_ignores_junk(tree: Path) -> None:
    found, broken = list_images(tree)
    assert found == sorted(IMAGES)
    assert broken == []


def test_list_images_is_sorted_regardless_of_creation_order(tmp_path: Path) -> None:
    names = [f"d{i % 3}/img{i:03d}.png" for i in (7, 3, 11, 0, 5, 2, 9)]
    _touch(tmp_path, *names)
    found, _ = list_images(tmp_path)
    assert found == sorted(names)


@pytest.mark.parametrize(
    ("link", "target"),
    [
        pytest.param("cats/loop", "..", id="subdir-link-to-its-parent"),
        pytest.param("loop", ".", id="root-link-to-itself"),
        pytest.param("cats/deep/er/up", "../..", id="deep-link-to-grandparent"),
        pytest.param("cats/deep/up", "../../dogs", id="link-to-sibling-tree"),
    ],
)
def test_list_images_symlink_loop_terminates(tree: Path, link: str, target: str) -> None:
    (tree / link).symlink_to(target, target_is_directory=True)
    found, broken = list_images(tree)
    assert broken == []
    # Every real folder is listed once; a symlinked folder seen before is not listed again.
    assert len(found) == len(set(found))
    real = {os.path.realpath(tree / f) for f in found}
    assert real == {os.path.realpath(tree / f) for f in IMAGES}


def test_list_images_follows_symlinked_folder_outside_root(tmp_path: Path) -> None:
    _touch(tmp_path / "elsewhere", "x.png")
    root = tmp_path / "src"
    _touch(root, "a.png")
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert list_images(root) == (["a.png", "linked/x.png"], [])


def test_list_images_reports_broken_symlink(tree: Path) -> None:
    (tree / "cats" / "gone.jpg").symlink_to(tree / "cats" / "missing.jpg")
    (tree / "gone.txt").symlink_to(tree / "missing.txt")  # not an image name: ignored
    (tree / "ok.png").symlink_to(tree / "b.png")  # a working file symlink is an image
    found, broken = list_images(tree)
    assert found == sorted([*IMAGES, "ok.png"])
    assert [rel for rel, _ in broken] == ["cats/gone.jpg"]
    assert "broken symlink" in broken[0][1]


def test_list_images_missing_root(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        list_images(tmp_path / "nope")


def test_list_images_empty_root(tmp_path: Path) -> None:
    assert list_images(tmp_path) == ([], [])


# --- split_of --------------------------------------------------------------------------------

PATHS = [f"class{i % 7}/img_{i:05d}.jpg" for i in range(10_000)]


@pytest.mark.parametrize(
    ("val", "test"),
    [
        pytest.param(0.1, 0.1, id="default"),
        pytest.param(0.2, 0.05, id="uneven"),
        pytest.param(0.0, 0.3, id="no-val"),
        pytest.param(0.25, 0.0, id="no-test"),
        pytest.param(0.0, 0.0, id="all-train"),
        pytest.param(0.45, 0.45, id="mostly-held-out"),
    ],
)
def test_split_proportions(val: float, test: float) -> None:
    counts = Counter(split_of(p, val=val, test=test) for p in PATHS)
    n = len(PATHS)
    assert set(counts) <= {"train", "val", "test"}
    assert counts["val"] / n == pytest.approx(val, abs=0.02)
    assert counts["test"] / n == pytest.approx(test, abs=0.02)
    assert counts["train"] / n == pytest.approx(1 - val - test, abs=0.02)
    if val == 0:
        assert counts["val"] == 0
    if test == 0:
        assert counts["test"] == 0


def test_split_is_deterministic_within_a_process() -> None:
    first = [split_of(p, val=0.1, test=0.1) for p in PATHS[:2000]]
    second = [split_of(p, val=0.1, test=0.1) for p in reversed(PATHS[:2000])]
    assert first == second[::-1]


def test_split_is_deterministic_across_processes() -> None:
    """Not Python's salted hash(): other interpreters with other hash seeds agree."""
    paths = PATHS[:300]
    script = (
        "import json, sys\n"
        "from pipeline.ingest.images import split_of\n"
        "paths = json.loads(sys.stdin.read())\n"
        "print(json.dumps([split_of(p, val=0.2, test=0.1) for p in paths]))\n"
    )
    here = [split_of(p, val=0.2, test=0.1) for p in paths]
    seed = "1" if os.environ.get("PYTHONHASHSEED") == "2" else "2"
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(paths),
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=30,
    )
    assert json.loads(out.stdout) == here


def test_adding_paths_never_moves_existing_ones() -> None:
    old = PATHS[:5000]
    before = {p: split_of(p, val=0.1, test=0.1) for p in old}
    more = [*PATHS[5000:], "new/a.png", "class0/img_00000 copy.jpg", "ünïcode/ß.jpg"]
    after = {p: split_of(p, val=0.1, test=0.1) for p in sorted(old + more)}
    assert {p: after[p] for p in old} == before


def test_split_depends_on_the_relative_path_only() -> None:
    splits = {split_of(f"x/{i}.png", val=0.3, test=0.3) for i in range(200)}
    assert splits == {"train", "val", "test"}


def test_growing_val_only_moves_train_to_val() -> None:
    """val is carved after test: raising val never moves a test item, nor a val item out."""
    small = {p: split_of(p, val=0.1, test=0.1) for p in PATHS[:3000]}
    large = {p: split_of(p, val=0.2, test=0.1) for p in PATHS[:3000]}
    for p, s in small.items():
        if s in ("test", "val"):
            assert large[p] == s


# --- 16-bit colour ---------------------------------------------------------------------------


def png16(a: np.ndarray) -> bytes:
    """A 16-bit RGB (colour type 2) or RGBA (6) PNG of ``a``, chunks written by hand."""
    h, w, c = a.shape

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    raw = b"".join(b"\0" + a[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def tiff16(a: np.ndarray, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, a, photometric="rgb", **kwargs)
    return buf.getvalue()


def to8(a: np.ndarray) -> np.ndarray:
    """round(x * 255 / 65535), in float64."""
    return np.round(a.astype(np.float64) * 255 / 65535).astype(np.uint8)


def over(a: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """16-bit straight alpha over an 8-bit background, in float64."""
    al = a[..., 3:4].astype(np.float64) / 65535
    bg = np.asarray(background, dtype=np.float64) * 257
    return np.round(a[..., :3] * al + bg * (1 - al)).astype(np.uint16)


RNG16 = np.random.default_rng(16)
RGB16 = RNG16.integers(0, 65536, (5, 7, 3), dtype=np.uint16)
RGBA16 = RNG16.integers(0, 65536, (5, 7, 4), dtype=np.uint16)


def test_pillow_still_truncates_16_bit_colour() -> None:
    """Why colour16.py exists: if this fails, Pillow keeps 16 bits and the detour can go."""
    im = pillow_open(tiff16(RGB16))
    assert im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im), RGB16 >> 8)


@pytest.mark.parametrize("planar", ["contig", "separate"])
def test_sixteen_bit_rgb_tiff_is_exact(planar: str) -> None:
    stored = np.moveaxis(RGB16, -1, 0) if planar == "separate" else RGB16  # (S, Y, X) planes
    data = tiff16(stored, planarconfig=planar)
    d16 = decode_image(data, ingest(bit_depth=16), channels=3)
    np.testing.assert_array_equal(d16.pixels, RGB16)
    assert (d16.pixels.dtype, d16.mode, d16.bits) == (np.uint16, "RGB", 16)
    d8 = decode_image(data, ingest(bit_depth=8), channels=3)
    np.testing.assert_array_equal(d8.pixels, to8(RGB16))


@pytest.mark.parametrize("alpha", ["composite", "drop"])
def test_sixteen_bit_rgba_tiff_is_exact(alpha: str) -> None:
    data = tiff16(RGBA16)
    bg = (10, 200, 255)
    expected = over(RGBA16, bg) if alpha == "composite" else RGBA16[..., :3]
    d16 = decode_image(data, ingest(bit_depth=16, alpha=alpha, background=list(bg)), channels=3)
    np.testing.assert_array_equal(d16.pixels, expected)
    assert (d16.mode, d16.bits) == ("RGBA", 16)
    d8 = decode_image(data, ingest(bit_depth=8, alpha=alpha, background=list(bg)), channels=3)
    np.testing.assert_array_equal(d8.pixels, to8(expected))


def test_sixteen_bit_tiff_to_gray_uses_601_weights() -> None:
    got = decode_image(tiff16(RGB16), ingest(bit_depth=16, color="gray"), channels=1).pixels
    f = RGB16.astype(np.float64)
    expected = np.round((f[..., 0] * 299 + f[..., 1] * 587 + f[..., 2] * 114) / 1000)
    np.testing.assert_array_equal(got[..., 0], expected.astype(np.uint16))


def test_sixteen_bit_tiff_resize_keeps_sixteen_bits() -> None:
    """A 2x box downscale is the mean of each 2x2 block; Pillow rounds once per pass (±1)."""
    a = RNG16.integers(0, 65536, (8, 12, 3), dtype=np.uint16)
    p = ingest(bit_depth=16, image_size=[4, 6], resize="stretch", resample="box")
    got = decode_image(tiff16(a), p, channels=3).pixels
    mean = a.astype(np.float64).reshape(4, 2, 6, 2, 3).mean(axis=(1, 3))
    assert got.shape == (4, 6, 3)
    assert np.abs(got - mean).max() <= 1  # an 8-bit detour would be off by up to 255


def test_sixteen_bit_tiff_pads_with_the_channel_s_value() -> None:
    a = np.full((4, 8, 3), 1000, dtype=np.uint16)
    p = ingest(bit_depth=16, image_size=[8, 8], resize="pad", pad_value=[1, 2, 3])
    got = decode_image(tiff16(a), p, channels=3).pixels
    np.testing.assert_array_equal(got[0, 0], [257, 514, 771])
    np.testing.assert_array_equal(got[4, 4], [1000, 1000, 1000])


@pytest.mark.parametrize("a", [RGB16, RGBA16], ids=["rgb", "rgba"])
def test_sixteen_bit_colour_png_is_rejected_not_truncated(a: np.ndarray) -> None:
    with pytest.raises(DecodeError, match=r"^16-bit colour PNG: .*convert it"):
        decode_image(png16(a), ingest(bit_depth=16), channels=3)


def test_bits_records_the_source_depth() -> None:
    rgb = Image.new("RGB", (3, 2), (1, 2, 3))
    gray16 = Image.fromarray(np.full((2, 3), 40000, dtype=np.uint16))
    assert decode_image(encode(rgb, "PNG"), ingest(), channels=3).bits == 8
    assert decode_image(encode(rgb, "JPEG"), ingest(), channels=3).bits == 8
    assert decode_image(encode(rgb.convert("1"), "PNG"), ingest(), channels=3).bits == 1
    assert decode_image(encode(gray16, "PNG"), ingest(), channels=1).bits == 16
    assert decode_image(encode(gray16, "TIFF"), ingest(), channels=1).bits == 16


# --- names -----------------------------------------------------------------------------------


def test_name_conflicts_rejects_both_names_of_a_normalization_pair() -> None:
    nfc_name, nfd_name = "a/caf\u00e9.png", "a/cafe\u0301.png"
    kept, bad = name_conflicts(["a/b.png", nfc_name, nfd_name])
    assert kept == ["a/b.png"]
    assert [p for p, _ in bad] == [nfc_name, nfd_name]
    assert ascii(nfd_name) in bad[0][1]
    assert ascii(nfc_name) in bad[1][1]


def test_split_of_an_nfd_name_is_that_of_its_nfc_form() -> None:
    assert nfc("cafe\u0301/x.png") == "caf\u00e9/x.png"
    assert nfc(os.fsdecode(b"\xff.png")) == os.fsdecode(b"\xff.png")  # not UTF-8: unchanged


def test_list_images_rejects_a_large_sparse_file_without_reading_it(tmp_path: Path) -> None:
    (tmp_path / "small.png").write_bytes(encode(Image.new("L", (2, 2)), "PNG"))
    with open(tmp_path / "huge.png", "wb") as fh:
        os.truncate(fh.fileno(), 3_200_000_000)  # sparse: no disk used, nothing to read
    found, broken = list_images(tmp_path, max_bytes=1 << 30)
    assert found == ["small.png"]
    assert broken == [("huge.png", broken[0][1])]
    assert broken[0][1].startswith("file is 3.2 GB (3200000000 bytes), more than ")
    assert "ingest.max_file_bytes (1073741824)" in broken[0][1]


def test_outside_source_marks_only_symlinks_leaving_the_folder(tmp_path: Path) -> None:
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    (src / "a").mkdir(parents=True)
    elsewhere.mkdir()
    (src / "a" / "in.png").write_bytes(b"x")
    (elsewhere / "out.png").write_bytes(b"x")
    (src / "a" / "inside-link.png").symlink_to(src / "a" / "in.png")
    (src / "a" / "outside-link.png").symlink_to(elsewhere / "out.png")
    (src / "linked").symlink_to(elsewhere, target_is_directory=True)
    found, _ = list_images(src)
    assert outside_source(src, found) == {"a/outside-link.png", "linked/out.png"}


def test_list_remote_images_rejects_large_objects_by_listed_size() -> None:
    root = parse_location(f"memory://sizes-{uuid.uuid4().hex[:8]}")
    try:
        (root / "a" / "small.png").write_bytes(b"x" * 10)
        (root / "a" / "big.png").write_bytes(b"x" * 101)
        found, broken = list_remote_images(root, max_bytes=100)
        assert found == ["a/small.png"]
        assert [p for p, _ in broken] == ["a/big.png"]
        assert "(101 bytes), more than ingest.max_file_bytes (100)" in broken[0][1]
    finally:
        root.remove()


def test_sixteen_bit_tiff_exif_orientation_turns_every_channel() -> None:
    a = RNG16.integers(0, 65536, (4, 6, 3), dtype=np.uint16)
    data = tiff16(a, extratags=[(274, "H", 1, 6, True)])  # 6: rotate 90 degrees clockwise
    d = decode_image(data, ingest(bit_depth=16), channels=3)
    assert d.orientation == 6
    np.testing.assert_array_equal(d.pixels, np.rot90(a, k=-1))
