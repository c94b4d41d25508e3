"""The embedded sample dataset: seeded crops of the photographs bundled with scikit-image.

Every source image comes from ``skimage.data`` and ships inside the scikit-image wheel, so no
network is needed. Their origins and licences (mostly CC0 / public domain) are given in the
docstring of each ``skimage.data`` function; ``skimage/data/README.txt`` in the wheel does not
list them. The output is a folder per class with a realistic mix of formats (JPEG, PNG, TIFF,
WebP, BMP), modes (RGB, L, RGBA, P, 16-bit I;16) and EXIF orientations. The same seed gives
byte-identical files for a given Pillow build.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import skimage.data
from PIL import Image, features

__all__ = ["run_sample", "write_sample"]

#: Class folder -> the skimage.data loaders whose photographs it is cropped from.
CLASS_SOURCES: dict[str, tuple[str, ...]] = {
    "animals": ("chelsea",),
    "people": ("astronaut", "camera"),
    "space": ("hubble_deep_field", "moon", "rocket"),
    "objects": ("coffee", "coins", "clock", "colorwheel", "logo"),
    "texture": ("grass", "gravel", "brick"),
    "documents": ("page", "text"),
    "medical": ("immunohistochemistry", "retina", "microaneurysms", "cell"),
}
NO_FLIP = frozenset({"documents"})  # mirrored text would not look like a real scan
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "TIFF": "tif", "WEBP": "webp", "BMP": "bmp"}
# exif_transpose applies the inverse of these, so the stored pixels come out upright.
ORIENTATION_STORE = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}


class Variant(NamedTuple):
    """How one file is encoded: container format, Pillow mode, EXIF orientation (1 = none)."""

    format: str
    mode: str
    orientation: int = 1


#: Relative frequency of each variant; every variant also appears at least once when room allows.
VARIANT_WEIGHTS: dict[Variant, int] = {
    Variant("JPEG", "RGB"): 40,
    Variant("JPEG", "RGB", 3): 2,
    Variant("JPEG", "RGB", 6): 3,
    Variant("JPEG", "RGB", 8): 2,
    Variant("JPEG", "L"): 7,
    Variant("PNG", "RGB"): 14,
    Variant("PNG", "L"): 6,
    Variant("PNG", "RGBA"): 5,
    Variant("PNG", "P"): 4,
    Variant("PNG", "I;16"): 3,
    Variant("TIFF", "RGB"): 3,
    Variant("TIFF", "I;16"): 2,
    Variant("WEBP", "RGB"): 4,
    Variant("WEBP", "RGBA"): 1,
    Variant("BMP", "RGB"): 3,
    Variant("BMP", "L"): 1,
}

Rng = np.random.Generator
Pixels = npt.NDArray[np.uint8]


def _load_sources() -> dict[str, Image.Image]:
    """Load every source photograph once, as an RGB or L Pillow image."""
    sources: dict[str, Image.Image] = {}
    for names in CLASS_SOURCES.values():
        for name in names:
            loader: Callable[[], Pixels] = getattr(skimage.data, name)
            pixels = loader()
            if pixels.ndim == 3:
                pixels = pixels[..., :3]  # the logo's alpha channel is fully opaque
            sources[name] = Image.fromarray(np.ascontiguousarray(pixels))
    return sources


def _plan_variants(count: int, rng: Rng) -> list[Variant]:
    """Every variant once (as room allows), the rest drawn by weight, in seeded random order."""
    variants = list(VARIANT_WEIGHTS)
    weights = np.array([VARIANT_WEIGHTS[v] for v in variants], dtype=float)
    extra = rng.choice(len(variants), size=max(0, count - len(variants)), p=weights / weights.sum())
    plan = (variants + [variants[i] for i in extra])[:count]
    return [plan[i] for i in rng.permutation(count)]


def _random_crop(source: Image.Image, rng: Rng) -> Image.Image:
    """Crop 30-100% of the largest box of a random 1:2..2:1 aspect, resized to 80-400 px."""
    width, height = source.size
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    box_w = min(width, height * aspect)
    scale = rng.uniform(0.3, 1.0)
    crop_w = max(8, round(box_w * scale))
    crop_h = max(8, min(height, round(box_w / aspect * scale)))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    long_side = int(rng.integers(80, 401))
    ratio = long_side / max(crop_w, crop_h)
    size = (max(1, round(crop_w * ratio)), max(1, round(crop_h * ratio)))
    box = (left, top, left + crop_w, top + crop_h)
    return source.resize(size, Image.Resampling.LANCZOS, box=box)


def _soft_alpha(size: tuple[int, int], rng: Rng) -> Image.Image:
    """An elliptical alpha mask, opaque in the middle and fading to transparent at the edges."""
    width, height = size
    cx, cy = rng.uniform(0.35, 0.65, size=2)
    ys, xs = np.mgrid[0:height, 0:width]
    radius = np.hypot(xs / width - cx, ys / height - cy) / 0.5
    alpha = np.clip((1.2 - radius) * 2.0, 0.0, 1.0) * 255
    return Image.fromarray(alpha.round().astype(np.uint8))


def _to_mode(image: Image.Image, mode: str, rng: Rng) -> Image.Image:
    """Convert an RGB or L image to the variant's mode (16-bit uses the full range plus noise)."""
    if mode == "I;16":
        gray = np.asarray(image.convert("L"), dtype=np.int32) * 257
        noisy = gray + rng.integers(-200, 201, size=gray.shape)
        return Image.fromarray(np.clip(noisy, 0, 65535).astype(np.uint16))
    if mode == "P":
        return image.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    if mode == "RGBA":
        rgba = image.convert("RGBA")
        rgba.putalpha(_soft_alpha(image.size, rng))
        return rgba
    return image.convert(mode)


