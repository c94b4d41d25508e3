"""A local, content-addressed cache that lets a grown dataset version reuse earlier work.

Three kinds of entry:

- ``packs/``: decoded images, a pack per shard that ingest wrote, with an index that names each
  image by its source file's sha256 and the decode configuration (:mod:`pipeline.cache.packs`);
- ``hashes/``: the sha256 of each source file under a folder, by file identity, so unchanged
  files need not be read again (:mod:`pipeline.cache.filehash`);
- ``moments/``: the exact integer sums of a stats fit, keyed by the prepared data's decode
  configuration, listing the files they cover.

It lives outside DVC's outputs and outside the repository (``$PIPELINE_CACHE_DIR``, else
``$XDG_CACHE_HOME/pipeline``, else ``~/.cache/pipeline``), so ``dvc repro`` removing an output
never removes it, clones and queued experiments share it, and deleting it only costs time.
Every entry carries a CRC-32 of its header and payload, checked on every read: a damaged
entry is deleted and rebuilt, never trusted. (CRC-32 is the check that PNG, gzip and Zarr's
shard index use against accidental damage; on these machines it runs at 4 GB/s against
sha256's 1.6, which made a cache read 30 % cheaper. Entry names stay sha256 keys.) Writes go
to a temporary file and are renamed into place, so concurrent workers and killed runs leave
only whole entries. When the cache grows past its limit (``$PIPELINE_CACHE_LIMIT``, default
10 GB), the entries used least recently are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import ParamsError, StoreError
from pipeline.zarrstore.store import dumps_json

__all__ = [
    "CACHE_DIR_ENV",
    "CACHE_LIMIT_ENV",
    "CACHE_SHARED_ENV",
    "Cache",
    "CacheInfo",
    "Entry",
    "cache_key",
    "default_dir",
    "is_real_dir",
    "open_cache",
    "parse_size",
    "read_entry",
    "write_entry",
]

CACHE_DIR_ENV = "PIPELINE_CACHE_DIR"
CACHE_LIMIT_ENV = "PIPELINE_CACHE_LIMIT"
CACHE_SHARED_ENV = "PIPELINE_CACHE_SHARED"
MAX_ENTRY_BYTES = 2**30  # larger entry files are never read (a moments entry of 1M images: ~100 MB)
DEFAULT_LIMIT = 10 * 10**9
KINDS = ("packs", "hashes", "moments")
MAGIC = b"pipeline-cache/2\n"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: str, key: str = CACHE_LIMIT_ENV) -> int:
    """Bytes from ``"10GB"``, ``"512MiB"`` or ``"1000000"``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _UNITS:
        raise ParamsError(
            f"Expected a size such as 10GB, 500MB or 2GiB for {key}. Got {value!r} instead."
        )
    return int(float(match.group(1)) * _UNITS[unit])


def cache_key(doc: Any) -> str:
    """sha256 of a JSON-able description (sorted keys): the name of an entry."""
    return hashlib.sha256(dumps_json(doc).encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class Entry:
    """What an entry holds: named arrays and a JSON-able header."""

    header: dict[str, Any]
    arrays: dict[str, np.ndarray]


@dataclass(frozen=True, kw_only=True)
class CacheInfo:
    """Size of the cache, per kind of entry."""

    root: Path
    limit: int
    entries: dict[str, int]
    bytes: dict[str, int]
    shared: int  # bytes of packs that are also files of prepared stores (hard links)


def _digest(meta: dict[str, Any], payload: Sequence[memoryview]) -> int:
    """CRC-32 over the header, the array layout and the bytes: all of an entry is checked."""
    crc = zlib.crc32(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    for part in payload:
        crc = zlib.crc32(part, crc)
    return crc


def _encode(entry: Entry) -> list[bytes | memoryview]:
    """MAGIC, one JSON line (header, array layout, CRC-32 of all), then the raw array bytes.

    Returned as parts to write one after the other: joining them would copy every image twice
    more (fresh memory is slow on these machines; measured 0.6 -> 0.3 ms per 224x224 image).
    """
    layout, payload = [], []
    for name in sorted(entry.arrays):
        a = np.ascontiguousarray(entry.arrays[name])
        if a.dtype == object:
            raise TypeError(f"cannot cache object array {name}")
        layout.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape)})
        payload.append(a.reshape(-1).view(np.uint8).data)
    meta: dict[str, Any] = {"header": entry.header, "arrays": layout}
    meta["crc32"] = _digest(meta, payload)
    line = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    return [MAGIC + line, *payload]


