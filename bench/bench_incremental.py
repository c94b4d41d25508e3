"""Incremental rebuilds: ingest + stats of a grown collection with the cache vs a full rebuild.

The promise measured: after adding 10 % new images to a collection of at least 20,000, ingest
plus stats take at most 0.3x the time of a full rebuild, measured in the same run, and the
outputs are byte-identical to the rebuild's.

Data (generated once under bench/out/incremental/ and reused by later runs): deterministic
photo-like JPEGs at q90 (the generator of bench_ingest.py: gradient, colour waves, shapes,
band-limited texture, noise sigma 4; non-square images are the centre crop of a square one),
in 10 class folders, written by 2 processes. "Version 1" is N files; version 2 adds N/10 files
whose names sort among the old ones in the same folders (``img_000004a.jpg`` right after
``img_000004.jpg``), so they land all through the store, not at its end.

Every timed step is the real CLI in a subprocess, with a params file that sets only
``ingest.image_size``; everything else (resize ``shorter_side_center_crop``, bilinear,
scheduler ``auto``) is the default::

    python -m pipeline ingest SRC OUT/prepared --params P
    python -m pipeline stats OUT/prepared OUT/stats --params P

Per case:

1. v1 with the cache off, then v1 with an empty cache (which fills it): the overhead of filling.
2. The filled cache is kept as a snapshot; each incremental run starts from a fresh hard-link
   copy of it (``cp -al``; entries are immutable files, replaced only by rename).
3. The new files are hard-linked into the source. Per repetition, interleaved (and alternating
   which goes first): incremental = v2 with a copy of the snapshot; full rebuild = v2 with
   ``PIPELINE_CACHE_DIR=off``. Ratio = median incremental / median full rebuild.
4. Checks: every file of the incremental outputs (prepared and stats folders) is byte-identical
   to the full rebuild's; the incremental run's messages say that ingest took the old files
   from the cache and that stats reused the cached fit.
5. No change: v2 again with the warm cache. Cache size from ``pipeline cache info``.

Cases: the main one (640x480 sources stored at 224x224) and a worst case on a smaller corpus
whose sources are already 224x224, so nothing is resized and decoding is cheap: the rewrite of
the store dominates there.

Before each command the script waits (up to ``--wait-idle`` s) for other processes to go
quiet, and it records the cores that other processes and the hypervisor took while the command
ran, and our own CPU seconds (the CLI and its workers). A run is clean when that foreign load
was under 0.3 cores; the verdict uses the medians of the clean runs when both sides have one.
Files and outputs stay in the page cache; nothing is fsynced. A one-thread breakdown of the
per-image steps (read, hash, decode + resize, cache put and get, shard write, stats reduce)
runs in this process first (``--parts``). Results go to bench/out/incremental.json; the exit
status is 1 when outputs differ or the cache messages are missing (a missed target is only
reported).

    python bench/bench_incremental.py                  # 20,000 + 2,000 files, 3 reps
    python bench/bench_incremental.py --quick          # smoke run
    python bench/bench_incremental.py --rev HEAD       # measure a commit, not the working tree
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from bench_ingest import (
    CLEAN_LOAD,
    JPEG_QUALITY,
    MP_CONTEXT,
    Sample,
    image_relpath,
    machine_facts,
    make_image,
    measure,
    wait_idle,
)
from PIL import Image

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out" / "incremental"
DEFAULT_JSON = BENCH_DIR / "out" / "incremental.json"
TARGET_RATIO = 0.3
STORED = (224, 224)
GENERATE_PROCESSES = 2
FILES_PER_JOB = 64
INGEST_HIT = re.compile(r"ingest: (\d+) file\(s\) unchanged, taken from the cache")
STATS_HIT = re.compile(r"stats: reused the cached fit; reduced (\d+) added and (\d+) removed")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Corpus:
    """``n`` version-1 files plus ``extra`` files interleaved among them, width x height."""

    name: str
    width: int
    height: int
    n: int
    extra: int
    classes: int
    seed: int

    @property
    def root(self) -> Path:
        return OUT_DIR / (
            f"corpus_{self.width}x{self.height}_{self.n}+{self.extra}"
            f"_c{self.classes}_q{JPEG_QUALITY}_s{self.seed}"
        )

    @property
    def files(self) -> Path:
        return self.root / "files"

    def old(self) -> list[tuple[int, str]]:
        """(generator index, relative path) of the version-1 files."""
        return [(i, image_relpath(i, self.classes)) for i in range(self.n)]

    def new(self) -> list[tuple[int, str]]:
        """The added files: each named to sort right after an old file ``j``, in ``j``'s class
        folder, with the ``j`` spread evenly over the old files and over the class folders."""
        step = max(1, self.n // self.extra)
        items = []
        for k in range(self.extra):
            j = k * self.n // self.extra + k % step
            items.append((self.n + k, f"class_{j % self.classes:02d}/img_{j:06d}a.jpg"))
        return items

    def layout(self) -> str:
        """sha256 of every file's generator index and path."""
        return hashlib.sha256(json.dumps(self.old() + self.new()).encode()).hexdigest()


