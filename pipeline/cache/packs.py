"""Decoded images kept in the cache as packs, so a grown dataset decodes only its new files.

A pack is a file holding the decoded images of one ingest shard back to back (image ``r`` at
byte ``r * image_nbytes``), beside an index entry ``NAME.json`` naming each image by
:func:`decoded_key` (its source file's sha256 and the decode configuration),
with the CRC-32C of its bytes (:mod:`pipeline.core.digests`) and its manifest record. An
uncompressed shard of the prepared store has exactly that layout, so its pack is a hard link
of the shard file: keeping the decoded images costs no write and no disk space while the store
exists (measured: a copy per image was a second 150 kB write per file, as costly as decoding a
small JPEG). Other layouts,
or a cache on another file system, get a written copy.

Every image is checked against its CRC-32C when read: a pack that was changed in place, cut
short or removed is a miss, and the image is decoded again. Each ingest run writes a new
pack per shard listing all its images, so earlier packs whose every image a newer pack holds
are removed as soon as a run has written its own (and whenever the index is loaded); what is
left ages out through the cache's size limit.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.entries import Cache, Entry, is_real_dir, read_entry, write_entry
from pipeline.core.digests import image_digest

__all__ = [
    "Packed",
    "add_pack",
    "decoded_key",
    "drop_superseded",
    "load_index",
    "mark_used",
    "read_packed",
]

SCHEMA = "pipeline-pack/2"  # /2: CRC-32C, the digest the prepared store records


@dataclass(frozen=True, kw_only=True)
class Packed:
    """Where the decoded pixels of one source file lie in the cache, and its manifest record."""

    pack: str
    offset: int
    nbytes: int
    crc32: int
    record: dict[str, Any]


def _folder(cache: Cache, config: str) -> Path:
    return cache.root / "packs" / config[:16]


def load_index(cache: Cache, config: str) -> dict[str, Packed]:
    """Every image the cache holds for decode configuration ``config``, by entry key.

    When several packs hold an image, the newest wins; packs left holding no image at all
    (all superseded by newer ones) are removed.
    """
    if not cache.enabled:
        return {}
    folder = _folder(cache, config)
    indices = []
    for found in _index_files(folder):
        entry = read_entry(found)
        header = entry.header if entry is not None else {}
        if header.get("schema") == SCHEMA and header.get("config") == config:
            rows = _valid_rows(header)
            if rows is not None:
                indices.append((header["created_ns"], str(found), header["image_nbytes"], rows))
    indices.sort(key=lambda t: (t[0], t[1]))
    located: dict[str, Packed] = {}
    owner: dict[str, str] = {}
    for _, path, nbytes, rows in indices:
        pack = str(Path(path).with_suffix(".pack"))
        for key, row, crc, record in rows:
            located[key] = Packed(
                pack=pack, offset=row * nbytes, nbytes=nbytes, crc32=crc, record=record
            )
            owner[key] = path
    needed = set(owner.values())
    for _, path, _, _ in indices:
        if path not in needed:
            for stale in (Path(path), Path(path).with_suffix(".pack")):  # index first
                with contextlib.suppress(OSError):
                    stale.unlink()
    return located


def _index_files(folder: Path) -> list[Path]:
    """The index files of a pack folder: regular files only, never through a symlink (a cache
    someone else wrote must not make us read, or later delete, files outside it)."""
    if not is_real_dir(folder):
        return []
    try:
        with os.scandir(folder) as it:
            return sorted(
                Path(e.path)
                for e in it
                if e.name.endswith(".json")
                and not e.name.startswith(".")
                and e.is_file(follow_symlinks=False)
            )
    except OSError:
        return []


def _valid_rows(header: dict[str, Any]) -> list[tuple[str, int, int, dict[str, Any]]] | None:
    """The index rows (key, row, CRC-32C, record) when every one is well-formed; else None."""
    nbytes, created = header.get("image_nbytes"), header.get("created_ns")
    entries = header.get("entries")
    if not (
        type(nbytes) is int and nbytes > 0 and type(created) is int and isinstance(entries, list)
    ):
        return None
    rows = []
    for item in entries:
        if not (isinstance(item, list) and len(item) == 4):
            return None
        key, row, crc, record = item
        if not (
            isinstance(key, str)
            and type(row) is int
            and 0 <= row < 2**31
            and type(crc) is int
            and 0 <= crc < 2**32
            and isinstance(record, dict)
            and isinstance(record.get("sha256"), str)
        ):
            return None
        rows.append((key, row, crc, record))
    return rows


def drop_superseded(located: Mapping[str, Packed], written: Set[str]) -> None:
    """Remove the packs of ``located`` (an earlier :func:`load_index`) whose images are all in
    ``written``: the keys of packs written since. Then the cache keeps one copy of the store
    between runs, not the previous run's as well."""
    owned: dict[str, list[str]] = {}
    for key, where in located.items():
        owned.setdefault(where.pack, []).append(key)
    for pack, keys in sorted(owned.items()):
        if all(key in written for key in keys):
            for stale in (Path(pack).with_suffix(".json"), Path(pack)):  # index first
                with contextlib.suppress(OSError):
                    stale.unlink()


