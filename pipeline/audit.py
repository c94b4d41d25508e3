"""``pipeline audit``: the fitted statistics of several data versions (git revisions), compared.

stats.json is read from git (``git show REV:path``); stats.zarr (histograms, mean and std
images) through DVC's cache (``DVCFileSystem``) and checked against ``arrays.sha256``.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.errors import PipelineError
from pipeline.statsfile import STATS_SCHEMA, tree_sha256
from pipeline.store import read_array

__all__ = [
    "DEFAULT_STATS",
    "WORKSPACE",
    "Audit",
    "ChannelChange",
    "Comparison",
    "RevisionStats",
    "StatsArrays",
    "audit_revisions",
    "js_distance",
]

WORKSPACE = "workspace"
DEFAULT_STATS = Path("data/stats/stats.json")


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

    def channel(self, name: str) -> dict[str, Any] | None:
        """The stats.json entry of channel ``name``, or None."""
        return None if self.doc is None else self.doc["channels"].get(name)

    def histogram(self, name: str) -> np.ndarray | None:
        """The exact histogram of channel ``name``, or None when stats.zarr was not read."""
        if self.arrays is None or self.doc is None or name not in self.doc["channel_names"]:
            return None
        return self.arrays.histogram[self.doc["channel_names"].index(name)]


@dataclass(frozen=True, kw_only=True)
class ChannelChange:
    """One channel from one revision to the next; drifts are in units of the earlier std."""

    delta_mean: float
    delta_std: float
    mean_drift: float  # |delta_mean| / std_before
    std_drift: float  # delta_std / std_before
    js_distance: float | None  # base 2, in [0, 1]; None without both histograms


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """A revision against the previous revision that has stats."""

    before: str
    after: str
    before_index: int  # positions in Audit.revisions (names may repeat)
    after_index: int
    channels: dict[str, ChannelChange] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Audit:
    """Every revision read, in order, and the comparisons of consecutive ones."""

    stats_path: str
    revisions: list[RevisionStats]
    comparisons: list[Comparison]

    @property
    def channel_names(self) -> list[str]:
        """Every channel name seen, in order of first appearance."""
        names = [n for r in self.revisions if r.doc for n in r.doc["channel_names"]]
        return list(dict.fromkeys(names))

    @property
    def max_drift(self) -> float | None:
        """The largest mean drift or |std drift| over all comparisons and channels."""
        drifts = [
            max(c.mean_drift, abs(c.std_drift))
            for comp in self.comparisons
            for c in comp.channels.values()
        ]
        return max(drifts, default=None)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: revisions (counts, per-channel mean/std, notes) and comparisons."""
        return {
            "stats_path": self.stats_path,
            "max_drift": self.max_drift,
            "revisions": [_revision_dict(r) for r in self.revisions],
            "comparisons": [
                {**vars(c), "channels": {k: vars(v) for k, v in c.channels.items()}}
                for c in self.comparisons
            ],
        }


def _revision_dict(rev: RevisionStats) -> dict[str, Any]:
    """One revision as plain JSON."""
    doc = rev.doc or {}
    return {
        "name": rev.name,
        "commit": rev.commit,
        "stats": rev.doc is not None,
        "arrays": rev.arrays is not None,
        "notes": list(rev.notes),
        "count": doc.get("count", {}).get("images"),
        "fit_split": doc.get("fit_split"),
        "fingerprint": doc.get("fingerprint"),
        "channels": {
            k: {"mean": v["mean"], "std": v["std"]} for k, v in doc.get("channels", {}).items()
        },
    }


