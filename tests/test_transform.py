"""Normalization modes as pure functions against a numpy float64 oracle written here.

The data are real: Pillow-made PNG files go through the real ingest and stats stages, and the
dataset-statistics modes take their constants from ``load_stats`` of that stats folder. Every
expected value is computed from the pixels with numpy float64 in this file, then rounded once
to the output dtype, and compared bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from pipeline.ingest import run_ingest
from pipeline.params import parse_params
from pipeline.stats_stage import run_stats
from pipeline.statsfile import Stats, load_stats
from pipeline.transform import (
    DATASET_MODES,
    PER_IMAGE_MODES,
    Constants,
    apply,
    dataset_constants,
    invert,
    per_image_constants,
)

MODES = (
    "per_channel",
    "per_pixel",
    "global",
    "per_image",
    "per_image_per_channel",
    "mean_only",
    "min_max",
)
SCALES = ("pixel", "unit")
DTYPES = ("float32", "float16")
EPS = 1e-6
H, W = 12, 10  # not square, so a transposed axis would show


# --- real stores built once per module -------------------------------------------------------


@dataclass(frozen=True)
class Fitted:
    """A prepared store read back with plain zarr, and its stats folder."""

    images: np.ndarray  # (n, H, W, C) uint8 / uint16, all splits
    train: np.ndarray  # the train split: what the stats were fitted on
    stats_dir: Path
    pixel_max: int


def write_rgb_source(root: Path) -> None:
    """30 lossless PNGs in 3 class folders; pixel (0, 0) is the same in every image (zero
    per-pixel std) and one image is a single constant colour (zero per-image std)."""
    rng = np.random.default_rng(1234)
    for cls in ("ant", "bee", "cow"):
        (root / cls).mkdir(parents=True)
        for i in range(10):
            a = np.stack(
                [
                    rng.integers(30, 221, (H, W)),  # min/max away from 0/255
                    rng.integers(0, 256, (H, W)),
                    rng.integers(60, 100, (H, W)),
                ],
                axis=-1,
            ).astype(np.uint8)
            a[0, 0] = 60
            if cls == "cow" and i == 0:
                a[...] = 60
            Image.fromarray(a).save(root / cls / f"{i:02d}.png")


def write_gray16_source(root: Path) -> None:
    """14 16-bit gray PNGs with values that are not multiples of 257 (true 16-bit data)."""
    rng = np.random.default_rng(99)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(7):
            a = rng.integers(1000, 64001, (H, W)).astype(np.uint16)
            a[0, 0] = 4321
            if cls == "b" and i == 0:
                a[...] = 4321
            Image.fromarray(a).save(root / cls / f"{i:02d}.png")


def build(tmp: Path, write_source: object, **ingest: object) -> Fitted:
    src = tmp / "src"
    write_source(src)  # type: ignore[operator]
    p = parse_params(
        {
            "base": {"scheduler": "synchronous"},
            "ingest": {"image_size": None, "chunk_images": 2, "shard_images": 4, **ingest},
        }
    )
    run_ingest(src, tmp / "prepared", p)
    run_stats(tmp / "prepared" / "images.zarr", tmp / "stats", p)
    group = zarr.open_group(tmp / "prepared" / "images.zarr", mode="r")
    images = np.asarray(group["images"][...])
    start, stop = group.attrs["splits"]["train"]
    pixel_max = int(np.iinfo(images.dtype).max)
    return Fitted(images, images[start:stop], tmp / "stats", pixel_max)


@pytest.fixture(scope="module")
def rgb8(tmp_path_factory: pytest.TempPathFactory) -> Fitted:
    return build(tmp_path_factory.mktemp("rgb8"), write_rgb_source)


@pytest.fixture(scope="module")
def gray16(tmp_path_factory: pytest.TempPathFactory) -> Fitted:
    return build(tmp_path_factory.mktemp("gray16"), write_gray16_source, bit_depth=16, color="gray")


@pytest.fixture(params=["uint8", "uint16"])
def fitted(request: pytest.FixtureRequest) -> Fitted:
    return request.getfixturevalue("rgb8" if request.param == "uint8" else "gray16")


# --- the oracle --------------------------------------------------------------------------------


def oracle_dataset_constants(
    mode: str, train: np.ndarray, d: float
) -> tuple[np.ndarray, np.ndarray]:
    """offset and scale in input-scale units, from the train pixels with numpy float64."""
    x = train.astype(np.float64)
    c = x.shape[-1]
    if mode == "per_channel":
        offset, scale = x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))
    elif mode == "per_pixel":
        offset, scale = x.mean(axis=0), x.std(axis=0)
    elif mode == "global":
        offset, scale = np.full(c, x.mean()), np.full(c, x.std())
    elif mode == "mean_only":
        return x.mean(axis=(0, 1, 2)) / d, np.ones(c)
    else:  # min_max: (x - min) / (max - min) per channel
        lo, hi = x.min(axis=(0, 1, 2)), x.max(axis=(0, 1, 2))
        offset, scale = lo, hi - lo
    scale = np.where(scale > 0, scale, 1.0)  # stats.zero_std: one (the default)
    return offset / d, scale / d


def oracle_apply(block: np.ndarray, mode: str, train: np.ndarray, d: float) -> np.ndarray:
    """float64 ((x / d) - offset) / scale, per image for the per-image modes."""
    x = block.astype(np.float64) / d
    if mode in PER_IMAGE_MODES:
        out = np.empty_like(x)
        for i, img in enumerate(x):
            if mode == "per_image":
                out[i] = (img - img.mean()) / (img.std() + EPS)
            else:
                flat = img.reshape(-1, img.shape[-1])
                out[i] = (img - flat.mean(axis=0)) / (flat.std(axis=0) + EPS)
        return out
    offset, scale = oracle_dataset_constants(mode, train, d)
    return (x - offset) / scale


def code_constants(mode: str, stats: Stats, block: np.ndarray, scale: str) -> Constants:
    d = float(stats.pixel_max) if scale == "unit" else 1.0
    if mode in PER_IMAGE_MODES:
        return per_image_constants(block, mode, EPS, d)
    return dataset_constants(mode, stats, scale)


def assert_bits_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    """Same dtype, shape and bit pattern (so -0.0 vs 0.0 or a NaN would show)."""
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    uint = np.dtype(f"u{actual.dtype.itemsize}")
    diff = actual.view(uint) != expected.view(uint)
    assert not diff.any(), (
        f"{int(diff.sum())} of {diff.size} values differ; first at "
        f"{np.argwhere(diff)[0].tolist()}: {actual[diff][0]!r} != {expected[diff][0]!r}"
    )


# --- tests -------------------------------------------------------------------------------------


def test_the_data_exercise_the_edge_cases(rgb8: Fitted, gray16: Fitted) -> None:
    """The fixtures do contain what the mode tests rely on."""
    for f in (rgb8, gray16):
        assert f.images.shape[0] % 4 != 0  # a partial last shard
        assert (f.train.std(axis=0) == 0).any()  # a pixel with zero std (replaced by 1)
        per_image = f.images.reshape(len(f.images), -1).std(axis=1)
        assert (per_image == 0).any()  # a constant image (std 0: scale is eps)
        lo, hi = f.train.min(axis=(0, 1, 2)), f.train.max(axis=(0, 1, 2))
        assert (lo > 0).any()  # so min_max is more than x / max
        assert (hi < f.pixel_max).any()
        assert 0 < len(f.train) < len(f.images)  # stats fitted on train, applied to all


def test_load_stats_agrees_with_the_oracle(fitted: Fitted) -> None:
    """The constants dataset_constants starts from are the train split's numpy statistics."""
    stats = load_stats(fitted.stats_dir)
    x = fitted.train.astype(np.float64)
    np.testing.assert_array_equal(stats.mean, x.mean(axis=(0, 1, 2)))  # exact integer sums
    np.testing.assert_allclose(stats.std, x.std(axis=(0, 1, 2)), rtol=1e-14, atol=0)
    np.testing.assert_array_equal(stats.mean_image, x.mean(axis=0))
    np.testing.assert_allclose(
        stats.std_image, np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0), rtol=1e-14, atol=0
    )
    assert stats.pixel_max == fitted.pixel_max
    assert stats.count == len(fitted.train)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("mode", MODES)