def mark_used(located: Iterable[Packed]) -> None:
    """Make the packs of ``located`` the most recently used (their index files, not the packs)."""
    for pack in sorted({p.pack for p in located}):
        with contextlib.suppress(OSError):
            os.utime(Path(pack).with_suffix(".json"))


def read_packed(where: Packed, out: np.ndarray) -> bool:
    """Fill ``out`` (a C-contiguous image) from the cache; False when missing or damaged."""
    view = out.data.cast("B")
    if view.nbytes != where.nbytes:
        return False
    try:
        # never through a symlink, never a FIFO or device: the cache is data, not a path to follow
        fd = os.open(where.pack, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            got = os.preadv(fd, [view], where.offset)
        finally:
            os.close(fd)
    except OSError:
        return False
    return got == where.nbytes and image_digest(out) == where.crc32


def add_pack(
    cache: Cache,
    config: str,
    block: np.ndarray,
    entries: Sequence[tuple[int, str, int, dict[str, Any]]],
    *,
    shard_file: Path | None = None,
) -> bool:
    """Keep the images of ``block`` listed in ``entries`` (row, key, CRC-32, record) as a pack.

    ``shard_file``, when given, already holds ``block``'s bytes in pack layout (an uncompressed
    shard): it is hard-linked instead of written. Returns whether the pack was kept: a cache
    that cannot be written only costs time later.
    """
    if not cache.enabled or not entries:
        return False
    folder = _folder(cache, config)
    name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
    pack = folder / f"{name}.pack"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not is_real_dir(folder):
            return False
        if shard_file is None or not _link(shard_file, pack):
            data = np.ascontiguousarray(block)
            tmp = folder / f".{name}.pack.tmp-{uuid.uuid4().hex[:12]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data.data.cast("B"))
                os.replace(tmp, pack)
            except OSError:  # a full disk leaves no temporary file behind
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
    except OSError:
        return False
    header = {
        "schema": SCHEMA,
        "config": config,
        "created_ns": time.time_ns(),
        "image_nbytes": int(block[0].nbytes),
        "entries": [[key, row, crc, record] for row, key, crc, record in entries],
    }
    return write_entry(pack.with_suffix(".json"), Entry(header=header, arrays={}))


def _link(src: Path, dst: Path) -> bool:
    """Hard-link ``src`` to ``dst``; False where the file system cannot (e.g. across devices)."""
    try:
        os.link(src, dst)
    except OSError:
        return False
    return True


def decoded_key(file_sha256: str, config: str) -> str:
    """Name of the decoded pixels of one file (sha256 ``file_sha256``) in the cache's packs.

    Both parts are hex digests, so joining them is unambiguous; computed once per file per
    run, it is kept cheaper than :func:`pipeline.cache.entries.cache_key`'s JSON.
    """
    return hashlib.sha256(f"decoded/{config}/{file_sha256}".encode()).hexdigest()