def js_distance(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two histograms of counts.

    Parameters
    ----------
    p_counts, q_counts
        Non-negative counts of the same length, each with a positive sum.

    Returns
    -------
    float
        The square root of the JS divergence of the normalized histograms: 0 for identical
        distributions, 1 for disjoint ones.
    """
    p = np.asarray(p_counts, dtype=np.float64)
    q = np.asarray(q_counts, dtype=np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return float(np.sqrt(min(max(0.5 * kl(p) + 0.5 * kl(q), 0.0), 1.0)))


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
    # peeled (annotated tags) or direct values; only one of each pair is set
    fmt = (
        "%(refname:short)\t%(*objectname)%(objectname)\t%(*committerdate:unix)%(committerdate:unix)"
    )
    proc = _git(root, "for-each-ref", "--format", fmt, "refs/tags")
    tags = []
    for line in proc.stdout.decode().splitlines():
        name, objects, date = line.split("\t")
        tags.append((name, objects[:40], int(date or 0)))
    order = _git(root, "rev-list", "--topo-order", "--reverse", *{sha for _, sha, _ in tags})
    rank = {sha: i for i, sha in enumerate(order.stdout.decode().split())} if tags else {}
    tags.sort(key=lambda t: (t[2], rank.get(t[1], 0), t[0]))
    head = ["HEAD"] if _commit(root, "HEAD") else []
    return [name for name, _, _ in tags] + head + [WORKSPACE]


def _resolve(root: Path, rev: str) -> str | None:
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
        for path in fs.find(f"/{rel}"):
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
            return None, f"only stats.json could be read at {name} ({rel}: {reason}); {lost}"
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


def _change(before: RevisionStats, after: RevisionStats, channel: str) -> ChannelChange:
    """Deltas, drifts and histogram distance of one channel."""
    b, a = before.channel(channel) or {}, after.channel(channel) or {}
    d_mean, d_std = a["mean"] - b["mean"], a["std"] - b["std"]
    hb, ha = before.histogram(channel), after.histogram(channel)
    js = js_distance(hb, ha) if hb is not None and ha is not None and hb.shape == ha.shape else None
    return ChannelChange(
        delta_mean=d_mean,
        delta_std=d_std,
        mean_drift=abs(d_mean) / b["std"],
        std_drift=d_std / b["std"],
        js_distance=js,
    )


def compare(revisions: list[RevisionStats]) -> list[Comparison]:
    """Each revision with stats against the previous revision with stats."""
    with_stats = [i for i, r in enumerate(revisions) if r.doc is not None]
    out = []
    for i, j in itertools.pairwise(with_stats):
        before, after = revisions[i], revisions[j]
        common = [c for c in after.doc["channel_names"] if before.channel(c)]  # type: ignore[index]
        changes = {c: _change(before, after, c) for c in common}
        out.append(
            Comparison(
                before=before.name,
                after=after.name,
                before_index=i,
                after_index=j,
                channels=changes,
            )
        )
    return out


def audit_revisions(
    revisions: list[str] | None = None,
    *,
    stats_path: Path = DEFAULT_STATS,
    cwd: Path | None = None,
) -> Audit:
    """Read the stats of each revision and compare consecutive ones.

    Parameters
    ----------
    revisions
        Git revisions (tag, branch, sha, ``HEAD~1``) or ``workspace``; None or empty for
        every tag by commit date, then HEAD, then the workspace.
    stats_path
        stats.json, relative to ``cwd`` (or absolute) inside the repository.
    cwd
        A folder inside the git repository; default the current directory.

    Returns
    -------
    Audit
        The revisions in order, with notes for what could not be read, and the comparisons.

    Raises
    ------
    PipelineError
        Not in a git repository, an unknown revision, or ``stats_path`` outside the repository.
    """
    cwd = Path.cwd() if cwd is None else Path(cwd)
    root = repo_root(cwd)
    try:
        rel = Path(os.path.abspath(cwd / stats_path)).relative_to(root).as_posix()
    except ValueError as exc:
        raise PipelineError(f"--stats {stats_path} is outside the repository {root}.") from exc
    names = list(revisions) if revisions else default_revisions(root)
    resolved = [(name, _resolve(root, name)) for name in names]
    read = [read_revision(root, name, commit, rel) for name, commit in resolved]
    return Audit(stats_path=rel, revisions=read, comparisons=compare(read))


def _fmt(value: float | None, spec: str) -> str:
    """A number for a table cell; empty when there is none."""
    return "" if value is None else format(value, spec)


def _revisions_table(audit: Audit) -> Any:
    """One row per revision: commit, fit split, data fingerprint, images, arrays read."""
    from rich.table import Table

    table = Table(title=f"revisions ({audit.stats_path})", title_justify="left")
    for name in ("revision", "commit", "fit split", "fingerprint", "images", "stats.zarr"):
        table.add_column(name, no_wrap=True)
    for rev in audit.revisions:
        doc = rev.doc or {}
        table.add_row(
            rev.name,
            (rev.commit or WORKSPACE)[:12],
            doc.get("fit_split", "-"),
            str(doc.get("fingerprint", "-"))[:12],
            str(doc.get("count", {}).get("images", "-")),
            "read" if rev.arrays is not None else "-",
        )
    return table


def _channel_table(audit: Audit, channel: str) -> Any:
    """One row per revision: count, mean, std and the change from the previous revision."""
    from rich.table import Table

    table = Table(title=f"channel {channel}", title_justify="left")
    for name in ("revision", "images", "mean", "std", "Δmean", "Δstd"):
        table.add_column(name, justify="left" if name == "revision" else "right", no_wrap=True)
    for name in ("|Δmean|/std", "Δstd/std", "JS dist"):
        table.add_column(name, justify="right", no_wrap=True)
    changes = {c.after_index: c.channels.get(channel) for c in audit.comparisons}
    for i, rev in enumerate(audit.revisions):
        ch = rev.channel(channel)
        if ch is None:
            table.add_row(rev.name, "-", "no stats" if rev.doc is None else "no channel")
            continue
        c = changes.get(i)
        table.add_row(
            rev.name,
            str(rev.doc["count"]["images"]),  # type: ignore[index]
            f"{ch['mean']:.3f}",
            f"{ch['std']:.3f}",
            *(
                ("", "", "", "", "")
                if c is None
                else (
                    f"{c.delta_mean:+.3f}",
                    f"{c.delta_std:+.3f}",
                    f"{c.mean_drift:.3f}",
                    f"{c.std_drift:+.3f}",
                    _fmt(c.js_distance, ".4f"),
                )
            ),
        )
    return table


def print_audit(audit: Audit, *, as_json: bool = False) -> None:
    """Print the audit: rich tables (revisions, then one per channel) and notes, or JSON.

    Parameters
    ----------
    audit
        The result of `audit_revisions`.
    as_json
        Print ``Audit.to_dict()`` as JSON with sorted keys instead of tables.
    """
    from rich.console import Console
    from rich.text import Text

    if as_json:
        print(json.dumps(audit.to_dict(), sort_keys=True, indent=2, allow_nan=False))
        return
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 110)
    console.print(_revisions_table(audit))
    for rev in audit.revisions:
        for note in rev.notes:
            console.print(Text(note, style="yellow"))
    for channel in audit.channel_names:
        console.print(_channel_table(audit, channel))
