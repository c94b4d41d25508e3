"""Finding image files, and decoding one file with Pillow under the ingest policy.

Pure functions of (bytes, params): no Dask, no Zarr. The ingest stage maps them over files.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import StoreError
from pipeline.location import Location
from pipeline.params import IngestParams

__all__ = [
    "IMAGE_EXTENSIONS",
    "DecodeError",
    "Decoded",
    "SourceFile",
    "decode_image",
    "list_images",
    "list_remote_images",
    "output_channels",
    "split_of",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp", ".gif"})
# Files and folders that operating systems and archivers leave behind in image collections.
JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx", "$recycle.bin"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
SPLITS = ("train", "val", "test")


class DecodeError(ValueError):
    """A file that cannot be used; the message is the reason recorded in rejected.json."""


@dataclass(frozen=True, kw_only=True)
class SourceFile:
    """One candidate input: its path relative to the source root (POSIX form), label and split."""

    relpath: str
    label: str
    split: str


@dataclass(frozen=True, kw_only=True)
class Decoded:
    """Pixels in the store's layout (y, x, channel) plus what the manifest records."""

    pixels: np.ndarray
    sha256: str
    format: str
    mode: str
    width: int
    height: int
    frames: int
    orientation: int


def _is_junk(name: str) -> bool:
    return name.startswith(".") or name.lower() in JUNK_NAMES


