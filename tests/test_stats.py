"""Exact statistics kernels against independent oracles: ``fractions.Fraction`` and numpy float64.

Nothing here trusts the kernels' own output: every expected value is computed from the raw pixels
with Python integers (Fraction, 50-digit Decimal square roots) or with numpy float64. The compiled
chunk kernel (``stats_kernel``) is also compared bit for bit with the numpy version of the same
sums (``stats_numpy``, the implementation it replaced). ``block_moments`` uses the compiled kernel
in these tests unless a test says otherwise (in a real run, small fits use numpy).
"""

from __future__ import annotations

import functools
import itertools
import math
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.stats import kernel as stats_kernel
from pipeline.stats import kernel_numpy as stats_numpy
from pipeline.stats import moments as stats
from pipeline.stats.moments import FitResult, Moments, aggregate, block_moments, combine

INT64_MAX = 2**63 - 1
PERCENTILES = (0.0, 1.0, 12.5, 25.0, 50.0, 95.0, 99.0, 100.0)  # exact in binary and decimal
FAST = settings(max_examples=40, deadline=None, database=None)


@pytest.fixture(autouse=True, scope="module")
def _compiled_kernel() -> Iterator[None]:
    """block_moments uses the compiled kernel here, however little the process has reduced."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stats, "COMPILED_AFTER_BYTES", 0)
        yield


def block_moments_numpy(x: np.ndarray) -> Moments:
    """block_moments with the numpy sums."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stats, "COMPILED_AFTER_BYTES", math.inf)
        return block_moments(x)


# --- oracles ---------------------------------------------------------------------------------


def sqrt_oracle(num: int, den: int) -> float:
    """sqrt(num / den) from exact integers: 50-digit Decimal, then one rounding to float."""
    with localcontext() as ctx:
        ctx.prec = 50
        return float((Decimal(num) / Decimal(den)).sqrt())


def assert_within_ulp(value: float, expected: float) -> None:
    assert abs(value - expected) <= math.ulp(expected), (value, expected)


def std_oracle(count: int, total: int, total_sq: int) -> float:
    """Population std from exact sums: sqrt(Fraction variance)."""
    var = Fraction(count * total_sq - total * total, count * count)
    assert var >= 0
    return sqrt_oracle(var.numerator, var.denominator)


def nearest_rank(sorted_values: np.ndarray, q: float) -> int:
    """Nearest-rank percentile of the decimal number the user wrote (``repr(q)``)."""
    rank = max(1, math.ceil(Fraction(repr(q)) * len(sorted_values) / 100))
    return int(sorted_values[rank - 1])


def make_images(seed: int, shape: tuple[int, ...], dtype: type, style: str) -> np.ndarray:
    """Random images whose values are full-range, clustered at either end, constant or extreme."""
    rng = np.random.default_rng(seed)
    top = int(np.iinfo(dtype).max)
    if style == "full":
        return rng.integers(0, top + 1, shape, dtype=dtype)
    if style == "low":
        return rng.integers(0, 4, shape, dtype=dtype)
    if style == "high":
        return rng.integers(top - 3, top + 1, shape, dtype=dtype)
    if style == "const":
        return np.full(shape, rng.integers(0, top + 1), dtype=dtype)
    return (rng.integers(0, 2, shape) * top).astype(dtype)  # "extremes": 0 or max only


