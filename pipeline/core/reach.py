"""Can this process (or a Dask worker) reach the URLs a stage reads and writes?

Checked before any work starts, on the machine running the command and on every worker of a
cluster, so a missing bucket, wrong credentials or a per-process ``memory://`` filesystem is one
clear error instead of a failure in every task.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from pipeline.core.errors import StoreError
from pipeline.core.location import Location

__all__ = ["FIX", "probe", "require_reachable"]

FIX = (
    "Check the URL, and that credentials and endpoint reach fsspec through the environment "
    "of every process (AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
    "AWS_ENDPOINT_URL_S3 or FSSPEC_S3_ENDPOINT_URL for S3-compatible servers, or fsspec's "
    "config file); memory:// "
    "URLs exist only inside one process, so use them with the threads or synchronous scheduler."
)


def _readable(loc: Location) -> str | None:
    """None when ``loc`` exists and can be listed (folders) or read (files); else the reason."""
    try:
        fs = loc.fs
        fs.invalidate_cache(loc.path)
        if fs.isfile(loc.path):
            with fs.open(loc.path, "rb") as f:
                f.read(1)
            return None
        if not fs.exists(loc.path):
            return "it does not exist"
        fs.ls(loc.path, detail=False)
    except Exception as exc:  # any backend error is the answer here, reported as such
        return f"{type(exc).__name__}: {exc}"
    return None


def _writable(dest: Location) -> str | None:
    """None when a small object can be written beside ``dest`` and removed; else the reason."""
    probe_loc = dest.with_name(f".{dest.name}.probe-{uuid.uuid4().hex[:12]}")
    try:
        probe_loc.write_bytes(b"probe")
        probe_loc.fs.rm(probe_loc.path)
    except Exception as exc:  # any backend error is the answer here, reported as such
        return f"{type(exc).__name__}: {exc}"
    return None


def probe(reads: Sequence[str], writes: Sequence[str]) -> list[tuple[str, str]]:
    """``(url, reason)`` for each URL of ``reads`` this process cannot read and of ``writes``
    beside which it cannot write. Takes strings so it can be sent to Dask workers as is."""
    from pipeline.core.location import parse_location

    problems = []
    for url in reads:
        reason = _readable(parse_location(url))
        if reason:
            problems.append((url, f"cannot read: {reason}"))
    for url in writes:
        reason = _writable(parse_location(url))
        if reason:
            problems.append((url, f"cannot write beside it: {reason}"))
    return problems


def require_reachable(
    reads: Sequence[Location], writes: Sequence[Location], where: str = "this machine"
) -> None:
    """Raise StoreError naming each URL of ``reads`` / ``writes`` that ``where`` cannot reach.

    Local paths are skipped: the stages check those themselves.
    """
    problems = probe(
        [loc.url for loc in reads if not loc.is_local],
        [loc.url for loc in writes if not loc.is_local],
    )
    if problems:
        shown = "; ".join(f"{url} ({reason})" for url, reason in problems)
        raise StoreError(f"{where} cannot reach {shown}. {FIX}")
