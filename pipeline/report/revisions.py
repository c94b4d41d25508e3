"""Reading the fitted statistics of a git revision (or the workspace) without a checkout.

stats.json comes from git (``git show REV:path``); stats.zarr (histograms, mean and std images)
through DVC's cache (``DVCFileSystem``), checked against the ``arrays.sha256`` in stats.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.core.errors import PipelineError
from pipeline.stats.document import STATS_SCHEMA, tree_sha256
from pipeline.zarrstore.store import read_array

__all__ = [
    "WORKSPACE",
    "RevisionStats",
    "StatsArrays",
    "default_revisions",
    "read_revision",
    "repo_root",
    "resolve",
]

WORKSPACE = "workspace"


@dataclass(frozen=True, kw_only=True)
class StatsArrays:
    """The arrays of one stats.zarr that the audit uses."""

    histogram: np.ndarray  # (C, pixel_max + 1) int64
    mean_image: np.ndarray  # (H, W, C) float64
    std_image: np.ndarray  # (H, W, C) float64


@dataclass(frozen=True, kw_only=True)
class RevisionStats:
    """What could be read at one revision; ``notes`` say what could not, and why."""

    name: str
    commit: str | None  # None for the workspace
    doc: dict[str, Any] | None = None
    arrays: StatsArrays | None = None
    notes: tuple[str, ...] = ()

    @property
    def channel_names(self) -> list[str]:
        """Channel names in stats.json (none without stats)."""
        return [] if self.doc is None else list(self.doc["channel_names"])

    @property
    def images(self) -> int | None:
        """Images the stats were fitted on, or None."""
        return None if self.doc is None else int(self.doc["count"]["images"])

    def channel(self, name: str) -> dict[str, Any] | None:
        """The stats.json entry of channel ``name``, or None."""
        return None if self.doc is None else self.doc["channels"].get(name)

    def histogram(self, name: str) -> np.ndarray | None:
        """The exact histogram of channel ``name``, or None when stats.zarr was not read."""
        if self.arrays is None or name not in self.channel_names:
            return None
        return self.arrays.histogram[self.channel_names.index(name)]


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run git in ``root``; the result is checked by the caller."""
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, check=False)
    except FileNotFoundError as exc:
        raise PipelineError("git is not installed: `pipeline audit` reads git revisions.") from exc


def repo_root(cwd: Path) -> Path:
    """The top folder of the git repository holding ``cwd``, or PipelineError."""
    proc = _git(cwd, "rev-parse", "--show-toplevel")
    if proc.returncode != 0:
        raise PipelineError(
            f"{cwd} is not in a git repository. `pipeline audit` compares committed versions "
            f"of the stats: run it inside the project's git repository."
        )
    return Path(proc.stdout.decode().strip())