def check_against_oracle(x: np.ndarray, fit: FitResult, percentiles: Sequence[float]) -> None:
    """Every FitResult field against Fraction / numpy float64 computed from the pixels ``x``."""
    n, h, w, c = x.shape
    top = int(np.iinfo(x.dtype).max)
    assert fit.n_images == n
    assert fit.pixel_max == top
    assert len(fit.channels) == c
    per_channel = n * h * w
    xf = x.astype(np.float64)
    for ch, got in enumerate(fit.channels):
        values = x[..., ch].reshape(-1)
        exact = values.astype(object)
        total, total_sq = int(exact.sum()), int((exact * exact).sum())
        assert got.count == per_channel
        assert (got.total, got.total_sq) == (total, total_sq)
        assert got.mean == float(Fraction(total, per_channel))
        assert_within_ulp(got.std, std_oracle(per_channel, total, total_sq))
        assert got.minimum == int(values.min())
        assert got.maximum == int(values.max())
        ordered = np.sort(values)
        assert got.percentiles == {q: nearest_rank(ordered, q) for q in percentiles}
        image_stds = xf[..., ch].reshape(n, -1).std(axis=1)
        np.testing.assert_allclose(got.mean_of_image_stds, image_stds.mean(), rtol=1e-12, atol=0)
    # Global figures over all channels.
    exact_all = x.reshape(-1).astype(object)
    total, total_sq, count = int(exact_all.sum()), int((exact_all * exact_all).sum()), x.size
    assert fit.global_mean == float(Fraction(total, count))
    assert_within_ulp(fit.global_std, std_oracle(count, total, total_sq))
    np.testing.assert_allclose(fit.global_mean, xf.mean(), rtol=1e-12, atol=0)
    np.testing.assert_allclose(fit.global_std, xf.std(), rtol=1e-12, atol=0)
    # Per-pixel images: the mean is the exact integer sum divided once; the std vs numpy float64.
    sums = x.astype(np.int64).sum(axis=0)
    assert fit.mean_image.dtype == np.float64
    assert np.array_equal(fit.mean_image, sums / n)
    expected_std = xf.std(axis=0)
    assert fit.std_image.dtype == np.float64
    np.testing.assert_allclose(fit.std_image, expected_std, rtol=1e-12, atol=0)
    constant = (x == x[:1]).all(axis=0)
    assert np.array_equal(fit.std_image == 0, constant)


def check_histogram(hist: np.ndarray, x: np.ndarray) -> None:
    """One bin per possible value, per channel, equal to np.bincount of that channel."""
    bins = int(np.iinfo(x.dtype).max) + 1
    c = x.shape[-1]
    assert hist.shape == (c, bins)
    for ch in range(c):
        expected = np.bincount(x[..., ch].reshape(-1), minlength=bins)
        assert np.array_equal(np.asarray(hist[ch], dtype=np.int64), expected)


def assert_moments_equal(a: Moments, b: Moments, *, same_order: bool = True) -> None:
    """Exact equality of the integer partials (dtypes may differ: int64 vs Python ints)."""
    assert (a.n_images, a.pixel_max) == (b.n_images, b.pixel_max)
    for left, right in [
        (a.pixel_sum, b.pixel_sum),
        (a.pixel_sumsq, b.pixel_sumsq),
        (a.histogram, b.histogram),
    ]:
        assert left.shape == right.shape
        assert [int(v) for v in left.reshape(-1)] == [int(v) for v in right.reshape(-1)]
    if same_order:
        assert np.array_equal(a.image_std, b.image_std)
    else:
        assert np.array_equal(np.sort(a.image_std, axis=0), np.sort(b.image_std, axis=0))


def assert_fit_identical(a: FitResult, b: FitResult) -> None:
    """Bit-identical FitResults: ``==`` on every float, array_equal on the images."""
    assert a.n_images == b.n_images
    assert a.pixel_max == b.pixel_max
    assert a.channels == b.channels  # dataclass equality: exact ints, floats and percentiles
    assert a.global_mean == b.global_mean
    assert a.global_std == b.global_std
    assert a.mean_image.dtype == b.mean_image.dtype
    assert np.array_equal(a.mean_image, b.mean_image)
    assert a.std_image.dtype == b.std_image.dtype
    assert np.array_equal(a.std_image, b.std_image)


images = st.builds(
    make_images,
    seed=st.integers(0, 2**32 - 1),
    shape=st.tuples(
        st.integers(1, 12), st.integers(1, 9), st.integers(1, 9), st.sampled_from([1, 3, 4])
    ),
    dtype=st.sampled_from([np.uint8, np.uint16]),
    style=st.sampled_from(["full", "full", "low", "high", "const", "extremes"]),
)


# --- single block against the oracle -----------------------------------------------------------


@FAST
@given(x=images)
def test_block_matches_fraction_and_numpy_oracle(x: np.ndarray) -> None:
    m = block_moments(x)
    check_histogram(m.histogram, x)
    check_against_oracle(x, aggregate(m, PERCENTILES), PERCENTILES)


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [
        (np.uint8, (7, 5, 3, 3)),
        (np.uint8, (5, 3, 3, 1)),  # 45 elements: odd
        (np.uint16, (7, 5, 3, 3)),
        (np.uint16, (3, 3, 5, 1)),
        (np.uint8, (1, 1, 1, 1)),
        (np.uint16, (1, 1, 1, 3)),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "x".join(map(str, v)),
)
def test_fixed_shapes_match_oracle(dtype: type, shape: tuple[int, ...]) -> None:
    x = make_images(sum(shape), shape, dtype, "full")
    check_against_oracle(x, aggregate(block_moments(x), PERCENTILES), PERCENTILES)


