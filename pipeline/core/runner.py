"""Running Dask task lists on the scheduler that ``base.scheduler`` asks for.

Local schedulers (threads, processes, synchronous) or an existing dask.distributed cluster
given by its address. Outputs never depend on the choice: every task writes whole shards or
returns exact partial results.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dask
from dask.diagnostics import ProgressBar

from pipeline.core.errors import PipelineError
from pipeline.core.location import Location
from pipeline.core.memory import tune_malloc
from pipeline.params import BaseParams, parse_scheduler

__all__ = ["SCHEDULER_ENV", "resolve_scheduler", "run_tasks"]

# Measured on 2 cores: Pillow's JPEG decode holds the GIL, so decoding scales with processes
# only; numpy reductions and Zarr I/O release it, so threads avoid pickling for those.
AUTO = {"decode": "processes", "reduce": "threads", "io": "threads"}
# Overrides base.scheduler without touching params.yaml (so DVC sees no change): for cluster runs.
SCHEDULER_ENV = "PIPELINE_SCHEDULER"


def resolve_scheduler(base: BaseParams, kind: str) -> tuple[str, int]:
    """(scheduler name or cluster address, worker count) for a task list of ``kind``."""
    chosen = base.scheduler
    if os.environ.get(SCHEDULER_ENV):
        chosen = parse_scheduler(os.environ[SCHEDULER_ENV], SCHEDULER_ENV)
    workers = base.workers or os.cpu_count() or 1
    scheduler = AUTO[kind] if chosen == "auto" else chosen
    if scheduler == "processes" and workers == 1:
        scheduler = "synchronous"  # one worker process only adds start-up and pickling cost
    return scheduler, workers


Shared = Path | Location


def _check_shared(client: Any, paths: Sequence[Shared], writes: Sequence[Location] = ()) -> None:
    """Fail before any work if some worker cannot see a path the tasks read or write.

    Local paths must exist at the same absolute path on every worker; URLs must be readable
    through fsspec there, and ``writes`` (URLs) writable beside (a probe object is written and
    removed).
    """
    from pipeline.core.reach import FIX, probe

    reads = [p.url for p in paths if isinstance(p, Location) and not p.is_local]
    probes = [w.url for w in writes if not w.is_local]
    if reads or probes:
        answers = client.run(probe, reads, probes)
        failed: dict[tuple[str, str], list[str]] = {}
        for worker, problems in answers.items():
            for url, reason in problems:
                failed.setdefault((url, reason), []).append(worker)
        if failed:
            shown = "; ".join(
                f"{url} on {len(w)} worker(s) ({', '.join(sorted(w)[:3])}): {reason}"
                for (url, reason), w in sorted(failed.items())
            )
            raise PipelineError(f"Dask workers cannot reach {shown}. {FIX}")
    for path in paths:
        if isinstance(path, Location):
            if not path.is_local:
                continue
            path = path.local  # type: ignore[assignment]
        seen = client.run(os.path.exists, str(Path(path).resolve()))
        blind = sorted(worker for worker, ok in seen.items() if not ok)
        if blind:
            raise PipelineError(
                f"{len(blind)} Dask worker(s) cannot see {path} ({', '.join(blind[:3])}). Put "
                f"the data and outputs on storage every worker mounts at the same path."
            )


def _run_on_cluster(
    tasks: Sequence[Any],
    address: str,
    progress: bool,
    shared: Sequence[Shared],
    writes: Sequence[Location],
) -> list[Any]:
    from distributed import Client, as_completed
    from distributed import progress as show_progress

    try:
        client = Client(address, set_as_default=False, timeout="10s")
    except OSError as exc:
        raise PipelineError(
            f"Cannot reach the Dask scheduler at {address}: {exc}. Start it (`dask scheduler`) "
            f"or fix base.scheduler / ${SCHEDULER_ENV}."
        ) from exc
    with client:
        _check_shared(client, shared, writes)
        if progress and sys.stderr.isatty():
            print(f"dask dashboard: {client.dashboard_link}", file=sys.stderr)
        futures = client.compute(list(tasks))
        if progress and sys.stderr.isatty():
            show_progress(futures)
        for _ in as_completed(futures, loop=client.loop, raise_errors=False):  # wait for all
            pass
        return list(client.gather(futures))


def run_tasks(
    tasks: Sequence[Any],
    base: BaseParams,
    *,
    kind: str,
    progress: bool = False,
    shared: Sequence[Shared] = (),
    writes: Sequence[Location] = (),
) -> list[Any]:
    """Compute ``tasks`` and return their results in order.

    ``shared`` lists paths and URLs every worker must see, ``writes`` the URLs of outputs
    they write; on a cluster both are checked first.
    """
    if not tasks:
        return []
    tune_malloc()
    scheduler, workers = resolve_scheduler(base, kind)
    if "://" in scheduler:
        return _run_on_cluster(tasks, scheduler, progress, shared, writes)
    in_memory = [str(p) for p in [*shared, *writes] if str(p).startswith("memory://")]
    if scheduler == "processes" and in_memory:
        raise PipelineError(
            f"{in_memory[0]} exists only inside this process, and base.scheduler (or "
            f"${SCHEDULER_ENV}) chose worker processes. Use the threads or synchronous "
            f"scheduler with memory:// URLs."
        )
    bar = ProgressBar(out=sys.stderr) if progress and sys.stderr.isatty() else None
    with bar if bar is not None else contextlib.nullcontext(), _pool(scheduler, workers) as pool:
        # Leaving the pool's context waits for tasks still running when one fails, so none
        # writes into a temporary folder after the caller has removed it.
        # chunksize=1: hand worker processes one shard at a time (dask's default batches 6,
        # which left one worker idle on small inputs; measured +15 % ingest throughput).
        extra = {"chunksize": 1} if scheduler == "processes" else {}
        return list(
            dask.compute(*tasks, scheduler=scheduler, num_workers=workers, pool=pool, **extra)
        )


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _watch_parent(parent: int) -> None:
    """Exit this worker once its parent is gone (it is re-parented: the pid changes)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _die_with_parent(parent: int) -> None:
    """Worker initializer: end with the main process, even when that is killed with SIGKILL
    (which runs no cleanup). On Linux the kernel sends this worker SIGKILL when its parent
    dies; elsewhere a daemon thread polls the parent pid."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


@contextlib.contextmanager
def _pool(scheduler: str, workers: int) -> Iterator[Executor | None]:
    """An executor we own (and wait for) for the threads and processes schedulers."""
    if scheduler == "threads":
        with ThreadPoolExecutor(workers) as pool:
            yield pool
    elif scheduler == "processes":
        context = multiprocessing.get_context(dask.config.get("multiprocessing.context", "spawn"))
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=_die_with_parent, initargs=(os.getpid(),)
        ) as pool:
            yield pool
    else:
        yield None