def _commit(root: Path, rev: str) -> str | None:
    """The commit sha that ``rev`` names, or None."""
    proc = _git(root, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")
    return proc.stdout.decode().strip() if proc.returncode == 0 else None


def default_revisions(root: Path) -> list[str]:
    """Every tag (by commit date, ancestors first on ties), then HEAD, then the workspace."""
    # %(*field) is the tagged object's (annotated tags), %(field) the ref's own (lightweight)
    fields = ("objecttype", "objectname", "committerdate:unix")
    fmt = "\t".join(["%(refname:short)", *(f"%(*{f})\t%({f})" for f in fields)])
    tags = []
    for line in (
        _git(root, "for-each-ref", "--format", fmt, "refs/tags").stdout.decode().splitlines()
    ):
        name, *pairs = line.split("\t")
        kind, sha, date = (pairs[k] or pairs[k + 1] for k in (0, 2, 4))
        if kind == "commit":  # a tag of a tree or blob names no data version
            tags.append((name, sha, int(date)))
    shas = sorted({sha for _, sha, _ in tags})
    order = _git(root, "rev-list", "--topo-order", "--reverse", *shas) if shas else None
    rank = {sha: i for i, sha in enumerate(order.stdout.decode().split())} if order else {}
    tags.sort(key=lambda t: (t[2], rank.get(t[1], 0), t[0]))
    head = ["HEAD"] if _commit(root, "HEAD") else []
    return [name for name, _, _ in tags] + head + [WORKSPACE]


def resolve(root: Path, rev: str) -> str | None:
    """Commit of ``rev`` (None for the workspace), or PipelineError for an unknown revision."""
    if rev == WORKSPACE:
        return None
    sha = _commit(root, rev)
    if sha is None:
        raise PipelineError(
            f"unknown revision {rev!r} in {root}: give a tag, branch or commit (`git tag`, "
            f"`git log --oneline`), or `{WORKSPACE}` for the working tree."
        )
    return sha


def _read_doc(root: Path, name: str, commit: str | None, rel: str) -> tuple[Any, str | None]:
    """stats.json at a revision as (document, None), or (None, a note saying why not)."""
    if commit is None:
        path = root / rel
        raw = path.read_bytes() if path.is_file() else None
    else:
        proc = _git(root, "show", f"{commit}:{rel}")
        raw = proc.stdout if proc.returncode == 0 else None
    if raw is None:
        return None, f"no stats at {name}: {rel} not found"
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        return None, f"unreadable stats at {name}: {rel} is not JSON ({exc})"
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if schema != STATS_SCHEMA:
        return None, f"older stats schema {schema!r} at {name}: re-run dvc repro at that revision"
    return doc, None


def _fetch_files(root: Path, commit: str | None, rel: str, dest: Path) -> None:
    """Copy folder ``rel`` at ``commit`` (DVC cache) or in the workspace (disk) to ``dest``."""
    if commit is None:
        if not (root / rel).is_dir():
            raise FileNotFoundError("not in the workspace (dvc checkout, or dvc pull)")
        shutil.copytree(root / rel, dest, dirs_exist_ok=True)
        return
    from dvc.fs import DVCFileSystem

    fs = DVCFileSystem(repo=os.fspath(root), rev=commit)
    try:
        found = list(fs.find(f"/{rel}"))
        if not found:
            raise FileNotFoundError("not tracked by DVC at this revision")
        for path in found:
            target = dest / Path(path.lstrip("/")).relative_to(rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(fs.read_bytes(path))
    finally:
        fs.close()


def _read_arrays(
    root: Path, name: str, commit: str | None, rel: str, sha256: str
) -> tuple[StatsArrays | None, str | None]:
    """stats.zarr at a revision, checked against its digest, or (None, a note saying why not)."""
    lost = "histogram distance and pictures unavailable"
    with tempfile.TemporaryDirectory(prefix="pipeline-audit-") as tmp:
        try:
            _fetch_files(root, commit, rel, Path(tmp))
        except Exception as exc:  # git, DVC and its cache raise many types; the note names it
            reason = f"{type(exc).__name__}: {exc}"
            hint = "is it in the DVC cache? `dvc fetch` gets it"
            return (
                None,
                f"only stats.json could be read at {name}: {rel}: {reason} ({hint}); {lost}",
            )
        if tree_sha256(Path(tmp)) != sha256:
            return None, f"{rel} at {name} does not match arrays.sha256 of stats.json; {lost}"
        group = zarr.open_group(tmp, mode="r")
        arrays = StatsArrays(
            histogram=read_array(group, "histogram"),
            mean_image=read_array(group, "mean_image"),
            std_image=read_array(group, "std_image"),
        )
    return arrays, None


def read_revision(root: Path, name: str, commit: str | None, rel: str) -> RevisionStats:
    """stats.json and, when available, stats.zarr of one revision."""
    doc, note = _read_doc(root, name, commit, rel)
    if doc is None:
        return RevisionStats(name=name, commit=commit, notes=(str(note),))
    zarr_rel = (Path(rel).parent / doc["arrays"]["path"]).as_posix()
    arrays, note = _read_arrays(root, name, commit, zarr_rel, doc["arrays"]["sha256"])
    notes = () if note is None else (note,)
    return RevisionStats(name=name, commit=commit, doc=doc, arrays=arrays, notes=notes)