def _decode(data: bytes) -> Entry | None:
    """The entry in ``data``, or None when it is damaged in any way."""
    if not data.startswith(MAGIC):
        return None
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        return None
    try:
        meta = json.loads(data[len(MAGIC) : end])
        payload = memoryview(data)[end + 1 :]
        unchecked = {k: v for k, v in meta.items() if k != "crc32"}
        if _digest(unchecked, [payload]) != meta["crc32"] or not isinstance(meta["header"], dict):
            return None
        arrays, offset = {}, 0
        for spec in meta["arrays"]:
            dtype = np.dtype(spec["dtype"])
            shape = spec["shape"]
            if dtype.kind not in "biuf" or not all(type(d) is int and d >= 0 for d in shape):
                return None  # CRC-valid but not what we write: a miss, never a crash
            count = int(np.prod(shape, dtype=object))
            arrays[spec["name"]] = np.frombuffer(
                payload, dtype=dtype, count=count, offset=offset
            ).reshape(spec["shape"])
            offset += count * dtype.itemsize
        if offset != len(payload):
            return None
        return Entry(header=meta["header"], arrays=arrays)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None


def _last_use(members: Sequence[tuple[os.stat_result, Path]]) -> int:
    """When an entry was last used: for a pack, its index's mtime (never the pack's own)."""
    marks = [st.st_mtime_ns for st, f in members if f.suffix != ".pack"]
    return max(marks or [st.st_mtime_ns for st, _ in members])


def is_real_dir(path: Path) -> bool:
    """True when ``path`` is a folder and not a symlink (the cache never follows one)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def read_entry(path: Path) -> Entry | None:
    """The verified entry in file ``path``; None when it is missing or damaged (then removed).

    The file is untrusted input: a symlink, a FIFO or device, or a file larger than
    ``MAX_ENTRY_BYTES`` is a miss without being read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_ENTRY_BYTES:
            return None
        try:
            data = f.read(MAX_ENTRY_BYTES + 1)
        except OSError:
            return None
    entry = _decode(data)
    if entry is None:
        with contextlib.suppress(OSError):
            path.unlink()
    return entry


def write_entry(path: Path, entry: Entry) -> bool:
    """Write ``entry`` to ``path`` through a temporary file; False when that failed (a failure
    only costs time later)."""
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.writelines(_encode(entry))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False
    return True


