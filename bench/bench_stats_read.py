"""`pipeline stats` against a pure 2-thread read of the same store, and per-sample reads.

Builds a warm prepared store of ``--n`` photo-like 256x256x3 uint8 images in the ingest layout
(bench_stats.py's builder), then, median of ``--reps`` interleaved runs:

1. pure read: 2 threads reading every shard file whole (``np.fromfile``), one task per shard;
2. ``run_stats`` end to end with the cache off (``PIPELINE_CACHE_DIR=off``);
3. 2,000 shuffled single samples through zarr (``array[i]``) and through the direct reader.

    PIPELINE_CACHE_DIR=off python bench/bench_stats_read.py --n 4096
"""

from __future__ import annotations

import argparse
import os
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

from pipeline.params import parse_params
from pipeline.shardread import open_shard_reader
from pipeline.stats_stage import run_stats


def pure_read(images: Path) -> int:
    files = sorted(p for p in (images / "c").rglob("*") if p.is_file())
    with ThreadPoolExecutor(2) as pool:
        return sum(pool.map(lambda p: int(np.fromfile(p, dtype=np.uint8)[0]), files))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
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


if __name__ == "__main__":
    main()
