"""Normalize stage throughput against "read + write a same-size float store", same run.

Inputs are made with the real stages: N synthetic photo-like 256x256 RGB JPEGs (q90; smooth
gradients, flat shapes, mild noise, seeded) -> ``pipeline.ingest.stage.run_ingest`` (16 images per
chunk, 256 per shard, no codec) -> ``pipeline.stats.stage.run_stats``. Then, on the warm
(page-cached) prepared store, median of ``--reps`` repetitions. Every pipeline run sits right
beside a fresh run of its baseline (order alternating by rep), so slow phases of a noisy VM hit
both; besides the ratio of medians each row reports the median of these paired ratios, which is
the steadier number when other processes share the 2 cores:

1. baseline: the same Dask threads scheduler (2 workers), one task per 256-image shard; each task
   reads its shard and writes ``block.astype(dtype)`` as one whole shard of an array made with
   ``pipeline.zarrstore.store.create_images_array`` (same chunks, shards and codec as the stage's
   output).
   No normalization math: this is the cost of reading and writing a same-size float store.
2. ``pipeline.normalize.stage.run_normalize`` (wall clock, lineage and sample arrays included) for
   per_channel and per_pixel in float32 and float16, per_image in float32, and per_channel
   float32 with codec lz4 and zstd, each against the baseline with the same dtype and codec.
   Each row also records the summed time the two worker threads spent inside
   ``expected_block`` (the normalization math) and in the Dask task phase, by wrapping those two
   names of ``pipeline.normalize.stage`` while the row runs (the package itself is not changed).
3. ``pipeline.normalize.modes.apply`` alone on one in-memory 256-image block of the store, per mode,
   1 thread (and 2 threads on two blocks for the per-channel path), plus faster candidates for
   the per-channel lookup-table path and the per-pixel float64 path. Every candidate is checked
   bit-identical to ``apply`` (``np.array_equal``).
4. peak memory of a child process running ``run_normalize`` on N and 4N images: ``ru_maxrss``
   (``resource.getrusage``) and ``VmHWM``. On Linux ru_maxrss keeps the parent's high-water mark
   across fork+exec, so VmHWM (which starts clean with the new address space) is the fair one.

Throughput counts uint8 input bytes (decimal MB/GB), images/s counts input images. Every timed
row records this process's own CPU seconds (all threads, user + system: a cost that other load
on the machine inflates far less than wall time), the CPU time other processes used meanwhile
("foreign load", in cores, from /proc/stat) and the hypervisor steal. Results go to
bench/out/normalize.json.

    python bench/bench_normalize.py            # n=4096 (and 4n=16384 for memory), ~20 min
    python bench/bench_normalize.py --quick    # smoke run (n=512), a few minutes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dask
import numpy as np
import zarr
from cpuload import own_cpu, proc_stat
from PIL import Image, ImageDraw

import pipeline.normalize.stage as normalize_module
from pipeline.core.runner import resolve_scheduler
from pipeline.ingest.stage import run_ingest
from pipeline.normalize.modes import Constants, _lut, apply, dataset_constants, per_image_constants
from pipeline.normalize.stage import expected_block, run_normalize
from pipeline.params import Params, parse_params
from pipeline.stats.document import load_stats
from pipeline.stats.stage import run_stats
from pipeline.zarrstore.store import create_images_array

BENCH_DIR = Path(__file__).resolve().parent
# The setup's ingest and stats need no cache (and should not fill the user's with benchmark data).
os.environ.setdefault("PIPELINE_CACHE_DIR", "off")
REPO = BENCH_DIR.parent
DEFAULT_JSON = BENCH_DIR / "out" / "normalize.json"
SIZE = 256
CHANNELS = 3
PIXELS = SIZE * SIZE * CHANNELS  # uint8 input bytes per image
CHUNK_IMAGES = 16
SHARD_IMAGES = 256
WORKERS = 2
TARGET_RATIO = 0.8
JPEG_QUALITY = 90
CLASSES = 10
PIECE = 3 * 16384  # elements per cache-sized piece in the candidates (384 KiB of intp index)


# --------------------------------------------------------------------------- machine facts


def _first_line_value(path: str, prefix: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_facts() -> dict[str, Any]:
    """CPU, memory and the versions that decide normalize speed."""
    import numcodecs
    import PIL

    mem = _first_line_value("/proc/meminfo", "MemTotal")
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _first_line_value("/proc/cpuinfo", "model name") or platform.processor(),
        "mem_total_gib": round(int(mem.split()[0]) / 2**20, 1) if mem else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "zarr": zarr.__version__,
        "dask": dask.__version__,
        "numcodecs": numcodecs.__version__,
        "pillow": PIL.__version__,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }


# --------------------------------------------------------------------------- CPU accounting




def timed(fn: Callable[[], Any]) -> tuple[float, float, float, float, Any]:
    """(wall s, own CPU s, foreign load in cores, steal in cores, result) of one call."""
    hz = os.sysconf("SC_CLK_TCK")
    busy0, steal0 = proc_stat()
    own0 = own_cpu()
    t0 = time.perf_counter()
    result = fn()
    wall = time.perf_counter() - t0
    busy1, steal1 = proc_stat()
    own = own_cpu() - own0
    foreign = max(0.0, (busy1 - busy0) / hz - own) / wall
    return wall, own, foreign, (steal1 - steal0) / hz / wall, result


def wait_idle(max_wait: float, threshold: float = 0.3) -> float:
    """Wait (at most ``max_wait`` s) until other processes use under ``threshold`` cores."""
    hz = os.sysconf("SC_CLK_TCK")
    t0 = time.perf_counter()
    while True:
        busy0, own0 = proc_stat()[0], own_cpu()
        time.sleep(0.5)
        load = max(0.0, (proc_stat()[0] - busy0) / hz - (own_cpu() - own0)) / 0.5
        if load < threshold or time.perf_counter() - t0 >= max_wait:
            return load


class Row:
    """Repeated timings of one end-to-end measurement."""

    def __init__(self, name: str, kind: str, dtype: str, codec: str, mode: str | None) -> None:
        self.name, self.kind, self.dtype, self.codec, self.mode = name, kind, dtype, codec, mode
        self.seconds: list[float] = []
        self.foreign: list[float] = []
        self.steal: list[float] = []
        self.extra: list[dict[str, float]] = []
        self.bytes_per_image: dict[str, float] = {}
        self.paired: list[float] = []  # baseline seconds / own seconds, per adjacent pair
        self.cpu: list[float] = []  # CPU seconds of this process (all threads, user + sys)

    def add(
        self, wall: float, cpu: float, foreign: float, steal: float, extra: dict[str, float]
    ) -> None:
        self.seconds.append(wall)
        self.cpu.append(cpu)
        self.foreign.append(foreign)
        self.steal.append(steal)
        self.extra.append(extra)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best_s(self) -> float:
        return min(self.seconds)

    def to_json(self, n: int, baseline: Row | None) -> dict[str, Any]:
        extra = {k: statistics.median(e[k] for e in self.extra) for k in (self.extra or [{}])[0]}
        return {
            "name": self.name,
            "kind": self.kind,
            "mode": self.mode,
            "dtype": self.dtype,
            "codec": self.codec,
            "n_images": n,
            "seconds": self.seconds,
            "median_s": self.median,
            "images_per_s": n / self.median,
            "mb_per_s_uint8_in": n * PIXELS / self.median / 1e6,
            "best_s": min(self.seconds),
            "ratio_vs_baseline": None if baseline is None else baseline.median / self.median,
            "paired_ratios": self.paired,
            "median_paired_ratio": statistics.median(self.paired) if self.paired else None,
            "best_of_ratio": None if baseline is None else min(baseline.seconds) / self.best_s,
            "cpu_seconds": self.cpu,
            "median_cpu_s": statistics.median(self.cpu),
            "cpu_ratio_vs_baseline": None
            if baseline is None
            else statistics.median(baseline.cpu) / statistics.median(self.cpu),
            "baseline": None if baseline is None else baseline.name,
            "foreign_load_cores": statistics.median(self.foreign),
            "steal_cores": statistics.median(self.steal),
            "bytes_per_image": self.bytes_per_image,
            **{f"median_{k}": v for k, v in extra.items()},
        }


# --------------------------------------------------------------------------- synthetic data


def make_image(index: int, seed: int) -> np.ndarray:
    """One deterministic photo-like RGB image: gradient, colour waves, shapes, noise sigma 4."""
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    theta = rng.uniform(0, 2 * np.pi)
    t = xx * np.cos(theta) + yy * np.sin(theta)
    t = (t - t.min()) / (t.max() - t.min())
    c0, c1 = rng.uniform(20, 235, (2, 3)).astype(np.float32)
    img = c0 + t[..., None] * (c1 - c0)
    for _ in range(2):
        fy, fx = rng.uniform(0.5, 2.5, 2)
        amp = rng.uniform(5, 25, 3).astype(np.float32)
        img += amp * np.sin(2 * np.pi * (fx * xx + fy * yy) + rng.uniform(0, 2 * np.pi))[..., None]
    im = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = (int(v) for v in rng.integers(0, SIZE - 16, 2))
        w, h = (int(v) for v in rng.integers(16, SIZE // 2, 2))
        box = (x0, y0, min(x0 + w, SIZE - 1), min(y0 + h, SIZE - 1))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    pixels = np.asarray(im, dtype=np.float32)
    pixels += rng.normal(0.0, 4.0, pixels.shape).astype(np.float32)
    return np.clip(pixels + 0.5, 0, 255).astype(np.uint8)


def _relpath(index: int) -> str:
    return f"class_{index % CLASSES:02d}/img_{index:06d}.jpg"


def _write_images(job: tuple[str, int, int, int]) -> int:
    root, start, stop, seed = job
    total = 0
    for i in range(start, stop):
        path = Path(root) / _relpath(i)
        Image.fromarray(make_image(i, seed)).save(path, "JPEG", quality=JPEG_QUALITY)
        total += path.stat().st_size
    return total


def generate(root: Path, start: int, stop: int, seed: int) -> int:
    """Write images ``start..stop-1`` as JPEGs under ``root``; return their total bytes."""
    for c in range(CLASSES):
        (root / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), a, min(a + 256, stop), seed) for a in range(start, stop, 256)]
    with mp.get_context("spawn").Pool(os.cpu_count() or 1) as pool:
        return sum(pool.imap_unordered(_write_images, jobs))


def link_subset(src: Path, dst: Path, n: int) -> None:
    """Hard-link images 0..n-1 of ``src`` into ``dst``."""
    for c in range(CLASSES):
        (dst / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        os.link(src / _relpath(i), dst / _relpath(i))


def make_params(src: Path, **normalize: Any) -> Params:
    """Pipeline params: 256x256 ingest of ``src``, the given normalize section."""
    return parse_params(
        {"ingest": {"image_size": [SIZE, SIZE], "source": str(src)}, "normalize": normalize}
    )


def prepare(src: Path, work: Path, name: str) -> tuple[Path, Path, dict[str, float]]:
    """run_ingest + run_stats on ``src``; return (prepared folder, stats folder, timings)."""
    params = make_params(src)
    prepared, stats = work / f"prepared-{name}", work / f"stats-{name}"
    t0 = time.perf_counter()
    run_ingest(src, prepared, params)
    t1 = time.perf_counter()
    run_stats(prepared / "images.zarr", stats, params)
    return prepared, stats, {"ingest_s": t1 - t0, "stats_s": time.perf_counter() - t1}


def warm(folder: Path) -> int:
    """Read every file under ``folder`` once (page cache); return the byte count."""
    total = 0
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    total += len(chunk)
    return total


def tree_bytes(folder: Path) -> int:
    """Sum of file sizes under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- baseline


