"""glibc malloc settings for large, short-lived buffers (shards of tens of megabytes).

With glibc's defaults, every shard-sized buffer is a fresh mmap that is returned to the system
when freed, and fresh pages are slow on virtual machines (first touch measured at 0.1-0.6 GB/s
here). Raising the mmap and trim thresholds lets malloc reuse that memory: measured 1.4x faster
shard decode+write in ingest and 1.65-1.9x faster Zarr reads on these machines.
dask.distributed sets ``MALLOC_TRIM_THRESHOLD_`` for its workers for the same reason.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["tune_malloc"]

MMAP_THRESHOLD = 32 * 2**20  # larger blocks still come from mmap
TRIM_THRESHOLD = 2 * 2**30
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_done = False


def tune_malloc() -> None:
    """Apply the thresholds to this process and (by environment) to worker processes."""
    global _done
    if _done:
        return
    _done = True
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(TRIM_THRESHOLD))
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
