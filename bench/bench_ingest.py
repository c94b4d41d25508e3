"""Ingest throughput against the machine's limit, measured in the same run on the same files.

What is compared, on N synthetic photo-like JPEGs (q90, about 17 KB each) in class folders:

- baseline ("limit"): two processes each decode half of the files with Pillow
  (``np.asarray(Image.open(f).convert("RGB"))``) and write the raw pixels into their own row
  range of one shared ``np.memmap`` file. No hashing, no manifest, no Zarr: the least work that
  turns the folder into pixels on disk with both cores. Timed from listing the folder to the
  last worker exiting, process start-up included.
- pipeline: ``pipeline.ingest.stage.run_ingest`` with ``ingest.image_size`` (formerly ``size``)
equal
  to the image size (no resize), timed as wall clock including Dask's worker start-up. Twice:
  as a first run does it (an empty decode cache that the run fills, the default), and with the
  cache off (what the cache costs when nothing can be reused).
- variants (``--variants``): codec none / zstd / lz4, chunk_images 16 vs 64 vs 256 (shard 256),
  scheduler threads vs processes (``auto`` is processes for decoding), and the processes
  scheduler with Dask's task batching switched off (``dask.config`` ``chunksize=1``; not a
  pipeline param: Dask hands tasks to worker processes in batches of 6 by default).
- peak memory: ingest of n and 10*n images, each in a fresh child process: the child's own
  peak (VmHWM), its largest worker's peak (VmHWM polled with psutil), the polled peak of the
  RSS summed over the child and all its workers, and getrusage's ru_maxrss for SELF and
  CHILDREN (which Linux carries over from the forking process, so treat it as an upper bound).

Timings: ``--reps`` repetitions, baseline and pipeline interleaved so slow phases of a noisy VM
hit both. Before each run the script waits (up to ``--wait-idle`` s) for other processes to go
quiet, and it records the cores that other processes and the hypervisor took during the run
(from /proc/stat) and our own CPU time. A rep is "clean" when others took under 0.3 cores; the
median is over the clean reps when there is one, else over all reps. Files and outputs stay in
the page cache; nothing is fsynced by either side. MB/s counts uncompressed pixel bytes
(decimal MB). Results go to bench/out/ingest.json.

    python bench/bench_ingest.py --n 10240 --size 256            # baseline + default config
    python bench/bench_ingest.py --n 10240 --size 256 --variants # plus the variant table
    python bench/bench_ingest.py --quick                         # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cpuload import own_cpu, proc_stat
from PIL import Image, ImageDraw

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_JSON = BENCH_DIR / "out" / "ingest.json"
TARGET_RATIO = 0.8
JPEG_QUALITY = 90
NOISE_SIGMA = 4.0
TEXTURE_CELLS = 64
TEXTURE_SIGMA = 10.0
MP_CONTEXT = "spawn"  # the same start method Dask's processes scheduler uses
# A rep is "clean" when other processes plus the hypervisor took under this many cores on
# average while it ran; medians use the clean reps when there is at least one.
CLEAN_LOAD = 0.3


# --------------------------------------------------------------------------- machine facts


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_facts() -> dict[str, Any]:
    """CPU count, memory and the versions that decide ingest speed."""
    import dask
    import PIL
    import zarr
    from PIL import features

    try:
        import psutil

        psutil_version: str | None = psutil.__version__
    except ImportError:
        psutil_version = None
    return {
        "nproc": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "mem_total_gib": _mem_total_gib(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "libjpeg": str(features.version("jpg")),
        "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "zarr": zarr.__version__,
        "dask": dask.__version__,
        "psutil": psutil_version,
    }


# --------------------------------------------------------------------------- data generation


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Band-limited texture: coarse Gaussian noise upsampled bicubically, per channel."""
    small = rng.normal(0.0, TEXTURE_SIGMA, (TEXTURE_CELLS, TEXTURE_CELLS, 3)).astype(np.float32)
    planes = [
        np.asarray(
            Image.fromarray(small[..., c], mode="F").resize(
                (size, size), Image.Resampling.BICUBIC
            )
        )
        for c in range(3)
    ]
    return np.stack(planes, axis=-1)


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear two-colour gradient in a random direction plus two smooth colour waves."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    theta = rng.uniform(0, 2 * np.pi)
    t = xx * np.cos(theta) + yy * np.sin(theta)
    t = (t - t.min()) / (t.max() - t.min())
    c0, c1 = rng.uniform(20, 235, (2, 3)).astype(np.float32)
    img = c0 + t[..., None] * (c1 - c0)
    for _ in range(2):
        fy, fx = rng.uniform(0.5, 2.5, 2)
        phase = rng.uniform(0, 2 * np.pi)
        amp = rng.uniform(5, 25, 3).astype(np.float32)
        img += amp * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)[..., None]
    return img