def test_apply_equals_float64_reference(fitted: Fitted, mode: str, scale: str, dtype: str) -> None:
    stats = load_stats(fitted.stats_dir)
    block = fitted.images  # every split: the train-fitted constants apply to all of them
    d = float(fitted.pixel_max) if scale == "unit" else 1.0
    expected = oracle_apply(block, mode, fitted.train, d).astype(dtype)
    actual = apply(block, code_constants(mode, stats, block, scale), dtype)
    assert_bits_equal(actual, expected)
    assert np.isfinite(actual).all()


@pytest.mark.parametrize("mode", MODES)
def test_apply_is_blockwise(rgb8: Fitted, mode: str) -> None:
    """Any split of the samples into blocks gives the same values (what the stage relies on)."""
    stats = load_stats(rgb8.stats_dir)
    whole = apply(rgb8.images, code_constants(mode, stats, rgb8.images, "unit"), "float32")
    for size in (1, 3, 4, 7):
        for a in range(0, len(rgb8.images), size):
            block = rgb8.images[a : a + size]
            part = apply(block, code_constants(mode, stats, block, "unit"), "float32")
            assert_bits_equal(part, whole[a : a + size])


@pytest.mark.parametrize(
    ("bits", "dtype"),
    [("uint8", "float32"), ("uint8", "float16"), ("uint16", "float32")],
)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("mode", MODES)
def test_invert_recovers_the_pixels_exactly(
    rgb8: Fitted, gray16: Fitted, mode: str, scale: str, bits: str, dtype: str
) -> None:
    f = rgb8 if bits == "uint8" else gray16
    stats = load_stats(f.stats_dir)
    constants = code_constants(mode, stats, f.images, scale)
    back = invert(apply(f.images, constants, dtype), constants, f.pixel_max)
    assert back.dtype == f.images.dtype
    np.testing.assert_array_equal(back, f.images)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("mode", DATASET_MODES)