def _make_image(source: Image.Image, variant: Variant, flip: bool, rng: Rng) -> Image.Image:
    """One seeded crop of source, flipped, brightness-jittered and converted to the variant."""
    image = _random_crop(source, rng)
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    gain = rng.uniform(0.85, 1.15)
    image = image.point(lambda value: min(255, round(value * gain)))
    return _to_mode(image, variant.mode, rng)


def _save(image: Image.Image, path: Path, variant: Variant, rng: Rng) -> None:
    """Encode with fixed, seeded options only: no timestamps or machine-dependent metadata."""
    quality = int(rng.integers(75, 96))  # drawn for every file, so the stream never depends
    coin = rng.random()  # on the format (WebP may fall back to PNG)
    fmt = variant.format
    if fmt == "JPEG":
        progressive = coin < 0.15
        if variant.orientation != 1:
            image = image.transpose(ORIENTATION_STORE[variant.orientation])
            exif = image.getexif()
            exif[0x0112] = variant.orientation
            image.save(path, "JPEG", quality=quality, progressive=progressive, exif=exif)
        else:
            image.save(path, "JPEG", quality=quality, progressive=progressive)
    elif fmt == "WEBP":
        image.save(path, "WEBP", quality=quality, method=4)
    elif fmt == "TIFF":
        image.save(path, "TIFF", compression="tiff_lzw" if coin < 0.5 else None)
    else:
        image.save(path, fmt)


def write_sample(out_dir: Path, *, seed: int = 0, images_per_class: int = 50) -> int:
    """Write the embedded sample image collection into out_dir (which exists and is empty).

    Return the number of files written.
    """
    rng = np.random.default_rng(seed)
    sources = _load_sources()
    plan = _plan_variants(len(CLASS_SOURCES) * images_per_class, rng)
    webp_ok = features.check("webp")
    written = 0
    for class_name, source_names in CLASS_SOURCES.items():
        class_dir = Path(out_dir) / class_name
        class_dir.mkdir()
        for index in range(images_per_class):
            variant = plan[written]
            if variant.format == "WEBP" and not webp_ok:
                variant = variant._replace(format="PNG")  # same pixels, so the rest is unchanged
            source = sources[source_names[int(rng.integers(len(source_names)))]]
            image = _make_image(source, variant, class_name not in NO_FLIP, rng)
            path = class_dir / f"{index:05d}.{EXTENSIONS[variant.format]}"
            _save(image, path, variant, rng)
            written += 1
    return written


def run_sample(out_dir: Path, *, seed: int = 0, images_per_class: int = 50) -> int:
    """The ``sample`` stage: :func:`write_sample` published whole into ``out_dir``, with the
    marker file that lets a later run replace it (and nothing else)."""
    from pipeline.core.location import parse_location
    from pipeline.core.outputs import check_output, write_marker
    from pipeline.core.publish import publish

    check_output(out_dir, "sample", out_name="OUT_DIR")
    with publish(parse_location(out_dir, "OUT_DIR")) as tmp:
        n = write_sample(Path(tmp), seed=seed, images_per_class=images_per_class)
        write_marker(tmp, "sample")
    return n
