"""Where a stage reads or writes: a local path or an fsspec URL, as one value object.

A command-line argument becomes a :class:`Location`. Local paths (and ``file://`` URLs) stay
``pathlib.Path`` objects underneath, so every local fast path (the direct shard writer, the
hard-linked cache packs, publish by rename) keeps working on them unchanged. Anything else
(``s3://bucket/prefix``, ``gs://``, ``memory://`` in tests) is handled through fsspec, and
handed to zarr as the URL itself: zarr 3 opens fsspec URLs on its own (wrapping synchronous
filesystems such as ``memory://`` in fsspec's ``AsyncFileSystemWrapper``).

URLs never go through ``pathlib``: ``Path("s3://b/x")`` is ``s3:/b/x``. Credentials and
endpoints reach fsspec through the environment (``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID``,
``FSSPEC_S3_ENDPOINT_URL`` ...), never through params: they must not change the outputs, and
DVC must not see them as a change.

A Location holds only strings, so it pickles cheaply into Dask tasks; each process makes its
own filesystem object from the URL (fsspec caches those per process).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import fsspec
from fsspec import AbstractFileSystem

from pipeline.core.errors import ParamsError

__all__ = ["Location", "parse_location", "remote"]


@dataclass(frozen=True)
class Location:
    """A file or folder: ``local`` is set for local paths, ``url`` is the fsspec URL otherwise."""

    url: str
    local: Path | None = None

    @property
    def is_local(self) -> bool:
        """True for a path on this machine's file system (including ``file://`` URLs)."""
        return self.local is not None

    @property
    def protocol(self) -> str:
        """``file`` for local paths, else the URL's scheme (``s3``, ``memory``, ...)."""
        return "file" if self.local is not None else self.url.split("://", 1)[0]

    @property
    def fs(self) -> AbstractFileSystem:
        """The fsspec filesystem (configured from the environment, as fsspec does)."""
        if self.local is not None:
            return fsspec.filesystem("file")
        return fsspec.filesystem(self.protocol)

    @property
    def path(self) -> str:
        """The path as the filesystem names it (``bucket/key`` for S3)."""
        if self.local is not None:
            return str(self.local)
        return str(fsspec.get_filesystem_class(self.protocol)._strip_protocol(self.url))

    @property
    def name(self) -> str:
        """The last part of the path."""
        return self.local.name if self.local is not None else posixpath.basename(self.url)

    @property
    def parent(self) -> Location:
        """The folder holding this location."""
        if self.local is not None:
            return Location(str(self.local.parent), self.local.parent)
        scheme, rest = self.url.split("://", 1)
        return Location(f"{scheme}://{posixpath.dirname(rest)}")

    def __truediv__(self, name: str) -> Location:
        if self.local is not None:
            child = self.local / name
            return Location(str(child), child)
        scheme, rest = self.url.split("://", 1)
        # normpath resolves the ".." of relative paths recorded in lineage.
        return Location(f"{scheme}://{posixpath.normpath(posixpath.join(rest, name))}")

    def __str__(self) -> str:
        return self.url

    def __fspath__(self) -> str:
        if self.local is None:
            raise TypeError(f"{self.url} is not a local path")
        return str(self.local)

    def with_name(self, name: str) -> Location:
        """The sibling called ``name``."""
        return self.parent / name

    def resolve(self) -> Location:
        """Absolute (local paths), so tasks on workers with another working directory agree."""
        if self.local is None:
            return self
        resolved = self.local.resolve()
        return Location(str(resolved), resolved)

    def _fresh(self) -> AbstractFileSystem:
        """The filesystem, with what it cached about this path forgotten: s3fs answers
        ``exists``/``info``/``cat`` from listings it cached, which miss objects that other
        processes (Dask workers) wrote since."""
        fs = self.fs
        fs.invalidate_cache(self.path)
        return fs

    def zarr(self) -> str:
        """What to hand to ``zarr.open_*``: the local path or the URL."""
        return str(self.local) if self.local is not None else self.url

    def exists(self) -> bool:
        """True when a file or folder (a prefix, on object storage) is there."""
        return (
            self.local.exists() if self.local is not None else bool(self._fresh().exists(self.path))
        )

    def is_file(self) -> bool:
        """True when a file (an object) is there."""
        return (
            self.local.is_file()
            if self.local is not None
            else bool(self._fresh().isfile(self.path))
        )

    def is_dir(self) -> bool:
        """True when a folder (a non-empty prefix, on object storage) is there."""
        return (
            self.local.is_dir() if self.local is not None else bool(self._fresh().isdir(self.path))
        )

    def read_bytes(self) -> bytes:
        """The whole file."""
        if self.local is not None:
            return self.local.read_bytes()
        return bytes(self._fresh().cat_file(self.path))

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file (local parent folders must exist)."""
        if self.local is not None:
            self.local.write_bytes(data)
        else:
            self.fs.pipe_file(self.path, data)

    def files(self) -> dict[str, dict[str, Any]]:
        """Every file below this folder: ``{relative POSIX path: fsspec info}``, sorted."""
        fs, root = self.fs, self.path.rstrip("/")
        fs.invalidate_cache(root)  # other processes (workers) may have written since
        found = fs.find(root, detail=True, withdirs=False)
        out = {}
        for full, info in found.items():
            rel = posixpath.relpath(full, root) if full != root else posixpath.basename(full)
            out[rel] = info
        return dict(sorted(out.items()))

    def remove(self) -> None:
        """Delete this file or folder and everything below it, if it exists."""
        fs = self.fs
        fs.invalidate_cache(self.path)
        if fs.exists(self.path):
            fs.rm(self.path, recursive=True)


def parse_location(value: str | os.PathLike[str] | Location, name: str = "path") -> Location:
    """A Location from a command-line argument or API value: local path or fsspec URL.

    ``file://`` URLs become local paths. An unknown scheme, or one whose fsspec package is not
    installed (``s3://`` needs s3fs), is a ParamsError naming ``name`` and the fix.
    """
    if isinstance(value, Location):
        return value
    text = os.fspath(value)
    if "://" not in text:
        return Location(text, Path(text))
    scheme = text.split("://", 1)[0].lower()
    if scheme in ("file", "local"):
        parts = urlsplit(text)
        local = Path(unquote(parts.netloc + parts.path) if parts.netloc else unquote(parts.path))
        return Location(str(local), local)
    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as exc:
        raise ParamsError(
            f"Expected a local path or an fsspec URL for {name}. Got {text!r}, which fsspec "
            f"cannot open: {exc}. Install the package for that scheme (s3fs for s3://, gcsfs "
            f"for gs://, adlfs for az://) or fix the URL."
        ) from exc
    stripped = text.rstrip("/")
    return Location(stripped if not stripped.endswith(":") else text)


def remote(locations: Iterable[Location]) -> list[Location]:
    """The locations that are URLs (not local paths)."""
    return [loc for loc in locations if not loc.is_local]
