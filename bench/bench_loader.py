"""Training-side read speed: the normalized stores against the loaders users pick, in one run.

Generates ``--n`` photo-like JPEGs with Pillow (``--source-size`` pixels square, default 256),
runs the real ``pipeline ingest`` (stored at ``--size``, default 224x224, uint8), ``pipeline
stats`` and ``pipeline normalize`` twice (a float32 and a float16 store), then times whole
epochs, batch 64, shuffled and sequential, 0 and 2 DataLoader workers, of:

- ``DataLoader(ds, batch_size=64, shuffle=...)`` on ``open_normalized(..., channels_first=True)``
  (the plain loader a user writes first; each batch is one ``__getitems__`` call);
- the quasi-random iterator ``ds.batches(64, ...)`` (0 workers) and its batch sampler in a
  DataLoader (2 workers), when ``pipeline.reader.batches`` is there;
- normalize-on-read: ``open_normalized(prepared, stats=...)`` on the uint8 store, when there;
- torchvision ``ImageFolder`` + Resize/CenterCrop/ToTensor/Normalize on the source JPEGs;
- LitData (``litdata.optimize`` of the same uint8 pixels, raw arrays, no normalization, read
  by ``StreamingDataset`` + ``StreamingDataLoader``);
- a plain sequential read of the stores' shard bytes with ``np.fromfile``: the limit.

Rows are interleaved in each of ``--reps`` repetitions and the median is reported, with the
ratio to the plain read of the float32 store and to ImageFolder (same shuffle and workers).
Each timed epoch also records the CPU that other processes used meanwhile ("foreign load",
cores, from /proc/stat). Then the peak RSS (VmHWM) of the main process and of the DataLoader
workers, in a fresh process per size, for a store of 1x and 10x the images (the 10x store is
synthetic: the float32 store's shard files repeated ten times by symlinks). Results go to
bench/out/loader.json.

torchvision and LitData live in their own environment, never in the test venv:

    make bench-loader-env                       # .venv-bench: torch 2.14.1, torchvision, litdata
    .venv-bench/bin/python bench/bench_loader.py            # n=6000: about 20 minutes
    .venv-bench/bin/python bench/bench_loader.py --quick    # smoke run, a few minutes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stats import machine_facts, make_images, timed, wait_idle, workdir

from pipeline import load_stats, open_normalized

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_JSON = BENCH_DIR / "out" / "loader.json"
BATCH = 64
CLASSES = 2
TARGET_VS_LIMIT = 0.3
TARGET_VS_IMAGEFOLDER = 10.0
FLAT_MEMORY = 1.10  # "flat": 10x the images may cost at most 10 % more peak RSS


# --------------------------------------------------------------------------- data


def _write_jpegs(args: tuple[Path, int, int, int, int]) -> int:
    src, first, count, seed, size = args
    for j, img in enumerate(make_images(first, count, seed)):
        i = first + j
        pic = Image.fromarray(img)
        if size != img.shape[0]:
            pic = pic.resize((size, size), Image.Resampling.BICUBIC)
        pic.save(src / f"cls{i % CLASSES}" / f"img_{i:06d}.jpg", quality=90)
    return count


def make_jpegs(src: Path, n: int, seed: int, size: int) -> None:
    """``n`` photo-like JPEGs (bench_stats' generator) in ``CLASSES`` class folders."""
    for c in range(CLASSES):
        (src / f"cls{c}").mkdir(parents=True, exist_ok=True)
    step = 250
    jobs = [(src, a, min(step, n - a), seed, size) for a in range(0, n, step)]
    with ProcessPoolExecutor(2) as pool:
        assert sum(pool.map(_write_jpegs, jobs)) == n


def run_stage(*argv: str, env: dict[str, str]) -> None:
    """One real ``pipeline`` command in a subprocess; its output goes to stderr."""
    cmd = [sys.executable, "-m", "pipeline", *argv]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    sys.stderr.write(done.stdout[-2000:])
    if done.returncode:
        sys.exit(f"{' '.join(argv[:1])} failed:\n{done.stderr[-3000:]}")


@dataclass(frozen=True)
class Stores:
    src: Path
    prepared: Path
    stats: Path
    f32: Path
    f16: Path


def build_stores(work: Path, n: int, size: int, source_size: int, seed: int) -> Stores:
    """The JPEG folder and the real ingest / stats / normalize outputs made from it."""
    data = work / "data"
    st = Stores(src=work / "jpegs", prepared=data / "prepared", stats=data / "stats",
                f32=data / "normalized", f16=data / "normalized16")
    make_jpegs(st.src, n, seed, source_size)
    env = {**os.environ, "PIPELINE_CACHE_DIR": "off", "DVC_NO_ANALYTICS": "1"}
    base = ("base: {scheduler: auto}\n"
            f"ingest: {{image_size: [{size}, {size}], split: {{val: 0.0, test: 0.0}}}}\n")
    for dtype in ("float32", "float16"):
        (work / f"params_{dtype}.yaml").write_text(base + f"normalize: {{dtype: {dtype}}}\n")
    p32, p16 = str(work / "params_float32.yaml"), str(work / "params_float16.yaml")
    run_stage("ingest", str(st.src), str(st.prepared), "--params", p32, env=env)
    run_stage("stats", str(st.prepared), str(st.stats), "--params", p32, env=env)
    run_stage("normalize", str(st.prepared), str(st.stats), str(st.f32), "--params", p32, env=env)
    run_stage("normalize", str(st.prepared), str(st.stats), str(st.f16), "--params", p16, env=env)
    return st


def shard_files(store: Path) -> list[Path]:
    images = store / "images.zarr" / "images" if (store / "images.zarr").is_dir() else store
    return sorted(p for p in (images / "c").rglob("*") if p.is_file())


def tiled_store(store: Path, dest: Path, times: int) -> int:
    """A normalized store of ``times`` x the full shards of ``store``, by symlinked shards.

    Only whole shards are repeated (a partial last shard is left out), so the 1x view made
    the same way has the same layout. Opened with ``verify=False``: its lineage is the
    original's. Returns the number of samples.
    """
    src = store / "images.zarr"
    meta = json.loads((src / "images" / "zarr.json").read_text())
    shard = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
    full = meta["shape"][0] // shard
    n = full * shard * times
    shutil.copytree(src, dest / "images.zarr", symlinks=True,
                    ignore=lambda d, names: [x for x in names if Path(d, x).is_dir()
                                             and Path(d).name == "images" and x == "c"])
    out = dest / "images.zarr"
    meta["shape"][0] = n
    (out / "images" / "zarr.json").write_text(json.dumps(meta))
    for s in range(full * times):
        link = out / "images" / "c" / str(s) / "0" / "0" / "0"
        link.parent.mkdir(parents=True)
        link.symlink_to(src / "images" / "c" / str(s % full) / "0" / "0" / "0")
    group = zarr.open_group(out, mode="r+")
    attrs = dict(group.attrs)
    attrs["splits"] = {"train": [0, n], "val": [n, n], "test": [n, n]}
    group.attrs.update(attrs)
    for name in ("label", "split"):
        if name in group:
            old = group[name]
            assert isinstance(old, zarr.Array)
            values = np.resize(np.asarray(old[: full * shard]), n)
            del group[name]
            arr = group.create_array(name, shape=(n,), chunks=(n,), dtype=old.dtype,
                                     dimension_names=old.metadata.dimension_names,
                                     fill_value=old.fill_value, attributes=dict(old.attrs))
            arr[:] = values
    return n


# --------------------------------------------------------------------------- loaders


def count(batches: Iterable[Any]) -> int:
    """Images in an epoch of (images, labels) batches; touches each batch's first element."""
    seen = 0
    for images, _labels in batches:
        seen += int(images.shape[0])
        float(images[0, 0, 0, 0])
    return seen


def torch_loader(ds: Any, shuffle: bool, workers: int, **kw: Any) -> Any:
    import torch

    g = torch.Generator().manual_seed(0)
    if "batch_sampler" in kw:
        return torch.utils.data.DataLoader(ds, num_workers=workers, **kw)
    return torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=shuffle, generator=g,
                                       num_workers=workers, **kw)


