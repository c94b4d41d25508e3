"""Ingest stage against Pillow's own decode: real files, real Zarr stores, real Dask schedulers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image, ImageOps
from test_images import png16

from pipeline.cache.entries import open_cache
from pipeline.core.errors import BadImagesError, ParamsError, PipelineError
from pipeline.ingest.stage import run_ingest
from pipeline.params import parse_params

SIZE = (24, 32)  # (height, width): not square, so a transposed axis would show


def make_photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth colour field plus mild noise: compresses like a photo, unlike pure noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], axis=-1)
    noise = rng.normal(0, 6, (h, w, 3))
    return np.clip(base + noise + rng.integers(0, 60), 0, 255).astype(np.uint8)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Forty images in three class folders: JPEG and PNG, RGB, L, RGBA, mixed sizes."""
    rng = np.random.default_rng(7)
    root = tmp_path / "src"
    for c, cls in enumerate(["cat", "dog", "eel"]):
        (root / cls).mkdir(parents=True)
        for i in range(13 + c):
            h, w = int(rng.integers(20, 70)), int(rng.integers(20, 70))
            im = Image.fromarray(make_photo(rng, h, w))
            if i % 5 == 1:
                im = im.convert("L")
            if i % 7 == 2:
                im.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
                im.save(root / cls / f"{i:03d}.png")
            elif i % 2:
                im.save(root / cls / f"{i:03d}.png")
            else:
                im.save(root / cls / f"{i:03d}.jpg", quality=90)
    return root


def params(**ingest: object) -> object:
    base = ingest.pop("base", {"scheduler": "threads", "workers": 2})
    settings = {"image_size": list(SIZE), "chunk_images": 4, "shard_images": 8, **ingest}
    return parse_params({"base": base, "ingest": settings})


