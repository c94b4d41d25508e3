"""Finding image files, and decoding one file with Pillow under the ingest policy.

Pure functions of (bytes, params): no Dask, no Zarr. The ingest stage maps them over files.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import unicodedata
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.core.errors import StoreError
from pipeline.core.location import Location
from pipeline.ingest.colour16 import flatten_alpha16, read_tiff16, source_bits, to_gray16
from pipeline.params import IngestParams

__all__ = [
    "IMAGE_EXTENSIONS",
    "DecodeError",
    "Decoded",
    "SourceFile",
    "decode_image",
    "list_images",
    "list_remote_images",
    "name_conflicts",
    "nfc",
    "output_channels",
    "outside_source",
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
    """One candidate input: its path relative to the source root (POSIX form), label and split.

    ``relpath`` is in Unicode NFC, as recorded; ``disk`` is the real name to open when it
    differs (a folder copied from macOS has NFD names), else "".
    """

    relpath: str
    label: str
    split: str
    disk: str = ""

    @property
    def on_disk(self) -> str:
        """The relative path to open."""
        return self.disk or self.relpath


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
    bits: int  # bits per sample of the source file


def _is_junk(name: str) -> bool:
    return name.startswith(".") or name.lower() in JUNK_NAMES


def nfc(relpath: str) -> str:
    """The name a relative path is compared, split and recorded by: its Unicode NFC form."""
    return unicodedata.normalize("NFC", relpath)


def too_large(size: int, max_bytes: int) -> str:
    """The rejection reason for a file of ``size`` bytes."""
    return (
        f"file is {size / 1e9:.1f} GB ({size} bytes), more than ingest.max_file_bytes "
        f"({max_bytes}); raise ingest.max_file_bytes or remove the file"
    )


def name_conflicts(relpaths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Split ``relpaths`` into usable ones and ``(relpath, reason)`` for names that differ only
    in Unicode normalization (both of each such group are unusable)."""
    groups: dict[str, list[str]] = {}
    for rel in relpaths:
        groups.setdefault(nfc(rel), []).append(rel)
    bad = [
        (
            rel,
            "name differs only in Unicode normalization from "
            + ", ".join(ascii(o) for o in group if o != rel)
            + "; rename one of them",
        )
        for group in groups.values()
        if len(group) > 1
        for rel in group
    ]
    clash = {rel for rel, _ in bad}
    return [rel for rel in relpaths if rel not in clash], bad


def outside_source(root: Path, relpaths: list[str]) -> set[str]:
    """The paths among ``relpaths`` that are symlinks (or under symlinked folders) leading
    outside ``root``.

    Resolves each folder once and only the files that are symlinks: 20,000 plain files take
    0.1 s this way, 0.7 s with a realpath per file.
    """
    prefix = os.path.realpath(root).rstrip(os.sep) + os.sep
    real_dirs: dict[str, str] = {}
    outside = set()
    for rel in relpaths:
        folder, name = os.path.split(rel)
        if folder not in real_dirs:
            real_dirs[folder] = os.path.realpath(root / folder)
        full = os.path.join(real_dirs[folder], name)
        target = os.path.realpath(full) if os.path.islink(full) else full
        if not target.startswith(prefix):
            outside.add(rel)
    return outside