def _baseline_shard(src: str, dst: str, start: int, stop: int, dtype: str) -> None:
    """Read samples [start, stop) and write ``block.astype(dtype)`` as one whole shard."""
    block = np.asarray(zarr.open_array(src, mode="r")[start:stop])
    zarr.open_array(dst, mode="r+")[start:stop] = block.astype(dtype)


def run_baseline(prepared: Path, out: Path, dtype: str, codec: str) -> None:
    """Read + write a same-size float store: same layout, scheduler and task split."""
    src = zarr.open_array(prepared / "images.zarr" / "images", mode="r")
    n, h, w, c = src.shape
    shard = (src.shards or src.chunks)[0]
    group = zarr.open_group(out / "images.zarr", mode="w")
    create_images_array(
        group,
        "images",
        shape=(n, h, w, c),
        dtype=dtype,
        chunk_images=src.chunks[0],
        shard_images=shard,
        codec=codec,
        codec_level=1,
    )
    src_path = str(prepared / "images.zarr" / "images")
    dst_path = str(out / "images.zarr" / "images")
    tasks = [
        dask.delayed(_baseline_shard, pure=True)(src_path, dst_path, a, min(a + shard, n), dtype)
        for a in range(0, n, shard)
    ]
    dask.compute(*tasks, scheduler="threads", num_workers=WORKERS)


