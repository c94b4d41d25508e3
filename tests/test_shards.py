"""write_shard against zarr's own writer: the same files, byte for byte, and zarr reads them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.zarrstore.shardwrite import write_shard
from pipeline.zarrstore.store import create_images_array


def files(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def make(
    path: Path,
    n: int,
    hw: tuple[int, int, int],
    dtype: str,
    chunk: int,
    shard: int,
    codec: str = "none",
) -> zarr.Array:
    group = zarr.open_group(path, mode="w")
    return create_images_array(
        group,
        "images",
        shape=(n, *hw),
        dtype=dtype,
        chunk_images=chunk,
        shard_images=shard,
        codec=codec,
    )


CASES = {
    "uint8 full shards": (16, (3, 2, 3), "uint8", 4, 8),
    "uint8 last shard partial chunk": (21, (3, 2, 3), "uint8", 4, 8),
    "uint8 last shard one chunk": (17, (3, 2, 3), "uint8", 4, 8),
    "uint8 one image": (1, (5, 7, 1), "uint8", 2, 4),
    "uint8 chunk = shard": (10, (4, 4, 3), "uint8", 4, 4),
    "uint8 one chunk per image": (9, (4, 4, 3), "uint8", 1, 4),
    "uint16 gray": (13, (6, 5, 1), "uint16", 2, 6),
    "float32": (11, (3, 3, 3), "float32", 2, 4),
    "float16": (7, (2, 3, 3), "float16", 2, 4),
    "rgba": (9, (2, 2, 4), "uint8", 3, 9),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_files_as_zarr(case: str, tmp_path: Path) -> None:
    n, hw, dtype, chunk, shard = CASES[case]
    rng = np.random.default_rng(len(case))
    if dtype.startswith("float"):
        data = rng.normal(0, 3, (n, *hw)).astype(dtype)
    else:
        data = rng.integers(0, np.iinfo(dtype).max, (n, *hw), endpoint=True).astype(dtype)
    data[0] = 0  # an all-fill image is still written (write_empty_chunks)
    theirs = make(tmp_path / "zarr", n, hw, dtype, chunk, shard)
    ours = make(tmp_path / "ours", n, hw, dtype, chunk, shard)
    for a in range(0, n, shard):
        theirs[a : a + shard] = data[a : a + shard]
        write_shard(ours, tmp_path / "ours" / "images", a, data[a : a + shard])
    assert files(tmp_path / "ours") == files(tmp_path / "zarr")
    back = np.asarray(zarr.open_array(tmp_path / "ours" / "images", mode="r")[...])
    np.testing.assert_array_equal(back, data)


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_compressed_layouts_go_through_zarr(codec: str, tmp_path: Path) -> None:
    data = np.arange(6 * 4 * 4 * 3, dtype=np.uint8).reshape(6, 4, 4, 3)
    ours = make(tmp_path / "ours", 6, (4, 4, 3), "uint8", 2, 4, codec)
    theirs = make(tmp_path / "zarr", 6, (4, 4, 3), "uint8", 2, 4, codec)
    for a in (0, 4):
        write_shard(ours, tmp_path / "ours" / "images", a, data[a : a + 4])
        theirs[a : a + 4] = data[a : a + 4]
    assert files(tmp_path / "ours") == files(tmp_path / "zarr")


@pytest.mark.parametrize(("start", "count"), [(2, 4), (0, 3), (4, 4)])
def test_refuses_what_is_not_one_whole_shard(tmp_path: Path, start: int, count: int) -> None:
    array = make(tmp_path / "s", 6, (2, 2, 3), "uint8", 2, 4)
    with pytest.raises(ValueError, match="whole shard"):
        write_shard(array, tmp_path / "s" / "images", start, np.zeros((count, 2, 2, 3), "uint8"))


def test_refuses_another_dtype(tmp_path: Path) -> None:
    array = make(tmp_path / "s", 4, (2, 2, 3), "uint8", 2, 4)
    with pytest.raises(ValueError, match="does not fit"):
        write_shard(array, tmp_path / "s" / "images", 0, np.zeros((4, 2, 2, 3), "uint16"))