# --- any blocking, any combine tree: bit-identical -----------------------------------------------


def blocks_of(x: np.ndarray, size: int) -> list[np.ndarray]:
    return [x[i : i + size] for i in range(0, len(x), size)]


def tree(parts: list[Moments], split_every: int) -> Moments:
    """Combine ``split_every`` at a time, level by level (the shape of dask's reductions)."""
    while len(parts) > 1:
        parts = [combine(parts[i : i + split_every]) for i in range(0, len(parts), split_every)]
    return parts[0]


@functools.cache
def _eleven(dtype: type) -> tuple[np.ndarray, Moments, FitResult]:
    """11 images (block sizes 1, 2, odd, and n itself) with their one-block moments and fit."""
    x = make_images(3, (11, 3, 5, 3), dtype, "full")
    whole = block_moments(x)
    return x, whole, aggregate(whole, PERCENTILES)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16], ids=["u8", "u16"])
@pytest.mark.parametrize("block", [1, 2, 3, 5, 11], ids=lambda b: f"block{b}")
@pytest.mark.parametrize("split_every", [2, 3, 8], ids=lambda s: f"every{s}")
def test_block_sizes_and_trees_bit_identical(dtype: type, block: int, split_every: int) -> None:
    x, whole, reference = _eleven(dtype)
    merged = tree([block_moments(b) for b in blocks_of(x, block)], split_every)
    assert_moments_equal(merged, whole)
    assert_fit_identical(aggregate(merged, PERCENTILES), reference)


@settings(max_examples=25, deadline=None, database=None)
@given(x=images, data=st.data())
def test_any_partition_and_grouping_bit_identical(x: np.ndarray, data: st.DataObject) -> None:
    n = len(x)
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1)) if n > 1 else st.just(set())))
    edges = [0, *cuts, n]
    parts = [block_moments(x[a:b]) for a, b in itertools.pairwise(edges)]
    reference = aggregate(block_moments(x), PERCENTILES)

    # A random tree over consecutive partials.
    work = list(parts)
    while len(work) > 1:
        i = data.draw(st.integers(0, len(work) - 2))
        k = data.draw(st.integers(2, len(work) - i))
        work[i : i + k] = [combine(work[i : i + k])]
    assert_moments_equal(work[0], block_moments(x))
    assert_fit_identical(aggregate(work[0], PERCENTILES), reference)

    # Reversed order (image_std comes out reversed; mean_of_image_stds must not change).
    backwards = combine(parts[::-1])
    assert_moments_equal(backwards, block_moments(x), same_order=False)
    assert_fit_identical(aggregate(backwards, PERCENTILES), reference)


# --- the compiled kernel against the oracles and the numpy path it replaced ---------------------


def assert_same_moments(got: Moments, expected: Moments) -> None:
    """Bit-identical Moments: same dtypes, same integers, same float64 image_std."""
    assert (got.n_images, got.pixel_max) == (expected.n_images, expected.pixel_max)
    for name in ("pixel_sum", "pixel_sumsq", "histogram", "image_std"):
        left, right = getattr(got, name), getattr(expected, name)
        assert (left.dtype, left.shape) == (right.dtype, right.shape), name
        assert np.array_equal(left, right), name


