"""``pipeline audit``: the fitted statistics of several data versions (git revisions), compared.

stats.json is read from git (``git show REV:path``); stats.zarr (histograms, mean and std
images) through DVC's cache (``DVCFileSystem``) and checked against ``arrays.sha256``.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.report.revisions import (
    WORKSPACE,
    RevisionStats,
    default_revisions,
    read_revision,
    repo_root,
    resolve,
)

__all__ = [
    "DEFAULT_STATS",
    "Audit",
    "ChannelChange",
    "Comparison",
    "audit_revisions",
    "js_distance",
]

DEFAULT_STATS = Path("data/stats/stats.json")


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
        return list(dict.fromkeys(n for r in self.revisions for n in r.channel_names))

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
        "count": rev.images,
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
        common = [c for c in after.channel_names if c in before.channel_names]
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
    stats_path: Path | None = None,
    cwd: Path | None = None,
) -> Audit:
    """Read the stats of each revision and compare consecutive ones.

    Parameters
    ----------
    revisions
        Git revisions (tag, branch, sha, ``HEAD~1``) or ``workspace``; None or empty for
        every tag by commit date, then HEAD, then the workspace.
    stats_path
        stats.json inside the repository, relative to ``cwd`` (or absolute); None for
        ``data/stats/stats.json`` at the repository's root.
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
        path = (
            root / DEFAULT_STATS if stats_path is None else Path(os.path.abspath(cwd / stats_path))
        )
        rel = path.relative_to(root).as_posix()
    except ValueError as exc:
        raise PipelineError(f"--stats {stats_path} is outside the repository {root}.") from exc
    names = list(revisions) if revisions else default_revisions(root)
    resolved = [(name, resolve(root, name)) for name in names]
    read = [read_revision(root, name, commit, rel) for name, commit in resolved]
    return Audit(stats_path=rel, revisions=read, comparisons=compare(read))


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
            str(rev.images or "-"),
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
            str(rev.images),
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
                    "" if c.js_distance is None else f"{c.js_distance:.4f}",
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
