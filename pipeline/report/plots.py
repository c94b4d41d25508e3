"""Pictures of fitted statistics, drawn with Pillow only.

Histograms overlaid across revisions, mean and std images, mean-image differences; colour maps
are interpolated with numpy. PNGs carry no timestamps: the same statistics give the same bytes.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.report.audit import Audit
from pipeline.report.revisions import RevisionStats, StatsArrays

__all__ = [
    "colormap",
    "diff_picture",
    "histogram_figure",
    "mean_picture",
    "save_png",
    "shares_of",
    "std_picture",
    "write_audit_plots",
]

HISTOGRAM_SIZE = (640, 400)
BINS = 256  # histograms are drawn (and reported) with 256 bins; 16-bit values are folded
PALETTE = [  # matplotlib's tab10: distinct colours for up to 10 revisions, then repeated
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip
VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
BLUE_WHITE_RED = [(33, 102, 172), (103, 169, 207), (247, 247, 247), (239, 138, 98), (178, 24, 43)]
_MARGIN = (64, 36, 16, 44)  # left, top, right, bottom of the histogram's plot area


def colormap(values: np.ndarray, anchors: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """Map values in [0, 1] to RGB by linear interpolation between equally spaced anchors.

    Parameters
    ----------
    values
        Any shape; clipped to [0, 1].
    anchors
        RGB colours at 0, ..., 1.

    Returns
    -------
    numpy.ndarray
        ``values.shape + (3,)`` uint8.
    """
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    stops = np.linspace(0.0, 1.0, len(anchors))
    rgb = [np.interp(v, stops, [a[k] for a in anchors]) for k in range(3)]
    return np.rint(np.stack(rgb, axis=-1)).astype(np.uint8)


def _font() -> Any:
    """Pillow's built-in font (Aileron, embedded in Pillow: no font files needed)."""
    return ImageFont.load_default(size=12)


def shares_of(counts: np.ndarray) -> np.ndarray:
    """Counts folded into BINS bins, as fractions of the total."""
    counts = np.asarray(counts, dtype=np.float64)
    folded = counts.reshape(BINS, -1).sum(axis=1) if counts.size > BINS else counts
    total = folded.sum()
    return folded / total if total > 0 else folded


def _axes(
    draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], pixel_max: int, ymax: float
) -> None:
    """Frame, ticks and tick labels of the histogram's plot area."""
    x0, y0, x1, y1 = box
    font = _font()
    draw.rectangle(box, outline=(0, 0, 0))
    for k in range(5):
        x = x0 + (x1 - x0) * k / 4
        draw.line([(x, y1), (x, y1 + 4)], fill=(0, 0, 0))
        draw.text(
            (x, y1 + 6), str(round(pixel_max * k / 4)), fill=(0, 0, 0), font=font, anchor="mt"
        )
    for k in range(3):
        y = y1 - (y1 - y0) * k / 2
        draw.line([(x0 - 4, y), (x0, y)], fill=(0, 0, 0))
        label = f"{100 * ymax * k / 2:.2f}%"
        draw.text((x0 - 6, y), label, fill=(0, 0, 0), font=font, anchor="rm")
    draw.text(((x0 + x1) / 2, y1 + 22), "pixel value", fill=(0, 0, 0), font=font, anchor="mt")


def _legend(
    draw: ImageDraw.ImageDraw, corner: tuple[int, int], labels: list[tuple[str, int]]
) -> None:
    """Colour swatches and revision names in a framed box whose top-right corner is given."""
    font = _font()
    width = 30 + max(int(draw.textlength(name, font=font)) for name, _ in labels)
    right, top = corner
    draw.rectangle(
        (right - width, top, right, top + 6 + 14 * len(labels)),
        fill=(255, 255, 255),
        outline=(160, 160, 160),
    )
    for row, (name, colour) in enumerate(labels):
        y = top + 10 + 14 * row
        draw.line(
            [(right - width + 6, y), (right - width + 22, y)],
            fill=PALETTE[colour % len(PALETTE)],
            width=3,
        )
        draw.text((right - width + 26, y), name, fill=(0, 0, 0), font=font, anchor="lm")