def list_images(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Return sorted relative POSIX paths of image files under ``root``, and unusable entries.

    Follows symlinked folders but visits each real folder once, so symlink loops end. Hidden
    files, OS junk and files without an image extension are ignored. Broken symlinks are
    returned as ``(relpath, reason)``.
    """
    if not root.is_dir():
        raise StoreError(f"Source folder {root} does not exist or is not a folder.")
    found: list[str] = []
    broken: list[tuple[str, str]] = []
    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not _is_junk(d))
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if _is_junk(name) or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            rel = (rel_dir / name).as_posix()
            full = os.path.join(dirpath, name)
            if not os.path.exists(full):
                try:
                    os.stat(full)
                    reason = "cannot be read"
                except OSError as exc:
                    loop = exc.errno == errno.ELOOP
                    reason = "symlink loop" if loop else "broken symlink: its target does not exist"
                broken.append((rel, reason))
            elif not os.path.isfile(full):
                broken.append((rel, "not a regular file (a folder, FIFO, socket or device)"))
            else:
                found.append(rel)
    return sorted(found), sorted(broken)


def list_remote_images(root: Location) -> tuple[list[str], list[tuple[str, str]]]:
    """:func:`list_images` for a folder given by an fsspec URL (object storage).

    The same rules: sorted relative POSIX paths, hidden files and folders, OS junk and files
    without an image extension ignored. Object stores have no symlinks or special files, so
    the list of unusable entries is always empty.
    """
    if not root.is_dir():
        raise StoreError(
            f"Source folder {root} does not exist or is not a folder (no objects under it)."
        )
    found = [
        rel
        for rel in root.files()
        if not any(_is_junk(part) for part in rel.split("/"))
        and os.path.splitext(rel)[1].lower() in IMAGE_EXTENSIONS
    ]
    return sorted(found), []


def split_of(relpath: str, *, val: float, test: float) -> str:
    """Split from a hash of the relative path alone, so adding files never moves old ones."""
    digest = hashlib.sha256(relpath.encode("utf-8", "surrogateescape")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test:
        return "test"
    if u < test + val:
        return "val"
    return "train"


def output_channels(color: str, first_mode: str) -> int:
    """Channel count of the store: 3 for rgb, 1 for gray, the first image's for keep."""
    if color == "rgb":
        return 3
    if color == "gray":
        return 1
    return 1 if _base_gray(first_mode) else 3


def _base_gray(mode: str) -> bool:
    return mode in SIXTEEN_BIT_MODES or mode in {"1", "L", "LA", "La", "F"}


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in {"RGBA", "LA", "PA", "La", "RGBa"} or "transparency" in im.info


def _flatten_alpha(im: Image.Image, params: IngestParams) -> Image.Image:
    """Drop alpha, or composite the image over ``ingest.background``."""
    if not _has_alpha(im):
        return im
    rgba = im.convert("RGBA")
    if params.alpha == "drop":
        return rgba.convert("RGB")
    background = Image.new("RGBA", rgba.size, (*params.background, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_store_mode(im: Image.Image, params: IngestParams, channels: int) -> Image.Image:
    """Convert to "RGB", "L" or (16-bit gray) "I" before resizing."""
    if im.mode in SIXTEEN_BIT_MODES:
        # Resized as 32-bit "I" so 16-bit values stay exact; widened to 3 channels at the end.
        return im if im.mode == "I" else im.convert("I")
    im = _flatten_alpha(im, params)
    target = "RGB" if channels == 3 else "L"
    return im if im.mode == target else im.convert(target)  # convert() always copies


def _resize(im: Image.Image, params: IngestParams) -> Image.Image:
    """Apply ``ingest.image_size`` with ``ingest.resize`` using Pillow's own ImageOps helpers."""
    if params.image_size is None:
        return im
    height, width = params.image_size
    if im.size == (width, height):
        return im
    method = RESAMPLE[params.resample]
    if params.resize == "stretch":
        return im.resize((width, height), method)
    if params.resize == "pad":
        fill: int | tuple[int, ...] = params.pad_value
        if im.mode != "RGB":
            fill = params.pad_value[0] * (257 if im.mode == "I" else 1)
        return ImageOps.pad(im, (width, height), method=method, color=fill)
    return ImageOps.fit(im, (width, height), method=method)


def _to_array(im: Image.Image, params: IngestParams, channels: int) -> np.ndarray:
    """Pixels as (y, x, channel) in the store dtype, with exact bit-depth conversion."""
    a = np.asarray(im)
    if im.mode == "I":  # 16-bit gray: keep exact values, clip what resampling overshot
        a16 = np.clip(a, 0, 65535).astype(np.uint32)
        if params.bit_depth == 16:
            a = a16.astype(np.uint16)
        else:  # round-to-nearest of x * 255 / 65535, in integers
            a = ((a16 * 255 + 32767) // 65535).astype(np.uint8)
    elif params.bit_depth == 16:
        a = a.astype(np.uint16) * np.uint16(257)
    a = a.reshape(a.shape[0], a.shape[1], -1)
    if a.shape[2] != channels:
        a = np.repeat(a, channels, axis=2)
    return np.ascontiguousarray(a)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_crc_error(data: bytes) -> str | None:
    """The first PNG chunk whose CRC does not match, or None.

    Written here because Pillow skips the CRCs of image data (IDAT) chunks, and some corrupt
    bytes then decode without an error into wrong pixels. zlib.crc32 is the PNG chunk CRC.
    """
    pos = len(PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > len(data):
            return None  # truncated: Pillow reports it
        kind = data[pos + 4 : pos + 8]
        if zlib.crc32(data[pos + 4 : end]) != int.from_bytes(data[end : end + 4], "big"):
            return f"corrupt PNG: CRC mismatch in the {kind.decode('latin-1')} chunk at byte {pos}"
        if kind == b"IEND":
            return None
        pos = end + 4
    return None


def decode_image(
    data: bytes, params: IngestParams, *, channels: int, name: str = "<bytes>"
) -> Decoded:
    """Decode one file's bytes under the ingest policy, or raise DecodeError with the reason."""
    sha = hashlib.sha256(data).hexdigest()
    if not data:
        raise DecodeError("empty file (0 bytes)")
    if data.startswith(PNG_SIGNATURE) and (crc_error := _png_crc_error(data)):
        raise DecodeError(crc_error)
    try:
        with warnings.catch_warnings():
            # The pixel limit is checked explicitly below with ingest.max_pixels.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            if width * height > params.max_pixels:
                raise DecodeError(
                    f"decompression bomb: {width}x{height} = {width * height} pixels is more "
                    f"than ingest.max_pixels ({params.max_pixels})"
                )
            fmt, mode = im.format or "unknown", im.mode
            frames = getattr(im, "n_frames", 1)
            orientation = int(im.getexif().get(0x0112, 1) or 1)
            im.load()
    except DecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise DecodeError("not an image Pillow can read") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DecodeError(f"cannot decode: {exc}") from exc
    try:
        # exif_transpose copies even when there is nothing to turn: skip it then.
        upright: Image.Image = ImageOps.exif_transpose(im) if orientation in range(2, 9) else im
        converted = _resize(_to_store_mode(upright, params, channels), params)
        pixels = _to_array(converted, params, channels)
    except (OSError, ValueError) as exc:
        raise DecodeError(f"cannot convert {mode} image: {exc}") from exc
    if params.image_size is not None and pixels.shape[:2] != params.image_size:
        raise DecodeError(f"resized to {pixels.shape[:2]}, expected {params.image_size}")
    return Decoded(
        pixels=pixels,
        sha256=sha,
        format=fmt,
        mode=mode,
        width=width,
        height=height,
        frames=frames,
        orientation=orientation,
    )