# --------------------------------------------------------------------------- pipeline (timed)


@contextlib.contextmanager
def instrumented() -> Iterator[dict[str, float]]:
    """Sum the time spent in ``expected_block`` (all threads) and in the Dask task phase."""
    acc = {"math_thread_s": 0.0, "task_phase_s": 0.0}
    lock = threading.Lock()
    orig_block, orig_run = normalize_module.expected_block, normalize_module.run_tasks

    def block_wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return orig_block(*args, **kwargs)
        finally:
            with lock:
                acc["math_thread_s"] += time.perf_counter() - t0

    def run_wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return orig_run(*args, **kwargs)
        finally:
            acc["task_phase_s"] += time.perf_counter() - t0

    normalize_module.expected_block = block_wrapper  # type: ignore[assignment]
    normalize_module.run_tasks = run_wrapper  # type: ignore[assignment]
    try:
        yield acc
    finally:
        normalize_module.expected_block = orig_block  # type: ignore[assignment]
        normalize_module.run_tasks = orig_run  # type: ignore[assignment]


def check_output(prepared: Path, stats_dir: Path, out: Path, row: Row) -> None:
    """The first and last shard of an output store equal what the row should have written."""
    src = zarr.open_array(prepared / "images.zarr" / "images", mode="r")
    dst = zarr.open_array(out / "images.zarr" / "images", mode="r")
    n = src.shape[0]
    for a in sorted({0, (n - 1) // SHARD_IMAGES * SHARD_IMAGES}):
        block = np.asarray(src[a : a + SHARD_IMAGES])
        if row.kind == "baseline":
            want = block.astype(row.dtype)
        else:
            assert row.mode is not None
            stats = load_stats(stats_dir)
            constants = None
            if row.mode in ("per_channel", "per_pixel"):
                constants = dataset_constants(row.mode, stats, "pixel")
            want, _ = expected_block(block, row.mode, constants, 1e-6, 1.0, row.dtype)
        got = np.asarray(dst[a : a + SHARD_IMAGES])
        if got.dtype != want.dtype or not np.array_equal(got, want):
            raise AssertionError(f"{row.name}: shard at {a} differs from the expected values")


def end_to_end(
    prepared: Path,
    stats_dir: Path,
    work: Path,
    n: int,
    reps: int,
    idle_wait: float,
    quick: bool,
) -> list[dict[str, Any]]:
    """Baselines and run_normalize rows, interleaved per repetition."""
    base = {
        (dt, cd): Row(f"baseline read + write {dt}, codec {cd}", "baseline", dt, cd, None)
        for dt, cd in (
            ("float32", "none"),
            ("float16", "none"),
            ("float32", "lz4"),
            ("float32", "zstd"),
        )
    }
    norm = [
        Row(f"run_normalize {m} {dt}, codec {cd}", "normalize", dt, cd, m)
        for m, dt, cd in (
            ("per_channel", "float32", "none"),
            ("per_channel", "float16", "none"),
            ("per_pixel", "float32", "none"),
            ("per_pixel", "float16", "none"),
            ("per_image", "float32", "none"),
            ("per_channel", "float32", "lz4"),
            ("per_channel", "float32", "zstd"),
        )
    ]
    out = work / "out"
    checked: set[str] = set()

    def run(row: Row, rep: int) -> float:
        shutil.rmtree(out, ignore_errors=True)
        os.sync()  # start every run with no dirty pages waiting for writeback
        load = wait_idle(idle_wait)
        if row.kind == "baseline":
            wall, cpu, foreign, steal, _ = timed(
                lambda: run_baseline(prepared, out, row.dtype, row.codec)
            )
            extra: dict[str, float] = {}
        else:
            params = make_params(prepared, mode=row.mode, dtype=row.dtype, codec=row.codec)
            with instrumented() as acc:
                wall, cpu, foreign, steal, _ = timed(
                    lambda: run_normalize(prepared, stats_dir, out, params)
                )
            extra = dict(acc)
        extra["foreign_load_before"] = load
        row.add(wall, cpu, foreign, steal, extra)
        if row.name not in checked:
            images = out / "images.zarr" / "images"
            row.bytes_per_image = {
                "images_array": tree_bytes(images) / n,
                "whole_output": tree_bytes(out) / n,
                "files_in_images_array": sum(1 for p in images.rglob("*") if p.is_file()),
            }
            check_output(prepared, stats_dir, out, row)
            checked.add(row.name)
        print(
            f"  rep {rep} {row.name}: {wall:.2f} s ({n / wall:.0f} img/s, "
            f"CPU {cpu:.2f} s, foreign {foreign:.2f} cores)",
            flush=True,
        )
        return wall

    # Each normalize row runs right beside a fresh run of its baseline (so the f32 baseline
    # is measured once per f32 row and rep); the pair's order alternates with the rep.
    for rep in range(reps):
        for r in norm:
            b = base[(r.dtype, r.codec)]
            first, second = (b, r) if rep % 2 == 0 else (r, b)
            t_first, t_second = run(first, rep), run(second, rep)
            r.paired.append(t_first / t_second if first is b else t_second / t_first)
    shutil.rmtree(out, ignore_errors=True)
    rows = [b.to_json(n, None) for b in base.values()]
    rows += [r.to_json(n, base[(r.dtype, r.codec)]) for r in norm]
    if quick:
        for r in rows:
            r["quick"] = True
    return rows


# --------------------------------------------------------------------------- micro-benchmarks


def _median_time(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def _tiled(values: np.ndarray, count: int, dtype: Any) -> np.ndarray:
    return np.tile(np.asarray(values, dtype=dtype), count)


def lut_candidates(
    block: np.ndarray, constants: Constants, dtype: str
) -> dict[str, Callable[[], np.ndarray]]:
    """Per-channel alternatives to ``apply``'s LUT path; each returns the whole output block."""
    n = block.shape[0]
    c = block.shape[-1]
    flat = block.reshape(-1)
    table = _lut(constants, 255, np.dtype(dtype)).reshape(-1)
    chan = np.arange(c) * 256
    off_img = _tiled(chan, PIXELS // c, np.intp)
    off_img16 = _tiled(chan, PIXELS // c, np.uint16)
    off_piece = _tiled(chan, PIECE // c, np.intp)
    out = np.empty(block.shape, dtype=dtype)
    oflat, orows = out.reshape(-1), out.reshape(n, -1)
    idx_all = np.empty((n, PIXELS), dtype=np.intp)
    idx_img = np.empty(PIXELS, dtype=np.intp)
    idx_piece = np.empty(PIECE, dtype=np.intp)
    offs = _tiled(constants.offset, PIECE // c, np.float64)
    scale = _tiled(constants.scale, PIECE // c, np.float64)
    f64 = np.empty(PIECE, dtype=np.float64)

    def u16_index() -> np.ndarray:
        idx = block.reshape(n, -1).astype(np.uint16)
        idx += off_img16
        return np.take(table, idx).reshape(block.shape)

    def intp_reused_take_out() -> np.ndarray:
        np.add(block.reshape(n, -1), off_img, out=idx_all)
        np.take(table, idx_all, out=orows)
        return out

    def per_image(mode: str) -> Callable[[], np.ndarray]:
        def run() -> np.ndarray:
            rows = block.reshape(n, -1)
            for i in range(n):
                np.add(rows[i], off_img, out=idx_img)
                np.take(table, idx_img, out=orows[i], mode=mode)
            return out

        return run

    def pieces(mode: str) -> Callable[[], np.ndarray]:
        def run() -> np.ndarray:
            for a in range(0, flat.size, PIECE):
                np.add(flat[a : a + PIECE], off_piece, out=idx_piece)
                np.take(table, idx_piece, out=oflat[a : a + PIECE], mode=mode)
            return out

        return run

    def per_channel_strided() -> np.ndarray:
        t2 = table.reshape(c, 256)
        for ch in range(c):
            np.take(t2[ch], block[..., ch], out=out[..., ch])
        return out

    def float64_tiled_pieces() -> np.ndarray:
        # the same float64 operations as the LUT entries, so the same rounding (d = 1 here)
        for a in range(0, flat.size, PIECE):
            np.subtract(flat[a : a + PIECE], offs, out=f64)
            np.divide(f64, scale, out=f64)
            np.copyto(oflat[a : a + PIECE], f64, casting="same_kind")
        return out

    return {
        "uint16 index (tiled channel offsets), np.take -> fresh output": u16_index,
        "intp index into a reused buffer, np.take(out=preallocated)": intp_reused_take_out,
        "per image: 1.5 MiB reused intp index, take(out=)": per_image("raise"),
        "per image, take(mode='clip')": per_image("clip"),
        f"pieces of {PIECE} elements: reused intp index, take(out=)": pieces("raise"),
        f"pieces of {PIECE}, take(mode='clip')": pieces("clip"),
        "3 strided per-channel takes (out= channel views)": per_channel_strided,
        f"float64 arithmetic, tiled constants, pieces of {PIECE}": float64_tiled_pieces,
    }


def per_pixel_candidates(
    block: np.ndarray, constants: Constants, dtype: str
) -> dict[str, Callable[[], np.ndarray]]:
    """Per-pixel alternatives: the same float64 operations into reused buffers."""
    n = block.shape[0]
    rows = block.reshape(n, -1)
    offset, scale = constants.offset.reshape(-1), constants.scale.reshape(-1)
    out = np.empty(block.shape, dtype=dtype)
    orows = out.reshape(n, -1)
    f64 = np.empty(PIXELS, dtype=np.float64)

    def per_image() -> np.ndarray:
        for i in range(n):
            np.subtract(rows[i], offset, out=f64)
            np.divide(f64, scale, out=f64)
            np.copyto(orows[i], f64, casting="same_kind")
        return out

    return {"float64 per image into a reused 1.5 MiB buffer, out=preallocated": per_image}


def micro(prepared: Path, stats_dir: Path, reps: int) -> dict[str, Any]:
    """``apply`` per mode on one 256-image block, its steps, and bit-identical candidates."""
    src = zarr.open_array(prepared / "images.zarr" / "images", mode="r")
    block = np.asarray(src[0:SHARD_IMAGES])
    block2 = np.asarray(src[SHARD_IMAGES : 2 * SHARD_IMAGES]) if src.shape[0] >= 512 else block
    nbytes = block.nbytes
    stats = load_stats(stats_dir)
    rows: list[dict[str, Any]] = []

    def record(name: str, mode: str, dtype: str, seconds: float, **more: Any) -> None:
        rows.append(
            {
                "name": name,
                "mode": mode,
                "dtype": dtype,
                "seconds": seconds,
                "gb_per_s_uint8_in": nbytes / seconds / 1e9,
                **more,
            }
        )
        print(f"  {mode} {dtype} {name}: {nbytes / seconds / 1e9:.3f} GB/s", flush=True)

    wait_idle(30)
    # the modes through expected_block (per-image modes compute their constants too)
    for mode, dtypes in (
        ("per_channel", ("float32", "float16")),
        ("per_pixel", ("float32", "float16")),
        ("global", ("float32",)),
        ("min_max", ("float32",)),
        ("per_image", ("float32",)),
        ("per_image_per_channel", ("float32",)),
    ):
        constants = (
            None if mode.startswith("per_image") else dataset_constants(mode, stats, "pixel")
        )
        for dt in dtypes:
            s, _ = _median_time(
                lambda m=mode, k=constants, d=dt: expected_block(block, m, k, 1e-6, 1.0, d), reps
            )
            record("current expected_block (apply + per-image constants)", mode, dt, s)
    s, _ = _median_time(lambda: per_image_constants(block, "per_image", 1e-6, 1.0), reps)
    record("per_image_constants alone", "per_image", "-", s)

    # reference costs: the baseline's cast, and a cast into a reused buffer
    for dt in ("float32", "float16"):
        s, _ = _median_time(lambda d=dt: block.astype(d), reps)
        record("reference: block.astype (the baseline's cast)", "-", dt, s)
        buf = np.empty(block.shape, dtype=dt)
        s, _ = _median_time(lambda b=buf: np.copyto(b, block, casting="unsafe"), reps)
        record("reference: np.copyto into a reused buffer", "-", dt, s)

    # steps of the current LUT path (per_channel)
    pc = dataset_constants("per_channel", stats, "pixel")
    for dt in ("float32", "float16"):
        table = _lut(pc, 255, np.dtype(dt)).reshape(-1)
        s1, index = _median_time(lambda: block.astype(np.intp), reps)
        chan = np.arange(CHANNELS, dtype=np.intp) * 256

        def add(index: np.ndarray = index, chan: np.ndarray = chan) -> None:
            index += chan

        s2, _ = _median_time(add, reps)
        index = block.astype(np.intp) + chan
        s3, _ = _median_time(lambda t=table, i=index: np.take(t, i), reps)
        record("step: block.astype(intp) (fresh 8 B/px)", "per_channel", dt, s1)
        record("step: index += arange(3)*256 (broadcast, 3-long inner loop)", "per_channel", dt, s2)
        record("step: np.take(table, index) (fresh output)", "per_channel", dt, s3)
        del index

    # candidates, bit-identical to apply
    for mode, maker in (("per_channel", lut_candidates), ("per_pixel", per_pixel_candidates)):
        constants = dataset_constants(mode, stats, "pixel")
        for dt in ("float32", "float16"):
            ref = apply(block, constants, dt)
            s, _ = _median_time(lambda k=constants, d=dt: apply(block, k, d), reps)
            record("current apply", mode, dt, s, identical=True)
            for name, fn in maker(block, constants, dt).items():
                s, got = _median_time(fn, reps)
                same = got.dtype == ref.dtype and bool(np.array_equal(got, ref))
                assert same, f"{name} ({mode} {dt}) is not bit-identical to apply"
                record(name, mode, dt, s, identical=same)
            del ref

    # two threads on two blocks: does the path release the GIL? (the stage runs 2 threads)
    # (each thread has its own block and its own buffers, as each Dask task would)
    two = [block, block2]
    piece_clip = f"pieces of {PIECE}, take(mode='clip')"
    for dt in ("float32", "float16"):
        fast = [lut_candidates(b, pc, dt)[piece_clip] for b in two]
        variants: dict[str, list[Callable[[], Any]]] = {
            "current apply": [lambda b=b, d=dt: apply(b, pc, d) for b in two],
            piece_clip: fast,
        }
        for name, fns in variants.items():
            for fn in fns:
                fn()  # warm up (first touch of the buffers)
            with ThreadPoolExecutor(2) as pool:
                s, _ = _median_time(lambda fns=fns: list(pool.map(lambda f: f(), fns)), reps)
            record(
                f"2 threads, 2 blocks: {name}",
                "per_channel",
                dt,
                s / 2,
                note="wall seconds per block with both threads busy",
            )
    return {"block_images": SHARD_IMAGES, "block_bytes": nbytes, "rows": rows}


# --------------------------------------------------------------------------- memory (child)

CHILD = """
import json, resource, sys
from pathlib import Path
from pipeline.normalize.stage import run_normalize
from pipeline.params import parse_params

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None

params = parse_params({"normalize": {"mode": sys.argv[4], "dtype": sys.argv[5]}})
before = {"ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "vmhwm_kib": hwm()}
run_normalize(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), params)
after = {"ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "vmhwm_kib": hwm()}
print(json.dumps({"after_imports": before, "peak": after}))
"""


def child_peak(prepared: Path, stats_dir: Path, out: Path, mode: str, dtype: str) -> dict[str, Any]:
    """Peak memory of ``run_normalize`` in a fresh Python process."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(prepared), str(stats_dir), str(out), mode, dtype],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- report


def fmt_end_to_end(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| row | runs | img/s | MB/s (uint8 in) | best img/s | ratio of medians "
        "| median paired ratio | CPU s | CPU ratio | math s (threads summed) "
        "| bytes/image on disk | foreign load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def num(value: float | None, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    for r in rows:
        lines.append(
            f"| {r['name']} | {len(r['seconds'])} | {r['images_per_s']:.0f} "
            f"| {r['mb_per_s_uint8_in']:.0f} | {r['n_images'] / r['best_s']:.0f} "
            f"| {num(r['ratio_vs_baseline'], '.2f')} | {num(r['median_paired_ratio'], '.2f')} "
            f"| {r['median_cpu_s']:.1f} | {num(r['cpu_ratio_vs_baseline'], '.2f')} "
            f"| {num(r.get('median_math_thread_s'), '.2f')} "
            f"| {r['bytes_per_image']['images_array']:,.0f} | {r['foreign_load_cores']:.2f} |"
        )
    return "\n".join(lines)


def fmt_micro(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| mode | dtype | variant | GB/s (uint8 in) | ms/block |", "|---|---|---|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['dtype']} | {r['name']} | "
            f"{r['gb_per_s_uint8_in']:.3f} | {r['seconds'] * 1e3:.1f} |"
        )
    return "\n".join(lines)


def fmt_memory(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| mode | dtype | images | peak VmHWM MiB | after imports MiB | peak ru_maxrss MiB "
        "| wall s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['dtype']} | {r['n_images']} | {r['peak']['vmhwm_kib'] / 1024:.0f} "
            f"| {r['after_imports']['vmhwm_kib'] / 1024:.0f} "
            f"| {r['peak']['ru_maxrss_kib'] / 1024:.0f} | {r['wall_s']:.1f} |"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def workdir(parent: str | None, keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bench-normalize-", dir=parent))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=4096, help="images in the main store (default 4096)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per row (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: n=512, 2 reps")
    p.add_argument("--skip-memory", action="store_true", help="no 4n store, no child runs")
    p.add_argument(
        "--idle-wait",
        type=float,
        default=20.0,
        help="before each row wait up to this many s for other processes to go quiet",
    )
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    p.add_argument("--tmp", default=None, help="parent folder of the work directory")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.reps, args.idle_wait = 512, 2, 2.0
    if args.n % SHARD_IMAGES:
        p.error(f"--n must be a multiple of {SHARD_IMAGES}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    n = args.n
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "command": "python bench/bench_normalize.py " + " ".join(sys.argv[1:]),
        "machine": machine_facts(),
        "n": n,
        "reps": args.reps,
        "seed": args.seed,
        "layout": {
            "image": [SIZE, SIZE, CHANNELS],
            "chunk_images": CHUNK_IMAGES,
            "shard_images": SHARD_IMAGES,
            "input_codec": "none",
            "pipeline_scheduler": list(resolve_scheduler(parse_params({}).base, "io")),
            "baseline_scheduler": ["threads", WORKERS],
        },
        "target_ratio": TARGET_RATIO,
    }
    with workdir(args.tmp, args.keep) as work:
        big = n * 4 if not args.skip_memory else n
        src_all = work / "src-all"
        print(f"generating {big} JPEGs ...", flush=True)
        t0 = time.perf_counter()
        jpeg_bytes = generate(src_all, 0, big, args.seed)
        result["data"] = {
            "generate_s": time.perf_counter() - t0,
            "mean_jpeg_bytes": jpeg_bytes / big,
            "jpeg_quality": JPEG_QUALITY,
        }
        src_n = work / "src-n"
        link_subset(src_all, src_n, n)
        print("ingest + stats ...", flush=True)
        prepared, stats_dir, times = prepare(src_n, work, "n")
        result["data"]["prepare_n"] = times
        result["data"]["prepared_bytes_per_image"] = tree_bytes(prepared / "images.zarr") / n
        warm(prepared)

        print("end to end ...", flush=True)
        result["end_to_end"] = end_to_end(
            prepared, stats_dir, work, n, args.reps, args.idle_wait, args.quick
        )
        print("micro-benchmarks ...", flush=True)
        result["micro"] = micro(prepared, stats_dir, max(args.reps, 3))

        if not args.skip_memory:
            print("memory ...", flush=True)
            prepared4, stats4, times4 = prepare(src_all, work, "4n")
            result["data"]["prepare_4n"] = times4
            mem = []
            for mode in ("per_channel", "per_pixel"):
                for folder, st, count in ((prepared, stats_dir, n), (prepared4, stats4, big)):
                    r = child_peak(folder, st, work / "mem-out", mode, "float32")
                    r.update(mode=mode, dtype="float32", n_images=count)
                    mem.append(r)
                    print(
                        f"  {mode} n={count}: VmHWM {r['peak']['vmhwm_kib'] / 1024:.0f} MiB",
                        flush=True,
                    )
            result["memory"] = mem
    result["total_s"] = time.perf_counter() - t_start
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print("\n" + fmt_end_to_end(result["end_to_end"]))
    print("\n" + fmt_micro(result["micro"]["rows"]))
    if "memory" in result:
        print("\n" + fmt_memory(result["memory"]))
    print(f"\nwrote {args.json} in {result['total_s']:.0f} s")


if __name__ == "__main__":
    main()