def test_dataset_constants_match_the_oracle(rgb8: Fitted, mode: str, scale: str) -> None:
    k = dataset_constants(mode, load_stats(rgb8.stats_dir), scale)
    offset, scale_ = oracle_dataset_constants(
        mode, rgb8.train, 255.0 if scale == "unit" else 1.0
    )
    np.testing.assert_allclose(k.offset, offset, rtol=1e-14, atol=0)
    np.testing.assert_allclose(k.scale, scale_, rtol=1e-14, atol=0)
    assert k.divisor == (255.0 if scale == "unit" else 1.0)


@pytest.mark.parametrize("mode", PER_IMAGE_MODES)
def test_dataset_constants_refuses_per_image_modes(rgb8: Fitted, mode: str) -> None:
    with pytest.raises(ValueError, match="does not use dataset statistics"):
        dataset_constants(mode, load_stats(rgb8.stats_dir), "pixel")


@pytest.mark.parametrize("mode", PER_IMAGE_MODES)
def test_per_image_constants_are_each_samples_mean_and_std_plus_eps(
    rgb8: Fitted, mode: str
) -> None:
    x = rgb8.images.astype(np.float64) / 255.0
    k = per_image_constants(rgb8.images, mode, EPS, 255.0)
    for i, img in enumerate(x):
        flat = img.reshape(-1) if mode == "per_image" else img.reshape(-1, img.shape[-1])
        want_offset = np.broadcast_to(np.atleast_1d(flat.mean(axis=0)), (3,))
        want_scale = np.broadcast_to(np.atleast_1d(flat.std(axis=0)) + EPS, (3,))
        np.testing.assert_allclose(k.offset[i], want_offset, rtol=1e-14)
        np.testing.assert_allclose(k.scale[i], want_scale, rtol=1e-14)
    assert k.offset.shape == k.scale.shape == (len(x), 3)  # (sample, channel) for both modes