def assert_same_sums(got: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> None:
    """The five integer arrays of the two moment_sums: same dtypes, shapes and values."""
    assert len(got) == len(expected) == 5
    for left, right in zip(got, expected, strict=True):
        assert (left.dtype, left.shape) == (right.dtype, right.shape)
        assert np.array_equal(left, right)


def check_sums_against_oracle(m: Moments, x: np.ndarray) -> None:
    """Per-pixel and per-image sums from Python ints, per-image std from Fraction and float64."""
    n, h, w, c = x.shape
    exact = x.astype(object)
    assert m.pixel_sum.tolist() == exact.sum(axis=0).tolist()
    assert m.pixel_sumsq.tolist() == (exact * exact).sum(axis=0).tolist()
    check_histogram(m.histogram, x)
    assert m.image_std.shape == (n, c)
    assert m.image_std.dtype == np.float64
    per_image = exact.reshape(n, h * w, c)
    for i, ch in itertools.product(range(n), range(c)):
        values = per_image[i, :, ch]
        expected = std_oracle(h * w, int(values.sum()), int((values * values).sum()))
        # _image_std rounds the exact numerator, its square root and the division: 2 ulp at most.
        assert abs(m.image_std[i, ch] - expected) <= 2 * math.ulp(expected), (i, ch)
    stds = x.astype(np.float64).reshape(n, h * w, c).std(axis=1)
    np.testing.assert_allclose(m.image_std, stds, rtol=1e-12, atol=1e-12)


KERNEL_SHAPES = [(1, 1, 1), (15, 3, 11), (17, 5, 7), (33, 1, 1), (2, 61, 47)]  # last: 2+ tiles


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16], ids=["u8", "u16"])
@pytest.mark.parametrize("channels", [1, 3, 4], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("nhw", KERNEL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_oracles_and_numpy_path(
    dtype: type, channels: int, nhw: tuple[int, int, int]
) -> None:
    shape = (*nhw, channels)
    x = make_images(math.prod(shape), shape, dtype, "full")
    m = block_moments(x)
    assert_same_moments(m, block_moments_numpy(x))
    check_sums_against_oracle(m, x)
    check_against_oracle(x, aggregate(m, PERCENTILES), PERCENTILES)


kernel_blocks = st.builds(
    make_images,
    seed=st.integers(0, 2**32 - 1),
    shape=st.tuples(st.integers(0, 40), st.integers(1, 13), st.integers(1, 13), st.integers(1, 5)),
    dtype=st.sampled_from([np.uint8, np.uint16]),
    style=st.sampled_from(["full", "low", "high", "const", "extremes"]),
)


@settings(max_examples=60, deadline=None, database=None)
@given(x=kernel_blocks)
def test_kernel_bit_identical_to_numpy_path(x: np.ndarray) -> None:
    """Any n (also 0 and not a multiple of 16), odd sizes, C from 1 to 5, both dtypes."""
    assert_same_sums(stats_kernel.moment_sums(x), stats_numpy.moment_sums(x))
    m = block_moments(x)
    assert_same_moments(m, block_moments_numpy(x))
    check_sums_against_oracle(m, x)


def test_kernel_uint8_tiles_flushed_before_uint32_wraps() -> None:
    """70,000 images: per-pixel sums of squares pass 2**32, the uint8 tile sums' limit."""
    x = np.full((70_000, 1, 2, 1), 255, dtype=np.uint8)
    x[::3, 0, 1, 0] = 7
    m = block_moments(x)
    assert int(m.pixel_sumsq[0, 0, 0]) == 70_000 * 255**2 > 2**32
    assert_same_moments(m, block_moments_numpy(x))
    check_sums_against_oracle(m, x)


def test_kernel_wide_per_image_counts_agree() -> None:
    """The uint64 per-image counters (images of 2**32 values or more) count like uint32 ones."""
    x = make_images(9, (5, 7, 9, 3), np.uint8, "full").reshape(5, -1)
    narrow = stats_kernel.histogram_u8(x, 3, np.empty(0, np.uint32))
    wide = stats_kernel.histogram_u8(x, 3, np.empty(0, np.uint64))
    for a, b in zip(narrow, wide, strict=True):
        assert a.dtype == b.dtype
        assert np.array_equal(a, b)


def test_kernel_from_threads_gives_the_same_moments() -> None:
    """The kernel releases the GIL: blocks reduced concurrently match one-by-one results."""
    blocks = [
        make_images(k, (20, 16, 16, 3), dtype, "full")
        for k in range(4)
        for dtype in (np.uint8, np.uint16)
    ]
    alone = [block_moments(b) for b in blocks]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(block_moments, blocks * 2))
    for m, expected in zip(together, alone * 2, strict=True):
        assert_same_moments(m, expected)


def test_kernel_in_spawned_worker_processes() -> None:
    """Worker processes of the processes scheduler (spawned) load and run the kernel."""
    blocks = [
        make_images(k, (18, 7, 9, 3), dtype, "full")
        for k in range(2)
        for dtype in (np.uint8, np.uint16)
    ]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        got = list(pool.map(stats_kernel.moment_sums, blocks))
    for sums, x in zip(got, blocks, strict=True):
        assert_same_sums(sums, stats_numpy.moment_sums(x))


def test_numpy_until_the_threshold_then_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process reduces its first COMPILED_AFTER_BYTES with numpy, then loads the kernel."""
    x = make_images(4, (6, 5, 7, 3), np.uint8, "full")
    used: list[str] = []

    def spy(name: str, fn: Callable[[np.ndarray], Any]) -> Callable[[np.ndarray], Any]:
        def wrapped(block: np.ndarray) -> Any:
            used.append(name)
            return fn(block)

        return wrapped

    monkeypatch.setattr(stats_numpy, "moment_sums", spy("numpy", stats_numpy.moment_sums))
    monkeypatch.setattr(stats_kernel, "moment_sums", spy("compiled", stats_kernel.moment_sums))
    monkeypatch.setattr(stats, "COMPILED_AFTER_BYTES", 3 * x.nbytes)
    monkeypatch.setattr(stats, "_reduced_with_numpy", 0)
    results = [block_moments(x) for _ in range(5)]
    assert used == ["numpy"] * 3 + ["compiled"] * 2
    for m in results[1:]:
        assert_same_moments(m, results[0])


# --- uint8 histograms: numpy byte pairs and kernel lanes -----------------------------------


def u8_histograms(x: np.ndarray) -> list[np.ndarray]:
    """The numpy version's pair-count histogram and the kernel's."""
    return [stats_numpy._histogram_u8(x), block_moments(x).histogram]


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.tuples(
        st.integers(1, 5), st.integers(1, 9), st.integers(1, 9), st.sampled_from([1, 3])
    ),
)
def test_histogram_u8_matches_bincount(seed: int, shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    for hist in u8_histograms(x):
        check_histogram(hist, x)


@pytest.mark.parametrize(
    "shape",
    [
        (1, 1, 1, 1),
        (1, 1, 1, 3),
        (1, 1, 3, 1),
        (3, 1, 1, 3),
        (1, 3, 3, 1),
        (1, 1, 5, 3),
        (2, 2, 2, 3),
        (1, 1, 2, 1),
        (7, 3, 3, 3),
        (1, 1, 11, 1),
        (1, 1, 13, 1),
        (1, 2, 2, 3),
        (1, 1, 1, 4),
        (1, 1, 4, 4),
    ],
    ids=lambda s: (
        f"{'x'.join(map(str, s))}-rem{math.prod(s) % (2 * s[-1])}-{math.prod(s[1:]) % 12}"
    ),
)
def test_histogram_u8_remainders(shape: tuple[int, ...]) -> None:
    """Element counts that are and are not multiples of 2*C (the numpy pair period) and of
    12 (the kernel's lanes per image)."""
    x = np.random.default_rng(len(shape) + math.prod(shape)).integers(0, 256, shape, np.uint8)
    for hist in u8_histograms(x):
        check_histogram(hist, x)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16], ids=["u8", "u16"])