def _draw_shapes(rng: np.random.Generator, im: Image.Image) -> None:
    """Two to five flat-coloured rectangles and ellipses."""
    size = im.width
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = (int(v) for v in rng.integers(0, size - 16, 2))
        w, h = (int(v) for v in rng.integers(16, size // 2, 2))
        box = (x0, y0, min(x0 + w, size - 1), min(y0 + h, size - 1))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse(box, fill=fill)
        else:
            draw.rectangle(box, fill=fill)


def make_image(index: int, size: int, seed: int) -> np.ndarray:
    """One deterministic photo-like RGB image: gradient, shapes, texture, noise sigma 4."""
    rng = np.random.default_rng([seed, index])
    base = Image.fromarray(np.clip(_gradient(rng, size) + 0.5, 0, 255).astype(np.uint8))
    _draw_shapes(rng, base)
    pixels = np.asarray(base, dtype=np.float32) + _texture(rng, size)
    pixels += rng.normal(0.0, NOISE_SIGMA, pixels.shape).astype(np.float32)
    return np.clip(pixels + 0.5, 0, 255).astype(np.uint8)


def image_relpath(index: int, classes: int) -> str:
    """Path of image ``index`` under the source root: ``class_KK/img_NNNNNN.jpg``."""
    return f"class_{index % classes:02d}/img_{index:06d}.jpg"


def _write_images(job: tuple[str, Sequence[int], int, int, int]) -> int:
    root, indices, size, seed, classes = job
    total = 0
    for i in indices:
        path = Path(root) / image_relpath(i, classes)
        Image.fromarray(make_image(i, size, seed)).save(path, "JPEG", quality=JPEG_QUALITY)
        total += path.stat().st_size
    return total


def generate(root: Path, n: int, size: int, seed: int, classes: int) -> float:
    """Write N JPEGs into ``root``; return the mean file size in bytes."""
    for c in range(classes):
        (root / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
    step = 256
    jobs = [(str(root), range(a, min(a + step, n)), size, seed, classes) for a in range(0, n, step)]
    with mp.get_context(MP_CONTEXT).Pool(os.cpu_count() or 1) as pool:
        total = sum(pool.imap_unordered(_write_images, jobs))
    return total / n


def link_subset(src: Path, dst: Path, n: int, classes: int) -> Path:
    """Hard-link images 0..n-1 of ``src`` into ``dst`` (same bytes, same page cache)."""
    for c in range(classes):
        (dst / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rel = image_relpath(i, classes)
        os.link(src / rel, dst / rel)
    return dst


# --------------------------------------------------------------------------- baseline


def list_jpegs(root: Path) -> list[str]:
    """Sorted paths of the JPEGs under ``root``."""
    return sorted(str(p) for p in root.rglob("*.jpg"))


def _baseline_worker(
    paths: Sequence[str], out_file: str, shape: tuple[int, ...], start: int
) -> None:
    out = np.memmap(out_file, dtype=np.uint8, mode="r+", shape=shape)
    for i, path in enumerate(paths, start):
        with Image.open(path) as im:
            out[i] = np.asarray(im.convert("RGB"))
    out.flush()
    del out


def run_baseline(src: Path, out_file: Path, size: int) -> None:
    """Two processes decode half the files each into one shared memmap."""
    paths = list_jpegs(src)
    shape = (len(paths), size, size, 3)
    np.memmap(out_file, dtype=np.uint8, mode="w+", shape=shape).flush()
    half = (len(paths) + 1) // 2
    ctx = mp.get_context(MP_CONTEXT)
    procs = [
        ctx.Process(target=_baseline_worker, args=(paths[a:b], str(out_file), shape, a))
        for a, b in ((0, half), (half, len(paths)))
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"baseline worker failed: exit codes {[p.exitcode for p in procs]}")


# --------------------------------------------------------------------------- pipeline


@dataclass(frozen=True)
class Config:
    """One pipeline configuration: params overrides plus Dask config (not a pipeline param)."""

    name: str
    ingest: dict[str, Any] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)
    dask: dict[str, Any] = field(default_factory=dict)
    cache: bool = True  # an empty decode cache, filled by the run (as on a first run)


DEFAULT = Config("default (codec none, chunk 16, shard 256, auto, empty cache)")
NO_CACHE = Config("default with the cache off (PIPELINE_CACHE_DIR=off)", cache=False)
VARIANTS = [
    DEFAULT,
    Config("codec zstd level 1", ingest={"codec": "zstd", "codec_level": 1}),
    Config("codec lz4 (blosc, level 1)", ingest={"codec": "lz4", "codec_level": 1}),
    Config("chunk_images 64, shard 256", ingest={"chunk_images": 64, "shard_images": 256}),
    Config("chunk_images 256 (= shard)", ingest={"chunk_images": 256, "shard_images": 256}),
    Config("scheduler threads", base={"scheduler": "threads"}),
    Config("scheduler processes, Dask chunksize=1", dask={"chunksize": 1}),
]


def make_params(src: Path, size: int, config: Config) -> Any:
    """Parsed pipeline params for ``config`` with no resize."""
    from pipeline.params import parse_params

    raw = {
        "ingest": {"image_size": [size, size], "source": str(src), **config.ingest},
        "base": {"scheduler": "auto", **config.base},
    }
    return parse_params(raw)


def cache_for(out: Path, config: Config) -> Any:
    """The decode cache of a run: ``out``'s sibling folder (emptied between runs), or off."""
    from pipeline.cache.entries import Cache

    return Cache(root=out.parent / "ingest-cache", limit=10**12, enabled=config.cache)


def run_pipeline(src: Path, out: Path, size: int, config: Config) -> None:
    """Run ``run_ingest`` once."""
    import dask

    from pipeline.ingest.stage import run_ingest

    with dask.config.set(config.dask):
        run_ingest(src, out, make_params(src, size, config), cache=cache_for(out, config))


def output_facts(out: Path) -> dict[str, Any]:
    """File count and bytes of the prepared folder and of its image array."""
    files = [p for p in out.rglob("*") if p.is_file()]
    image_files = [p for p in (out / "images.zarr" / "images").rglob("*") if p.is_file()]
    return {
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "image_array_files": len(image_files),
        "image_array_bytes": sum(p.stat().st_size for p in image_files),
    }


# --------------------------------------------------------------------------- peak memory


def vm_hwm(pid: int | str = "self") -> int | None:
    """Peak RSS in bytes of a live process's current address space (VmHWM), or None.

    Unlike ``ru_maxrss``, VmHWM starts afresh at exec: Linux carries ``ru_maxrss`` over from
    the forking parent, so a child started from a large process reports at least its size.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


class TreeRssPoller:
    """Poll this process and all its descendants (needs psutil).

    Records the peak of the summed RSS of the whole tree, and the last VmHWM seen of every
    descendant (VmHWM only grows, so the last sample is its peak up to one poll interval).
    """

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.tree_peak = 0
        self.workers_peak = 0
        self.hwm: dict[int, int] = {}

    def _sample(self) -> None:
        import psutil

        own = self._proc.memory_info().rss
        workers = 0
        for child in self._proc.children(recursive=True):
            try:
                workers += child.memory_info().rss
            except psutil.Error:
                continue
            hwm = vm_hwm(child.pid)
            if hwm is not None:
                self.hwm[child.pid] = max(hwm, self.hwm.get(child.pid, 0))
        self.tree_peak = max(self.tree_peak, own + workers)
        self.workers_peak = max(self.workers_peak, workers)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._interval)

    def __enter__(self) -> TreeRssPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def peak_child_main(src: Path, out: Path, size: int) -> None:
    """Helper mode: ingest once in this (fresh) process and print peak RSS facts as JSON."""
    from pipeline.ingest.stage import run_ingest

    params = make_params(src, size, DEFAULT)
    start_hwm = vm_hwm()
    try:
        poller: TreeRssPoller | None = TreeRssPoller()
    except ImportError:
        poller = None
    t0 = time.perf_counter()
    with poller if poller is not None else contextlib.nullcontext():
        run_ingest(src, out, params, cache=cache_for(out, DEFAULT))
    elapsed = time.perf_counter() - t0
    shutil.rmtree(out.parent / "ingest-cache", ignore_errors=True)
    kib = 1024  # ru_maxrss is in KiB on Linux
    result = {
        "seconds": elapsed,
        "parent_hwm_before": start_hwm,
        "parent_hwm": vm_hwm(),
        "worker_hwm_max": max(poller.hwm.values(), default=None) if poller else None,
        "workers_seen": len(poller.hwm) if poller else None,
        "tree_rss_peak": poller.tree_peak if poller else None,
        "workers_rss_peak": poller.workers_peak if poller else None,
        "ru_maxrss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib,
        "ru_maxrss_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib,
    }
    print(json.dumps(result))


def measure_peak(src: Path, out: Path, size: int) -> dict[str, Any]:
    """Run the helper mode in a fresh interpreter and return what it printed."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--peak-child", str(src), str(out),
           "--size", str(size)]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


# --------------------------------------------------------------------------- orchestration




@dataclass(frozen=True)
class Sample:
    """One timed run: wall seconds, our CPU seconds, and what else the machine was doing."""

    wall: float
    cpu: float
    foreign: float  # cores used by other processes on average during the run
    steal: float  # cores taken by the hypervisor on average during the run


def measure(fn: Callable[[], None]) -> Sample:
    """Time ``fn`` and account the machine's CPU use meanwhile."""
    hz = os.sysconf("SC_CLK_TCK")
    busy0, steal0 = proc_stat()
    own0 = own_cpu()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    busy1, steal1 = proc_stat()
    own = own_cpu() - own0
    foreign = max(0.0, (busy1 - busy0) / hz - own) / wall
    return Sample(wall, own, foreign, (steal1 - steal0) / hz / wall)


def wait_idle(max_wait: float, threshold: float = 0.3) -> float:
    """Wait at most ``max_wait`` s until other processes use under ``threshold`` cores.

    Returns the foreign load of the last 0.5 s window.
    """
    hz = os.sysconf("SC_CLK_TCK")
    t0 = time.perf_counter()
    while True:
        busy0, _ = proc_stat()
        own0 = own_cpu()
        time.sleep(0.5)
        load = max(0.0, (proc_stat()[0] - busy0) / hz - (own_cpu() - own0)) / 0.5
        if load < threshold or time.perf_counter() - t0 >= max_wait:
            return load


@dataclass
class Row:
    """One line of the results table."""

    name: str
    n: int
    samples: list[Sample]
    pixel_bytes: int
    baseline_seconds: float | None = None
    output: dict[str, Any] | None = None

    @property
    def seconds(self) -> list[float]:
        return [s.wall for s in self.samples]

    @property
    def clean(self) -> list[Sample]:
        """Reps during which the machine was (nearly) ours; all reps if there is none."""
        ok = [s for s in self.samples if s.foreign + s.steal < CLEAN_LOAD]
        return ok or self.samples

    @property
    def cpu_ms_per_image(self) -> float:
        return statistics.median(s.cpu for s in self.clean) / self.n * 1e3

    @property
    def clean_count(self) -> int:
        return sum(1 for s in self.samples if s.foreign + s.steal < CLEAN_LOAD)

    @property
    def median(self) -> float:
        return statistics.median(s.wall for s in self.clean)

    @property
    def images_per_s(self) -> float:
        return self.n / self.median

    @property
    def mb_per_s(self) -> float:
        return self.pixel_bytes / self.median / 1e6

    @property
    def ratio(self) -> float | None:
        return None if self.baseline_seconds is None else self.baseline_seconds / self.median

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(median_s=self.median, images_per_s=self.images_per_s, mb_per_s=self.mb_per_s,
                 ratio_to_baseline=self.ratio, cpu_ms_per_image=self.cpu_ms_per_image,
                 clean_reps=self.clean_count)
        return d


def _fresh(path: Path) -> Path:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    return path


def time_interleaved(
    runs: dict[str, Callable[[], None]],
    reps: int,
    cleanup: Callable[[], None],
    inspect: Callable[[str], None],
    max_wait: float,
) -> dict[str, list[Sample]]:
    """Run every callable once per rep, in turn; ``inspect`` the output of the last rep's run.

    Before each run: ``cleanup`` (so no run sees another's output), then wait for the machine
    to go idle. Neither is timed.
    """
    samples: dict[str, list[Sample]] = {name: [] for name in runs}
    for rep in range(reps):
        for name, fn in runs.items():
            cleanup()
            if max_wait > 0:
                wait_idle(max_wait)
            sample = measure(fn)
            samples[name].append(sample)
            if rep == reps - 1:
                inspect(name)
            print(f"  rep {rep + 1}/{reps}  {name:<50} {sample.wall:7.2f} s  cpu "
                  f"{sample.cpu:6.1f} s  foreign {sample.foreign:4.2f}  steal "
                  f"{sample.steal:4.2f} cores", flush=True)
    cleanup()
    return samples


def bench_configs(
    src: Path, work: Path, n: int, size: int, configs: Sequence[Config], reps: int,
    max_wait: float,
) -> list[Row]:
    """Baseline plus each config on the same source, interleaved; rows with output facts."""
    out = work / "prepared"
    raw = work / "baseline.u8"
    facts: dict[str, dict[str, Any]] = {}

    def cleanup() -> None:
        _fresh(out)
        _fresh(raw)
        _fresh(work / "ingest-cache")

    def inspect(name: str) -> None:
        if out.exists():
            facts[name] = output_facts(out)

    runs: dict[str, Callable[[], None]] = {"baseline": lambda: run_baseline(src, raw, size)}
    for c in configs:
        runs[c.name] = lambda c=c: run_pipeline(src, out, size, c)
    times = time_interleaved(runs, reps, cleanup, inspect, max_wait)
    pixel_bytes = n * size * size * 3
    baseline = Row("baseline: 2 processes, Pillow -> np.memmap", n, times["baseline"], pixel_bytes)
    return [baseline] + [
        Row(c.name, n, times[c.name], pixel_bytes, baseline.median, facts.get(c.name))
        for c in configs
    ]


def bench_memory(src: Path, work: Path, size: int, small: int, classes: int) -> dict[str, Any]:
    """Peak RSS of ingest at ``small`` and ``10 * small`` images, each in a fresh process."""
    result: dict[str, Any] = {}
    for n in (small, 10 * small):
        subset = link_subset(src, work / f"subset_{n}", n, classes)
        out = _fresh(work / f"prepared_{n}")
        result[str(n)] = measure_peak(subset, out, size)
        _fresh(out)
        _fresh(subset)
        print(f"  memory n={n}: {json.dumps(result[str(n)])}", flush=True)
    big = result[str(10 * small)]
    ratios = {k: big[k] / v for k, v in result[str(small)].items() if v and big.get(k)}
    result["ratio_10x"] = ratios
    return result


# --------------------------------------------------------------------------- printing


def _fmt_mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f}"


def format_table(rows: Sequence[Row]) -> str:
    """Markdown table of timing rows."""
    head = ("| run | n | clean reps | median s | min-max s (all) | img/s | MB/s | vs baseline "
            "| CPU ms/img | store MB | files |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        ratio = "1 (limit)" if r.ratio is None else f"{r.ratio:.2f}"
        out = r.output or {}
        lines.append(
            f"| {r.name} | {r.n} | {r.clean_count}/{len(r.samples)} | {r.median:.2f} "
            f"| {min(r.seconds):.2f}-{max(r.seconds):.2f} "
            f"| {r.images_per_s:,.0f} | {r.mb_per_s:,.0f} | {ratio} "
            f"| {r.cpu_ms_per_image:.2f} "
            f"| {_fmt_mb(out.get('image_array_bytes'))} | {out.get('files', '-')} |"
        )
    return "\n".join(lines)


def format_memory(mem: dict[str, Any]) -> str:
    """Markdown table of the peak-memory runs."""
    keys = ("parent_hwm", "worker_hwm_max", "tree_rss_peak", "ru_maxrss_self",
            "ru_maxrss_children")
    lines = ["| images | seconds | parent VmHWM MB | largest worker VmHWM MB "
             "| tree RSS peak MB | ru_maxrss self MB | ru_maxrss children MB |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for n, m in mem.items():
        if n == "ratio_10x":
            continue
        cells = " | ".join(_fmt_mb(m[k]) for k in keys)
        lines.append(f"| {n} | {m['seconds']:.2f} | {cells} |")
    ratios = ", ".join(f"{k} {v:.2f}" for k, v in mem["ratio_10x"].items() if k in keys)
    lines.append(f"\n10x / 1x: {ratios}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def scratch_dir(parent: str | None) -> Iterator[Path]:
    """A temporary folder that is removed with everything in it at the end."""
    path = Path(tempfile.mkdtemp(prefix="bench_ingest_", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10240, help="images for the timed runs")
    ap.add_argument("--size", type=int, default=256, help="image height and width")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per timed run (median)")
    ap.add_argument("--classes", type=int, default=10, help="class subfolders")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", action="store_true",
                    help="also time codec / chunk_images / scheduler variants")
    ap.add_argument("--variants-n", type=int, default=4096,
                    help="images for the variant runs (at most --n)")
    ap.add_argument("--mem-n", type=int, default=None,
                    help="peak memory is compared at this many images and at 10x "
                         "(default 1000, 40 with --quick; 0: skip)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: n=512, 1 rep, memory at 40 vs 400 images")
    ap.add_argument("--wait-idle", type=float, default=20.0,
                    help="before each timed run wait up to this many seconds for other "
                         "processes to use under 0.3 cores (0: don't wait)")
    ap.add_argument("--tmp", default=None, help="parent folder for the scratch data")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    ap.add_argument("--peak-child", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.reps = 512, 1
    if args.mem_n is None:
        args.mem_n = 40 if args.quick else 1000
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Generate the data, run every measurement, print the tables and write the JSON."""
    args = parse_args(argv)
    if args.peak_child:
        peak_child_main(Path(args.peak_child[0]), Path(args.peak_child[1]), args.size)
        return
    import pipeline.ingest.stage  # noqa: F401  (import cost stays out of the first timed run)

    facts = machine_facts()
    print("machine:", json.dumps(facts))
    variants_n = min(args.variants_n, args.n)
    total = max(args.n, 10 * args.mem_n)
    results: dict[str, Any] = {"machine": facts, "args": {
        "n": args.n, "size": args.size, "reps": args.reps, "classes": args.classes,
        "seed": args.seed, "variants": args.variants, "variants_n": variants_n,
        "mem_n": args.mem_n, "quick": args.quick, "wait_idle": args.wait_idle}}
    with scratch_dir(args.tmp) as work:
        src = work / "images"
        t0 = time.perf_counter()
        mean_bytes = generate(src, total, args.size, args.seed, args.classes)
        results["data"] = {"images": total, "mean_file_bytes": mean_bytes,
                           "generate_seconds": time.perf_counter() - t0}
        print(f"generated {total} JPEGs, mean {mean_bytes / 1e3:.1f} KB, "
              f"{results['data']['generate_seconds']:.1f} s", flush=True)
        timed = src if total == args.n else link_subset(src, work / "timed", args.n, args.classes)
        print(f"default config, n={args.n}:", flush=True)
        rows = bench_configs(timed, work, args.n, args.size, [DEFAULT, NO_CACHE], args.reps,
                             args.wait_idle)
        results["default"] = [r.to_json() for r in rows]
        print(format_table(rows))
        if args.variants:
            vsrc = timed if variants_n == args.n else link_subset(
                src, work / "variants", variants_n, args.classes)
            print(f"variants, n={variants_n}:", flush=True)
            vrows = bench_configs(vsrc, work, variants_n, args.size, VARIANTS, args.reps,
                                  args.wait_idle)
            results["variants"] = [r.to_json() for r in vrows]
            print(format_table(vrows))
        if args.mem_n:
            print("peak memory:", flush=True)
            results["memory"] = bench_memory(src, work, args.size, args.mem_n, args.classes)
            print(format_memory(results["memory"]))
    pipe = rows[1]
    verdict = "meets" if (pipe.ratio or 0) >= TARGET_RATIO else "misses"
    print(f"pipeline / baseline = {pipe.ratio:.2f} ({verdict} the target {TARGET_RATIO})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