def imagefolder(src: Path, size: int, mean: np.ndarray, std: np.ndarray) -> Any:
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
        transforms.Normalize(mean.tolist(), std.tolist()),
    ])
    return datasets.ImageFolder(str(src), transform=tf)


def _litdata_item(args: tuple[str, int]) -> dict[str, Any]:
    path, i = args
    arr = zarr.open_group(path, mode="r")
    images, labels = arr["images"], arr["label"]
    assert isinstance(images, zarr.Array)
    assert isinstance(labels, zarr.Array)
    return {"image": np.asarray(images[i]), "label": int(labels[i])}


def write_litdata(prepared: Path, dest: Path, n: int) -> None:
    """The prepared store's uint8 pixels as a LitData dataset (raw arrays, 64 MB chunks)."""
    import multiprocessing

    import litdata

    method = multiprocessing.get_start_method()
    with contextlib.redirect_stdout(sys.stderr):
        litdata.optimize(fn=_litdata_item, inputs=[(str(prepared / "images.zarr"), i)
                                                   for i in range(n)],
                         output_dir=str(dest), chunk_bytes="64MB", num_workers=2,
                         verbose=False)
    # optimize() switches the whole process to "spawn"; the DataLoader rows need the default
    # again (with spawn each worker re-imports torch: +2.5 s per epoch, measured).
    multiprocessing.set_start_method(method, force=True)


