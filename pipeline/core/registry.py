"""The local output folders this tool has written, so their leftovers can be swept.

Under DVC's run-cache a stage whose outputs are restored from the cache does not run, so the
``.NAME.tmp-*`` folder of a killed run of it would stay forever. Every publish records its
local destination in ``outputs.json`` in the cache folder
(:func:`pipeline.cache.entries.open_cache`),
and every stage run, and ``pipeline cache clear``, removes the leftovers of every recorded
output whose lock is free (:func:`pipeline.core.locks.sweep_leftovers`: exact names only).

The file is untrusted input: larger than :data:`MAX_BYTES` or malformed reads as empty, and it
is written atomically (a temporary file renamed into place). With the cache switched off
(``PIPELINE_CACHE_DIR=off``) nothing is recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path

from pipeline.core.locks import sweep_leftovers, try_hold

__all__ = ["known_outputs", "remember_output", "sweep_known"]

FILE = "outputs.json"
SCHEMA = "pipeline.outputs/1"
MAX_ENTRIES = 256  # the most recently written outputs; older ones are forgotten
MAX_BYTES = 1 << 20  # 256 paths of up to 4 kB each


def _root() -> Path | None:
    """The cache folder, or None when caching is off."""
    from pipeline.cache.entries import open_cache

    cache = open_cache()
    return cache.root if cache.enabled else None


def known_outputs(root: Path | None = None) -> list[Path]:
    """The recorded output paths, most recent last; [] when the file is missing or malformed."""
    root = root if root is not None else _root()
    if root is None:
        return []
    try:
        with open(root / FILE, "rb") as f:
            data = f.read(MAX_BYTES + 1)
        doc = json.loads(data) if len(data) <= MAX_BYTES else None
    except (OSError, ValueError):
        return []
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        return []
    paths = doc.get("outputs")
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        return []
    return [Path(p) for p in paths[-MAX_ENTRIES:] if os.path.isabs(p)]


def remember_output(dest: Path, root: Path | None = None) -> None:
    """Record the absolute local output ``dest``; a cache folder that cannot be written is
    skipped (the registry only saves disk space, it never changes a result)."""
    root = root if root is not None else _root()
    if root is None:
        return
    dest = Path(os.path.abspath(dest))
    paths = [p for p in known_outputs(root) if p != dest] + [dest]
    doc = {"schema": SCHEMA, "outputs": [str(p) for p in paths[-MAX_ENTRIES:]]}
    tmp = root / f".{FILE}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, root / FILE)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def sweep_known(root: Path | None = None, *, skip: Path | None = None) -> list[Path]:
    """Remove the leftovers of every recorded output nobody is writing now; return them."""
    removed: list[Path] = []
    for dest in known_outputs(root):
        if dest == skip or not dest.parent.is_dir():
            continue
        try:
            with try_hold(dest) as free:
                if free:
                    removed += sweep_leftovers(dest)
        except OSError:  # a folder we may not write (any more): nothing to sweep there
            continue
    return removed
