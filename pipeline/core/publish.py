"""Publishing a stage's output folder whole: by rename locally, by marker order on object storage.

Local folders use :func:`pipeline.zarrstore.store.atomic_output` (a temporary folder renamed into
place).
Object storage has no rename, so :func:`publish` writes everything under a temporary sibling
prefix ``.NAME.tmp-<id>`` and, only after the whole stage succeeded:

1. deletes the root ``zarr.json`` of every store in the old destination,
2. deletes the rest of the old destination,
3. copies the temporary tree into the destination, the root ``zarr.json`` of each store last,
4. deletes the temporary prefix.

Readers refuse a folder without a root ``zarr.json`` (and a stats.json whose stats.zarr does
not hash to its record), so a publish interrupted between 1 and 3 shows "no store, re-run the
stage", never a half store or an old/new mixture. A failed stage leaves the old destination
untouched and removes its temporary prefix; the prefixes of killed runs (exactly
``.NAME.tmp-<12 hex>``) are removed by the next run. Two runs writing one URL at once are not
detected (object storage has no lock): do not start them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import uuid
from collections.abc import Iterator

from pipeline.core.errors import StoreError
from pipeline.core.location import Location
from pipeline.core.locks import leftover_names
from pipeline.core.registry import remember_output, sweep_known
from pipeline.zarrstore.store import atomic_output

__all__ = ["publish", "root_markers"]

MARKER = "zarr.json"


def root_markers(relpaths: list[str]) -> list[str]:
    """The ``zarr.json`` files of ``relpaths`` that belong to a store's root group or array.

    A ``zarr.json`` is a root marker when no folder above it (within the published tree) also
    holds one: ``images.zarr/zarr.json`` is, ``images.zarr/images/zarr.json`` is not.
    """
    marked = {posixpath.dirname(p) for p in relpaths if posixpath.basename(p) == MARKER}

    def ancestors(folder: str) -> Iterator[str]:
        while folder:
            folder = posixpath.dirname(folder)
            yield folder

    return [
        posixpath.join(folder, MARKER) if folder else MARKER
        for folder in sorted(marked)
        if not any(above in marked for above in ancestors(folder))
    ]


def _tmp_siblings(dest: Location) -> list[Location]:
    """Temporary prefixes beside ``dest`` left by runs that were killed."""
    parent = dest.parent
    fs = parent.fs
    fs.invalidate_cache(parent.path)
    try:
        names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(parent.path, detail=False)]
    except FileNotFoundError:
        return []
    return [parent / n for n in leftover_names(dest.name, names)]


def _replace(tmp: Location, dest: Location) -> None:
    """Steps 1-4 of the module docstring."""
    fs = dest.fs
    old = list(dest.files()) if dest.exists() else []
    old_roots = root_markers(old)
    if old_roots:
        fs.rm([(dest / p).path for p in old_roots])
    dest.remove()
    new = list(tmp.files())
    roots = set(root_markers(new))
    for batch in ([p for p in new if p not in roots], sorted(roots)):
        if batch:  # one call per batch: s3fs copies a list concurrently
            fs.copy([(tmp / p).path for p in batch], [(dest / p).path for p in batch])
    tmp.remove()


DISK_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT)


@contextlib.contextmanager
def _names_destination(dest: Location) -> Iterator[None]:
    """Turn a full, read-only or over-quota disk into a StoreError that names ``dest``."""
    try:
        yield
    except StoreError:
        raise
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        error = StoreError(
            f"Cannot write {dest}: {exc.strerror or os.strerror(exc.errno)}. Nothing was "
            f"changed; free space (or make it writable), or choose another output path."
        )
        error.errno = exc.errno
        raise error from exc


@contextlib.contextmanager
def publish(dest: Location) -> Iterator[Location]:
    """Yield a temporary folder beside ``dest``; on success its content replaces ``dest``.

    Local destinations are renamed into place (:func:`pipeline.zarrstore.store.atomic_output`, which
    also holds ``dest``'s lock: a second run writing it at once stops with a StoreError);
    remote ones follow the marker-ordered copy of the module docstring. On any exception the
    temporary folder is removed and ``dest`` is left as it was. Every publish also removes the
    leftovers of killed runs of the local outputs recorded in :mod:`pipeline.core.registry`.
    """
    sweep_known(skip=dest.local.absolute() if dest.local is not None else None)
    with _names_destination(dest):
        if dest.local is not None:
            with atomic_output(dest.local) as tmp_path:
                remember_output(tmp_path.parent / dest.local.name)
                yield Location(str(tmp_path), tmp_path)
            return
        for leftover in _tmp_siblings(dest):
            leftover.remove()
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            yield tmp
        except BaseException:
            with contextlib.suppress(Exception):  # keep the stage's own error
                tmp.remove()
            raise
        _replace(tmp, dest)
