"""A cache can only save time: poisoned stores, damaged and hostile cache entries, warm and cold.

The oracle is always a run with the cache switched off (every output file byte for byte) and
numpy float64 over the stored pixels; each case is one a careless or hostile neighbour could
cause, and each failed on the code before the per-image pixel digests.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import mounted_tmpfs
from test_incremental import (
    assert_identical,
    assert_stats_match_numpy,
    flip_byte,
    make_params,
    run_both,
    scratch,
    write_version_1,
)

from pipeline.cache.entries import Cache, Entry, open_cache, read_entry, write_entry
from pipeline.cache.packs import load_index
from pipeline.core.errors import StoreError
from pipeline.ingest.stage import run_ingest
from pipeline.normalize.stage import run_normalize
from pipeline.stats.stage import run_stats
from pipeline.tools.verify import verify_store

PARAMS = make_params()


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    write_version_1(root)
    return root


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(root=tmp_path / "cache", limit=10**9)


def first_shard(prepared: Path) -> Path:
    return prepared / "images.zarr" / "images" / "c" / "0" / "0" / "0" / "0"


# --- 1. the poisoning of the issue: a shard written in place, then a clean re-ingest -----------


def test_a_fit_of_pixels_edited_in_place_is_refused_and_never_reused(
    src: Path, cache: Cache, tmp_path: Path
) -> None:
    run_ingest(src, tmp_path / "one" / "prepared", PARAMS, cache=cache)
    flip_byte(first_shard(tmp_path / "one" / "prepared"), 5)  # the store (and its pack) edited
    with pytest.raises(StoreError, match=r"do not match the digests ingest recorded"):
        run_stats(
            tmp_path / "one" / "prepared" / "images.zarr",
            tmp_path / "one" / "stats",
            PARAMS,
            cache=cache,
        )
    # A new ingest of the same folder decodes the damaged image again (its pack fails its
    # CRC-32C); stats on it must equal a run without any cache.
    warm = run_both(src, tmp_path / "two", PARAMS, cache)
    assert warm.stats.reused is None  # nothing trustworthy was kept from the refused fit
    cold = scratch(src, tmp_path / "cold", PARAMS)
    assert_identical(warm, cold)
    assert_stats_match_numpy(warm)


def test_a_cached_fit_is_tied_to_the_pixel_digests(src: Path, cache: Cache, tmp_path: Path) -> None:
    """A kept fit names each image by (file sha256, pixel digest): the same files decoded to
    other pixels (here: a store whose digests were rewritten to match edited pixels, as a
    forger would) is a miss, not a reuse."""
    first = run_both(src, tmp_path / "one", PARAMS, cache)
    assert first.stats.reused is None
    again = run_both(src, tmp_path / "two", PARAMS, cache)
    assert again.stats.reused is not None  # premise: the same data reuses the fit
    group = zarr.open_group(tmp_path / "two" / "prepared" / "images.zarr", mode="r+")
    digests = np.asarray(group["crc32c"][...])
    digests[0] ^= 1
    group["crc32c"][...] = digests
    with pytest.raises(StoreError, match="fingerprint"):  # the fingerprint covers the digests
        run_stats(
            tmp_path / "two" / "prepared" / "images.zarr",
            tmp_path / "two" / "s2",
            PARAMS,
            cache=cache,
        )


# --- 2. the corrupt-store rows of README's table, with a warm and a cold cache ------------------


def _missing(prepared: Path) -> None:
    first_shard(prepared).unlink()


def _truncated(prepared: Path) -> None:
    shard = first_shard(prepared)
    shard.write_bytes(shard.read_bytes()[:-7])


def _edited_in_place(prepared: Path) -> None:
    flip_byte(first_shard(prepared), 3)


def _wrong_dtype(prepared: Path) -> None:
    meta = prepared / "images.zarr" / "images" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["data_type"] = "int8"
    meta.write_text(json.dumps(doc))


def _edited_attributes(prepared: Path) -> None:
    meta = prepared / "images.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["classes"] = ["x", "y"]
    doc["attributes"]["fingerprint"] = "0" * 64
    meta.write_text(json.dumps(doc))


def _wrong_types(prepared: Path) -> None:
    meta = prepared / "images.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["splits"] = {"train": "all of them"}
    meta.write_text(json.dumps(doc))


DAMAGE = {
    "missing-shard": (_missing, "missing or empty"),
    "truncated-shard": (_truncated, "truncated"),
    "edited-in-place": (_edited_in_place, "do not match the digests"),
    "wrong-dtype": (_wrong_dtype, "int8"),
    "edited-attributes": (_edited_attributes, "fingerprint"),
    "wrongly-typed-attributes": (_wrong_types, "splits"),
}


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_corrupt_store_stops_stats_warm_and_cold(
    src: Path, cache: Cache, tmp_path: Path, case: str, warm: bool
) -> None:
    damage, message = DAMAGE[case]
    use = cache if warm else Cache(root=tmp_path / "off", limit=0, enabled=False)
    if warm:
        run_both(src, tmp_path / "earlier", PARAMS, cache)  # leaves packs and a fit to reuse
    prepared = tmp_path / "now" / "prepared"
    run_ingest(src, prepared, PARAMS, cache=use)
    damage(prepared)
    stats = tmp_path / "now" / "stats"
    if case == "edited-in-place" and warm:
        # A reused fit reads no pixels: it is the fit of the pixels ingest recorded, exactly what
        # a clean rebuild gives; normalize, which reads them all, then refuses the store.
        run_stats(prepared / "images.zarr", stats, PARAMS, cache=use)
        clean = scratch(src, tmp_path / "clean", PARAMS)
        assert (stats / "stats.json").read_bytes() == (
            clean.out / "stats" / "stats.json"
        ).read_bytes()
        with pytest.raises(StoreError, match=message):
            run_normalize(prepared, stats, tmp_path / "now" / "normalized", PARAMS)
        return
    with pytest.raises(StoreError, match=message):
        run_stats(prepared / "images.zarr", stats, PARAMS, cache=use)
    assert not stats.exists()  # nothing published


def test_normalize_and_verify_catch_a_store_edited_in_place(src: Path, tmp_path: Path) -> None:
    built = scratch(src, tmp_path / "b", PARAMS)
    prepared = built.out / "prepared"
    run_normalize(prepared, built.out / "stats", built.out / "normalized", PARAMS)
    assert verify_store(built.out / "normalized").ok  # premise
    flip_byte(first_shard(prepared), 3)
    report = verify_store(built.out / "normalized")
    assert not report.ok
    assert any("no longer match the digests" in p for p in report.problems)
    assert 0 in report.mismatched
    with pytest.raises(StoreError, match="do not match the digests"):
        run_normalize(prepared, built.out / "stats", built.out / "again", PARAMS)


def test_verify_redecodes_sources_and_finds_a_poisoned_pack(
    src: Path, cache: Cache, tmp_path: Path
) -> None:
    """A pack whose pixels and index were both rewritten consistently passes every CRC; only a
    fresh decode of the source files shows the difference."""
    run_ingest(src, tmp_path / "one" / "prepared", PARAMS, cache=cache)
    config = json.loads((tmp_path / "one" / "prepared" / "images.zarr" / "zarr.json").read_text())[
        "attributes"
    ]["decode_config"]
    index = load_index(cache, config)
    victim = min(index.values(), key=lambda p: (p.pack, p.offset))
    pack = Path(victim.pack)
    data = bytearray(pack.read_bytes())
    data[victim.offset] ^= 0xFF
    os.unlink(pack)  # a new file: the first store keeps its own bytes
    pack.write_bytes(bytes(data))
    from pipeline.core.digests import image_digest

    pixels = np.frombuffer(bytes(data[victim.offset : victim.offset + victim.nbytes]), np.uint8)
    index_file = pack.with_suffix(".json")
    entry = read_entry(index_file)
    assert entry is not None
    rows = [
        [k, r, image_digest(pixels) if r * victim.nbytes == victim.offset else c, rec]
        for k, r, c, rec in entry.header["entries"]
    ]
    write_entry(index_file, Entry(header={**entry.header, "entries": rows}, arrays={}))
    run_ingest(src, tmp_path / "two" / "prepared", PARAMS, cache=cache)
    clean = verify_store(tmp_path / "two" / "prepared")
    assert clean.ok  # consistent digests: the poisoned pixels pass every check but one
    report = verify_store(tmp_path / "two" / "prepared", source=src, decode=10**6)
    assert not report.ok
    assert report.mismatched
    assert any("fresh decode" in p for p in report.problems)
    honest = verify_store(tmp_path / "one" / "prepared", source=src, decode=10**6)
    assert honest.ok, honest.problems
    assert honest.decoded == len(list(src.rglob("*.*")))


# --- 3. the cache folder as untrusted data -------------------------------------------------------


def test_a_symlinked_moments_folder_never_makes_trim_delete_elsewhere(
    src: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "precious"
    (elsewhere / "ab").mkdir(parents=True)
    keep = elsewhere / "ab" / "keep.txt"
    keep.write_text("mine")
    cache = Cache(root=tmp_path / "cache", limit=0)  # trim removes everything it may
    (cache.root).mkdir()
    os.symlink(elsewhere, cache.root / "moments")
    run_both(src, tmp_path / "out", PARAMS, cache)
    cache.trim()
    cache.clear()
    assert keep.read_text() == "mine"
    assert (elsewhere / "ab").is_dir()


def test_a_symlinked_packs_folder_keeps_its_json_files(src: Path, tmp_path: Path) -> None:
    cache = Cache(root=tmp_path / "cache", limit=10**9)
    run_both(src, tmp_path / "one", PARAMS, cache)
    packs = cache.root / "packs"
    config_dir = next(packs.iterdir())
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(config_dir, elsewhere)
    shutil.rmtree(config_dir)
    os.symlink(elsewhere, config_dir)
    before = sorted(p.name for p in elsewhere.iterdir())
    warm = run_both(src, tmp_path / "two", PARAMS, cache)
    assert warm.ingest.from_cache == 0  # not followed
    assert sorted(p.name for p in elsewhere.iterdir()) == before
    assert_identical(warm, scratch(src, tmp_path / "cold", PARAMS))


def test_an_index_that_is_a_symlink_to_dev_zero_is_a_miss(src: Path, tmp_path: Path) -> None:
    cache = Cache(root=tmp_path / "cache", limit=10**9)
    run_both(src, tmp_path / "one", PARAMS, cache)
    index = sorted((cache.root / "packs").rglob("*.json"))[0]
    index.unlink()
    os.symlink("/dev/zero", index)
    fifo = index.with_name("fifo.json")
    os.mkfifo(fifo)  # never opened for reading: it would block
    warm = run_both(src, tmp_path / "two", PARAMS, cache)
    assert_identical(warm, scratch(src, tmp_path / "cold", PARAMS))


def test_crc_valid_entries_with_wrong_types_are_misses(src: Path, tmp_path: Path) -> None:
    cache = Cache(root=tmp_path / "cache", limit=10**9)
    run_both(src, tmp_path / "one", PARAMS, cache)
    for path in sorted(p for p in cache.root.rglob("*") if p.is_file() and p.suffix != ".pack"):
        entry = read_entry(path)
        assert entry is not None
        bad = {key: "not what it should be" for key in entry.header}
        write_entry(path, Entry(header=bad, arrays={"x": np.zeros(3, np.int64)}))
    warm = run_both(src, tmp_path / "two", PARAMS, cache)
    assert warm.stats.reused is None
    assert warm.ingest.from_cache == 0
    assert_identical(warm, scratch(src, tmp_path / "cold", PARAMS))


def test_cache_folder_is_created_private(tmp_path: Path) -> None:
    cache = open_cache(tmp_path / "new" / "cache")
    assert stat.S_IMODE(cache.root.stat().st_mode) == 0o700


def test_a_cache_others_can_write_is_refused_in_one_line(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    env = {**os.environ, "PIPELINE_CACHE_DIR": str(shared)}
    (tmp_path / "params.yaml").write_text("ingest: {image_size: [20, 24]}\n")
    cmd = [sys.executable, "-m", "pipeline", "ingest", str(src), str(tmp_path / "prepared")]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "writable by others" in lines[0]
    assert "PIPELINE_CACHE_SHARED=1" in lines[0]
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "prepared").exists()
    env["PIPELINE_CACHE_SHARED"] = "1"
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 64 kB tmpfs: big enough for the cache's first entries, too small for its packs."""
    (tmp_path / "tiny").mkdir()
    with mounted_tmpfs(tmp_path / "tiny", "64k") as mnt:
        yield mnt


def test_a_full_cache_disk_costs_only_time_and_leaves_no_temporary_files(
    src: Path, tiny_disk: Path, tmp_path: Path
) -> None:
    cache = Cache(root=tiny_disk / "cache", limit=10**9)  # another device: packs are written
    warm = run_both(src, tmp_path / "out", PARAMS, cache)
    assert_identical(warm, scratch(src, tmp_path / "cold", PARAMS))
    left = [p for p in tiny_disk.rglob("*") if ".tmp-" in p.name]
    assert not left, left
    packs = list((tiny_disk / "cache" / "packs").rglob("*.pack"))
    assert 0 < len(packs) < 12, "premise: the disk filled up part way (12 shards)"
