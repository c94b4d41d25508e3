"""``pipeline fit FOLDER``: the exact statistics of an image folder in one command, no project.

It runs the real stages, ingest then stats, into a temporary folder and prints what
``pipeline export`` prints for their output, so it agrees with ``ingest`` + ``stats`` +
``export`` bit for bit (same decode policy, kernels and cache). The temporary folder is removed
on success, error and Ctrl-C; only the cache keeps the decoded images, so fitting the same
folder again, or running the stages on it later, decodes nothing.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.ingest.stage import run_ingest
from pipeline.params import Params
from pipeline.stats.document import Stats, load_stats
from pipeline.stats.stage import run_stats
from pipeline.tools.export import check_export, export_constants

__all__ = ["FitOutput", "fit_folder"]


@dataclass(frozen=True)
class FitOutput:
    """The constants text (what ``pipeline export`` prints), and the statistics behind it."""

    text: str
    stats: Stats
    per_split: dict[str, int]
    rejected: int


def fit_folder(
    folder: str | Path,
    params: Params,
    *,
    fmt: str = "torchvision",
    mode: str = "per_channel",
    progress: bool = False,
) -> FitOutput:
    """Ingest ``folder`` and fit its statistics in a temporary folder; return the constants."""
    check_export(fmt, mode)  # before any work
    with tempfile.TemporaryDirectory(prefix="pipeline-fit-", ignore_cleanup_errors=True) as tmp:
        prepared, stats_dir = Path(tmp) / "prepared", Path(tmp) / "stats"
        try:
            ingested = run_ingest(folder, prepared, params, progress=progress)
            run_stats(prepared / "images.zarr", stats_dir, params, progress=progress)
        except PipelineError as exc:  # name the folder, not the temporary store made from it
            message = str(exc).replace(str(prepared / "images.zarr"), f"the images of {folder}")
            raise PipelineError(message) from exc
        stats = load_stats(stats_dir)
        text = export_constants(stats, fmt, mode)
    return FitOutput(
        text=text,
        stats=stats,
        per_split=dict(ingested.per_split),
        rejected=len(ingested.rejected),
    )