@pytest.mark.parametrize("channels", [1, 3])
def test_views_count_the_same(dtype: type, channels: int) -> None:
    """Non-contiguous and odd-address (unaligned for uint16) blocks give the same moments."""
    rng = np.random.default_rng(channels)
    top = int(np.iinfo(dtype).max)
    big = rng.integers(0, top + 1, (6, 5, 8, channels), dtype=dtype)
    strided = big[:, ::2, 1::3]
    raw = rng.integers(0, 256, 1 + 4 * 3 * 5 * channels * big.itemsize, dtype=np.uint8)
    odd = np.frombuffer(raw.tobytes(), dtype=dtype, offset=1).reshape(4, 3, 5, channels)
    for x in (strided, odd):
        if dtype == np.uint8:
            check_histogram(stats_numpy._histogram_u8(x), x)
        m = block_moments(x)
        assert_same_moments(m, block_moments_numpy(np.ascontiguousarray(x)))
        check_sums_against_oracle(m, x)


# --- totals beyond 2**64: Python ints, no int64 wrap-around -----------------------------------


def test_totals_beyond_2_64_from_real_images() -> None:
    """2**17 copies of one bright 256x256 uint16 image: per-channel sum of squares > 2**64."""
    x = np.random.default_rng(11).integers(40000, 65536, (1, 256, 256, 1), dtype=np.uint16)
    m = block_moments(x)
    for _ in range(17):
        m = combine([m, m])
    copies = 2**17
    assert m.n_images == copies
    fit = aggregate(m, (0.0, 50.0, 100.0))
    exact = x.reshape(-1).astype(object)
    total, total_sq = copies * int(exact.sum()), copies * int((exact * exact).sum())
    count = copies * x.size
    ch = fit.channels[0]
    assert total_sq > 2**64
    assert type(ch.total_sq) is int
    assert (ch.count, ch.total, ch.total_sq) == (count, total, total_sq)
    assert ch.mean == float(Fraction(total, count))
    assert_within_ulp(ch.std, std_oracle(count, total, total_sq))
    # Copies change no statistic: equal to the one image's float64 figures.
    assert ch.mean == float(Fraction(int(exact.sum()), x.size))
    np.testing.assert_allclose(ch.std, x.astype(np.float64).std(), rtol=1e-12, atol=0)
    assert fit.global_mean == ch.mean
    assert fit.global_std == ch.std
    hist = np.bincount(x.reshape(-1), minlength=65536) * copies
    assert [int(v) for v in m.histogram[0]] == hist.tolist()
    assert np.array_equal(fit.mean_image[..., 0], x[0, ..., 0].astype(np.float64))
    assert not fit.std_image.any()