@dataclass(frozen=True)
class Cache:
    """A cache folder; ``enabled`` is False when caching is switched off."""

    root: Path
    limit: int
    enabled: bool = True

    def _path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / key

    def _inside(self, path: Path) -> bool:
        """True when every folder from the root down to ``path``'s folder is a real folder."""
        folder = path.parent
        while folder != self.root:
            if not is_real_dir(folder):
                return False
            folder = folder.parent
        return True

    def get(self, kind: str, key: str) -> Entry | None:
        """The verified entry, or None (a damaged entry is removed, so it gets rebuilt)."""
        if not self.enabled:
            return None
        path = self._path(kind, key)
        if not self._inside(path):
            return None
        entry = read_entry(path)
        if entry is not None:
            with contextlib.suppress(OSError):
                os.utime(path)  # most recently used: trimmed last
        return entry

    def put(self, kind: str, key: str, entry: Entry) -> None:
        """Store ``entry``; a cache that cannot be written only costs time later."""
        if self.enabled:
            path = self._path(kind, key)
            with contextlib.suppress(OSError):
                path.parent.mkdir(parents=True, exist_ok=True)
            if self._inside(path):
                write_entry(path, entry)

    def _files(self) -> Iterator[tuple[str, os.stat_result, Path]]:
        """Every regular file of the cache, never through a symlink (trim deletes what this
        yields: a symlinked folder must not make it delete files elsewhere)."""
        for kind in KINDS:
            base = self.root / kind
            if not is_real_dir(base):
                continue
            for sub in _scan(base):
                if sub.is_dir(follow_symlinks=False):
                    for f in _scan(Path(sub.path)):
                        with contextlib.suppress(OSError):
                            if f.is_file(follow_symlinks=False):
                                yield kind, f.stat(follow_symlinks=False), Path(f.path)

    def info(self) -> CacheInfo:
        """Entry count and bytes per kind (a pack and its index count as one entry)."""
        entries = dict.fromkeys(KINDS, 0)
        sizes = dict.fromkeys(KINDS, 0)
        shared = 0
        for kind, st, f in self._files():
            if not f.name.startswith(".") and f.suffix != ".pack":
                entries[kind] += 1
            sizes[kind] += st.st_size
            shared += st.st_size if f.suffix == ".pack" and st.st_nlink > 1 else 0
        return CacheInfo(
            root=self.root, limit=self.limit, entries=entries, bytes=sizes, shared=shared
        )

    def trim(self) -> int:
        """Remove least recently used entries until the cache fits its limit; return bytes freed.

        A pack and its index (``NAME.pack``, ``NAME.json``) go together, aged by the index, which
        readers touch: touching the pack would touch the output file it is a hard link of.
        """
        if not self.enabled:
            return 0
        units: dict[Path, list[tuple[os.stat_result, Path]]] = {}
        for kind, st, f in self._files():
            unit = f.with_suffix("") if kind == "packs" else f
            units.setdefault(unit, []).append((st, f))
        ranked = sorted((_last_use(members), str(unit), members) for unit, members in units.items())
        total = sum(st.st_size for members in units.values() for st, _ in members)
        freed = 0
        stale = time.time_ns() - 3600 * 10**9  # temporary files of runs killed an hour ago
        for mtime, name, members in ranked:
            temporary = Path(name).name.startswith(".")
            if total - freed <= self.limit and not (temporary and mtime < stale):
                continue
            for st, f in sorted(members, key=lambda m: m[1].suffix == ".pack"):  # index first
                with contextlib.suppress(OSError):
                    f.unlink()
                    freed += st.st_size
        return freed

    def clear(self) -> int:
        """Remove every entry; return the bytes freed."""
        freed = sum(self.info().bytes.values())
        for kind in KINDS:
            base = self.root / kind
            if is_real_dir(base):
                shutil.rmtree(base, ignore_errors=True)  # rmtree never follows symlinks
            elif base.is_symlink():
                base.unlink()  # the link only: what it points to is not ours
        return freed


def _scan(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError:
        return []


def _check_private(root: Path) -> None:
    """Refuse a cache folder that other users can write: whoever can write the cache can change
    results (as with any build cache). Created private (0700) when it does not exist."""
    if os.environ.get(CACHE_SHARED_ENV, "").strip() == "1":
        return
    st = os.stat(root)
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(
            f"The cache folder {root} is not a folder. Set {CACHE_DIR_ENV} to a folder."
        )
    foreign = hasattr(os, "getuid") and st.st_uid != os.getuid()
    if foreign or st.st_mode & 0o022:
        who = (
            "owned by another user"
            if foreign
            else f"writable by others (mode {st.st_mode & 0o777:o})"
        )
        raise StoreError(
            f"The cache folder {root} is {who}: whoever can write it can change results. "
            f"`chmod 700 {root}`, choose another {CACHE_DIR_ENV}, or set {CACHE_SHARED_ENV}=1 "
            f"if everyone who can write it is trusted."
        )


def default_dir() -> Path:
    """``$XDG_CACHE_HOME/pipeline``, else ``~/.cache/pipeline`` (where pip and others cache)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pipeline"


def open_cache(root: Path | str | None = None) -> Cache:
    """The cache named by ``root``, else ``$PIPELINE_CACHE_DIR``, else :func:`default_dir`.

    ``off`` as the folder switches caching off; ``$PIPELINE_CACHE_LIMIT`` sets its size.
    """
    chosen = str(root) if root is not None else os.environ.get(CACHE_DIR_ENV) or ""
    limit_text = os.environ.get(CACHE_LIMIT_ENV)
    limit = parse_size(limit_text) if limit_text else DEFAULT_LIMIT
    if chosen.strip().lower() == "off":
        return Cache(root=default_dir(), limit=limit, enabled=False)
    root = Path(chosen).resolve() if chosen else default_dir()
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return Cache(root=root, limit=limit, enabled=False)  # a cache only saves time
    _check_private(root)
    return Cache(root=root, limit=limit)
