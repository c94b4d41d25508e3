"""Reuse across data versions: ingest and stats with a warm cache give the bytes of a rebuild.

Every scenario builds a new data version twice: with the cache the previous version left, and
from scratch with the cache switched off. The two output trees must be identical file for
file, and the counts of reused work prove the reuse happened. The statistics of the reused
fit are also checked against numpy float64 over the prepared store (an independent oracle).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from PIL import Image

from pipeline.cache.entries import Cache
from pipeline.ingest.stage import IngestResult, run_ingest
from pipeline.params import Params, parse_params
from pipeline.stats.document import load_stats
from pipeline.stats.stage import StatsRun, run_stats

SIZE = [20, 24]


def photo(seed: int, h: int, w: int, gray16: bool = False) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    if gray16:
        a = (yy * 900 + xx * 700 + rng.integers(0, 9000, (h, w))).astype(np.uint16)
        return Image.fromarray(a)
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], axis=-1)
    a = np.clip(base + rng.normal(0, 8, (h, w, 3)) + rng.integers(0, 60), 0, 255)
    return Image.fromarray(a.astype(np.uint8))


def write(root: Path, rel: str, seed: int, gray16: bool = False) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = 20 + seed % 17, 24 + seed % 23
    im = photo(seed, h, w, gray16)
    if path.suffix == ".jpg":
        im.save(path, quality=90)
    else:
        im.save(path)


def write_version_1(root: Path, gray16: bool = False) -> None:
    for i in range(48):
        ext = ".png" if gray16 or i % 3 == 0 else ".jpg"
        write(root, f"{'abc'[i % 3]}/{i:03d}{ext}", seed=i, gray16=gray16)


def grow(root: Path, gray16: bool = False) -> dict[str, int]:
    """Version 2: 8 files added (one a copy of a kept file), 5 removed, 3 changed in place."""
    for i in range(100, 107):
        write(root, f"{'abc'[i % 3]}/{i:03d}.png", seed=i, gray16=gray16)
    shutil.copy(root / "a/003.png", root / "b/copy_of_003.png")
    for i in (1, 4, 7, 10, 13):
        next(root.glob(f"*/{i:03d}.*")).unlink()
    for i in (2, 5, 8):
        path = next(root.glob(f"*/{i:03d}.*"))
        write(root, str(path.relative_to(root)), seed=1000 + i, gray16=gray16)
    return {"new_files": 8, "removed": 5, "changed": 3}


def make_params(**ingest: Any) -> Params:
    base = ingest.pop("base", {"scheduler": "threads", "workers": 2})
    stats = ingest.pop("stats", {})
    settings = {"image_size": SIZE, "chunk_images": 2, "shard_images": 4, **ingest}
    return parse_params({"base": base, "ingest": settings, "stats": {"block_images": 4, **stats}})


@dataclass(frozen=True)
class Built:
    out: Path
    ingest: IngestResult
    stats: StatsRun

    def tree(self) -> dict[str, str]:
        return {
            p.relative_to(self.out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(self.out.rglob("*"))
            if p.is_file()
        }


def run_both(src: Path, out: Path, params: Params, cache: Cache) -> Built:
    ingested = run_ingest(src, out / "prepared", params, cache=cache)
    fitted = run_stats(out / "prepared" / "images.zarr", out / "stats", params, cache=cache)
    return Built(out, ingested, fitted)


def scratch(src: Path, out: Path, params: Params) -> Built:
    """The oracle run: no cache at all."""
    return run_both(src, out, params, Cache(root=out / "unused", limit=0, enabled=False))


def assert_identical(a: Built, b: Built) -> None:
    ta, tb = a.tree(), b.tree()
    assert ta.keys() == tb.keys()
    differing = sorted(k for k in ta if ta[k] != tb[k])
    assert not differing, f"{len(differing)} file(s) differ: {differing[:5]}"


def assert_stats_match_numpy(built: Built) -> None:
    """stats.json against numpy float64 over the prepared store's fit split."""
    group = zarr.open_group(built.out / "prepared" / "images.zarr", mode="r")
    start, stop = group.attrs["splits"]["train"]
    x = np.asarray(group["images"][start:stop]).astype(np.float64)
    stats = load_stats(built.out / "stats")
    np.testing.assert_allclose(stats.mean, x.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(stats.std, x.std(axis=(0, 1, 2)), rtol=1e-10)
    np.testing.assert_allclose(stats.mean_image, x.mean(axis=0), rtol=1e-12)
    assert stats.count == stop - start


def entry_files(cache: Cache, kind: str) -> list[Path]:
    return sorted(e for e in (cache.root / kind).rglob("*") if e.is_file())


def flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    write_version_1(root)
    return root


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(root=tmp_path / "cache", limit=10**9)


def test_grown_version_reuses_work_and_equals_a_rebuild(
    src: Path, cache: Cache, tmp_path: Path
) -> None:
    p = make_params()
    first = run_both(src, tmp_path / "v1", p, cache)
    assert first.ingest.from_cache == 0
    assert first.stats.reused is None
    grow(src)
    second = run_both(src, tmp_path / "v2", p, cache)
    oracle = scratch(src, tmp_path / "v2-scratch", p)
    assert_identical(second, oracle)
    assert_stats_match_numpy(second)
    # 48 - 5 removed - 3 changed = 40 unchanged files, plus the copy of an unchanged file.
    assert second.ingest.from_cache == 41
    assert second.ingest.count == 48 + 8 - 5
    reused = second.stats.reused
    assert reused is not None
    assert 0 < reused.added <= 10
    assert 0 < reused.removed <= 8
    assert reused.added + reused.removed < second.stats.document["count"]["images"]


def test_unchanged_version_reuses_everything(src: Path, cache: Cache, tmp_path: Path) -> None:
    p = make_params()
    first = run_both(src, tmp_path / "v1", p, cache)
    again = run_both(src, tmp_path / "again", p, cache)
    assert_identical(first, again)
    assert again.ingest.from_cache == 48
    assert again.stats.reused is not None
    assert (again.stats.reused.added, again.stats.reused.removed) == (0, 0)


def test_shrunk_version_subtracts_exactly(src: Path, cache: Cache, tmp_path: Path) -> None:
    p = make_params()
    run_both(src, tmp_path / "v1", p, cache)
    for path in sorted(src.rglob("*.jpg"))[:9]:
        path.unlink()
    second = run_both(src, tmp_path / "v2", p, cache)
    assert_identical(second, scratch(src, tmp_path / "oracle", p))
    assert second.stats.reused is not None
    assert second.stats.reused.added == 0
    assert second.stats.reused.removed > 0
    assert_stats_match_numpy(second)


@pytest.mark.parametrize(
    "change",
    [
        {"resample": "nearest"},
        {"color": "gray"},
        {"image_size": [16, 16]},
        {"alpha": "drop"},
        {"bit_depth": 16},
    ],
    ids=lambda c: next(iter(c)),
)
def test_changed_decode_param_invalidates_the_reuse(
    src: Path, cache: Cache, tmp_path: Path, change: dict[str, Any]
) -> None:
    run_both(src, tmp_path / "v1", make_params(), cache)
    p = make_params(**change)
    second = run_both(src, tmp_path / "v2", p, cache)
    assert second.ingest.from_cache == 0
    assert second.stats.reused is None
    assert_identical(second, scratch(src, tmp_path / "oracle", p))


@pytest.mark.parametrize(
    "change",
    [
        {"split": {"method": "hash", "val": 0.3, "test": 0.2}},
        {"chunk_images": 4, "shard_images": 8},
        {"codec": "zstd"},
    ],
    ids=["split", "layout", "codec"],
)
def test_params_that_do_not_change_pixels_keep_the_reuse(
    src: Path, cache: Cache, tmp_path: Path, change: dict[str, Any]
) -> None:
    run_both(src, tmp_path / "v1", make_params(), cache)
    p = make_params(**change)
    second = run_both(src, tmp_path / "v2", p, cache)
    assert second.ingest.from_cache == 48
    assert second.stats.reused is not None
    assert_identical(second, scratch(src, tmp_path / "oracle", p))


def packs(cache: Cache) -> list[Path]:
    return sorted(cache.root.glob("packs/*/*.pack"))


def test_damaged_packs_are_decoded_again_not_trusted(
    src: Path, cache: Cache, tmp_path: Path
) -> None:
    p = make_params()
    run_both(src, tmp_path / "v1", p, cache)
    kept = packs(cache)
    assert len(kept) == 12  # one per shard of 4
    for pack in kept[:6]:
        flip_byte(pack, 0)  # the first byte of the shard's first image
    second = run_both(src, tmp_path / "v2", p, cache)
    assert second.ingest.from_cache == 42
    assert_identical(second, scratch(src, tmp_path / "oracle", p))
    third = run_both(src, tmp_path / "v3", p, cache)  # the six are in the new packs
    assert third.ingest.from_cache == 48
    assert len(packs(cache)) == 12  # v3's: each run removes the packs its own supersede
    assert not set(kept) & set(packs(cache))


def test_cut_or_missing_packs_and_damaged_indices_are_misses(
    src: Path, cache: Cache, tmp_path: Path
) -> None:
    p = make_params()
    run_both(src, tmp_path / "v1", p, cache)
    cut, gone, bad_index = packs(cache)[:3]
    with open(cut, "r+b") as f:
        f.truncate(0)
    gone.unlink()
    flip_byte(bad_index.with_suffix(".json"), -3)
    second = run_both(src, tmp_path / "v2", p, cache)
    assert second.ingest.from_cache == 48 - 3 * 4
    assert_identical(second, scratch(src, tmp_path / "oracle", p))


def manifest_sha(out: Path, rel: str) -> str:
    rows = [json.loads(x) for x in (out / "prepared" / "manifest.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if r["path"] == rel]
    return str(row["sha256"])


def test_files_whose_identity_is_unchanged_are_not_read_again(
    src: Path, cache: Cache, tmp_path: Path
) -> None:
    """Like DVC and git: same inode, size and mtime means the same bytes, so the file is not
    even opened. Shown by changing a file behind that check's back (same size, mtime put back):
    the run keeps the remembered hash and pixels. An ordinary edit (new mtime) is seen."""
    past = 1_600_000_000 * 10**9
    for path in src.rglob("*.*"):
        os.utime(path, ns=(past, past))  # not "racily" new: remembered by the first run
    p = make_params()
    first = run_both(src, tmp_path / "v1", p, cache)
    sneaky, edited = src / "a/003.png", src / "b/004.jpg"
    old_sha = manifest_sha(first.out, "a/003.png")
    flip_byte(sneaky, sneaky.stat().st_size // 2)
    os.utime(sneaky, ns=(past, past))
    write(src, "b/004.jpg", seed=999)
    second = run_both(src, tmp_path / "v2", p, cache)
    assert second.ingest.from_cache == 47  # all but the edited file
    assert manifest_sha(second.out, "a/003.png") == old_sha  # the changed bytes were not read
    assert manifest_sha(second.out, "b/004.jpg") == hashlib.sha256(edited.read_bytes()).hexdigest()


def test_corrupted_moments_entry_means_a_full_fit(src: Path, cache: Cache, tmp_path: Path) -> None:
    p = make_params()
    run_both(src, tmp_path / "v1", p, cache)
    (entry,) = entry_files(cache, "moments")
    flip_byte(entry, entry.stat().st_size // 2)
    grow(src)
    second = run_both(src, tmp_path / "v2", p, cache)
    assert second.stats.reused is None
    assert_identical(second, scratch(src, tmp_path / "oracle", p))


def test_removed_images_without_cached_pixels_mean_a_full_fit(
    src: Path, cache: Cache, tmp_path: Path
) -> None:
    p = make_params()
    run_both(src, tmp_path / "v1", p, cache)
    shutil.rmtree(cache.root / "packs")
    for path in sorted(src.rglob("*.png"))[:3]:
        path.unlink()
    second = run_both(src, tmp_path / "v2", p, cache)
    assert second.ingest.from_cache == 0
    assert second.stats.reused is None
    assert_identical(second, scratch(src, tmp_path / "oracle", p))


def test_only_added_images_read_from_the_store(src: Path, cache: Cache, tmp_path: Path) -> None:
    """No removed images, packs gone: the added ones come from the prepared store."""
    p = make_params()
    run_both(src, tmp_path / "v1", p, cache)
    for i in range(200, 206):
        write(src, f"c/{i}.png", seed=i)
    shutil.rmtree(cache.root / "packs")
    second = run_both(src, tmp_path / "v2", p, cache)
    assert second.stats.reused is not None
    assert second.stats.reused.added > 0
    assert_identical(second, scratch(src, tmp_path / "oracle", p))


@pytest.mark.parametrize(
    "base",
    [{"scheduler": "processes", "workers": 2}, {"scheduler": "synchronous"}],
    ids=["processes", "synchronous"],
)
def test_reuse_is_the_same_on_every_scheduler(
    src: Path, cache: Cache, tmp_path: Path, base: dict[str, Any]
) -> None:
    p = make_params(base=base)
    run_both(src, tmp_path / "v1", p, cache)
    grow(src)
    second = run_both(src, tmp_path / "v2", p, cache)
    assert second.ingest.from_cache == 41
    assert second.stats.reused is not None
    assert_identical(second, scratch(src, tmp_path / "oracle", make_params()))


def test_sixteen_bit_gray(tmp_path: Path, cache: Cache) -> None:
    src = tmp_path / "src"
    write_version_1(src, gray16=True)
    p = make_params(bit_depth=16, color="gray")
    run_both(src, tmp_path / "v1", p, cache)
    grow(src, gray16=True)
    second = run_both(src, tmp_path / "v2", p, cache)
    assert second.stats.reused is not None
    assert_identical(second, scratch(src, tmp_path / "oracle", p))
    assert_stats_match_numpy(second)


def test_non_train_fit_reuses_too(src: Path, cache: Cache, tmp_path: Path) -> None:
    p = make_params(stats={"fit_split": "all", "allow_non_train_fit": True})
    run_both(src, tmp_path / "v1", p, cache)
    grow(src)
    second = run_both(src, tmp_path / "v2", p, cache)
    assert second.stats.reused is not None
    assert_identical(second, scratch(src, tmp_path / "oracle", p))


def test_a_tiny_limit_keeps_the_cache_small_and_the_output_right(src: Path, tmp_path: Path) -> None:
    small = Cache(root=tmp_path / "cache", limit=20_000)
    p = make_params()
    run_both(src, tmp_path / "v1", p, small)
    assert sum(small.info().bytes.values()) <= 20_000
    grow(src)
    second = run_both(src, tmp_path / "v2", p, small)
    assert_identical(second, scratch(src, tmp_path / "oracle", p))