# --- hand-made Constants: the shapes apply() accepts, and its lookup-table path -------------


def block_of(dtype: type, n: int, channels: int, seed: int = 0) -> np.ndarray:
    top = int(np.iinfo(dtype).max)
    return np.random.default_rng(seed).integers(0, top + 1, (n, H, W, channels), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divisor", [1.0, 255.0])
@pytest.mark.parametrize(
    "shape", [(3,), (H, W, 3), (5, 1), (5, 3)], ids=["channel", "pixel", "image", "image-channel"]
)
def test_apply_with_direct_constants(shape: tuple[int, ...], divisor: float, dtype: str) -> None:
    rng = np.random.default_rng(len(shape))
    block = block_of(np.uint8, 5, 3)
    offset = rng.uniform(-50, 300, shape) / divisor
    scale = rng.uniform(0.01, 90, shape) / divisor
    k = Constants(offset=offset, scale=scale, divisor=divisor)
    o, s = offset, scale
    if len(shape) == 2:  # per sample: (n, 1 or C) broadcasts as (n, 1, 1, 1 or C)
        o, s = offset[:, None, None, :], scale[:, None, None, :]
    expected = ((block.astype(np.float64) / divisor - o) / s).astype(dtype)
    assert_bits_equal(apply(block, k, dtype), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("bits", "channels"), [(np.uint8, 3), (np.uint8, 1), (np.uint16, 3)])
def test_lookup_table_equals_per_pixel_evaluation(bits: type, channels: int, dtype: str) -> None:
    """Per-channel constants (table path) and the same constants tiled per pixel agree."""
    rng = np.random.default_rng(5)
    block = block_of(bits, 4, channels, seed=1)
    top = float(np.iinfo(bits).max)
    offset = rng.uniform(0, top, channels) / top
    scale = rng.uniform(0.01, 0.5, channels)
    table = apply(block, Constants(offset=offset, scale=scale, divisor=top), dtype)
    tiled = Constants(
        offset=np.broadcast_to(offset, (H, W, channels)).copy(),
        scale=np.broadcast_to(scale, (H, W, channels)).copy(),
        divisor=top,
    )
    assert_bits_equal(table, apply(block, tiled, dtype))
    assert_bits_equal(table, ((block / top - offset) / scale).astype(dtype))


def test_apply_and_invert_leave_their_inputs_alone(rgb8: Fitted) -> None:
    block = rgb8.images.copy()
    k = per_image_constants(block, "per_image_per_channel", EPS, 1.0)
    y = apply(block, k, "float32")
    y_copy = y.copy()
    invert(y, k, 255)
    np.testing.assert_array_equal(block, rgb8.images)
    np.testing.assert_array_equal(y, y_copy)


def test_invert_clips_to_the_pixel_range() -> None:
    k = Constants(offset=np.zeros(1), scale=np.ones(1), divisor=1.0)
    y = np.array([-3.0, 0.4, 254.6, 300.0, 70000.0], dtype=np.float32).reshape(1, 1, 5, 1)
    np.testing.assert_array_equal(invert(y, k, 255).ravel(), [0, 0, 255, 255, 255])
    np.testing.assert_array_equal(invert(y, k, 65535).ravel(), [0, 0, 255, 300, 65535])
    assert invert(y, k, 65535).dtype == np.uint16