def _single_pixel_moments(n: int, hist: dict[int, int]) -> Moments:
    """Moments of ``n`` uint16 1x1x1 images, built directly (no array could hold them).

    ``image_std`` is a one-row stand-in: an (n, 1) array of 2**31 or 2**62 rows cannot exist,
    and it only feeds mean_of_image_stds, which these tests do not check.
    """
    assert sum(hist.values()) == n
    total = sum(v * k for v, k in hist.items())
    total_sq = sum(v * v * k for v, k in hist.items())
    histogram = np.zeros((1, 65536), dtype=np.int64)
    for v, k in hist.items():
        histogram[0, v] = k
    wide = object if max(total, total_sq) > INT64_MAX else np.int64
    return Moments(
        n_images=n,
        pixel_max=65535,
        pixel_sum=np.array([total], dtype=wide).reshape(1, 1, 1),
        pixel_sumsq=np.array([total_sq], dtype=wide).reshape(1, 1, 1),
        histogram=histogram,
        image_std=np.zeros((1, 1)),
    )


def test_combine_switches_to_python_ints_before_int64_wraps() -> None:
    n = 2**31 + 5
    part = _single_pixel_moments(n, {65535: n})
    assert part.pixel_sumsq.dtype == np.int64  # each partial fits int64 ...
    naive = part.pixel_sumsq + part.pixel_sumsq
    assert int(naive[0, 0, 0]) < 0  # ... but int64 addition of two of them wraps silently
    merged = combine([part, part, part])
    expected_sq = 3 * n * 65535**2
    assert expected_sq > 2**64
    assert merged.pixel_sumsq.dtype == object
    assert int(merged.pixel_sumsq[0, 0, 0]) == expected_sq
    assert int(merged.pixel_sum[0, 0, 0]) == 3 * n * 65535
    fit = aggregate(merged, (50.0,))
    ch = fit.channels[0]
    assert (ch.count, ch.total, ch.total_sq) == (3 * n, 3 * n * 65535, expected_sq)
    assert ch.mean == 65535.0
    assert ch.std == 0.0
    assert fit.mean_image[0, 0, 0] == 65535.0
    assert fit.std_image[0, 0, 0] == 0.0


def test_histogram_counts_beyond_int64() -> None:
    """Bins holding ~2**62 counts; combining two must give 2**63 + 6 exactly, not a wrap."""
    n = 2**62 + 5
    part = _single_pixel_moments(n, {65535: 2**62 + 3, 1: 2})
    assert part.pixel_sum.dtype == object
    merged = combine([part, part])
    assert merged.n_images == 2 * n
    assert int(merged.histogram[0, 65535]) == 2**63 + 6 > INT64_MAX
    assert int(merged.histogram[0, 1]) == 4
    assert int(merged.histogram[0, 0]) == 0
    fit = aggregate(merged, (0.0, 50.0, 100.0))
    ch = fit.channels[0]
    count = 2 * n
    total = (2**63 + 6) * 65535 + 4
    total_sq = (2**63 + 6) * 65535**2 + 4
    assert (ch.count, ch.total, ch.total_sq) == (count, total, total_sq)
    assert ch.mean == float(Fraction(total, count))
    assert_within_ulp(ch.std, std_oracle(count, total, total_sq))
    assert ch.std > 0  # 4 pixels of value 1 among 2**63: tiny but not zero
    assert (ch.minimum, ch.maximum) == (1, 65535)
    assert ch.percentiles == {0.0: 1, 50.0: 65535, 100.0: 65535}
    assert fit.mean_image[0, 0, 0] == float(Fraction(total, count))
    assert_within_ulp(fit.std_image[0, 0, 0], std_oracle(count, total, total_sq))