def oracle(path: Path) -> np.ndarray:
    """What the default policy promises, written with Pillow's API directly."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA"):
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, im.convert("RGBA"))
        im = ImageOps.fit(im.convert("RGB"), (SIZE[1], SIZE[0]), Image.Resampling.BILINEAR)
        return np.asarray(im)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_every_pixel_equals_pillow_decode(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    result = run_ingest(folder, out, params())
    group = zarr.open_group(out / "images.zarr", mode="r")
    images, paths = group["images"], group["path"][:]
    assert images.shape == (42, *SIZE, 3)
    assert images.dtype == np.uint8
    assert result.count == 42
    for i, rel in enumerate(paths):
        np.testing.assert_array_equal(images[i], oracle(folder / rel), err_msg=rel)
    # labels come from the class folder; splits are contiguous ranges in split order
    classes = group.attrs["classes"]
    assert classes == ["cat", "dog", "eel"]
    assert [classes[k] for k in group["label"][:]] == [p.split("/")[0] for p in paths]
    codes = group["split"][:]
    assert list(codes) == sorted(codes)
    for code, name in enumerate(["train", "val", "test"]):
        start, stop = group.attrs["splits"][name]
        assert (codes[start:stop] == code).all()
    assert images.metadata.dimension_names == ("sample", "y", "x", "channel")


def test_manifest_records_every_file(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    run_ingest(folder, out, params())
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(42))
    for r in rows:
        src = folder / r["path"]
        assert r["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
        with Image.open(src) as im:
            assert (r["width"], r["height"], r["mode"], r["format"]) == (
                *im.size,
                im.mode,
                im.format,
            )
    assert json.loads((out / "rejected.json").read_text()) == []


def test_store_is_sharded_into_few_files(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    run_ingest(folder, out, params())
    shard_files = [p for p in (out / "images.zarr" / "images" / "c").rglob("*") if p.is_file()]
    assert len(shard_files) == 6  # ceil(42 / 8) shards, not one file per chunk or image


@pytest.mark.parametrize(
    "base",
    [
        pytest.param({"scheduler": "synchronous"}, id="synchronous"),
        pytest.param({"scheduler": "threads", "workers": 1}, id="threads-1"),
        pytest.param({"scheduler": "processes", "workers": 2}, id="processes-2"),
    ],
)
def test_byte_identical_whatever_the_scheduler(
    folder: Path, tmp_path: Path, base: dict[str, object]
) -> None:
    run_ingest(folder, tmp_path / "reference", params())
    run_ingest(folder, tmp_path / "other", params(base=base))
    assert tree_digest(tmp_path / "other") == tree_digest(tmp_path / "reference")


def _add_bad_files(folder: Path) -> list[str]:
    (folder / "cat" / "empty.jpg").write_bytes(b"")
    good = (folder / "dog" / "000.jpg").read_bytes()
    (folder / "dog" / "cut.jpg").write_bytes(good[: len(good) // 2])
    (folder / "eel" / "notes.png").write_text("<html>404 Not Found</html>")
    return ["cat/empty.jpg", "dog/cut.jpg", "eel/notes.png"]


def test_on_error_fail_names_every_bad_file_and_writes_nothing(
    folder: Path, tmp_path: Path
) -> None:
    bad = _add_bad_files(folder)
    out = tmp_path / "prepared"
    with pytest.raises(BadImagesError) as info:
        run_ingest(folder, out, params())
    assert [p for p, _ in info.value.rejected] == bad
    for name in bad:
        assert name in str(info.value)
    assert "on_error: skip" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no temp folder


def test_failed_run_keeps_previous_output(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    run_ingest(folder, out, params())
    before = tree_digest(out)
    _add_bad_files(folder)
    with pytest.raises(BadImagesError):
        run_ingest(folder, out, params())
    assert tree_digest(out) == before


def test_on_error_skip_records_reasons_and_keeps_the_rest(folder: Path, tmp_path: Path) -> None:
    bad = _add_bad_files(folder)
    out = tmp_path / "prepared"
    result = run_ingest(folder, out, params(on_error="skip"))
    rejected = json.loads((out / "rejected.json").read_text())
    assert [r["path"] for r in rejected] == bad
    assert "empty" in rejected[0]["reason"]
    assert result.count == 42
    group = zarr.open_group(out / "images.zarr", mode="r")
    assert sorted(group) == ["crc32c", "images", "label", "path", "split"]
    for i, rel in enumerate(group["path"][:]):
        np.testing.assert_array_equal(group["images"][i], oracle(folder / rel), err_msg=rel)
    # the same store as ingesting only the good files
    for name in bad:
        (folder / name).unlink()
    run_ingest(folder, tmp_path / "clean", params())
    clean = tree_digest(tmp_path / "clean")
    skipped = tree_digest(out)
    assert {k: v for k, v in skipped.items() if k != "rejected.json"} == {
        k: v for k, v in clean.items() if k != "rejected.json"
    }


def test_native_size_requires_equal_sizes(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(BadImagesError, match=r"set ingest\.image_size"):
        run_ingest(folder, tmp_path / "prepared", params(image_size=None))


def test_native_size_keeps_pixels_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    src = tmp_path / "src" / "only"
    src.mkdir(parents=True)
    arrays = [make_photo(rng, 30, 20) for _ in range(5)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(src / f"{i}.png")
    run_ingest(
        tmp_path / "src", tmp_path / "out", params(image_size=None, split={"val": 0, "test": 0})
    )
    images = zarr.open_array(tmp_path / "out" / "images.zarr" / "images", mode="r")
    np.testing.assert_array_equal(images[:], np.stack(arrays))


def test_sixteen_bit_gray_stays_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    src = tmp_path / "src" / "scans"
    src.mkdir(parents=True)
    arrays = [rng.integers(0, 65536, (16, 16), dtype=np.uint16) for _ in range(3)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(src / f"{i}.png")
    run_ingest(
        tmp_path / "src",
        tmp_path / "out",
        params(image_size=None, bit_depth=16, color="gray", split={"val": 0, "test": 0}),
    )
    group = zarr.open_group(tmp_path / "out" / "images.zarr", mode="r")
    assert group["images"].dtype == np.uint16
    assert group.attrs["pixel_max"] == 65535
    np.testing.assert_array_equal(group["images"][:, :, :, 0], np.stack(arrays))


def test_folder_splits(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    layout = {"train": 5, "val": 2, "test": 3}
    for split, n in layout.items():
        for cls in ("a", "b"):
            (tmp_path / "src" / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(make_photo(rng, 30, 30)).save(
                    tmp_path / "src" / split / cls / f"{i}.png"
                )
    result = run_ingest(tmp_path / "src", tmp_path / "out", params(split={"method": "folders"}))
    assert result.per_split == {"train": 10, "val": 4, "test": 6}
    group = zarr.open_group(tmp_path / "out" / "images.zarr", mode="r")
    assert group.attrs["classes"] == ["a", "b"]
    paths = list(group["path"][:])
    assert paths[:10] == sorted(p for p in paths if p.startswith("train/"))


def test_folder_splits_reject_files_outside_split_folders(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="train/, val/ or test/"):
        run_ingest(folder, tmp_path / "out", params(split={"method": "folders"}))


def test_empty_source_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "readme.txt").write_text("no images here")
    with pytest.raises(PipelineError, match="No image files found"):
        run_ingest(tmp_path / "src", tmp_path / "out", params())


def test_leftovers_of_a_killed_run_are_cleaned(folder: Path, tmp_path: Path) -> None:
    leftover = tmp_path / ".prepared.tmp-0123456789ab"  # the exact pattern the tool writes
    (leftover / "images.zarr").mkdir(parents=True)
    run_ingest(folder, tmp_path / "prepared", params())
    assert not leftover.exists()


def test_duplicates_are_reported_and_dropped_on_request(folder: Path, tmp_path: Path) -> None:
    (folder / "eel" / "copy-of-cat-000.jpg").write_bytes((folder / "cat" / "000.jpg").read_bytes())
    run_ingest(folder, tmp_path / "keep", params())
    groups = json.loads((tmp_path / "keep" / "duplicates.json").read_text())
    assert groups == [{"paths": [groups[0]["paths"][0], groups[0]["paths"][1]]}]
    assert sorted(groups[0]["paths"]) == ["cat/000.jpg", "eel/copy-of-cat-000.jpg"]
    kept = zarr.open_group(tmp_path / "keep" / "images.zarr", mode="r")
    assert kept["images"].shape[0] == 43

    result = run_ingest(folder, tmp_path / "drop", params(duplicates="drop"))
    assert result.count == 42
    rejected = json.loads((tmp_path / "drop" / "rejected.json").read_text())
    assert [r["path"] for r in rejected] == [groups[0]["paths"][1]]
    assert "duplicate of" in rejected[0]["reason"]
    group = zarr.open_group(tmp_path / "drop" / "images.zarr", mode="r")
    for i, rel in enumerate(group["path"][:]):
        np.testing.assert_array_equal(group["images"][i], oracle(folder / rel), err_msg=rel)


def test_awkward_file_names_and_special_files(folder: Path, tmp_path: Path) -> None:
    import os

    good = (folder / "cat" / "001.png").read_bytes()
    (folder / "cat" / "caf\u00e9 \u732b.PNG").write_bytes(good)  # non-ASCII, upper-case extension
    os.mkfifo(folder / "dog" / "pipe.png")  # would block a naive reader forever
    raw_name = os.fsencode(folder / "eel") + b"/\xff\xfe.png"  # not valid UTF-8
    with open(raw_name, "wb") as fh:
        fh.write(good)
    result = run_ingest(folder, tmp_path / "out", params(on_error="skip"))
    assert result.count == 44
    rejected = json.loads((tmp_path / "out" / "rejected.json").read_text())
    assert rejected == [{"path": "dog/pipe.png", "reason": rejected[0]["reason"]}]
    assert "not a regular file" in rejected[0]["reason"]
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()
    ]
    names = {r["path"] for r in rows}
    assert "cat/caf\u00e9 \u732b.PNG" in names
    assert os.fsdecode(b"eel/\xff\xfe.png") in names  # exact, as Python spells the raw name
    stored = list(zarr.open_group(tmp_path / "out" / "images.zarr", mode="r")["path"][:])
    assert "eel/\\xff\\xfe.png" in stored


def _manifest(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("bit_depth", [16, 8])
def test_sixteen_bit_colour_tiff_exact_png_rejected(tmp_path: Path, bit_depth: int) -> None:
    rng = np.random.default_rng(11)
    src = tmp_path / "src" / "scans"
    src.mkdir(parents=True)
    rgb = rng.integers(0, 65536, (6, 5, 3), dtype=np.uint16)
    rgba = rng.integers(0, 65536, (6, 5, 4), dtype=np.uint16)
    tifffile.imwrite(src / "a_rgb.tif", rgb, photometric="rgb")
    tifffile.imwrite(src / "b_rgba.tif", rgba, photometric="rgb")
    (src / "c_rgb.png").write_bytes(png16(rgb))
    (src / "d_rgba.png").write_bytes(png16(rgba))
    Image.fromarray(rgb[..., 0]).save(src / "e_gray.png")  # 16-bit gray: unchanged
    p = params(
        image_size=None,
        bit_depth=bit_depth,
        on_error="skip",
        alpha="drop",
        split={"val": 0, "test": 0},
    )
    out = tmp_path / "out"
    run_ingest(tmp_path / "src", out, p)
    rejected = json.loads((out / "rejected.json").read_text())
    assert [r["path"] for r in rejected] == ["scans/c_rgb.png", "scans/d_rgba.png"]
    assert all(r["reason"].startswith("16-bit colour PNG: ") for r in rejected)
    images = zarr.open_array(out / "images.zarr" / "images", mode="r")[:]
    expected = np.stack([rgb, rgba[..., :3], np.repeat(rgb[..., :1], 3, axis=2)])
    if bit_depth == 8:  # round(x * 255 / 65535)
        expected = np.round(expected.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert images.dtype == expected.dtype
    np.testing.assert_array_equal(images, expected)
    rows = _manifest(out)
    assert [(r["mode"], r["bits"]) for r in rows] == [("RGB", 16), ("RGBA", 16), ("I;16", 16)]
    with pytest.raises(BadImagesError, match="16-bit colour PNG"):
        run_ingest(tmp_path / "src", tmp_path / "fail", params(image_size=None, bit_depth=16))


def test_manifest_records_bits_of_every_file(folder: Path, tmp_path: Path) -> None:
    run_ingest(folder, tmp_path / "out", params())
    assert {r["bits"] for r in _manifest(tmp_path / "out")} == {8}


@pytest.mark.parametrize("on_error", ["skip", "fail"])
def test_files_over_max_file_bytes_are_rejected_unread(
    folder: Path, tmp_path: Path, on_error: str
) -> None:
    with open(folder / "cat" / "huge.png", "wb") as fh:
        os.truncate(fh.fileno(), 5_000_000_000)  # sparse: 5 GB that use no disk
    out = tmp_path / "out"
    if on_error == "fail":
        with pytest.raises(BadImagesError, match=r"cat/huge\.png.*5\.0 GB"):
            run_ingest(folder, out, params())
        assert not out.exists()
        return
    result = run_ingest(folder, out, params(on_error="skip"))
    assert result.count == 42
    rejected = json.loads((out / "rejected.json").read_text())
    assert rejected == [{"path": "cat/huge.png", "reason": rejected[0]["reason"]}]
    assert "more than ingest.max_file_bytes (1073741824)" in rejected[0]["reason"]


def test_max_file_bytes_is_a_param_but_not_a_decode_param(folder: Path, tmp_path: Path) -> None:
    small = (folder / "cat" / "000.jpg").stat().st_size
    run_ingest(folder, tmp_path / "out", params(on_error="skip", max_file_bytes=small - 1))
    rejected = json.loads((tmp_path / "out" / "rejected.json").read_text())
    assert "cat/000.jpg" in [r["path"] for r in rejected]
    assert "max_file_bytes" not in params().ingest.decode_dict()
    with pytest.raises(ParamsError, match="max_file_bytes"):
        params(max_file_bytes=0)


def _nfd_copy(src: Path, dst: Path) -> None:
    for path in sorted(src.rglob("*")):
        target = dst / unicodedata.normalize("NFD", path.relative_to(src).as_posix())
        if path.is_dir():
            target.mkdir(parents=True)
        else:
            target.write_bytes(path.read_bytes())


@pytest.mark.parametrize("cached", [False, True], ids=["decoded", "from-cache"])
def test_nfd_named_copy_gives_byte_identical_outputs(
    folder: Path, tmp_path: Path, cached: bool
) -> None:
    os.rename(folder / "cat", folder / "caf\u00e9")
    for i, p in enumerate(sorted((folder / "dog").iterdir())[:6]):
        p.rename(p.with_name(f"\u00e5ngstr\u00f6m-{i}{p.suffix}"))
    nfd = tmp_path / "nfd"
    _nfd_copy(folder, nfd)
    assert (nfd / "cafe\u0301").is_dir()
    assert not (nfd / "caf\u00e9").exists()  # this file system keeps names as given
    run_ingest(folder, tmp_path / "a", params())
    cache = open_cache()
    result = run_ingest(
        nfd, tmp_path / "b", params(), cache=dataclasses.replace(cache, enabled=cached)
    )
    assert result.from_cache == (42 if cached else 0)
    a, b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    assert a == b
    paths = {r["path"] for r in _manifest(tmp_path / "a")}
    assert "dog/\u00e5ngstr\u00f6m-0.jpg" in paths or "dog/\u00e5ngstr\u00f6m-0.png" in paths


@pytest.mark.parametrize("on_error", ["skip", "fail"])
def test_names_differing_only_in_normalization_conflict(
    folder: Path, tmp_path: Path, on_error: str
) -> None:
    good = (folder / "cat" / "001.png").read_bytes()
    nfc_name, nfd_name = "cat/caf\u00e9.png", "cat/cafe\u0301.png"
    (folder / nfc_name).write_bytes(good)
    (folder / nfd_name).write_bytes(good)
    if on_error == "fail":
        with pytest.raises(BadImagesError) as info:
            run_ingest(folder, tmp_path / "out", params())
        assert [p for p, _ in info.value.rejected] == [nfd_name, nfc_name]  # sorted
        return
    result = run_ingest(folder, tmp_path / "out", params(on_error="skip"))
    assert result.count == 42
    rejected = json.loads((tmp_path / "out" / "rejected.json").read_text())
    assert [r["path"] for r in rejected] == [nfd_name, nfc_name]  # sorted: "e" < "\u00e9"
    assert ascii(nfc_name) in rejected[0]["reason"]
    assert ascii(nfd_name) in rejected[1]["reason"]
    assert "Unicode normalization" in rejected[1]["reason"]


def test_symlink_outside_the_source_is_marked(folder: Path, tmp_path: Path) -> None:
    before = (tmp_path / "before", tmp_path / "after")
    run_ingest(folder, before[0], params())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "far.png").write_bytes((folder / "cat" / "001.png").read_bytes())
    (folder / "eel" / "zz-far.png").symlink_to(elsewhere / "far.png")
    run_ingest(folder, before[1], params())
    old = {r["path"]: r for r in _manifest(before[0])}
    new = {r["path"]: r for r in _manifest(before[1])}
    assert new.pop("eel/zz-far.png")["outside_source"] is True
    assert all("outside_source" not in r for r in new.values())
    assert {p: {**r, "index": 0} for p, r in new.items()} == {
        p: {**r, "index": 0} for p, r in old.items()
    }
