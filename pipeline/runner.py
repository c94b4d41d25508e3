"""Running Dask task lists on the scheduler that ``base.scheduler`` asks for."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import dask
from dask.diagnostics import ProgressBar

from pipeline.params import BaseParams

__all__ = ["resolve_scheduler", "run_tasks"]

# Measured on 2 cores: Pillow's JPEG decode holds the GIL, so decoding scales with processes
# only; numpy reductions and Zarr I/O release it, so threads avoid pickling for those.
AUTO = {"decode": "processes", "reduce": "threads", "io": "threads"}


def resolve_scheduler(base: BaseParams, kind: str) -> tuple[str, int]:
    """(scheduler name, worker count) for a task list of ``kind``."""
    workers = base.workers or os.cpu_count() or 1
    scheduler = AUTO[kind] if base.scheduler == "auto" else base.scheduler
    if scheduler == "processes" and workers == 1:
        scheduler = "synchronous"  # one worker process only adds start-up and pickling cost
    return scheduler, workers


def run_tasks(
    tasks: Sequence[Any], base: BaseParams, *, kind: str, progress: bool = False
) -> list[Any]:
    """Compute ``tasks`` and return their results in order."""
    if not tasks:
        return []
    scheduler, workers = resolve_scheduler(base, kind)
    bar = ProgressBar(out=sys.stderr) if progress and sys.stderr.isatty() else None
    with bar if bar is not None else contextlib.nullcontext():
        return list(dask.compute(*tasks, scheduler=scheduler, num_workers=workers))