def histogram_figure(
    channel: str, series: Sequence[tuple[str, int, np.ndarray]], pixel_max: int
) -> Image.Image:
    """Histograms of one channel overlaid, as shares of pixels per value (640x400 RGB).

    Parameters
    ----------
    channel
        Channel name for the title.
    series
        ``(label, colour index, counts)`` per revision; counts of length ``pixel_max + 1``.
    pixel_max
        255 or 65535 (16-bit counts are drawn in 256 bins).

    Returns
    -------
    PIL.Image.Image
    """
    image = Image.new("RGB", HISTOGRAM_SIZE, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = _MARGIN
    box = (left, top, HISTOGRAM_SIZE[0] - right, HISTOGRAM_SIZE[1] - bottom)
    shares = [shares_of(counts) for _, _, counts in series]
    ymax = max((float(s.max()) for s in shares if s.size), default=0.0) * 1.05 or 1.0
    _axes(draw, box, pixel_max, ymax)
    for (_, colour, _), share in zip(series, shares, strict=True):
        xs = box[0] + (box[2] - box[0]) * np.arange(share.size) / max(share.size - 1, 1)
        ys = box[3] - (box[3] - box[1]) * share / ymax
        draw.line(
            list(zip(xs.tolist(), ys.tolist(), strict=True)),
            fill=PALETTE[colour % len(PALETTE)],
            width=2,
        )
    title = f"channel {channel}: share of pixels per value"
    draw.text((left, top // 2), title, fill=(0, 0, 0), font=_font(), anchor="lm")
    if series:
        _legend(draw, (box[2] - 6, box[1] + 6), [(label, colour) for label, colour, _ in series])
    return image


def _enlarged(pixels: np.ndarray) -> Image.Image:
    """An (H, W, 3) uint8 array as RGB, enlarged by a whole factor to about 256 px (nearest)."""
    factor = max(1, 256 // max(pixels.shape[:2]))
    image = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def _captioned(picture: Image.Image, caption: str, bar: np.ndarray | None = None) -> Image.Image:
    """``picture`` above an optional colour bar (a (3,) uint8 colour per column) and a caption."""
    font = _font()
    width = max(picture.width, int(ImageDraw.Draw(picture).textlength(caption, font=font)) + 8)
    bar_height = 0 if bar is None else 12
    out = Image.new("RGB", (width, picture.height + bar_height + 20), (255, 255, 255))
    out.paste(picture, (0, 0))
    if bar is not None:
        strip = np.repeat(bar[None, :, :], bar_height, axis=0)
        out.paste(
            Image.fromarray(strip, mode="RGB").resize((picture.width, bar_height)),
            (0, picture.height),
        )
    ImageDraw.Draw(out).text(
        (4, picture.height + bar_height + 4), caption, fill=(0, 0, 0), font=font
    )
    return out


def mean_picture(mean_image: np.ndarray, pixel_max: int, caption: str) -> Image.Image:
    """The mean image in its own colours (gray for one channel), scaled so pixel_max is 255."""
    scaled = np.rint(np.clip(mean_image / pixel_max, 0.0, 1.0) * 255).astype(np.uint8)
    rgb = scaled if scaled.shape[-1] == 3 else np.repeat(scaled[..., :1], 3, axis=-1)
    return _captioned(_enlarged(rgb), caption)


def std_picture(std_image: np.ndarray, caption: str) -> Image.Image:
    """The std image averaged over channels, in the viridis colour map from 0 to its maximum."""
    std = np.asarray(std_image, dtype=np.float64).mean(axis=-1)
    top = float(std.max()) or 1.0
    bar = colormap(np.linspace(0.0, 1.0, 256), VIRIDIS)
    return _captioned(_enlarged(colormap(std / top, VIRIDIS)), f"{caption}: 0 .. {top:.2f}", bar)


def diff_picture(before: np.ndarray, after: np.ndarray, caption: str) -> Image.Image:
    """``after - before`` averaged over channels: blue below 0, white at 0, red above."""
    diff = (np.asarray(after, dtype=np.float64) - before).mean(axis=-1)
    top = float(np.abs(diff).max())
    shades = colormap(
        diff / (2 * top) + 0.5 if top > 0 else np.full(diff.shape, 0.5), BLUE_WHITE_RED
    )
    bar = colormap(np.linspace(0.0, 1.0, 256), BLUE_WHITE_RED)
    return _captioned(_enlarged(shades), f"{caption}: max |diff| = {top:.3f}", bar)


def save_png(image: Image.Image, path: Path) -> Path:
    """Write a PNG without metadata (deterministic bytes)."""
    image.save(path, format="PNG")
    return path


def _file_labels(names: list[str]) -> list[str]:
    """Revision names made safe for file names, unique (``HEAD~1`` -> ``HEAD_1``)."""
    safe = [re.sub(r"[^A-Za-z0-9._-]+", "_", name) for name in names]
    return [s if safe.count(s) == 1 else f"{s}-{i}" for i, s in enumerate(safe)]


@dataclass(frozen=True)
class _Drawn:
    """A revision whose arrays were read, with its colour index and file label."""

    colour: int
    label: str
    rev: RevisionStats
    arrays: StatsArrays
    pixel_max: int


def _drawable(audit: Audit) -> list[_Drawn]:
    """The revisions of ``audit`` that have stats.zarr, in order."""
    labels = _file_labels([rev.name for rev in audit.revisions])
    return [
        _Drawn(i, labels[i], r, r.arrays, int(r.doc["pixel_max"]))
        for i, r in enumerate(audit.revisions)
        if r.arrays is not None and r.doc is not None
    ]


def write_audit_plots(audit: Audit, out_dir: Path) -> tuple[list[Path], list[str]]:
    """Write the audit's PNGs: histograms per channel, mean/std image per revision, differences.

    Parameters
    ----------
    audit
        The result of `pipeline.report.audit.audit_revisions`; revisions without stats.zarr are left
        out of every picture.
    out_dir
        Folder for ``histogram_<C>.png``, ``mean_image_<rev>.png``, ``std_image_<rev>.png`` and
        ``mean_diff_<rev>_to_<rev>.png`` (consecutive revisions with arrays).

    Returns
    -------
    tuple of (list of Path, list of str)
        The files written, and notes on pictures that could not be drawn.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    drawn = _drawable(audit)
    written, notes = [], []
    for channel in audit.channel_names:
        series = [
            (d.rev.name, d.colour, h) for d in drawn if (h := d.rev.histogram(channel)) is not None
        ]
        if series:
            figure = histogram_figure(channel, series, max(d.pixel_max for d in drawn))
            written.append(save_png(figure, out / f"histogram_{channel}.png"))
    for d in drawn:
        mean = mean_picture(d.arrays.mean_image, d.pixel_max, f"mean {d.rev.name}")
        written.append(save_png(mean, out / f"mean_image_{d.label}.png"))
        std = std_picture(d.arrays.std_image, f"std {d.rev.name}")
        written.append(save_png(std, out / f"std_image_{d.label}.png"))
    for a, b in itertools.pairwise(drawn):
        ma, mb = a.arrays.mean_image, b.arrays.mean_image
        if ma.shape != mb.shape or a.pixel_max != b.pixel_max:
            notes.append(
                f"no mean difference {a.rev.name} -> {b.rev.name}: the images differ in shape "
                f"or bit depth ({ma.shape}, {mb.shape})"
            )
            continue
        picture = diff_picture(ma, mb, f"mean {b.rev.name} - {a.rev.name}")
        written.append(save_png(picture, out / f"mean_diff_{a.label}_to_{b.label}.png"))
    return written, notes
