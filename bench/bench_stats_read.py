"""`pipeline stats` against a pure 2-thread read of the same store, and per-sample reads.

Builds a warm prepared store of ``--n`` photo-like 256x256x3 uint8 images in the ingest layout
(bench_stats.py's builder), then, median of ``--reps`` interleaved runs:

1. pure read: 2 threads reading every shard file whole (``np.fromfile``), one task per shard;
2. ``run_stats`` end to end with the cache off (``PIPELINE_CACHE_DIR=off``);
3. 2,000 shuffled single samples through zarr (``array[i]``) and through the direct reader;
4. ``verify_store`` on the prepared store (every digest), and ``run_normalize`` (float32 output)
   on its first ``--n-normalize`` images, once each, against the pure read of the same images;
5. a per-part breakdown of one 256-image block on one thread (direct read into a reused buffer,
   zarr read, CRC-32C check, the kernel's per-pixel pass and its histogram pass, the whole
   ``block_moments``), and the same chunk task on 2 threads at once (does it scale?).

    PIPELINE_CACHE_DIR=off python bench/bench_stats_read.py --n 4096
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).parent))
from bench_stats import build_store, ingest_template, make_view

from pipeline.core.digests import check_digests
from pipeline.normalize.stage import run_normalize
from pipeline.params import parse_params
from pipeline.stats.moments import block_moments
from pipeline.stats.stage import _read_moments, run_stats
from pipeline.tools.verify import verify_store
from pipeline.zarrstore.shardread import open_shard_reader
from pipeline.zarrstore.store import open_prepared, read_samples


def _ms(fn: object, reps: int = 5) -> float:
    """Median wall time of ``fn()`` in ms."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def breakdown(view: Path, block: int) -> None:
    """Where one block's time goes, one thread; then 2 threads on 2 blocks."""
    from pipeline.stats.kernel import histogram_u8, moment_sums, pixel_sums

    images = view / "images"
    path = str(images)
    digests = open_prepared(view).digests
    array = zarr.open_array(images, mode="r")
    x = read_samples(path, 0, block).copy()
    flat = x.reshape(len(x), -1)
    like = np.empty(0, np.uint32)
    moment_sums(x)  # load the compiled kernel
    parts = {
        "direct read": _ms(lambda: read_samples(path, 0, block, reuse_buffer=True)),
        "zarr read": _ms(lambda: np.asarray(array[0:block]), 3),
        "crc32c check": _ms(lambda: check_digests(x, digests[:block], 0, path)),
        "pixel sums": _ms(lambda: pixel_sums(flat)),
        "histogram": _ms(lambda: histogram_u8(flat, x.shape[-1], like)),
        "block_moments": _ms(lambda: block_moments(x)),
        "chunk task": _ms(lambda: _read_moments(path, 0, block, digests[:block])),
    }
    line = ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
    print(f"one {block}-image block, 1 thread, ms: {line}")
    n_blocks = array.shape[0] // block
    one = parts["chunk task"]

    def two() -> None:
        with ThreadPoolExecutor(2) as pool:
            spans = [(b * block, (b + 1) * block) for b in range(min(n_blocks, 8))]
            list(pool.map(lambda ab: _read_moments(path, *ab, digests[ab[0] : ab[1]]), spans))

    t2 = _ms(two, 3) / min(n_blocks, 8)
    print(f"chunk task on 2 threads: {t2:.1f} ms per block ({one / t2:.2f}x one thread)")


def pure_read(images: Path) -> int:
    files = sorted(p for p in (images / "c").rglob("*") if p.is_file())
    with ThreadPoolExecutor(2) as pool:
        return sum(pool.map(lambda p: int(np.fromfile(p, dtype=np.uint8)[0]), files))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-normalize", type=int, default=1024)
    args = ap.parse_args()
    os.environ["PIPELINE_CACHE_DIR"] = "off"
    with TemporaryDirectory() as tmp:
        work = Path(tmp)
        store = work / "store.zarr"
        build_store(ingest_template(work, 0), store, args.n, 0)
        view = make_view(store, work / "view.zarr", args.n)
        images = view / "images"
        pure_read(images)  # warm the page cache
        params = parse_params({})
        t_read, t_stats = [], []
        for rep in range(args.reps):
            t0 = time.perf_counter()
            pure_read(images)
            t_read.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run_stats(view, work / f"stats{rep}", params)
            t_stats.append(time.perf_counter() - t0)
        r, s = statistics.median(t_read), statistics.median(t_stats)
        print(f"pure 2-thread read: {args.n / r:,.0f} images/s")
        print(f"run_stats:          {args.n / s:,.0f} images/s  ({r / s:.2f}x the pure read)")
        t0 = time.perf_counter()
        report = verify_store(view)
        v = time.perf_counter() - t0
        assert report.ok, report.problems
        print(f"verify (prepared):  {args.n / v:,.0f} images/s  ({r / v:.2f}x the pure read)")
        m = min(args.n_normalize, args.n)
        small = make_view(store, work / "small" / "images.zarr", m)
        pure_read(small / "images")
        t0 = time.perf_counter()
        pure_read(small / "images")
        r_small = time.perf_counter() - t0
        run_stats(small, work / "stats_small", params)
        t0 = time.perf_counter()
        run_normalize(small.parent, work / "stats_small", work / "normalized.zarr", params)
        t_norm = time.perf_counter() - t0
        shutil.rmtree(work / "normalized.zarr")
        print(
            f"run_normalize:      {m / t_norm:,.0f} images/s on {m} images, float32 out "
            f"({r_small / t_norm:.2f}x the pure read of its input)"
        )
        array = zarr.open_array(images, mode="r")
        reader = open_shard_reader(array, images)
        assert reader is not None
        rows = np.random.default_rng(0).integers(0, args.n, 2000)
        t0 = time.perf_counter()
        for i in rows[:300]:
            np.asarray(array[int(i)])
        per_zarr = (time.perf_counter() - t0) / 300
        t0 = time.perf_counter()
        for i in rows:
            reader.read(np.array([i]))
        per_direct = (time.perf_counter() - t0) / len(rows)
        zarr_ms, direct_ms = per_zarr * 1e3, per_direct * 1e3
        print(f"one shuffled sample: zarr {zarr_ms:.3f} ms, direct {direct_ms:.3f} ms")
        breakdown(view, min(256, args.n))
        print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
