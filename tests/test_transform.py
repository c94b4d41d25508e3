"""Normalization modes as pure functions against a numpy float64 oracle written in the tests.

The data are real: Pillow-made PNG files go through the real ingest and stats stages, and the
dataset-statistics modes take their constants from ``load_stats`` of that stats folder. Every
expected value is computed from the pixels with numpy float64 in this file (the
dataset-statistics constants by conftest.py's ``oracle_dataset_constants``), then rounded once
to the output dtype, and compared bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MODES, Fitted, H, W, assert_bits_equal, oracle_dataset_constants

from pipeline.normalize.modes import (
    DATASET_MODES,
    PER_IMAGE_MODES,
    Constants,
    apply,
    dataset_constants,
    invert,
    per_image_constants,
)
from pipeline.stats.document import Stats, load_stats

SCALES = ("pixel", "unit")
DTYPES = ("float32", "float16")
EPS = 1e-6


# --- real stores built once per module: rgb8 / gray16 in conftest.py ----------------------------


@pytest.fixture(params=["uint8", "uint16"])
def fitted(request: pytest.FixtureRequest) -> Fitted:
    return request.getfixturevalue("rgb8" if request.param == "uint8" else "gray16")


# --- the oracle --------------------------------------------------------------------------------


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
    stats = load_stats(fitted.stats)
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
    stats = load_stats(fitted.stats)
    block = fitted.images  # every split: the train-fitted constants apply to all of them
    d = float(fitted.pixel_max) if scale == "unit" else 1.0
    expected = oracle_apply(block, mode, fitted.train, d).astype(dtype)
    actual = apply(block, code_constants(mode, stats, block, scale), dtype)
    assert_bits_equal(actual, expected)
    assert np.isfinite(actual).all()


@pytest.mark.parametrize("mode", MODES)
def test_apply_is_blockwise(rgb8: Fitted, mode: str) -> None:
    """Any split of the samples into blocks gives the same values (what the stage relies on)."""
    stats = load_stats(rgb8.stats)
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
    stats = load_stats(f.stats)
    constants = code_constants(mode, stats, f.images, scale)
    back = invert(apply(f.images, constants, dtype), constants, f.pixel_max)
    assert back.dtype == f.images.dtype
    np.testing.assert_array_equal(back, f.images)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("mode", DATASET_MODES)
def test_dataset_constants_match_the_oracle(rgb8: Fitted, mode: str, scale: str) -> None:
    k = dataset_constants(mode, load_stats(rgb8.stats), scale)
    offset, scale_ = oracle_dataset_constants(mode, rgb8.train, 255.0 if scale == "unit" else 1.0)
    np.testing.assert_allclose(k.offset, offset, rtol=1e-14, atol=0)
    np.testing.assert_allclose(k.scale, scale_, rtol=1e-14, atol=0)
    assert k.divisor == (255.0 if scale == "unit" else 1.0)


@pytest.mark.parametrize("mode", PER_IMAGE_MODES)
def test_dataset_constants_refuses_per_image_modes(rgb8: Fitted, mode: str) -> None:
    with pytest.raises(ValueError, match="does not use dataset statistics"):
        dataset_constants(mode, load_stats(rgb8.stats), "pixel")


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
