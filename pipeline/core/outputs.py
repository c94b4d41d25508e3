"""Checks before a command writes: never over an input, never over something not ours.

Two rules (DESIGN invariant 10), checked before any work, for local paths and URLs alike:

1. An output never equals, contains or lies inside one of the command's inputs. Local paths
   are compared after resolving symlinks; URLs by protocol and normalized path.
2. An existing output is replaced only when it is recognisably an output of the same command
   (:data:`KINDS`): a prepared, stats or normalized folder by the schema it records, the sample
   and report folders by a small marker file the command writes into them. A missing path or
   an empty folder is fine; anything else (a user's folder, a regular file, a symlink, another
   kind of output) is refused.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import StoreError
from pipeline.core.location import Location, parse_location

__all__ = ["KINDS", "OutputKind", "check_output", "check_outside", "is_ours", "write_marker"]

FIX = "choose another OUT, or delete it yourself"
MAX_MARKER_BYTES = 1 << 20  # a zarr.json or stats.json is a few kB; a larger one is not ours


@dataclass(frozen=True, kw_only=True)
class OutputKind:
    """How a command recognises its own output folder."""

    command: str
    marker: str  # relative path of the file that identifies the folder
    schema: str  # its "schema" value (JSON files) or its whole content (marker files)
    attributes: bool = False  # the schema is under "attributes" (a zarr.json)
    ignorable: frozenset[str] = frozenset()  # entries of a folder that still count as empty

    def matches(self, data: bytes) -> bool:
        """True when ``data`` (the marker file's bytes) names this kind."""
        if not self.marker.endswith(".json"):
            return data == self.schema.encode("ascii")
        try:
            doc = json.loads(data)
        except ValueError:
            return False
        if self.attributes:
            doc = doc.get("attributes") if isinstance(doc, dict) else None
        found = doc.get("schema") if isinstance(doc, dict) else None
        family = self.schema.split("/", 1)[0] + "/"  # any version of the schema
        return isinstance(found, str) and found.startswith(family)


KINDS = {
    "sample": OutputKind(command="sample", marker=".pipeline-sample", schema="pipeline.sample/1\n"),
    "ingest": OutputKind(
        command="ingest",
        marker="images.zarr/zarr.json",
        schema="pipeline.prepared/1",
        attributes=True,
    ),
    "stats": OutputKind(
        command="stats",
        marker="stats.json",
        schema="pipeline.stats/1",
        # DVC removes stats.json and stats.zarr before it runs the stage, and keeps its own
        # .gitignore, which the stage carries over.
        ignorable=frozenset({".gitignore"}),
    ),
    "normalize": OutputKind(
        command="normalize",
        marker="images.zarr/zarr.json",
        schema="pipeline.normalized/1",
        attributes=True,
    ),
    "report": OutputKind(command="report", marker=".pipeline-report", schema="pipeline.report/1\n"),
}


def write_marker(folder: Path | Location, command: str) -> None:
    """Write the marker file of ``command`` (sample, report) into ``folder``: same bytes always."""
    kind = KINDS[command]
    (folder / kind.marker).write_bytes(kind.schema.encode("ascii"))


def _key(loc: Location) -> tuple[str, str]:
    """(protocol, normalized absolute path) to compare locations by."""
    if loc.local is not None:
        return "file", os.path.realpath(os.path.abspath(loc.local))
    return loc.protocol, "/" + posixpath.normpath(loc.path.strip("/"))


def _inside(inner: str, outer: str, sep: str) -> bool:
    return inner.startswith(outer.rstrip(sep) + sep)


def check_outside(
    out: str | os.PathLike[str] | Location,
    inputs: Mapping[str, str | os.PathLike[str] | Location],
    *,
    out_name: str = "OUT",
) -> None:
    """Refuse an output that equals, contains or lies inside one of ``inputs`` (name: path).

    Raises
    ------
    StoreError
        One line naming both paths and the fix.
    """
    out_loc = parse_location(out, out_name)
    out_proto, out_path = _key(out_loc)
    for name, value in inputs.items():
        loc = parse_location(value, name)
        proto, path = _key(loc)
        if proto != out_proto:
            continue
        sep = os.sep if proto == "file" else "/"
        if path == out_path:
            how = "is the same as"
        elif _inside(path, out_path, sep):
            how = "contains"
        elif _inside(out_path, path, sep):
            how = "lies inside"
        else:
            continue
        raise StoreError(
            f"{out_name} {out_loc} {how} the input {name} {loc}: writing it would destroy or "
            f"change the input. Choose an {out_name} outside {name}."
        )


def _read_marker(path: Path | Location) -> bytes | None:
    """The marker file's bytes, or None when it is missing, not a file, or too large."""
    try:
        if isinstance(path, Path):
            if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_MARKER_BYTES:
                return None
            return path.read_bytes()
        info = path.fs.info(path.path)
        if info.get("type") != "file" or int(info.get("size") or 0) > MAX_MARKER_BYTES:
            return None
        return path.read_bytes()
    except (OSError, ValueError):
        return None


def is_ours(folder: Path | Location, command: str) -> bool:
    """True when ``folder`` holds the marker of ``command``'s output."""
    kind = KINDS[command]
    data = _read_marker(folder / kind.marker)
    return data is not None and kind.matches(data)


def _what(loc: Location, command: str) -> str | None:
    """Why ``loc`` may not be replaced by ``command``'s output, or None when it may."""
    kind = KINDS[command]
    if loc.local is not None:
        path = loc.local
        if path.is_symlink():
            return "is a symlink"
        if not path.exists():
            return None
        if not path.is_dir():
            return "is a file, not a folder"
        entries = {p.name for p in path.iterdir()}
        if not entries - kind.ignorable or is_ours(path, command):
            return None
    else:
        if not loc.exists():
            return None
        if loc.is_file():
            return "is a file, not a folder"
        if is_ours(loc, command) or _interrupted_publish(loc, command):
            return None
        if not set(loc.files()) - kind.ignorable:
            return None
    others = [k for k in KINDS if k != command and is_ours(loc.local or loc, k)]
    if others:
        return f"is the output of `pipeline {others[0]}`, not of `pipeline {command}`"
    return f"exists and is not an output of `pipeline {command}`"


def _interrupted_publish(loc: Location, command: str) -> bool:
    """True when a publish to ``loc`` was interrupted (its old root markers are already deleted)
    and the complete new output waits in a temporary sibling of the exact name pattern."""
    from pipeline.core.locks import leftover_names

    parent = loc.parent
    try:
        names = [posixpath.basename(p.rstrip("/")) for p in parent.fs.ls(parent.path, detail=False)]
    except (OSError, ValueError):
        return False
    return any(is_ours(parent / n, command) for n in leftover_names(loc.name, names))


def check_output(
    out: str | os.PathLike[str] | Location,
    command: str,
    inputs: Mapping[str, str | os.PathLike[str] | Location] = {},
    *,
    out_name: str = "OUT",
) -> None:
    """Both rules of the module docstring, for ``command``'s output ``out``.

    Also refuses at once, for a local ``out``, when another run is writing it.

    Raises
    ------
    StoreError
        One line naming the path(s) and the fix.
    """
    check_outside(out, inputs, out_name=out_name)
    loc = parse_location(out, out_name)
    why = _what(loc, command)
    if why is not None:
        raise StoreError(f"{out_name} {loc} {why}; it is not replaced: {FIX}.")
    if loc.local is not None:
        from pipeline.core.locks import refuse_if_locked

        refuse_if_locked(loc.local)