def litdata_epoch(path: Path, shuffle: bool, workers: int) -> int:
    import litdata

    ds = litdata.StreamingDataset(str(path), shuffle=shuffle, seed=0)
    loader = litdata.StreamingDataLoader(ds, batch_size=BATCH, num_workers=workers)
    return count((b["image"], b["label"]) for b in loader)


def plain_read(store: Path) -> int:
    """Sequential ``np.fromfile`` of every shard file, one byte kept: the read limit."""
    acc = 0
    for p in shard_files(store):
        acc += int(np.fromfile(p, dtype=np.uint8)[0])
    return acc


# --------------------------------------------------------------------------- rows


@dataclass
class Row:
    """Repeated timed epochs of one loader configuration."""

    name: str
    group: str  # float32 | float16 | onread | imagefolder | litdata | limit
    kind: str  # dataloader | iterator | limit
    shuffle: bool
    workers: int
    epoch: Callable[[int], int] | None  # rep -> images read; None: API missing
    note: str = ""
    seconds: list[float] = field(default_factory=list)
    foreign: list[float] = field(default_factory=list)
    images: int = 0

    def run(self, rep: int) -> None:
        assert self.epoch is not None
        epoch = self.epoch
        wall, foreign, _steal, got = timed(lambda: epoch(rep))
        self.seconds.append(wall)
        self.foreign.append(foreign)
        self.images = got

    @property
    def rate(self) -> float:
        return self.images / statistics.median(self.seconds) if self.seconds else float("nan")


def folder_dataset(st: Stores, size: int) -> Any:
    """ImageFolder on the JPEGs, normalized with the fitted mean and std (in 0..1 units)."""
    stats = load_stats(st.stats)
    return imagefolder(st.src, size, stats.mean / stats.pixel_max, stats.std / stats.pixel_max)


