"""Compiled chunk kernel behind :func:`pipeline.stats.moments.block_moments` (numba).

Why a hand-written kernel: on one 256-image block of 256x256 RGB uint8 (50 MB, one thread, 2-core
VM) the numpy version took 124-183 ms, of which the exact per-value histogram (``np.bincount``,
which first widens every byte to int64) took 79-95 ms and the five summing passes (each a separate
trip through memory with its own temporaries) 52-88 ms. The stats stage then ran at 0.20-0.35x of
a pure read of the same store. Two compiled passes over the block do the same integer work in
26-28 ms, with no temporaries the size of the block, and the stage reaches 0.76-0.81x of the
pure read in its least disturbed runs (numbers in bench/RESULTS.md, "Stats").

Every function here only adds integers, so the results are exactly those of the numpy version
(:mod:`pipeline.stats.kernel_numpy`; the tests compare the two bit for bit). The functions release
the
GIL (``nogil``): Dask threads reduce different blocks at the same time. ``cache=True`` keeps the
machine code beside this file (in __pycache__), so only the first call after a change of this
file compiles (2-5 s per dtype); later processes load it on their first call (0.6-0.9 s with
numba's own imports), which is why :func:`pipeline.stats.moments.block_moments` reduces small fits
with
numpy instead.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["moment_sums"]

TILE = 8192  # pixels per tile of the per-pixel sums: two accumulator rows stay in L1/L2
LANES = 48  # image-sum lanes for uint16: a multiple of 1, 2, 3, 4, 6, 8, 12, 16 and 24 channels
FLUSH_U8 = 65536  # uint8 images per uint32 tile accumulation: 65536 * 255**2 < 2**32
U8_LANES = 12  # uint8 histogram lanes per image: a multiple of 4 (bytes per word) and of C<=4
COUNTER_ROW = 264  # counters per lane: 256 used; the padding avoids 4 KiB aliasing between lanes
BYTE = np.uint32(0xFF)


@njit(cache=True, nogil=True)
def _add_u8(seg, acc, acc2):
    """acc += seg, acc2 += seg**2 elementwise (vectorized by LLVM)."""
    for p in range(seg.size):
        v = np.uint32(seg[p])
        acc[p] += v
        acc2[p] += v * v


@njit(cache=True, nogil=True)
def _add_u16(seg, acc, acc2):
    """acc += seg, acc2 += seg**2 elementwise, in uint64."""
    for p in range(seg.size):
        v = np.uint64(seg[p])
        acc[p] += v
        acc2[p] += v * v


@njit(cache=True, nogil=True)
def pixel_sums(x):
    """Per-pixel sums and sums of squares (uint64) over the images of ``x`` (n, size).

    A tile of pixels at a time, all images into one small accumulator row per tile: the rows of
    ``x`` stream through once and the accumulators stay in cache. uint8 tiles add in uint32 and
    are flushed into the uint64 totals every ``FLUSH_U8`` images, before uint32 could wrap.
    """
    n, size = x.shape
    pixel_sum = np.zeros(size, np.uint64)
    pixel_sumsq = np.zeros(size, np.uint64)
    small = x.itemsize == 1
    acc32 = np.empty(TILE if small else 0, np.uint32)
    acc32_sq = np.empty(TILE if small else 0, np.uint32)
    acc64 = np.empty(0 if small else TILE, np.uint64)
    acc64_sq = np.empty(0 if small else TILE, np.uint64)
    for start in range(0, size, TILE):
        stop = min(start + TILE, size)
        width = stop - start
        if small:
            for first in range(0, n, FLUSH_U8):
                a, a2 = acc32[:width], acc32_sq[:width]
                a[:] = 0
                a2[:] = 0
                for i in range(first, min(first + FLUSH_U8, n)):
                    _add_u8(x[i, start:stop], a, a2)
                for p in range(width):
                    pixel_sum[start + p] += a[p]
                    pixel_sumsq[start + p] += a2[p]
        else:
            b, b2 = acc64[:width], acc64_sq[:width]
            b[:] = 0
            b2[:] = 0
            for i in range(n):
                _add_u16(x[i, start:stop], b, b2)
            for p in range(width):
                pixel_sum[start + p] += b[p]
                pixel_sumsq[start + p] += b2[p]
    return pixel_sum, pixel_sumsq


@njit(cache=True, nogil=True)
def histogram_u8(x, channels, count_like):
    """Per-channel histogram (C, 256) int64 of uint8 ``x`` (n, size), and each image's
    per-channel sum and sum of squares (n, C) uint64, read off that image's own histogram.

    Each image is counted into interleaved histograms ("lanes": lane j counts the positions
    p % lanes == j, which hold channel j % C), then folded. Measured on one 256-image RGB
    block: the lanes keep flat image areas (runs of one value) from serializing on one counter
    (a 4x slowdown with a single histogram); 32-bit loads of four pixels are 1.4x faster than
    byte loads; rows of 264 rather than 256 counters avoid 4 KiB aliasing between lanes (1.6x
    on flat images). The counters are allocated here, not passed in, so LLVM knows that they
    cannot alias the pixels (2x). Their dtype is that of ``count_like``: uint32, or uint64 for
    images of 2**32 values or more.
    """
    n, size = x.shape
    fast = U8_LANES % channels == 0
    lanes = U8_LANES if fast else channels * ((U8_LANES + channels - 1) // channels)
    counts = np.zeros((lanes, COUNTER_ROW), count_like.dtype)
    histogram = np.zeros((channels, 256), np.int64)
    image_sum = np.zeros((n, channels), np.uint64)
    image_sumsq = np.zeros((n, channels), np.uint64)
    steps = size // lanes
    body = steps * lanes
    for i in range(n):
        row = x[i]
        counts[:] = 0
        # The counting loops are written out here, not called: in a called function LLVM could
        # not tell that ``counts`` and ``row`` never overlap (measured 1.2-2x slower).
        if fast:
            for q in range(steps):
                base = q * U8_LANES
                for k in range(U8_LANES // 4):
                    o = base + 4 * k
                    word = (
                        np.uint32(row[o])
                        | (np.uint32(row[o + 1]) << 8)
                        | (np.uint32(row[o + 2]) << 16)
                        | (np.uint32(row[o + 3]) << 24)
                    )
                    for b in range(4):
                        counts[4 * k + b, (word >> (8 * b)) & BYTE] += 1
        else:
            for q in range(steps):
                base = q * lanes
                for j in range(lanes):
                    counts[j, row[base + j]] += 1
        for p in range(body, size):
            counts[p - body, row[p]] += 1
        for ch in range(channels):
            s = np.uint64(0)
            ss = np.uint64(0)
            for v in range(256):
                k = np.uint64(0)
                for j in range(ch, lanes, channels):
                    k += np.uint64(counts[j, v])
                histogram[ch, v] += np.int64(k)
                s += k * np.uint64(v)
                ss += k * np.uint64(v * v)
            image_sum[i, ch] = s
            image_sumsq[i, ch] = ss
    return histogram, image_sum, image_sumsq


@njit(cache=True, nogil=True)
def _lane_sums(row, lanes, out, out_sq):
    """out[j] += sum of row[p] over p % lanes == j (and squares), in uint64."""
    body = row.size - row.size % lanes
    if lanes == LANES:  # constant trip count: vectorized
        for q in range(0, body, LANES):
            for j in range(LANES):
                v = np.uint64(row[q + j])
                out[j] += v
                out_sq[j] += v * v
    else:
        for q in range(0, body, lanes):
            for j in range(lanes):
                v = np.uint64(row[q + j])
                out[j] += v
                out_sq[j] += v * v
    for p in range(body, row.size):
        v = np.uint64(row[p])
        out[p - body] += v
        out_sq[p - body] += v * v


@njit(cache=True, nogil=True)
def histogram_u16(x, channels):
    """Per-channel histogram (C, 65536) int64 of uint16 ``x`` (n, size), and each image's
    per-channel sum and sum of squares (n, C) uint64 (lane sums folded into channels)."""
    n, size = x.shape
    lanes = LANES if LANES % channels == 0 else channels
    flat = np.zeros(channels * 65536, np.int64)
    image_sum = np.zeros((n, channels), np.uint64)
    image_sumsq = np.zeros((n, channels), np.uint64)
    offset = np.empty(lanes, np.int64)
    for j in range(lanes):
        offset[j] = (j % channels) * 65536
    out = np.empty(lanes, np.uint64)
    out_sq = np.empty(lanes, np.uint64)
    steps = size // lanes
    body = steps * lanes
    for i in range(n):
        row = x[i]
        for q in range(steps):
            base = q * lanes
            for j in range(lanes):
                flat[offset[j] + row[base + j]] += 1
        for p in range(body, size):
            flat[offset[p - body] + row[p]] += 1
        out[:] = 0
        out_sq[:] = 0
        _lane_sums(row, lanes, out, out_sq)
        for ch in range(channels):
            s = np.uint64(0)
            ss = np.uint64(0)
            for j in range(ch, lanes, channels):
                s += out[j]
                ss += out_sq[j]
            image_sum[i, ch] = s
            image_sumsq[i, ch] = ss
    return flat.reshape(channels, 65536), image_sum, image_sumsq


def moment_sums(
    block: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact integer sums of one (n, H, W, C) uint8 or uint16 block.

    Returns per-pixel sums and sums of squares (H*W*C,) uint64, the per-channel histogram
    (C, pixel_max + 1) int64, and per-image, per-channel sums and sums of squares (n, C) uint64.
    """
    n, h, w, c = block.shape
    size = h * w * c
    # A C-contiguous, aligned (n, size) view; copies only odd views (strided or unaligned).
    x = np.require(block, requirements=("C", "A")).reshape(n, size)
    pixel_sum, pixel_sumsq = pixel_sums(x)
    if block.dtype == np.uint8:
        count_like = np.empty(0, dtype=np.uint64 if size >= 2**32 else np.uint32)
        histogram, image_sum, image_sumsq = histogram_u8(x, c, count_like)
    else:
        histogram, image_sum, image_sumsq = histogram_u16(x, c)
    return pixel_sum, pixel_sumsq, histogram, image_sum, image_sumsq