def list_images(
    root: Path, *, max_bytes: int | None = None
) -> tuple[list[str], list[tuple[str, str]]]:
    """Return sorted relative POSIX paths of image files under ``root``, and unusable entries.

    Follows symlinked folders but visits each real folder once, so symlink loops end. Hidden
    files, OS junk and files without an image extension are ignored. Broken symlinks and files
    larger than ``max_bytes`` (from stat, before any read) are returned as ``(relpath, reason)``.
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
            elif max_bytes is not None and (size := os.stat(full).st_size) > max_bytes:
                broken.append((rel, too_large(size, max_bytes)))
            else:
                found.append(rel)
    return sorted(found), sorted(broken)


def list_remote_images(
    root: Location, *, max_bytes: int | None = None
) -> tuple[list[str], list[tuple[str, str]]]:
    """:func:`list_images` for a folder given by an fsspec URL (object storage).

    The same rules: sorted relative POSIX paths, hidden files and folders, OS junk and files
    without an image extension ignored. Object stores have no symlinks or special files, so
    the only unusable entries are files larger than ``max_bytes`` (by the listing's size).
    """
    if not root.is_dir():
        raise StoreError(
            f"Source folder {root} does not exist or is not a folder (no objects under it)."
        )
    listed = {
        rel: info
        for rel, info in root.files().items()
        if not any(_is_junk(part) for part in rel.split("/"))
        and os.path.splitext(rel)[1].lower() in IMAGE_EXTENSIONS
    }
    sizes = {rel: int(info.get("size") or 0) for rel, info in listed.items()}
    big = {rel for rel, size in sizes.items() if max_bytes is not None and size > max_bytes}
    broken = [(rel, too_large(sizes[rel], max_bytes or 0)) for rel in sorted(big)]
    return sorted(set(listed) - big), broken


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


def _resize(im: Image.Image, params: IngestParams, channel: int = 0) -> Image.Image:
    """Apply ``ingest.image_size`` with ``ingest.resize`` using Pillow's own ImageOps helpers.

    A one-channel image is padded with ``ingest.pad_value[channel]``.
    """
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
            fill = params.pad_value[channel] * (257 if im.mode == "I" else 1)
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


# The transposition that makes an image upright, per EXIF orientation (as ImageOps.exif_transpose).
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _colour16(
    data: bytes, fmt: str, params: IngestParams, channels: int, orientation: int
) -> np.ndarray:
    """Pixels of a file with more than 8 bits per colour channel, kept exact (see colour16.py).

    Each channel is resized on its own as a 32-bit "I" image, like 16-bit gray.
    """
    if fmt != "TIFF":
        raise DecodeError(
            f"16-bit colour {fmt}: Pillow decodes it to 8 bits per channel and no installed "
            f"decoder keeps 16; convert it to a 16-bit TIFF or an 8-bit {fmt}"
        )
    try:
        a = read_tiff16(data)
    except (OSError, ValueError) as exc:
        raise DecodeError(f"cannot decode 16-bit colour TIFF exactly: {exc}") from exc
    if a.shape[2] == 4:
        a = flatten_alpha16(a, params.alpha, params.background)
    if channels == 1:
        a = to_gray16(a)
    planes = []
    for c in range(a.shape[2]):
        im = Image.fromarray(a[..., c].astype(np.int32), mode="I")
        if orientation in TRANSPOSE:
            im = im.transpose(TRANSPOSE[orientation])
        planes.append(_to_array(_resize(im, params, c), params, 1))
    return np.ascontiguousarray(np.concatenate(planes, axis=2))


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
            bits = source_bits(im, data)
            deep_colour = bits > 8 and not _base_gray(mode)
            if not deep_colour:  # those are decoded by colour16 (Pillow cannot always load them)
                im.load()
    except DecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise DecodeError("not an image Pillow can read") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DecodeError(f"cannot decode: {exc}") from exc
    if deep_colour:
        pixels = _colour16(data, fmt, params, channels, orientation)
    else:
        pixels = _pillow_pixels(im, params, channels, orientation)
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
        bits=bits,
    )


def _pillow_pixels(
    im: Image.Image, params: IngestParams, channels: int, orientation: int
) -> np.ndarray:
    """Pixels of an image Pillow decodes at its full depth."""
    mode = im.mode
    try:
        # exif_transpose copies even when there is nothing to turn: skip it then.
        upright: Image.Image = ImageOps.exif_transpose(im) if orientation in range(2, 9) else im
        converted = _resize(_to_store_mode(upright, params, channels), params)
        return _to_array(converted, params, channels)
    except (OSError, ValueError) as exc:
        raise DecodeError(f"cannot convert {mode} image: {exc}") from exc