# --- why exact: float32 drift, and the mean of per-image stds ----------------------------------


def test_float32_accumulation_drifts_ours_does_not() -> None:
    x = np.full((2000, 64, 64, 1), 200, dtype=np.uint8)
    x[::7, 3, 5] = 255
    x[::13, 60, 1] = 255
    bright = int((x == 255).sum())
    total, count = 200 * x.size + 55 * bright, x.size
    truth = Fraction(total, count)
    float32_mean = float(np.cumsum(x.reshape(-1), dtype=np.float32)[-1]) / count
    assert abs(float32_mean - float(truth)) > 1e-3  # the test would notice float32 drift
    fit = aggregate(block_moments(x))
    ch = fit.channels[0]
    assert ch.mean == float(truth)
    total_sq = 200**2 * (x.size - bright) + 255**2 * bright
    assert_within_ulp(ch.std, std_oracle(count, total, total_sq))
    # Blocked like a data loader's batches: still exact.
    batched = aggregate(combine([block_moments(b) for b in blocks_of(x, 37)]))
    assert_fit_identical(batched, fit)


def test_mean_of_image_stds_is_reported_but_is_not_the_std() -> None:
    """Between-image variance: the average per-image std (the CIFAR-10 0.2023 mistake) is low."""
    rng = np.random.default_rng(5)
    level = rng.integers(20, 236, (50, 1, 1, 3))
    x = (level + rng.integers(-3, 4, (50, 8, 8, 3))).astype(np.uint8)
    fit = aggregate(block_moments(x))
    xf = x.astype(np.float64)
    for c, ch in enumerate(fit.channels):
        values = x[..., c].reshape(-1).astype(object)
        total, total_sq = int(values.sum()), int((values * values).sum())
        assert_within_ulp(ch.std, std_oracle(len(values), total, total_sq))
        naive = xf[..., c].reshape(50, -1).std(axis=1).mean()
        np.testing.assert_allclose(ch.mean_of_image_stds, naive, rtol=1e-12, atol=0)
        assert ch.mean_of_image_stds < ch.std / 10


# --- percentiles given as decimals -----------------------------------------------------------


def test_decimal_percentiles_use_the_nearest_rank() -> None:
    """``percentiles: [0.1, 0.4, 99.9]`` in params.yaml means those decimals.

    (numpy's ``inverted_cdf`` is no oracle here: it rounds q/100*N in float64 and so gets
    0.1 and 0.4 right but 99.9 wrong, 999.0000000000001 -> rank 1000.)
    """
    values = np.random.default_rng(0).permutation(1000).astype(np.uint16)
    x = values.reshape(1000, 1, 1, 1)  # distinct values 0..999: value = rank - 1
    fit = aggregate(block_moments(x), (0.1, 0.4, 99.9))
    ordered = np.sort(values)
    assert [nearest_rank(ordered, q) for q in (0.1, 0.4, 99.9)] == [0, 3, 998]
    assert fit.channels[0].percentiles == {0.1: 0, 0.4: 3, 99.9: 998}


# --- bad inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(np.zeros((2, 3, 3, 3), dtype=np.int16), id="int16"),
        pytest.param(np.zeros((2, 3, 3, 3), dtype=np.float32), id="float32"),
        pytest.param(np.zeros((3, 3, 3), dtype=np.uint8), id="3-d"),
        pytest.param(np.zeros((1, 2, 3, 3, 3), dtype=np.uint8), id="5-d"),
    ],
)
def test_block_moments_rejects_bad_blocks(block: np.ndarray) -> None:
    with pytest.raises(TypeError, match="uint8 or uint16"):
        block_moments(block)


def test_combine_rejects_empty_and_mismatched() -> None:
    with pytest.raises(ValueError, match="nothing to combine"):
        combine([])
    a = block_moments(np.zeros((1, 2, 2, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="differently shaped"):
        combine([a, block_moments(np.zeros((1, 2, 3, 3), dtype=np.uint8))])
    with pytest.raises(ValueError, match="differently shaped"):
        combine([a, block_moments(np.zeros((1, 2, 2, 3), dtype=np.uint16))])
