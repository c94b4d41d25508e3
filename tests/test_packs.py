"""Packs of decoded images in the cache: hard links of shards, CRC-checked reads, supersession."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr

from pipeline.cache.entries import Cache
from pipeline.cache.packs import (
    add_pack,
    drop_superseded,
    load_index,
    mark_used,
    read_packed,
)
from pipeline.zarrstore.shardwrite import write_shard
from pipeline.zarrstore.store import create_images_array

CONFIG = "c0" * 32


def images(seed: int, n: int = 5, dtype: str = "uint8") -> np.ndarray:
    top = 255 if dtype == "uint8" else 65535
    return np.random.default_rng(seed).integers(0, top + 1, (n, 6, 7, 3)).astype(dtype)


def entries(block: np.ndarray, tag: str, rows: range | None = None) -> list:
    rows = range(len(block)) if rows is None else rows
    return [
        (r, f"{tag}-{r}", google_crc32c.value(block[r].tobytes()), {"sha256": f"{tag}{r}"})
        for r in rows
    ]


def shard_of(tmp_path: Path, block: np.ndarray) -> Path:
    """Write ``block`` as the one shard of an uncompressed store; return the shard file."""
    group = zarr.open_group(tmp_path / "s.zarr", mode="w")
    array = create_images_array(
        group,
        "images",
        shape=block.shape,
        dtype=str(block.dtype),
        chunk_images=2,
        shard_images=6,  # a partial shard: padded, with the index at its end
    )
    written = write_shard(array, tmp_path / "s.zarr" / "images", 0, block)
    assert written is not None
    return written


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(root=tmp_path / "cache", limit=10**9)


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_a_shard_file_becomes_a_pack_by_hard_link(cache: Cache, tmp_path: Path, dtype: str) -> None:
    block = images(1, dtype=dtype)
    shard = shard_of(tmp_path, block)
    add_pack(cache, CONFIG, block, entries(block, "a"), shard_file=shard)
    index = load_index(cache, CONFIG)
    assert sorted(index) == [f"a-{r}" for r in range(5)]
    assert os.stat(index["a-0"].pack).st_ino == shard.stat().st_ino  # no copy was written
    for r in range(5):
        out = np.zeros_like(block[0])
        assert read_packed(index[f"a-{r}"], out)
        np.testing.assert_array_equal(out, block[r])
        assert index[f"a-{r}"].record == {"sha256": f"a{r}"}


def test_without_a_shard_file_the_pack_is_written(cache: Cache) -> None:
    block = images(2)
    add_pack(cache, CONFIG, block, entries(block, "b", range(1, 4)))
    index = load_index(cache, CONFIG)
    assert sorted(index) == ["b-1", "b-2", "b-3"]  # only the rows listed
    (pack,) = {w.pack for w in index.values()}
    assert Path(pack).read_bytes() == block.tobytes()
    out = np.zeros_like(block[0])
    assert read_packed(index["b-2"], out)
    np.testing.assert_array_equal(out, block[2])


def test_a_cache_on_another_file_system_gets_a_written_pack(tmp_path: Path) -> None:
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a second file system (/dev/shm) to make a hard link fail")
    cache = Cache(root=other / f"pipeline-test-{os.getpid()}-{tmp_path.name}", limit=10**9)
    try:
        block = images(3)
        shard = shard_of(tmp_path, block)
        add_pack(cache, CONFIG, block, entries(block, "c"), shard_file=shard)
        where = load_index(cache, CONFIG)["c-4"]
        assert os.stat(where.pack).st_ino != shard.stat().st_ino
        out = np.zeros_like(block[0])
        assert read_packed(where, out)
        np.testing.assert_array_equal(out, block[4])
    finally:
        shutil.rmtree(cache.root, ignore_errors=True)


def test_reads_that_fail_their_check_are_misses(cache: Cache, tmp_path: Path) -> None:
    block = images(4)
    shard = shard_of(tmp_path, block)
    add_pack(cache, CONFIG, block, entries(block, "d"), shard_file=shard)
    index = load_index(cache, CONFIG)
    out = np.zeros_like(block[0])
    assert not read_packed(index["d-0"], np.zeros((6, 7, 4), np.uint8))  # another size
    with open(shard, "r+b") as f:  # the store's file changed in place: the pack is the same file
        f.seek(index["d-1"].offset + 5)
        f.write(bytes([block[1].reshape(-1)[5] ^ 1]))
    assert not read_packed(index["d-1"], out)
    assert read_packed(index["d-2"], out)
    os.truncate(shard, index["d-3"].offset + 10)
    assert not read_packed(index["d-3"], out)
    Path(index["d-0"].pack).unlink()
    assert not read_packed(index["d-2"], out)


def test_newest_pack_wins_and_fully_superseded_packs_are_removed(cache: Cache) -> None:
    old, newer = images(5), images(6)
    add_pack(cache, CONFIG, old, entries(old, "e"))  # e-0 .. e-4
    add_pack(cache, CONFIG, old, entries(old, "f"))  # f-0 .. f-4
    add_pack(cache, CONFIG, newer, entries(newer, "e"))  # all of the first pack again
    add_pack(cache, CONFIG, newer, entries(newer, "f", range(2)))  # part of the second
    index = load_index(cache, CONFIG)
    out = np.zeros_like(old[0])
    assert read_packed(index["e-3"], out)
    np.testing.assert_array_equal(out, newer[3])
    assert read_packed(index["f-1"], out)
    np.testing.assert_array_equal(out, newer[1])
    assert read_packed(index["f-4"], out)
    np.testing.assert_array_equal(out, old[4])
    assert len(list((cache.root / "packs").rglob("*.pack"))) == 3  # the first one is gone
    assert len(list((cache.root / "packs").rglob("*.json"))) == 3


def test_drop_superseded_removes_packs_whose_images_were_all_written_again(cache: Cache) -> None:
    block = images(12)
    add_pack(cache, CONFIG, block, entries(block, "k"))  # k-0 .. k-4
    add_pack(cache, CONFIG, block, entries(block, "m"))  # m-0 .. m-4
    before = load_index(cache, CONFIG)
    drop_superseded(before, {f"k-{r}" for r in range(5)} | {"m-0", "m-1"})
    left = {p.name for p in (cache.root / "packs").rglob("*") if p.is_file()}
    assert left == {
        Path(before["m-0"].pack).name,
        Path(before["m-0"].pack).with_suffix(".json").name,
    }
    assert sorted(load_index(cache, CONFIG)) == [f"m-{r}" for r in range(5)]


def test_other_configurations_are_not_seen(cache: Cache) -> None:
    block = images(7)
    add_pack(cache, CONFIG, block, entries(block, "g"))
    assert load_index(cache, "ff" * 32) == {}
    assert load_index(Cache(root=cache.root, limit=0, enabled=False), CONFIG) == {}


def test_a_damaged_index_hides_its_pack(cache: Cache) -> None:
    block = images(8)
    add_pack(cache, CONFIG, block, entries(block, "h"))
    (index_file,) = (cache.root / "packs").rglob("*.json")
    data = bytearray(index_file.read_bytes())
    data[-5] ^= 0x20
    index_file.write_bytes(bytes(data))
    assert load_index(cache, CONFIG) == {}


def test_trim_removes_a_pack_with_its_index_aged_by_the_index(cache: Cache) -> None:
    first, second = images(9, n=40), images(10, n=40)
    add_pack(cache, CONFIG, first, entries(first, "i"))
    add_pack(cache, CONFIG, second, entries(second, "j"))
    index = load_index(cache, CONFIG)
    older, newer = sorted((cache.root / "packs").rglob("*.json"))
    os.utime(newer, ns=(10**18, 10**18))  # long unused
    mark_used([index["i-0"]])  # the first pack is used now
    pack_bytes = first.nbytes
    small = Cache(root=cache.root, limit=pack_bytes + 2000)  # room for one pack
    small.trim()
    left = sorted(p.name for p in (cache.root / "packs").rglob("*") if p.is_file())
    assert left == sorted([older.name, older.with_suffix(".pack").name])
    assert sorted(load_index(cache, CONFIG)) == sorted(f"i-{r}" for r in range(40))