def _write_jpegs(job: tuple[str, Sequence[tuple[int, str]], int, int, int]) -> int:
    """Write the files of one job that are not there yet; return the bytes of all of them."""
    root, items, width, height, seed = job
    side = max(width, height)
    top, left = (side - height) // 2, (side - width) // 2
    total = 0
    for index, rel in items:
        path = Path(root) / rel
        if not path.exists():
            pixels = make_image(index, side, seed)[top : top + height, left : left + width]
            tmp = path.with_name(f".{path.name}.tmp")
            Image.fromarray(np.ascontiguousarray(pixels)).save(
                tmp, "JPEG", quality=JPEG_QUALITY
            )
            os.replace(tmp, path)  # a killed run leaves only whole files behind
        total += path.stat().st_size
    return total


def generate(corpus: Corpus) -> dict[str, Any]:
    """Write the corpus unless a complete one is there; return its facts."""
    done = corpus.root / "corpus.json"
    if done.is_file():
        facts = dict(json.loads(done.read_text()))
        if facts.get("layout") == corpus.layout():
            facts["generated_now"] = False
            return facts
    items = corpus.old() + corpus.new()
    for c in range(corpus.classes):
        (corpus.files / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
    jobs = [
        (str(corpus.files), items[a : a + FILES_PER_JOB], corpus.width, corpus.height,
         corpus.seed)
        for a in range(0, len(items), FILES_PER_JOB)
    ]
    t0 = time.perf_counter()
    with mp.get_context(MP_CONTEXT).Pool(GENERATE_PROCESSES) as pool:
        total = sum(pool.imap_unordered(_write_jpegs, jobs))
    facts = {
        "width": corpus.width, "height": corpus.height, "n": corpus.n, "extra": corpus.extra,
        "classes": corpus.classes, "seed": corpus.seed, "jpeg_quality": JPEG_QUALITY,
        "files": len(items), "bytes": total, "mean_file_bytes": total / len(items),
        "generate_seconds": time.perf_counter() - t0, "layout": corpus.layout(),
    }
    done.write_text(json.dumps(facts, indent=2) + "\n")
    facts["generated_now"] = True
    return facts


def link_files(src: Path, dst: Path, items: Sequence[tuple[int, str]]) -> None:
    """Hard-link ``items`` of ``src`` into ``dst`` (same bytes, same page cache)."""
    for _, rel in items:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(src / rel, dst / rel)


# --------------------------------------------------------------------------- running the CLI


@dataclass(frozen=True)
class Setup:
    """What every CLI call of one case shares."""

    work: Path
    params: Path
    env: dict[str, str]
    max_wait: float


@dataclass
class Run:
    """ingest + stats of one source with one cache state."""

    label: str
    ingest: Sample
    stats: Sample
    from_cache: int | None  # files ingest took from the cache (None: no such message)
    reused: tuple[int, int] | None  # (added, removed) reduced by stats; None: fitted afresh

    @property
    def total(self) -> float:
        return self.ingest.wall + self.stats.wall

    @property
    def cpu(self) -> float:
        """CPU seconds of both commands and their workers."""
        return self.ingest.cpu + self.stats.cpu

    def part(self, name: str) -> float:
        """Seconds of ``ingest``, ``stats``, ``total`` (wall) or ``cpu``."""
        if name in ("ingest", "stats"):
            return float(getattr(self, name).wall)
        return self.total if name == "total" else self.cpu

    @property
    def foreign(self) -> float:
        """Cores used by other processes (and the hypervisor), averaged over both commands."""
        busy = sum((s.foreign + s.steal) * s.wall for s in (self.ingest, self.stats))
        return busy / self.total

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "ingest": vars(self.ingest),
            "stats": vars(self.stats),
            "total_s": self.total,
            "foreign_cores": self.foreign,
            "from_cache": self.from_cache,
            "reused": list(self.reused) if self.reused else None,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Run:
        """The run that :meth:`to_json` wrote."""
        return cls(label=d["label"], ingest=Sample(**d["ingest"]), stats=Sample(**d["stats"]),
                   from_cache=d["from_cache"], reused=tuple(d["reused"]) if d["reused"] else None)


def cli(setup: Setup, argv: Sequence[str], cache: str, *, timed: bool) -> tuple[Sample, str]:
    """Run ``python -m pipeline ARGV`` with ``PIPELINE_CACHE_DIR=cache``; return time and text."""
    env = dict(setup.env, PIPELINE_CACHE_DIR=cache)
    if timed and setup.max_wait > 0:
        wait_idle(setup.max_wait)
    done: dict[str, subprocess.CompletedProcess[str]] = {}

    def call() -> None:
        done["p"] = subprocess.run(
            [sys.executable, "-m", "pipeline", *argv],
            env=env, cwd=setup.work, capture_output=True, text=True, check=False,
        )

    sample = measure(call)
    proc = done["p"]
    if proc.returncode != 0:
        raise RuntimeError(
            f"pipeline {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return sample, proc.stdout + proc.stderr


def run_both(setup: Setup, src: Path, out: Path, cache: Path | None, label: str) -> Run:
    """Time ingest then stats of ``src`` into ``out`` (cache None: off)."""
    fresh(out)
    cache_dir = str(cache) if cache is not None else "off"
    prepared = out / "prepared"
    ingest, text = cli(setup, ["ingest", str(src), str(prepared), "--params", str(setup.params)],
                       cache_dir, timed=True)
    stats, text2 = cli(setup, ["stats", str(prepared), str(out / "stats"), "--params",
                               str(setup.params)], cache_dir, timed=True)
    hit, fit = INGEST_HIT.search(text), STATS_HIT.search(text2)
    run = Run(
        label=label,
        ingest=ingest,
        stats=stats,
        from_cache=int(hit.group(1)) if hit else None,
        reused=(int(fit.group(1)), int(fit.group(2))) if fit else None,
    )
    print(f"  {label:<44} ingest {ingest.wall:7.2f} s  stats {stats.wall:6.2f} s  "
          f"total {run.total:7.2f} s  foreign {run.foreign:4.2f} cores  "
          f"cache: ingest {run.from_cache}, stats {run.reused}", flush=True)
    return run


def cache_info(setup: Setup, cache: Path) -> dict[str, Any]:
    """``pipeline cache info`` output, plus entries and bytes counted here."""
    _, text = cli(setup, ["cache", "info", "--dir", str(cache)], str(cache), timed=False)
    kinds: dict[str, dict[str, int]] = {}
    for kind_dir in sorted(p for p in cache.iterdir() if p.is_dir()):
        files = [f for f in kind_dir.rglob("*") if f.is_file() and not f.name.startswith(".")]
        kinds[kind_dir.name] = {"entries": len(files),
                                "bytes": sum(f.stat().st_size for f in files)}
    return {"cli": text.strip(), "kinds": kinds,
            "bytes": sum(k["bytes"] for k in kinds.values())}


def warm_up(setup: Setup, corpus: Corpus, n: int = 32) -> None:
    """Untimed ingest + stats of a few files, cache off: the first run of a fresh copy of the
    code compiles its bytecode and the stats kernel, which no timed row should pay for."""
    src, out = setup.work / "warm-up-src", setup.work / "warm-up"
    link_files(corpus.files, src, corpus.old()[:n])
    cli(setup, ["ingest", str(src), str(out / "prepared"), "--params", str(setup.params)],
        "off", timed=False)
    cli(setup, ["stats", str(out / "prepared"), str(out / "stats"), "--params",
                str(setup.params)], "off", timed=False)
    fresh(src)
    fresh(out)


# --------------------------------------------------------------------------- checks and helpers


def fresh(path: Path) -> Path:
    """Remove ``path`` (file or folder) if it exists."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    return path


def tree_files(root: Path) -> dict[str, int]:
    """Relative path -> size of every file under ``root``."""
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def compare_trees(a: Path, b: Path) -> dict[str, Any]:
    """Are all files under ``a`` and ``b`` the same, byte for byte (and the same set)?"""
    fa, fb = tree_files(a), tree_files(b)
    common = sorted(fa.keys() & fb.keys())
    differ = [rel for rel in common if not filecmp.cmp(a / rel, b / rel, shallow=False)]
    only = sorted(fa.keys() ^ fb.keys())
    return {
        "identical": not differ and not only,
        "files": len(common),
        "bytes": sum(fa[rel] for rel in common),
        "differ": differ[:20],
        "only_in_one": only[:20],
    }


def git(*args: str) -> str:
    """Output of a git command in the repository ("" when it fails)."""
    proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
    return proc.stdout.rstrip("\n")


def code_state(code: Path, rev: str | None) -> dict[str, Any]:
    """sha256 over the pipeline package that the CLI runs, and where that code came from."""
    h = hashlib.sha256()
    for f in sorted((code / "pipeline").rglob("*.py")):
        h.update(str(f.relative_to(code)).encode() + b"\0" + f.read_bytes())
    where: dict[str, Any] = {"rev": rev} if rev else {
        "head": git("rev-parse", "HEAD"),
        "uncommitted": git("status", "--porcelain", "--", "pipeline").splitlines(),
    }
    return {"pipeline_sha256": h.hexdigest(), **where}


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def summarize(inc: Sequence[Run], full: Sequence[Run]) -> dict[str, Any]:
    """Ratios incremental / full of the medians, over all reps and over the clean ones.

    A run is clean when other processes and the hypervisor took under CLEAN_LOAD cores on
    average while it ran. The verdict uses the clean runs when both sides have some.
    """

    def medians(a: Sequence[Run], b: Sequence[Run]) -> dict[str, Any] | None:
        if not a or not b:
            return None
        out: dict[str, Any] = {"runs": [len(a), len(b)]}
        for part in ("ingest", "stats", "total", "cpu"):
            x, y = median([r.part(part) for r in a]), median([r.part(part) for r in b])
            out[part] = {"incremental_s": x, "full_s": y, "ratio": x / y}
        return out

    clean = [[r for r in runs if r.foreign < CLEAN_LOAD] for runs in (inc, full)]
    s: dict[str, Any] = {"all": medians(inc, full), "clean": medians(*clean)}
    s["basis"] = "clean" if s["clean"] else "all"
    s["ratio"] = s[s["basis"]]["total"]["ratio"]
    s["meets_target"] = s["ratio"] <= TARGET_RATIO
    s["ratio_per_rep"] = [a.total / b.total for a, b in zip(inc, full, strict=True)]
    s["foreign_per_rep"] = [[a.foreign, b.foreign] for a, b in zip(inc, full, strict=True)]
    return s


# --------------------------------------------------------------------------- one case


def bench_case(
    corpus: Corpus, setup: Setup, reps: int, *, v1_off: bool, keep: bool
) -> dict[str, Any]:
    """Every timed row of one corpus; see the module docstring for the order."""
    work = setup.work
    src = work / "src"
    fresh(src)
    link_files(corpus.files, src, corpus.old())
    snapshot, cache = work / "cache-v1", work / "cache"
    fresh(snapshot)
    fresh(cache)
    result: dict[str, Any] = {"name": corpus.name}
    rows: dict[str, Any] = {}
    checks: dict[str, Any] = {}

    print(f"{corpus.name}: v1 = {corpus.n} files", flush=True)
    if v1_off:
        rows["v1_cache_off"] = run_both(setup, src, work / "v1-off", None, "v1, cache off")
    rows["v1_fill"] = run_both(setup, src, work / "v1-fill", snapshot, "v1, empty cache (fills it)")
    if v1_off:
        checks["v1_fill_vs_off"] = compare_trees(work / "v1-fill", work / "v1-off")
        fresh(work / "v1-off")
    result["cache_after_v1"] = cache_info(setup, snapshot)
    fresh(work / "v1-fill")

    link_files(corpus.files, src, corpus.new())
    print(f"{corpus.name}: v2 = v1 + {corpus.extra} files", flush=True)
    inc: list[Run] = []
    full: list[Run] = []
    for rep in range(reps):
        order = ("inc", "full") if rep % 2 == 0 else ("full", "inc")
        for which in order:
            if which == "inc":
                fresh(cache)
                subprocess.run(["cp", "-al", str(snapshot), str(cache)], check=True)
                inc.append(run_both(setup, src, work / "inc", cache,
                                    f"rep {rep + 1}: v2 incremental (v1 cache)"))
            else:
                full.append(run_both(setup, src, work / "full", None,
                                     f"rep {rep + 1}: v2 full rebuild (cache off)"))
    checks["incremental_vs_full"] = compare_trees(work / "inc", work / "full")
    fresh(work / "inc")
    nochange = run_both(setup, src, work / "nochange", cache, "v2 again, warm cache (no change)")
    checks["nochange_vs_full"] = compare_trees(work / "nochange", work / "full")
    result["cache_after_v2"] = cache_info(setup, cache)

    n_v2 = corpus.n + corpus.extra
    manifest = work / "full" / "prepared" / "manifest.jsonl"
    rows_v2 = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    new_paths = {rel for _, rel in corpus.new()}
    train_added = sum(1 for r in rows_v2 if r["split"] == "train" and r["path"] in new_paths)
    checks["messages"] = {
        "incremental_ingest_from_cache": [r.from_cache for r in inc],
        "incremental_stats_reused": [r.reused for r in inc],
        "expected_from_cache": corpus.n,
        "expected_stats_added": train_added,
        "full_mentions_cache": any(r.from_cache or r.reused for r in full),
        "nochange_from_cache": nochange.from_cache,
        "nochange_stats_reused": nochange.reused,
        "ok": all(r.from_cache == corpus.n and r.reused == (train_added, 0) for r in inc)
        and not any(r.from_cache or r.reused for r in full)
        and nochange.from_cache == n_v2
        and nochange.reused == (0, 0),
    }
    result["outputs"] = {
        "prepared": tree_files(work / "full" / "prepared"),
        "stats": tree_files(work / "full" / "stats"),
    }
    result["outputs"] = {k: {"files": len(v), "bytes": sum(v.values())}
                         for k, v in result["outputs"].items()}
    positions = sorted(r["index"] for r in rows_v2 if r["path"] in new_paths)
    result["new_files_store_index"] = {"first": positions[0], "last": positions[-1],
                                       "of": len(rows_v2)} if positions else None

    summary = summarize(inc, full)
    base = summary[summary["basis"]]["total"]["full_s"]
    summary["fill_overhead"] = (
        rows["v1_fill"].total / rows["v1_cache_off"].total if v1_off else None
    )
    summary["nochange_ratio"] = nochange.total / base
    result["summary"] = summary
    result["rows"] = {k: v.to_json() for k, v in rows.items()}
    result["incremental"] = [r.to_json() for r in inc]
    result["full"] = [r.to_json() for r in full]
    result["nochange"] = nochange.to_json()
    result["checks"] = checks
    if not keep:
        for p in (src, snapshot, cache, work / "full", work / "nochange"):
            fresh(p)
    return result


# --------------------------------------------------------------------------- per-image costs


def _ms_per_item(fn: Any, items: Sequence[Any]) -> float:
    """Milliseconds per item of ``fn(item)`` over ``items``, best of 3 passes (one thread)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - t0)
    return best / len(items) * 1e3


def parts_breakdown(corpus: Corpus, k: int, scratch: Path) -> dict[str, float]:
    """One-thread milliseconds per image of the steps the incremental and full runs differ in.

    On the first ``k`` files of ``corpus`` (shards of 256), in this process: reading a
    source file, hashing it, decoding it with the ingest policy (decode + resize), keeping a
    shard as a written cache pack (the fallback when ingest cannot hard-link the shard file) and
    reading an image back from it with its CRC check, writing whole shards into new stores
    (array creation included), reducing images for stats.
    """
    import zarr

    from pipeline.cache.entries import open_cache
    from pipeline.cache.packs import add_pack, decoded_key, image_crc, load_index, read_packed
    from pipeline.ingest.images import decode_image
    from pipeline.params import parse_params
    from pipeline.stats.moments import block_moments
    from pipeline.zarrstore.store import create_images_array

    k = min(k, corpus.n)
    ip = parse_params({"ingest": {"image_size": list(STORED)}}).ingest
    paths = [corpus.files / rel for _, rel in corpus.old()[:k]]
    data = [p.read_bytes() for p in paths]
    decoded = [decode_image(d, ip, channels=3) for d in data]
    cache = open_cache(fresh(scratch / "cache"))
    keys = [decoded_key(d.sha256, "parts") for d in decoded]

    pixels = np.stack([d.pixels for d in decoded])
    shards = [(a, min(a + 256, k)) for a in range(0, k, 256)]
    stores = iter(range(10**9))

    write_shard: Any = None
    with contextlib.suppress(ImportError):  # the shard writer of ingest, where the code has one
        from pipeline.zarrstore.shardwrite import write_shard

    def write(shard: tuple[int, int]) -> None:
        """Write one whole shard into a new store, as every ingest does (new files)."""
        path = scratch / "stores" / f"{next(stores)}.zarr"
        a, b = shard
        images = create_images_array(zarr.open_group(path, mode="w"), "images",
                                     shape=(b - a, *pixels.shape[1:]), dtype="uint8",
                                     chunk_images=16, shard_images=256)
        if write_shard is not None:
            write_shard(images, path / "images", 0, pixels[a:b])
        else:
            images[:] = pixels[a:b]

    block_moments(pixels[:16])  # compile the kernel outside the timing

    def pack(shard: tuple[int, int]) -> None:
        """Keep one shard's images as a written pack (the copy used when a link cannot be)."""
        a, b = shard
        entries = [(i - a, keys[i], image_crc(pixels[i]), {"sha256": decoded[i].sha256})
                   for i in range(a, b)]
        add_pack(cache, "parts", pixels[a:b], entries)

    for shard in shards:
        pack(shard)
    index = load_index(cache, "parts")
    out = np.empty_like(pixels[0])
    result = {
        "images": k,
        "read_source_ms": _ms_per_item(lambda p: p.read_bytes(), paths),
        "sha256_source_ms": _ms_per_item(lambda d: hashlib.sha256(d).hexdigest(), data),
        "decode_resize_ms": _ms_per_item(lambda d: decode_image(d, ip, channels=3), data),
        "cache_put_ms": _ms_per_item(pack, shards) * len(shards) / k,
        "cache_get_ms": _ms_per_item(lambda key: read_packed(index[key], out), keys),
        "write_store_ms": _ms_per_item(write, shards) * len(shards) / k,
        "stats_reduce_ms": _ms_per_item(lambda s: block_moments(pixels[s[0] : s[1]]), shards)
        * len(shards) / k,
        "mean_source_bytes": sum(len(d) for d in data) / k,
    }
    fresh(scratch)
    return result


def format_parts(parts: dict[str, float]) -> str:
    """The per-image costs as a small table."""
    lines = [f"per-image costs, one thread, {parts['images']} images (ms):"]
    lines += [f"  {k[:-3]:<18} {v:7.3f}" for k, v in parts.items() if k.endswith("_ms")]
    return "\n".join(lines)


# --------------------------------------------------------------------------- printing


def format_case(res: dict[str, Any]) -> str:
    """Markdown table of one case's rows, then the ratios and checks."""
    lines = [f"### {res['name']}", "",
             "| run | ingest s | stats s | total s | CPU s | foreign cores | from cache "
             "| stats reused (added, removed) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    runs = [*res["rows"].values(), *res["incremental"], *res["full"], res["nochange"]]
    for r in runs:
        cpu = r["ingest"]["cpu"] + r["stats"]["cpu"]
        lines.append(
            f"| {r['label']} | {r['ingest']['wall']:.2f} | {r['stats']['wall']:.2f} "
            f"| {r['total_s']:.2f} | {cpu:.1f} | {r['foreign_cores']:.2f} "
            f"| {r['from_cache'] if r['from_cache'] is not None else '-'} "
            f"| {tuple(r['reused']) if r['reused'] else '-'} |"
        )
    s = res["summary"]
    lines += ["", "| medians over | runs (inc, full) | ingest | stats | total s (inc / full) "
              "| total ratio | CPU ratio |", "|---|---|---:|---:|---:|---:|---:|"]
    for basis in ("all", "clean"):
        m = s[basis]
        if m is None:
            lines.append(f"| {basis} runs | none clean | | | | | |")
            continue
        lines.append(
            f"| {basis} runs | {m['runs'][0]}, {m['runs'][1]} | {m['ingest']['ratio']:.3f} "
            f"| {m['stats']['ratio']:.3f} | {m['total']['incremental_s']:.2f} / "
            f"{m['total']['full_s']:.2f} | {m['total']['ratio']:.3f} | {m['cpu']['ratio']:.3f} |"
        )
    per_rep = ", ".join(f"{x:.3f} (foreign {f[0]:.2f}/{f[1]:.2f})"
                        for x, f in zip(s["ratio_per_rep"], s["foreign_per_rep"], strict=True))
    verdict = "meets" if s["meets_target"] else "misses"
    lines.append(f"\nincremental / full = {s['ratio']:.3f} over {s['basis']} runs ({verdict} the "
                 f"target {TARGET_RATIO}); per rep: {per_rep}")
    if s["fill_overhead"] is not None:
        lines.append(f"v1 filling the cache / v1 cache off = {s['fill_overhead']:.3f}")
    lines.append(f"no change (warm cache) / full rebuild = {s['nochange_ratio']:.3f}")
    for name, c in res["checks"].items():
        if "identical" in c:
            lines.append(f"{name}: identical={c['identical']} ({c['files']} files, "
                         f"{c['bytes'] / 1e6:,.1f} MB){'' if c['identical'] else ' ' + str(c)}")
    lines.append(f"messages: {json.dumps(res['checks']['messages'])}")
    for key in ("cache_after_v1", "cache_after_v2"):
        lines.append(f"{key}: {res[key]['bytes'] / 1e9:.2f} GB {json.dumps(res[key]['kinds'])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="version-1 files of the main case")
    ap.add_argument("--extra", type=float, default=0.1,
                    help="files added for version 2, as a fraction of --n")
    ap.add_argument("--width", type=int, default=640, help="source width of the main case")
    ap.add_argument("--height", type=int, default=480, help="source height of the main case")
    ap.add_argument("--worst-n", type=int, default=4000,
                    help="version-1 files of the worst case (224x224 sources; 0: skip)")
    ap.add_argument("--reps", type=int, default=3, help="incremental/full pairs per case")
    ap.add_argument("--classes", type=int, default=10, help="class subfolders")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wait-idle", type=float, default=10.0,
                    help="before each timed command wait up to this many seconds for other "
                         "processes to use under 0.3 cores (0: don't wait)")
    ap.add_argument("--rev", default=None,
                    help="run the pipeline code of this git revision (exported next to the "
                         "data) instead of the working tree's")
    ap.add_argument("--parts", type=int, default=512,
                    help="images for the one-thread per-image cost breakdown (0: skip)")
    ap.add_argument("--parts-only", action="store_true",
                    help="only the per-image cost breakdown (on the main corpus)")
    ap.add_argument("--keep", action="store_true", help="keep sources, caches and outputs")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 200 + 20 files, worst case 100 + 10, 1 rep, no waiting")
    ap.add_argument("--json", type=Path, default=None,
                    help="where to write results (default bench/out/incremental.json, "
                         "incremental-quick.json with --quick)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.worst_n, args.reps, args.wait_idle = 200, 100, 1, 0.0
    if args.json is None:
        stem = "incremental-quick" if args.quick else "incremental"
        stem += "-parts" if args.parts_only else ""
        args.json = DEFAULT_JSON.with_stem(stem)
    return args


def export_code(rev: str, dest: Path) -> Path:
    """The ``pipeline`` package of git revision ``rev``, unpacked under ``dest``."""
    fresh(dest)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev, "pipeline"], cwd=REPO, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def main(argv: Sequence[str] | None = None) -> None:
    """Generate the corpora, time every case, print the tables and write the JSON."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    facts = machine_facts()
    print("machine:", json.dumps(facts))
    tag = "quick" if args.quick else "full"
    run_dir = OUT_DIR / f"run-{tag}{'-parts' if args.parts_only else ''}"
    fresh(run_dir)
    run_dir.mkdir(parents=True)
    env = dict(os.environ)
    env.pop("PIPELINE_CACHE_LIMIT", None)  # the default limit (10 GB)
    code, rev = REPO, None
    if args.rev:
        rev = git("rev-parse", "--verify", f"{args.rev}^{{commit}}")
        if not rev:
            raise SystemExit(f"not a git revision: {args.rev}")
        code = export_code(rev, run_dir / "code")
        env["PYTHONPATH"] = str(code)
    params = run_dir / "params.yaml"
    params.write_text(f"ingest:\n  image_size: [{STORED[0]}, {STORED[1]}]\n")
    results: dict[str, Any] = {
        "machine": facts,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "params_yaml": params.read_text(),
        "code_before": code_state(code, rev),
        "target_ratio": TARGET_RATIO,
        "cases": [],
    }
    extra = max(1, round(args.n * args.extra))
    cases = [(Corpus("main", args.width, args.height, args.n, extra, args.classes, args.seed),
              True)]
    if args.worst_n:
        worst_extra = max(1, round(args.worst_n * args.extra))
        cases.append((Corpus("worst case: 224x224 sources", *STORED[::-1], args.worst_n,
                             worst_extra, args.classes, args.seed), not args.quick))
    for corpus, _ in cases:
        print(f"corpus {corpus.root.name}: ", end="", flush=True)
        data = generate(corpus)
        made = f", generated in {data['generate_seconds']:.0f} s" if data["generated_now"] else ""
        print(f"{data['files']} files, mean {data['mean_file_bytes'] / 1e3:.1f} KB{made}",
              flush=True)
        results.setdefault("data", {})[corpus.name] = data
    if args.parts:
        if args.rev:
            sys.path.insert(0, str(code))
        results["parts"] = {}
        for corpus, _ in cases:
            parts = parts_breakdown(corpus, args.parts, run_dir / "parts")
            results["parts"][corpus.name] = parts
            print(f"{corpus.name}: {format_parts(parts)}", flush=True)
    if args.parts_only:
        cases = []
    else:
        warm_up(Setup(work=run_dir, params=params, env=env, max_wait=0), cases[0][0])
    for corpus, v1_off in cases:
        work = run_dir / re.sub(r"\W+", "-", corpus.name).strip("-")
        work.mkdir()
        setup = Setup(work=work, params=params, env=env, max_wait=args.wait_idle)
        res = bench_case(corpus, setup, args.reps, v1_off=v1_off, keep=args.keep)
        res["data"] = results["data"][corpus.name]
        results["cases"].append(res)
        print(format_case(res), flush=True)
    results["code_after"] = code_state(code, rev)
    if results["code_after"]["pipeline_sha256"] != results["code_before"]["pipeline_sha256"]:
        print("WARNING: the pipeline code changed during the run", flush=True)
    results["seconds"] = time.perf_counter() - t_start
    if not args.keep:
        fresh(run_dir)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.json} ({results['seconds']:.0f} s)")
    failed = [
        f"{case['name']}: {name}"
        for case in results["cases"]
        for name, check in case["checks"].items()
        if not check.get("identical", check.get("ok"))
    ]
    if failed:
        raise SystemExit(f"FAILED (outputs differ or the cache was not used): {failed}")


if __name__ == "__main__":
    main()
