"""The ``report`` stage: histogram.json, mean_image.png and std_image.png of one stats folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.location import Location, parse_location
from pipeline.core.outputs import check_output, write_marker
from pipeline.core.publish import publish
from pipeline.report.plots import BINS, mean_picture, save_png, shares_of, std_picture
from pipeline.stats.document import load_stats
from pipeline.zarrstore.store import write_json

__all__ = ["histogram_rows", "write_report"]


def histogram_rows(
    histogram: np.ndarray, channels: list[str], pixel_max: int
) -> list[dict[str, Any]]:
    """Rows ``{"value": v, "<C>": share, ...}`` for ``dvc plots`` (x: value, y: the channels).

    Parameters
    ----------
    histogram
        (C, pixel_max + 1) exact counts.
    channels
        Channel names (``R``, ``G``, ``B`` or ``L``).
    pixel_max
        255 gives one row per value; 65535 gives 256 rows of 256 values (``value``: first).

    Returns
    -------
    list of dict
        Shares of the channel's pixels (summing to 1 per channel).
    """
    shares = [shares_of(h) for h in histogram]
    step = (pixel_max + 1) // BINS
    return [
        {"value": v * step, **{c: float(s[v]) for c, s in zip(channels, shares, strict=True)}}
        for v in range(BINS)
    ]


def write_report(stats_dir: str | os.PathLike[str] | Location, out_dir: Path) -> list[Path]:
    """The ``report`` stage: histogram.json, mean_image.png and std_image.png of one stats folder.

    Parameters
    ----------
    stats_dir
        Folder written by ``pipeline stats`` (stats.json and a matching stats.zarr).
    out_dir
        Replaced atomically by a folder with the three files.

    Returns
    -------
    list of Path
        The files written.
    """
    check_output(out_dir, "report", {"STATS_DIR": stats_dir}, out_name="OUT_DIR")
    stats = load_stats(stats_dir)
    names = ["histogram.json", "mean_image.png", "std_image.png"]
    with publish(parse_location(out_dir, "OUT_DIR")) as loc:
        tmp = Path(loc)
        write_marker(tmp, "report")
        write_json(tmp / names[0], histogram_rows(stats.histogram, stats.channels, stats.pixel_max))
        save_png(mean_picture(stats.mean_image, stats.pixel_max, "mean image"), tmp / names[1])
        save_png(std_picture(stats.std_image, "std image (mean over channels)"), tmp / names[2])
    return [Path(out_dir) / name for name in names]
