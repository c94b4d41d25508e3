"""The sha256 of source files, remembered by file identity so unchanged files are not read again.

The same bargain as DVC's state database and git's index: a file whose device, inode, size
and modification time (in ns) are those recorded still has the recorded sha256. A file
changed in place keeps its inode but gets a new mtime; a file replaced (editors, rsync, a
checkout) gets a new inode. Files modified in the two seconds before the record is written
are left out of it (git's "racily clean" files: a second change within the same clock tick
would keep the mtime), so they are hashed again next time. Kept in the cache as one
``hashes`` entry per source folder.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.cache.entries import Cache, Entry, cache_key

__all__ = ["Identity", "hash_files", "identities", "known_hashes", "remember_hashes"]

Identity = tuple[int, int, int, int]  # device, inode, size, mtime in ns
RACY_NS = 2 * 10**9


def identities(root: Path, relpaths: Sequence[str]) -> dict[str, Identity]:
    """Identity of every file of ``relpaths`` that can be looked at."""
    found = {}
    for rel in relpaths:
        try:
            st = os.stat(os.path.join(root, rel))
        except OSError:
            continue
        found[rel] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return found


def _key(root: Path) -> str:
    return cache_key({"hashes": str(root)})


def known_hashes(cache: Cache, root: Path, ids: Mapping[str, Identity]) -> dict[str, str]:
    """sha256 of the files of ``ids`` whose identity is recorded unchanged."""
    entry = cache.get("hashes", _key(root))
    table = entry.header.get("files", {}) if entry is not None else {}
    if not isinstance(table, dict):
        return {}  # an entry from elsewhere: a miss, never a crash
    known = {}
    for rel, (dev, ino, size, mtime) in ids.items():
        row = table.get(f"{dev}:{ino}")
        if (
            isinstance(row, list)
            and len(row) == 3
            and row[0] == size
            and row[1] == mtime
            and isinstance(row[2], str)
            and len(row[2]) == 64
        ):
            known[rel] = row[2]
    return known


def remember_hashes(
    cache: Cache, root: Path, ids: Mapping[str, Identity], shas: Mapping[str, str]
) -> None:
    """Record ``shas`` for the next run, leaving out files modified moments ago."""
    cutoff = time.time_ns() - RACY_NS
    table = {
        f"{dev}:{ino}": [size, mtime, sha]
        for rel, sha in shas.items()
        if rel in ids
        for dev, ino, size, mtime in [ids[rel]]
        if mtime < cutoff
    }
    cache.put("hashes", _key(root), Entry(header={"files": table}, arrays={}))


def _sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def hash_files(root: Path, relpaths: Sequence[str], workers: int) -> dict[str, str]:
    """sha256 of each readable file of ``relpaths``, on ``workers`` threads.

    Threads suffice: hashlib releases the GIL while it hashes.
    """
    with ThreadPoolExecutor(max(1, workers)) as pool:
        digests = pool.map(_sha256, [os.path.join(root, rel) for rel in relpaths], chunksize=64)
        return {rel: d for rel, d in zip(relpaths, digests, strict=True) if d is not None}
