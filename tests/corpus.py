"""A folder of bad and awkward inputs for the hardening tests, with what each entry must become.

``CASES`` is the table: every entry of the folder (file, symlink or junk) is ``ok`` (decoded,
checked pixel by pixel against ``oracle``), ``rejected`` (a line in rejected.json whose reason
matches ``reason``) or ``ignored`` (OS junk, hidden files, other extensions, a folder symlink
loop). ``write_corpus`` writes it with Pillow or byte by byte; ``walk_entries`` lists a folder
independently of the code under test, so a test can check that the table is complete.
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

SIZE = (24, 32)  # ingest.image_size, (height, width): not square, so a transposed axis shows
MAX_PIXELS = 50_000  # ingest.max_pixels: small, so a real image can be a "bomb" cheaply
BILINEAR = Image.Resampling.BILINEAR
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
NON_UTF8 = os.fsdecode(b"names/\xff\xfe raw.png")  # Python's spelling of a non-UTF-8 file name


@dataclass(frozen=True)
class Case:
    """One entry of the corpus folder and what ingest must make of it."""

    path: str  # relative POSIX path as Python spells it (surrogate escapes for raw bytes)
    kind: str  # "ok" | "rejected" | "ignored"
    reason: str = ""  # rejected: regex the rejected.json reason must match
    frames: int = 1  # ok: frames recorded in the manifest
    data: Callable[[], bytes] | None = None  # file content, or None for a symlink
    link: str | None = None  # symlink target


# --- image makers ------------------------------------------------------------------------------


def photo(seed: int, width: int, height: int) -> Image.Image:
    """A smooth colour field plus noise: resizing, cropping and JPEG all change it visibly."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack(
        [xx * 255 / max(width, 1), yy * 255 / max(height, 1), (xx + yy) * 127 / (width + height)],
        axis=-1,
    )
    noise = rng.normal(0, 12, (height, width, 3)) + rng.integers(0, 60)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def encode(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR (CRC fixed up) claims ``width`` x ``height``."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    body = data[12:29]  # IHDR type + its 13 data bytes
    body[4:8] = width.to_bytes(4, "big")
    body[8:12] = height.to_bytes(4, "big")
    data[12:29] = body
    data[29:33] = zlib.crc32(bytes(body)).to_bytes(4, "big")
    return bytes(data)


def png_chunks(png: bytes) -> list[tuple[bytes, int, int, bool]]:
    """(type, data offset, length, CRC matches) of every chunk of a PNG."""
    out, pos = [], 8
    while pos < len(png):
        length = int.from_bytes(png[pos : pos + 4], "big")
        kind = png[pos + 4 : pos + 8]
        crc = int.from_bytes(png[pos + 8 + length : pos + 12 + length], "big")
        out.append((kind, pos + 8, length, zlib.crc32(png[pos + 4 : pos + 8 + length]) == crc))
        pos += 12 + length
    return out


def flip_idat_byte(png: bytes, offset: int, mask: int = 0xFF) -> bytes:
    """XOR one byte of the first IDAT chunk's data with ``mask``; its CRC is left stale."""
    _, start, length, _ = next(c for c in png_chunks(png) if c[0] == b"IDAT")
    assert 0 <= offset < length
    i = start + offset
    return png[:i] + bytes([png[i] ^ mask]) + png[i + 1 :]


def pillow_decode(data: bytes) -> np.ndarray | None:
    """Pillow's own full decode of ``data``, or None when Pillow refuses it."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError):
        return None


def _cmyk_jpeg() -> bytes:
    cmyk = np.asarray(photo(2, 41, 29).convert("CMYK"))
    return encode(Image.frombytes("CMYK", (41, 29), cmyk.tobytes()), "JPEG", quality=95)


def _gray16() -> np.ndarray:
    """16-bit values that are not multiples of 257, covering most of the range."""
    rng = np.random.default_rng(3)
    ramp = (np.arange(29 * 37, dtype=np.int64).reshape(29, 37) * 61 + 257 * 3) % 65536
    return (ramp + rng.integers(0, 300, ramp.shape)).clip(0, 65535).astype(np.uint16)


def _la_png() -> bytes:
    alpha = Image.fromarray((np.arange(33 * 25) % 256).astype(np.uint8).reshape(25, 33))
    return encode(Image.merge("LA", [photo(5, 33, 25).convert("L"), alpha]), "PNG")


def _animated_gif() -> bytes:
    frames = [photo(7 + k, 30, 22).quantize(64) for k in range(3)]
    frames[1].paste(9, (0, 0, 30, 22))  # later frames clearly differ from the first
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees
    return encode(photo(10, 44, 20), "JPEG", quality=90, exif=exif)


def _jpeg(seed: int, width: int = 40, height: int = 30) -> bytes:
    return encode(photo(seed, width, height), "JPEG", quality=90)


def _png(seed: int, width: int = 40, height: int = 30) -> bytes:
    return encode(photo(seed, width, height), "PNG")


def _flipped_idat() -> bytes:
    """A PNG with one IDAT byte flipped so that its zlib stream breaks (and its CRC is stale)."""
    png = _png(24, 64, 48)
    _, _, length, _ = next(c for c in png_chunks(png) if c[0] == b"IDAT")
    bad = flip_idat_byte(png, length // 2)
    assert not next(c for c in png_chunks(bad) if c[0] == b"IDAT")[3], "premise: CRC is stale"
    assert pillow_decode(bad) is None, "premise: this flip breaks the zlib stream"
    return bad


_HTML = (
    b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
    b"<body><h1>Not Found</h1><p>The requested URL was not found.</p></body></html>\n"
)


def _ok(path: str, data: Callable[[], bytes], frames: int = 1) -> Case:
    return Case(path, "ok", frames=frames, data=data)


def _bad(path: str, data: Callable[[], bytes], reason: str) -> Case:
    return Case(path, "rejected", reason=reason, data=data)


def _junk(path: str, data: Callable[[], bytes]) -> Case:
    return Case(path, "ignored", data=data)


CASES: list[Case] = [
    # --- awkward but usable: decoded, pixel-checked against the oracle ----------------------
    _ok("formats/plain.jpg", lambda: _jpeg(1)),
    _ok("formats/cmyk.jpg", _cmyk_jpeg),
    _ok("formats/gray16.png", lambda: encode(Image.fromarray(_gray16()), "PNG")),
    _ok("formats/gray16.tif", lambda: encode(Image.fromarray(_gray16()[::-1].copy()), "TIFF")),
    _ok(
        "formats/palette_trns.png",
        lambda: encode(photo(4, 35, 27).quantize(16), "PNG", transparency=3),
    ),
    _ok("formats/la.png", _la_png),
    _ok("formats/one_bit.png", lambda: encode(photo(6, 36, 28).convert("1"), "PNG")),
    _ok("formats/animated.gif", _animated_gif, frames=3),
    _ok("formats/exif_rotated.jpg", _exif_rotated_jpeg),
    _ok("formats/jpeg_bytes.png", lambda: _jpeg(11)),  # a JPEG named .png
    _ok("formats/UPPER.JPG", lambda: _jpeg(12)),
    _ok("formats/UPPER.PNG", lambda: _png(13)),
    _ok("formats/Mixed.TiFf", lambda: encode(photo(14, 40, 30), "TIFF")),
    _ok("formats/trailing_bytes.jpg", lambda: _jpeg(15) + b"\x00trailing junk" * 50),
    _ok("formats/tiny.png", lambda: _png(16, 5, 4)),  # smaller than the target size
    _ok("formats/sliver_wide.png", lambda: _png(17, 2000, 3)),
    _ok("formats/sliver_tall.png", lambda: _png(18, 3, 2000)),
    _ok("names/caf\u00e9 \u732b \u00fc.png", lambda: _png(19)),
    _ok(NON_UTF8, lambda: _png(20)),
    _ok("dups/a.png", lambda: _png(21)),
    _ok("dups/b.png", lambda: _png(21)),  # the same bytes as dups/a.png
    Case("links/good.png", "ok", link="../formats/tiny.png"),  # a working file symlink
    # --- unusable: each must be a line in rejected.json ---------------------------------------
    _bad("bad/empty.jpg", lambda: b"", r"empty file \(0 bytes\)"),
    _bad("bad/truncated.jpg", lambda: _jpeg(22, 64, 48)[:1500], r"cannot decode: .*truncated"),
    _bad(
        "bad/truncated.png",
        lambda: (lambda p: p[: len(p) // 2])(_png(23, 64, 48)),
        r"cannot decode: .*truncated",
    ),
    _bad(
        "bad/idat_flipped.png",
        _flipped_idat,
        r"corrupt PNG: CRC mismatch|cannot decode: .*(broken data stream|CRC)",
    ),
    _bad("bad/notes.jpg", lambda: b"shopping list\n- milk\n- eggs\n", r"not an image"),
    _bad("bad/error_page.png", lambda: _HTML, r"not an image"),
    _bad(
        "bad/bomb_header.png",
        lambda: png_claiming_size(5000, 5000),
        r"decompression bomb: 5000x5000 = 25000000 pixels .*ingest\.max_pixels \(50000\)",
    ),
    _bad(
        "bad/bomb_beyond_pillow.png",
        lambda: png_claiming_size(100_000, 100_000),
        r"decompression bomb",
    ),
    _bad("bad/bomb_real.png", lambda: _png(25, 300, 200), r"decompression bomb: 300x200"),
    # a class folder whose only file is bad: no class, but its file is still recorded
    _bad("lonely/only_file_is_bad.jpg", lambda: _jpeg(26)[:300], r"cannot decode|truncated"),
    Case("links/broken.jpg", "rejected", reason=r"broken symlink", link="missing.jpg"),
    Case("links/loop_a.jpg", "rejected", reason=r"symlink", link="loop_b.jpg"),
    Case("links/loop_b.jpg", "rejected", reason=r"symlink", link="loop_a.jpg"),
    Case("links/self.png", "rejected", reason=r"symlink", link="self.png"),
    # --- ignored: junk, hidden files, other extensions, a folder symlink loop -------------------
    _junk(".DS_Store", lambda: b"\x00\x00\x00\x01Bud1" + bytes(100)),
    _junk("formats/.DS_Store", lambda: b"\x00\x00\x00\x01Bud1" + bytes(100)),
    _junk("Thumbs.db", lambda: b"\xd0\xcf\x11\xe0" + bytes(100)),
    _junk("formats/Thumbs.db", lambda: b"\xd0\xcf\x11\xe0" + bytes(100)),
    _junk("desktop.ini", lambda: b"[.ShellClassInfo]\n"),
    _junk("formats/._plain.jpg", lambda: b"\x00\x05\x16\x07AppleDouble" + bytes(50)),
    _junk("__MACOSX/formats/._plain.jpg", lambda: b"\x00\x05\x16\x07AppleDouble" + bytes(50)),
    _junk("__MACOSX/formats/plain.jpg", lambda: b"not an image either"),
    _junk(".hidden/secret.png", lambda: _png(27)),
    _junk("formats/.hidden.png", lambda: _png(28)),
    _junk("README.txt", lambda: b"my photos\n"),
    _junk("empty_class/notes.txt", lambda: b"no images in this class folder yet\n"),
    _junk("formats/plain.jpg.part", lambda: b"half a download"),
    Case("links/up", "ignored", link=".."),  # a folder symlink loop
]

OK = [c for c in CASES if c.kind == "ok"]
REJECTED = [c for c in CASES if c.kind == "rejected"]
IGNORED = [c for c in CASES if c.kind == "ignored"]
CLASSES = ["dups", "formats", "links", "names"]  # bad/, lonely/, empty_class/ keep no image
DUPLICATES = [["dups/a.png", "dups/b.png"], ["formats/tiny.png", "links/good.png"]]


def write_corpus(root: Path) -> list[Case]:
    """Write every case under ``root`` (plus an empty sub-folder); return the table."""
    top = os.fsencode(root)
    for case in CASES:
        path = os.path.join(top, os.fsencode(case.path))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if case.link is not None:
            os.symlink(case.link, path, target_is_directory=case.link == "..")
        else:
            assert case.data is not None
            with open(path, "wb") as fh:
                fh.write(case.data())
    os.makedirs(os.path.join(top, b"empty_class", b"still_empty"), exist_ok=True)
    return CASES


def walk_entries(root: Path) -> set[str]:
    """Every file and symlink under ``root`` (symlinks not followed), as relative paths."""
    found = set()
    top = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(top):
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in [*filenames, *links]:
            rel = os.path.relpath(os.path.join(dirpath, name), top)
            found.add(os.fsdecode(rel))
    return found


def oracle(path: str | bytes | Path) -> np.ndarray:
    """The documented decode policy spelled with Pillow's own API (rgb, 8 bit, alpha composited
    over white, shorter-side centre crop, bilinear): first frame, EXIF orientation applied,
    16-bit gray rounded to round(x * 255 / 65535), then repeated to three channels."""
    with Image.open(path) as im:
        upright = ImageOps.exif_transpose(im)
    w_h = (SIZE[1], SIZE[0])
    if upright.mode in SIXTEEN_BIT:
        wide = np.asarray(ImageOps.fit(upright.convert("I"), w_h, BILINEAR)).astype(np.float64)
        eight = np.round(np.clip(wide, 0, 65535) / 257).astype(np.uint8)  # x/257 is never .5
        return np.repeat(eight[..., None], 3, axis=2)
    if upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info:
        rgba = upright.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        upright = Image.alpha_composite(white, rgba)
    return np.asarray(ImageOps.fit(upright.convert("RGB"), w_h, BILINEAR))