def make_rows(st: Stores, n: int, folder: Any, lit: Path | None) -> list[Row]:
    """Every measured configuration, with its epoch function (None where the API is missing)."""
    rows: list[Row] = [
        Row("plain read, float32 store shards (`np.fromfile`)", "limit", "limit", False, 0,
            lambda _r: n if plain_read(st.f32) >= 0 else 0),
        Row("plain read, float32 store shards into one reused buffer (`readinto`)", "limit_r",
            "limit", False, 0, lambda _r: n if plain_readinto(st.f32) >= 0 else 0),
        Row("plain read, float16 store shards", "limit16", "limit", False, 0,
            lambda _r: n if plain_read(st.f16) >= 0 else 0),
        Row("plain read, uint8 prepared store shards", "limit8", "limit", False, 0,
            lambda _r: n if plain_read(st.prepared) >= 0 else 0),
    ]
    onread = _onread_dataset(st)
    datasets: dict[str, Any] = {
        "float32": open_normalized(st.f32, channels_first=True),
        "float16": open_normalized(st.f16, channels_first=True),
        "onread": onread,
    }
    for shuffle in (True, False):
        for workers in (0, 2):
            for group, ds in datasets.items():
                label = {"float32": "float32 store", "float16": "float16 store",
                         "onread": "normalize-on-read (uint8 store + stats)"}[group]
                rows.append(Row(
                    f"{label}, `DataLoader(ds, 64, shuffle={shuffle})`", group, "dataloader",
                    shuffle, workers,
                    None if ds is None else _dataloader_epoch(ds, shuffle, workers)))
                rows.append(Row(
                    f"{label}, `ds.batches` iterator" + (" (batch sampler)" if workers else ""),
                    group, "iterator", shuffle, workers, _iterator_epoch(ds, shuffle, workers)))
            rows.append(Row("torchvision ImageFolder + Resize/CenterCrop/ToTensor/Normalize",
                            "imagefolder", "dataloader", shuffle, workers,
                            _dataloader_epoch(folder, shuffle, workers)))
            rows.append(Row("LitData StreamingDataset (raw uint8, not normalized)", "litdata",
                            "dataloader", shuffle, workers,
                            None if lit is None else
                            (lambda _r, s=shuffle, w=workers, p=lit: litdata_epoch(p, s, w))))
    return rows


def _dataloader_epoch(ds: Any, shuffle: bool, workers: int) -> Callable[[int], int]:
    def epoch(_rep: int) -> int:
        return count(torch_loader(ds, shuffle, workers))

    return epoch


def _iterator_epoch(ds: Any, shuffle: bool, workers: int) -> Callable[[int], int] | None:
    """The ``ds.batches`` iterator (0 workers) or its batch sampler in a DataLoader."""
    if ds is None or not hasattr(ds, "batches"):
        return None
    if workers and make_batch_sampler(ds, shuffle) is None:
        return None

    def epoch(rep: int) -> int:
        if not workers:
            return count(ds.batches(BATCH, shuffle=shuffle, seed=0, epoch=rep))
        sampler = make_batch_sampler(ds, shuffle)
        sampler.set_epoch(rep)
        return count(torch_loader(ds, shuffle, workers, batch_sampler=sampler))

    return epoch


def make_batch_sampler(ds: Any, shuffle: bool) -> Any:
    """pipeline.reader.batches' batch sampler (index lists, ``set_epoch``) for ``ds``, or None."""
    if callable(getattr(ds, "batch_sampler", None)):
        return ds.batch_sampler(BATCH, shuffle=shuffle, seed=0)
    try:
        import pipeline.reader.batches as batches
    except ImportError:
        return None
    kinds = [getattr(batches, name) for name in getattr(batches, "__all__", dir(batches))]
    for cls in kinds:
        if isinstance(cls, type) and hasattr(cls, "set_epoch") and hasattr(cls, "__len__"):
            with contextlib.suppress(TypeError):
                return cls(ds, BATCH, shuffle=shuffle, seed=0)
            with contextlib.suppress(TypeError):
                return cls(ds, batch_size=BATCH, shuffle=shuffle, seed=0)
    return None


def _onread_dataset(st: Stores) -> Any:
    """``open_normalized`` on the prepared store + stats, or None before normalize-on-read."""
    try:
        return open_normalized(st.prepared, stats=st.stats,  # type: ignore[call-arg]
                               mode="per_channel", dtype="float32", channels_first=True)
    except TypeError:
        return None


