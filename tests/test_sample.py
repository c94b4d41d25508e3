"""The embedded sample dataset, checked with Pillow as the independent reader."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps, features

from pipeline.sample.stage import CLASS_SOURCES, Variant, _save, write_sample

SMALL = 6
EXTENSION_OF_FORMAT = {
    "JPEG": ".jpg",
    "PNG": ".png",
    "TIFF": ".tif",
    "WEBP": ".webp",
    "BMP": ".bmp",
}
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I"}


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in _files(root)
    }


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("sample")
    return root, write_sample(root, seed=0, images_per_class=SMALL)


@pytest.fixture(scope="module")
def opened(small_sample: tuple[Path, int]) -> list[tuple[Path, Image.Image]]:
    """Every file fully decoded (load() raises on a truncated or corrupt file)."""
    result: list[tuple[Path, Image.Image]] = []
    for path in _files(small_sample[0]):
        with Image.open(path) as image:
            image.load()
        result.append((path, image))
    return result


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for root in (first, second, other):
        root.mkdir()
    write_sample(first, seed=7, images_per_class=SMALL)
    write_sample(second, seed=7, images_per_class=SMALL)
    write_sample(other, seed=8, images_per_class=SMALL)

    assert _digests(first) == _digests(second)
    assert len(_digests(first)) == len(CLASS_SOURCES) * SMALL
    differing = [
        name for name, digest in _digests(first).items() if _digests(other).get(name) != digest
    ]
    assert len(differing) > len(CLASS_SOURCES) * SMALL // 2


def test_class_folders_hold_images_per_class_files(small_sample: tuple[Path, int]) -> None:
    root, count = small_sample
    files = _files(root)
    assert count == len(files) == len(CLASS_SOURCES) * SMALL
    assert {p.name for p in root.iterdir()} == set(CLASS_SOURCES)
    assert all(p.is_dir() for p in root.iterdir())
    assert Counter(p.parent.name for p in files) == dict.fromkeys(CLASS_SOURCES, SMALL)
    assert all(p.parent.parent == root for p in files)
    assert not [p for p in root.rglob("*") if p.name.startswith(".")]


def test_file_names_are_padded_indices_with_the_right_extension(
    opened: list[tuple[Path, Image.Image]],
) -> None:
    for path, image in opened:
        assert path.stem.isdigit()
        assert len(path.stem) == 5
        assert path.suffix == EXTENSION_OF_FORMAT[str(image.format)]
    stems = Counter(path.parent.name for path, _ in opened)
    assert set(stems.values()) == {SMALL}
    for class_name in CLASS_SOURCES:
        indices = sorted(int(p.stem) for p, _ in opened if p.parent.name == class_name)
        assert indices == list(range(SMALL))


def test_formats_and_modes_vary(opened: list[tuple[Path, Image.Image]]) -> None:
    formats = {image.format for _, image in opened}
    modes = {image.mode for _, image in opened}
    expected = {"JPEG", "PNG", "TIFF", "BMP"} | ({"WEBP"} if features.check("webp") else set())
    assert formats == expected
    assert {"RGB", "L", "RGBA", "P"} <= modes
    assert modes & SIXTEEN_BIT_MODES
    formats_of_16_bit = {image.format for _, image in opened if image.mode in SIXTEEN_BIT_MODES}
    assert formats_of_16_bit == {"PNG", "TIFF"}


def test_sixteen_bit_images_use_more_than_8_bits(opened: list[tuple[Path, Image.Image]]) -> None:
    sixteen = [image for _, image in opened if image.mode in SIXTEEN_BIT_MODES]
    assert sixteen
    for image in sixteen:
        values = np.asarray(image)
        assert values.dtype.itemsize >= 2
        assert values.max() > 255
        assert np.any(values % 257 != 0)  # not merely 8-bit values scaled up


def test_rgba_images_have_partial_transparency(opened: list[tuple[Path, Image.Image]]) -> None:
    rgba = [image for _, image in opened if image.mode == "RGBA"]
    assert rgba
    for image in rgba:
        alpha = np.asarray(image.getchannel("A"))
        assert alpha.min() < 255
        assert alpha.max() == 255
        assert np.any((alpha > 0) & (alpha < 255))


def test_some_jpegs_carry_an_exif_rotation(opened: list[tuple[Path, Image.Image]]) -> None:
    orientations = {image.getexif().get(0x0112) for _, image in opened if image.format == "JPEG"}
    assert orientations & {3, 6, 8}
    assert all(image.getexif().get(0x0112) is None for _, image in opened if image.format != "JPEG")


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_transpose_turns_rotated_jpegs_upright(tmp_path: Path, orientation: int) -> None:
    upright = np.zeros((96, 160, 3), dtype=np.uint8)
    upright[:32, :48] = (255, 0, 0)  # a red block in the top-left corner
    upright[64:, 112:] = (0, 0, 255)  # a blue block in the bottom-right corner
    path = tmp_path / "rotated.jpg"
    _save(
        Image.fromarray(upright),
        path,
        Variant("JPEG", "RGB", orientation),
        np.random.default_rng(0),
    )

    with Image.open(path) as stored:
        assert stored.getexif()[0x0112] == orientation
        shown = np.asarray(ImageOps.exif_transpose(stored), dtype=np.int16)
    assert shown.shape == upright.shape
    assert np.abs(shown - upright).mean() < 4


def test_sizes_and_pixels_vary(opened: list[tuple[Path, Image.Image]]) -> None:
    sizes = {image.size for _, image in opened}
    assert len(sizes) > 10
    assert all(32 <= side <= 400 for size in sizes for side in size)
    digests = {hashlib.sha256(image.tobytes()).hexdigest() for _, image in opened}
    assert len(digests) == len(opened)


def test_default_parameters_build_the_full_collection(tmp_path: Path) -> None:
    count = write_sample(tmp_path)
    files = _files(tmp_path)
    assert count == len(files) == len(CLASS_SOURCES) * 50
    assert Counter(p.parent.name for p in files) == dict.fromkeys(CLASS_SOURCES, 50)
