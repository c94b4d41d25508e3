"""Stats stage on a dask.distributed LocalCluster: 1 vs 2 worker processes (scaling efficiency).

On a warm prepared store of N synthetic photo-like 256x256x3 images (the layout ingest writes,
built with bench_stats.py's helpers), ``run_stats`` runs through the address of a real
``distributed.LocalCluster`` on loopback with 1 worker process and with 2 (one thread each),
interleaved per repetition, plus the local threads scheduler (2 threads) for reference.
Scaling efficiency = T(1 worker) / (2 x T(2 workers)): 1.0 is perfect on the 2 cores.
The stats outputs of every run are compared byte for byte with the local run's.

    python bench/bench_cluster.py            # n=4096, 3 reps: a few minutes
    python bench/bench_cluster.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ["PIPELINE_CACHE_DIR"] = "off"  # every run must do the whole pass

from bench_stats import build_store, ingest_template, make_view, timed, wait_idle
from distributed import LocalCluster

from pipeline.params import parse_params
from pipeline.stats.stage import run_stats

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_JSON = BENCH_DIR / "out" / "cluster.json"


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def timed_stats(view: Path, out: Path, scheduler: str) -> dict[str, Any]:
    """One run_stats call; wall seconds, foreign CPU load and steal (cores), output digest."""
    params = parse_params({"base": {"scheduler": scheduler}})
    shutil.rmtree(out, ignore_errors=True)
    wall, foreign, steal, _ = timed(lambda: run_stats(view, out, params))
    return {"wall": wall, "foreign_cores": foreign, "steal_cores": steal,
            "digest": tree_digest(out)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--wait-idle", type=float, default=10.0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args()
    if args.quick:
        args.n, args.reps, args.wait_idle = 512, 1, 0.0
    work = Path(tempfile.mkdtemp(prefix="bench_cluster_"))
    try:
        template = ingest_template(work, 0)
        store = work / "store.zarr"
        build_store(template, store, args.n, 0)
        view = make_view(store, work / "view.zarr", args.n)
        timed_stats(view, work / "warm", "threads")  # page cache warm, imports done
        clusters = {
            k: LocalCluster(n_workers=k, threads_per_worker=1, processes=True,
                            host="127.0.0.1", dashboard_address=None,
                            silence_logs=logging.WARNING)
            for k in (1, 2)
        }
        rows: dict[str, list[dict[str, Any]]] = {"threads (local, 2)": [], "cluster 1": [],
                                                 "cluster 2": []}
        try:
            for rep in range(args.reps):
                for name in rows:
                    wait_idle(args.wait_idle)
                    sched = "threads" if name.startswith("threads") else \
                        clusters[int(name[-1])].scheduler_address
                    r = timed_stats(view, work / "out", sched)
                    rows[name].append(r)
                    print(f"rep {rep + 1} {name:<20} {r['wall']:6.2f} s  foreign "
                          f"{r['foreign_cores']:.2f} cores", flush=True)
        finally:
            for c in clusters.values():
                c.close()
        gb = args.n * 256 * 256 * 3 / 1e9
        med = {k: statistics.median(r["wall"] for r in v) for k, v in rows.items()}
        digests = {r["digest"] for v in rows.values() for r in v}
        result = {
            "n": args.n, "reps": args.reps, "gb": gb,
            "median_s": med,
            "gb_per_s": {k: gb / v for k, v in med.items()},
            "efficiency_2_workers": med["cluster 1"] / (2 * med["cluster 2"]),
            "speedup_2_workers": med["cluster 1"] / med["cluster 2"],
            "cluster2_over_threads": med["threads (local, 2)"] / med["cluster 2"],
            "outputs_identical": len(digests) == 1,
            "rows": rows,
            "python": sys.version.split()[0],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, sort_keys=True))
        print(f"\nn={args.n} ({gb:.2f} GB), median of {args.reps}:")
        for k, v in med.items():
            print(f"  {k:<20} {v:6.2f} s  {gb / v:5.2f} GB/s")
        print(f"speed-up 1 -> 2 workers {result['speedup_2_workers']:.2f}x, efficiency "
              f"{result['efficiency_2_workers']:.2f}; outputs identical: "
              f"{result['outputs_identical']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