def plain_readinto(store: Path) -> int:
    """The same bytes read into one reused buffer: no page faults on fresh memory."""
    files = shard_files(store)
    buf = np.empty(max(p.stat().st_size for p in files), dtype=np.uint8)
    acc = 0
    for p in files:
        with p.open("rb", buffering=0) as f:
            f.readinto(memoryview(buf)[: p.stat().st_size])
        acc += int(buf[0])
    return acc


# --------------------------------------------------------------------------- where time goes


def profile_steps(st: Stores, folder: Any, reps: int) -> list[tuple[str, float, float]]:
    """Median ms per batch of 64 shuffled samples for each step of the float32 read path."""
    import torch
    from torch.utils.data import default_collate

    ds = open_normalized(st.f32, channels_first=True)
    hwc = open_normalized(st.f32)
    direct = hwc._open()["direct"]
    n = len(ds)
    rng = np.random.default_rng(1)
    batches = [rng.permutation(n)[:BATCH] for _ in range(max(8, reps * 4))]
    reused = np.empty((BATCH, *direct.shape[1:]), dtype=direct.dtype)
    items = ds.__getitems__(batches[0])
    first = hwc.read(batches[0])
    threads = torch.get_num_threads()

    def collate(k: int) -> Callable[[np.ndarray], Any]:
        def run(_b: np.ndarray) -> Any:
            torch.set_num_threads(k)
            try:
                return default_collate(items)
            finally:
                torch.set_num_threads(threads)

        return run

    steps: list[tuple[str, Callable[[np.ndarray], Any]]] = [
        ("ImageFolder: 64 x (JPEG decode + transforms), for scale",
         lambda b: [folder[int(i) % len(folder)] for i in b]),
        ("read HWC into a new array (`ShardReader.read`)", direct.read),
        ("read HWC into a reused array (`read_into`)", lambda b: direct.read_into(b, reused)),
        ("transpose HWC -> CHW into a new array (`ascontiguousarray`)",
         lambda _b: np.ascontiguousarray(first.transpose(0, 3, 1, 2))),
        ("read CHW, staged (`read_channels_first`, what `ds.read` does)",
         direct.read_channels_first),
        ("`ds.__getitems__` (read CHW + labels)", ds.__getitems__),
        (f"`default_collate` of those 64 items, torch threads {threads}", collate(threads)),
        ("`default_collate` of those 64 items, torch threads 1", collate(1)),
    ]
    out = []
    for name, fn in steps:
        times, foreign = [], []
        for b in batches:
            wall, load, _steal, _ = timed(lambda fn=fn, b=b: fn(b))
            times.append(wall)
            foreign.append(load)
        out.append((name, statistics.median(times) * 1e3, statistics.median(foreign)))
    return out


# --------------------------------------------------------------------------- memory


def _vmhwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def mem_child(store: Path, workers: int, batches: int) -> None:
    """In a fresh process: a shuffled DataLoader over ``store`` for ``batches`` batches."""
    import psutil

    ds = open_normalized(store, channels_first=True, verify=False)
    after_open = _vmhwm_kib(os.getpid())
    peaks: dict[int, int] = {}
    loader = iter(torch_loader(ds, True, workers))
    for k in range(batches):
        next(loader)
        if k % 8 == 7 or k == batches - 1:
            for child in psutil.Process().children():
                with contextlib.suppress(OSError, psutil.Error):
                    peaks[child.pid] = max(peaks.get(child.pid, 0), _vmhwm_kib(child.pid))
    print(json.dumps({"samples": len(ds), "main_kib": _vmhwm_kib(os.getpid()),
                      "main_after_open_kib": after_open,
                      "worker_kib": sorted(peaks.values())}))


