"""Exact image statistics as chunk / combine / aggregate kernels (no Dask).

Integer images allow exact statistics: each block yields integer sums, sums of squares and
histograms (:class:`Moments`); partials merge by exact integer addition (switching to Python
ints where int64 could overflow); floats appear once, in :func:`aggregate`. Results are
therefore identical for any blocking, merge tree, worker count or order. This is the
"pairwise/parallel" sufficient-statistics scheme of Chan, Golub & LeVeque (1979) with the
rounding step removed: integer sums need no correction terms.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

__all__ = ["ChannelStats", "FitResult", "Moments", "aggregate", "block_moments", "combine"]

INT64_MAX = 2**63 - 1


@dataclass(frozen=True, kw_only=True)
class Moments:
    """Exact partial statistics of a set of images of shape (H, W, C)."""

    n_images: int
    pixel_max: int
    pixel_sum: np.ndarray  # (H, W, C) int64, or object (Python ints) near overflow
    pixel_sumsq: np.ndarray  # (H, W, C) int64, or object
    histogram: np.ndarray  # (C, pixel_max + 1) int64
    image_std: np.ndarray  # (n_images, C) float64: each image's own std, per channel


# The compiled kernel has a fixed cost on its first call in a process: numba's imports and
# loading its cached machine code took 0.6-0.9 s here, compiling it 2-5 s. The numpy passes
# reduce 64 MiB in about 0.2 s, so a process uses them until it has reduced that much: small
# fits (the sample data, tests, DVC experiments on a few hundred images) never load numba, and
# a large fit pays at most that 0.2 s more than with the compiled kernel from its first block.
COMPILED_AFTER_BYTES = 64 * 2**20
_reduced_with_numpy = 0
_numpy_bytes_lock = threading.Lock()


def _use_compiled(nbytes: int) -> bool:
    """True once this process has reduced ``COMPILED_AFTER_BYTES`` with numpy."""
    global _reduced_with_numpy
    with _numpy_bytes_lock:
        if _reduced_with_numpy >= COMPILED_AFTER_BYTES:
            return True
        _reduced_with_numpy += nbytes
        return False


def block_moments(block: np.ndarray) -> Moments:
    """Chunk step: exact moments of one (n, H, W, C) uint8 or uint16 block.

    The integer sums come from a compiled kernel (:mod:`pipeline.stats.kernel`), or for the
    first ``COMPILED_AFTER_BYTES`` of a process from the numpy version of the same sums
    (:mod:`pipeline.stats.kernel_numpy`). Both give the same integers, so the result never depends
    on
    which one ran. The kernel exists for speed: on a 256-image block of 256x256 RGB the numpy
    sums took 124-183 ms (the per-value histogram 79-95 ms of it) and held the stats stage at
    0.20-0.35x of a pure read of the store; the kernel takes 26-28 ms, and the stage reached
    0.76-0.81x (bench/RESULTS.md, "Stats").
    """
    if block.dtype not in (np.uint8, np.uint16) or block.ndim != 4:
        raise TypeError(f"expected a 4-D uint8 or uint16 block, got {block.dtype} {block.shape}")
    if _use_compiled(block.nbytes):
        from pipeline.stats.kernel import moment_sums  # imports numba: on first use only
    else:
        from pipeline.stats.kernel_numpy import moment_sums
    n, h, w, c = block.shape
    pixel_sum, pixel_sumsq, histogram, image_sum, image_sumsq = moment_sums(block)
    return Moments(
        n_images=n,
        pixel_max=255 if block.dtype == np.uint8 else 65535,
        pixel_sum=_exact_int64(pixel_sum).reshape(h, w, c),
        pixel_sumsq=_exact_int64(pixel_sumsq).reshape(h, w, c),
        histogram=histogram,
        image_std=_image_std(image_sum, image_sumsq, h * w),
    )


def _exact_int64(a: np.ndarray) -> np.ndarray:
    """uint64 totals as int64, or as Python ints when a value does not fit."""
    if a.size and int(a.max()) > INT64_MAX:
        return np.array([int(v) for v in a], dtype=object)
    return a.astype(np.int64)


def _image_std(sums: np.ndarray, sumsqs: np.ndarray, count: int) -> np.ndarray:
    """Each image's population std per channel, from exact integer sums.

    A per-image figure, so it only needs to be deterministic: the variance numerator is exact
    (int64 when it fits), then rounded once to float64 before the square root.
    """
    sums, sumsqs = sums.astype(np.uint64), sumsqs.astype(np.uint64)
    if int(sumsqs.max(initial=0)) * count < INT64_MAX:
        num = count * sumsqs.astype(np.int64) - sums.astype(np.int64) ** 2
        return np.sqrt(num.astype(np.float64)) / count
    out = np.empty(sums.shape, dtype=np.float64)
    for idx in np.ndindex(sums.shape):
        s, ss = int(sums[idx]), int(sumsqs[idx])
        out[idx] = _sqrt_ratio(count * ss - s * s, count * count)
    return out


def _sqrt_ratio(num: int, den: int) -> float:
    """sqrt(num / den) for non-negative integers, correct to well under one float64 ulp."""
    if num <= 0:
        return 0.0
    # Scale so the integer square root carries about 80 significant bits, then round once.
    shift = max(0, 160 - num.bit_length() + den.bit_length())
    shift += shift % 2
    root = math.isqrt((num << shift) // den)
    return float(Fraction(root, 1 << (shift // 2)))


def _merge(a: np.ndarray, b: np.ndarray, bound: int) -> np.ndarray:
    """Exact sum of two integer arrays; Python ints when ``bound`` may exceed int64."""
    if bound > INT64_MAX or a.dtype == object or b.dtype == object:
        return a.astype(object) + b.astype(object)
    return a + b


def combine(parts: Sequence[Moments]) -> Moments:
    """Combine step: exact sum of partial moments (any grouping or order gives the same)."""
    if not parts:
        raise ValueError("nothing to combine")
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    n = first.n_images
    pixel_sum, pixel_sumsq, histogram = first.pixel_sum, first.pixel_sumsq, first.histogram
    for p in parts[1:]:
        if p.pixel_sum.shape != first.pixel_sum.shape or p.pixel_max != first.pixel_max:
            raise ValueError("cannot combine moments of differently shaped images")
        n += p.n_images
        pixel_sum = _merge(pixel_sum, p.pixel_sum, n * first.pixel_max)
        pixel_sumsq = _merge(pixel_sumsq, p.pixel_sumsq, n * first.pixel_max**2)
        histogram = _merge(histogram, p.histogram, n * first.pixel_sum.size)
    return Moments(
        n_images=n,
        pixel_max=first.pixel_max,
        pixel_sum=pixel_sum,
        pixel_sumsq=pixel_sumsq,
        histogram=histogram,
        image_std=np.concatenate([p.image_std for p in parts]),
    )


@dataclass(frozen=True, kw_only=True)
class ChannelStats:
    """Exact per-channel figures in pixel units."""

    count: int
    total: int
    total_sq: int
    mean: float
    std: float
    minimum: int
    maximum: int
    percentiles: dict[float, int]
    mean_of_image_stds: float


@dataclass(frozen=True, kw_only=True)
class FitResult:
    """Aggregate step output: per-channel, global and per-pixel statistics."""

    n_images: int
    pixel_max: int
    channels: list[ChannelStats]
    global_mean: float
    global_std: float
    mean_image: np.ndarray  # (H, W, C) float64
    std_image: np.ndarray  # (H, W, C) float64, population std of each pixel over images


def _percentile(hist: Sequence[int], count: int, q: float) -> int:
    """Nearest-rank percentile: the smallest value with at least ceil(q% of count) at or below."""
    rank = max(1, math.ceil(Fraction(repr(q)) / 100 * count))
    running = 0
    for value, c in enumerate(hist):
        running += c
        if running >= rank:
            return value
    raise ValueError("empty histogram")


def _pixel_images(s: np.ndarray, ss: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std image from exact per-pixel sums, vectorized while int64 holds them.

    ``s / n`` is the correctly rounded mean while both are below 2**53; the std's numerator
    ``n * ss - s**2`` is exact, then rounded once before the square root (deterministic).
    """
    limit = 2**53
    fits = (
        s.dtype != object
        and ss.dtype != object
        and n < limit
        and int(s.max(initial=0)) < limit
        and int(ss.max(initial=0)) <= INT64_MAX // max(n, 1)
    )
    if fits:
        num = n * ss - s * s
        return s / n, np.sqrt(num.astype(np.float64)) / n
    flat_s, flat_ss = s.astype(object).reshape(-1), ss.astype(object).reshape(-1)
    mean = np.array([float(Fraction(int(v), n)) for v in flat_s])
    std = np.array(
        [
            _sqrt_ratio(n * int(b) - int(a) * int(a), n * n)
            for a, b in zip(flat_s, flat_ss, strict=True)
        ]
    )
    return mean.reshape(s.shape), std.reshape(s.shape)


