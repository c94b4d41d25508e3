"""CPU accounting shared by the benchmarks: machine-wide busy/steal time and our own CPU time.

These machines are shared and noisy, so every timed run also records how much CPU other
processes (and the hypervisor) took meanwhile.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["own_cpu", "proc_stat"]


def proc_stat() -> tuple[int, int]:
    """(busy, steal) jiffies of the whole machine since boot, from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return (0, 0)
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq, steal)


def own_cpu() -> float:
    """CPU seconds of this process and its waited-for children (Dask and baseline workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system