def memory(st: Stores, work: Path, batches: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, times in (("1x", 1), ("10x", 10)):
        dest = work / f"tiled_{label}"
        n = tiled_store(st.f32, dest, times)
        for workers in (0, 2):
            cmd = [sys.executable, __file__, "--mem-child", str(dest), "--mem-workers",
                   str(workers), "--mem-batches", str(batches)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"memory child failed:\n{done.stderr[-3000:]}")
            out[f"{label}_w{workers}"] = {"n": n, **json.loads(done.stdout.splitlines()[-1])}
    return out


# --------------------------------------------------------------------------- report


def _find(rows: Sequence[Row], group: str, kind: str, shuffle: bool, workers: int) -> Row | None:
    for r in rows:
        if (r.group, r.kind, r.shuffle, r.workers) == (group, kind, shuffle, workers):
            return r
    return None


def table(rows: Sequence[Row], limit: Row) -> str:
    out = ["| loader | order | workers | images/s | vs plain read | vs ImageFolder "
           "| foreign load |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        order = "-" if r.kind == "limit" else ("shuffled" if r.shuffle else "sequential")
        if r.epoch is None:
            out.append(f"| {r.name} | {order} | {r.workers} | (API not on this branch) "
                       "| | | |")
            continue
        folder = _find(rows, "imagefolder", "dataloader", r.shuffle, r.workers)
        vs_folder = ("" if r.kind == "limit" or folder is None
                     else f"{r.rate / folder.rate:.1f}x")
        out.append(f"| {r.name} | {order} | {'-' if r.kind == 'limit' else r.workers} | "
                   f"{r.rate:,.0f} | {r.rate / limit.rate:.3f} | {vs_folder} | "
                   f"{statistics.median(r.foreign):.2f} |")
    return "\n".join(out)


def targets(rows: Sequence[Row], limit: Row, mem: dict[str, Any] | None) -> list[str]:
    lines = []
    for workers in (0, 2):
        folder = _find(rows, "imagefolder", "dataloader", True, workers)
        assert folder is not None
        checks = [("float32", "dataloader", True), ("float32", "iterator", True),
                  ("onread", "dataloader", False), ("onread", "iterator", False)]
        for group, kind, vs_limit in checks:
            r = _find(rows, group, kind, True, workers)
            if r is None or r.epoch is None:
                lines.append(f"SKIP {group} {kind}, shuffled, {workers} workers: not on this "
                             "branch")
                continue
            ok_f = r.rate >= TARGET_VS_IMAGEFOLDER * folder.rate
            msg = f"{r.rate / folder.rate:.1f}x ImageFolder (>= {TARGET_VS_IMAGEFOLDER:g})"
            ok = ok_f
            if vs_limit:
                ok_l = r.rate >= TARGET_VS_LIMIT * limit.rate
                ok = ok and ok_l
                msg += f", {r.rate / limit.rate:.3f}x plain read (>= {TARGET_VS_LIMIT})"
            lines.append(f"{'PASS' if ok else 'FAIL'} {group} {kind}, shuffled, {workers} "
                         f"workers: {r.rate:,.0f} images/s = {msg}")
    if mem is not None:
        for workers in (0, 2):
            one, ten = mem[f"1x_w{workers}"], mem[f"10x_w{workers}"]
            main = ten["main_kib"] / one["main_kib"]
            wk = (max(ten["worker_kib"]) / max(one["worker_kib"])
                  if workers and one["worker_kib"] and ten["worker_kib"] else None)
            worst = max(main, wk or 0.0)
            lines.append(f"{'PASS' if worst <= FLAT_MEMORY else 'FAIL'} memory 1x -> 10x, "
                         f"{workers} workers: main {main:.2f}x"
                         + (f", workers {wk:.2f}x" if wk is not None else "")
                         + f" (<= {FLAT_MEMORY})")
    return lines


def mem_table(mem: dict[str, Any]) -> str:
    out = ["| store | samples | workers | main peak RSS MiB | after open MiB "
           "| worker peak RSS MiB |", "|---|---:|---:|---:|---:|---:|"]
    for key, m in mem.items():
        size, workers = key.split("_w")
        wk = ", ".join(f"{v / 1024:.0f}" for v in m["worker_kib"]) or "-"
        out.append(f"| {size} | {m['samples']:,} | {workers} | {m['main_kib'] / 1024:.0f} | "
                   f"{m['main_after_open_kib'] / 1024:.0f} | {wk} |")
    return "\n".join(out)


def versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "torchvision", "litdata", "zarr", "numpy", "PIL"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "not installed"
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--n", type=int, default=6000, help="JPEGs to generate (default 6000)")
    p.add_argument("--size", type=int, default=224, help="stored image size (default 224)")
    p.add_argument("--source-size", type=int, default=256, help="JPEG size (default 256)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mem-batches", type=int, default=60,
                   help="batches per memory measurement (default 60)")
    p.add_argument("--wait-idle", type=float, default=2.0, metavar="S",
                   help="before each rep wait up to S s for other processes to go idle (0: off)")
    p.add_argument("--no-litdata", action="store_true", help="leave the LitData rows out")
    p.add_argument("--quick", action="store_true", help="smoke run: 640 images, 1 rep")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    p.add_argument("--tmp", default=None, help="parent folder for the scratch data")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--mem-child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--mem-workers", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.reps, args.mem_batches = 640, 1, 8
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.mem_child is not None:
        mem_child(args.mem_child, args.mem_workers, args.mem_batches)
        return
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    results: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_facts(), "versions": versions(),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }
    with workdir(args.tmp, args.keep, "bench_loader_") as work:
        t0 = time.perf_counter()
        st = build_stores(work, args.n, args.size, args.source_size, args.seed)
        log(f"JPEGs and stores built in {time.perf_counter() - t0:.0f} s")
        lit = None
        if not args.no_litdata:
            t0 = time.perf_counter()
            lit = work / "litdata"
            write_litdata(st.prepared, lit, args.n)
            log(f"LitData dataset written in {time.perf_counter() - t0:.0f} s")
        folder = folder_dataset(st, args.size)
        rows = make_rows(st, args.n, folder, lit)
        for folder_path in (st.src, lit):  # warm the page cache: the sources, then the stores
            for f in [] if folder_path is None else sorted(folder_path.rglob("*")):
                if f.is_file():
                    f.read_bytes()
        for r in rows:
            if r.kind == "limit":
                r.epoch(0)  # type: ignore[misc]
        idle = []
        for rep in range(args.reps):
            for r in rows:
                if r.epoch is None:
                    continue
                idle.append(wait_idle(args.wait_idle))
                r.run(rep)
            log(f"rep {rep + 1}/{args.reps} done; loadavg "
                f"{Path('/proc/loadavg').read_text().split()[:3]}")
        log("profile ...")
        idle.append(wait_idle(args.wait_idle))
        steps = profile_steps(st, folder, args.reps)
        log("memory ...")
        mem = memory(st, work, args.mem_batches)
        results["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    limit = rows[0]
    results["rows"] = [{"name": r.name, "group": r.group, "kind": r.kind, "shuffle": r.shuffle,
                        "workers": r.workers, "images": r.images, "seconds": r.seconds,
                        "images_per_s": r.rate if r.seconds else None,
                        "foreign_load_cores": r.foreign} for r in rows]
    results["memory"] = mem
    results["profile_ms_per_batch"] = steps
    results["idle_waits"] = idle
    results["targets"] = targets(rows, limit, mem)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    v = results["versions"]
    print(f"n={args.n} JPEGs {args.source_size}x{args.source_size} stored at "
          f"{args.size}x{args.size}, batch {BATCH}, median of {args.reps} interleaved reps; "
          + ", ".join(f"{k} {val}" for k, val in v.items()))
    print(table(rows, limit))
    print(f"\n| step, float32 store, {BATCH} shuffled samples | ms per batch | images/s "
          "| foreign load |\n|---|---:|---:|---:|")
    for name, ms, load in steps:
        print(f"| {name} | {ms:.1f} | {BATCH / ms * 1e3:,.0f} | {load:.2f} |")
    print("\n" + mem_table(mem))
    print("\n" + "\n".join(results["targets"]))
    print(f"\nloadavg start {results['loadavg_start']} end {results['loadavg_end']}")


if __name__ == "__main__":
    main()
