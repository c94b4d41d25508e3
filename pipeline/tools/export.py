"""``pipeline export``: fitted constants, ready to paste, in each library's own units."""

from __future__ import annotations

import json

from pipeline.core.errors import PipelineError
from pipeline.stats.document import Stats

__all__ = ["FORMATS", "check_export", "export_constants"]

FORMATS = ("torchvision", "albumentations", "timm", "keras", "json")


def _fmt(values: list[float]) -> str:
    return "(" + ", ".join(repr(v) for v in values) + ("," if len(values) == 1 else "") + ")"


def check_export(fmt: str, mode: str) -> None:
    """Refuse an unknown format or mode, and per_pixel where the library takes one value per
    channel."""
    if fmt not in FORMATS:
        raise PipelineError(f"Expected one of {', '.join(FORMATS)} for --format. Got {fmt!r}.")
    if mode not in ("per_channel", "global", "per_pixel"):
        raise PipelineError(f"Expected per_channel, global or per_pixel for --mode. Got {mode!r}.")
    if mode == "per_pixel" and fmt != "json":
        raise PipelineError(
            f"{fmt} takes one mean and std per channel; per_pixel normalization (a mean image) "
            f"cannot be expressed there. Read the normalized store with open_normalized(), or "
            f"load_stats(...).mean_image / .std_image yourself."
        )


def export_constants(stats: Stats, fmt: str, mode: str = "per_channel") -> str:
    """Text for ``fmt``; per_pixel is refused where the library only takes per-channel values."""
    check_export(fmt, mode)
    pm = stats.pixel_max
    if mode == "global":
        mean = [stats.global_mean] * len(stats.mean)
        std = [stats.global_std] * len(stats.std)
    else:
        mean, std = stats.mean.tolist(), stats.std.tolist()
    mean01, std01 = [m / pm for m in mean], [s / pm for s in std]
    origin = (
        f"# fitted on {stats.count} {stats.fit_split} images of the data with fingerprint "
        f"{stats.fingerprint}; stats sha256 {stats.sha256[:16]}"
    )
    if fmt == "torchvision":  # ToTensor() scales to [0, 1] first
        return (
            f"{origin}\nfrom torchvision import transforms\n"
            f"normalize = transforms.Normalize(mean={_fmt(mean01)}, std={_fmt(std01)})\n"
        )
    if fmt == "albumentations":  # (img - mean * max_pixel_value) / (std * max_pixel_value)
        return (
            f"{origin}\nimport albumentations as A\n"
            f"normalize = A.Normalize(mean={_fmt(mean01)}, std={_fmt(std01)}, "
            f"max_pixel_value={float(pm)!r})\n"
        )
    if fmt == "timm":  # data config: applied after scaling to [0, 1]
        return f"{origin}\ndata_config = {{'mean': {_fmt(mean01)}, 'std': {_fmt(std01)}}}\n"
    if fmt == "keras":  # on raw pixel values, channels last
        var = [s * s for s in std]
        return (
            f"{origin}\nimport keras\n"
            f"normalize = keras.layers.Normalization(axis=-1, mean={list(mean)!r}, "
            f"variance={var!r})  # input: raw pixels 0..{pm}\n"
        )
    if fmt == "json":
        doc = stats.to_dict()
        if mode == "per_pixel":
            doc["mean_image"] = stats.mean_image.tolist()
            doc["std_image"] = stats.std_image.tolist()
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"
    raise PipelineError(f"Expected one of {', '.join(FORMATS)} for --format. Got {fmt!r}.")