def aggregate(m: Moments, percentiles: Sequence[float] = (50.0,)) -> FitResult:
    """Aggregate step: round the exact totals to float64 once."""
    if m.n_images == 0:
        raise ValueError("no images to aggregate")
    h, w, _ = m.pixel_sum.shape
    per_channel_count = m.n_images * h * w
    values = [v * v for v in range(m.pixel_max + 1)]
    channels = []
    for c, row in enumerate(m.histogram):
        hist = [int(x) for x in row]  # Python ints: totals may pass 2**64
        total = sum(v * k for v, k in enumerate(hist))
        total_sq = sum(sq * k for sq, k in zip(values, hist, strict=True))
        nonzero = [v for v, k in enumerate(hist) if k]
        channels.append(
            ChannelStats(
                count=per_channel_count,
                total=total,
                total_sq=total_sq,
                mean=float(Fraction(total, per_channel_count)),
                std=_sqrt_ratio(per_channel_count * total_sq - total * total, per_channel_count**2),
                minimum=nonzero[0],
                maximum=nonzero[-1],
                percentiles={q: _percentile(hist, per_channel_count, q) for q in percentiles},
                mean_of_image_stds=math.fsum(m.image_std[:, c]) / m.n_images,
            )
        )
    count = per_channel_count * len(channels)
    total = sum(ch.total for ch in channels)
    total_sq = sum(ch.total_sq for ch in channels)
    mean_image, std_image = _pixel_images(m.pixel_sum, m.pixel_sumsq, m.n_images)
    return FitResult(
        n_images=m.n_images,
        pixel_max=m.pixel_max,
        channels=channels,
        global_mean=float(Fraction(total, count)),
        global_std=_sqrt_ratio(count * total_sq - total * total, count * count),
        mean_image=mean_image,
        std_image=std_image,
    )
