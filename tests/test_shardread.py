"""The direct shard reader against zarr's own read of the same store, and on damaged files."""

from __future__ import annotations

from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr

from pipeline.core.errors import StoreError
from pipeline.zarrstore.shardread import open_shard_reader
from pipeline.zarrstore.store import create_images_array, read_samples, read_selection

CASES = {
    "uint8 partial last chunk": (21, (3, 2, 3), "uint8", 4, 8),
    "uint8 one chunk per image": (9, (4, 4, 3), "uint8", 1, 4),
    "uint16 gray": (13, (6, 5, 1), "uint16", 2, 6),
    "float32": (11, (3, 3, 3), "float32", 2, 4),
    "float16 chunk = shard": (7, (2, 3, 3), "float16", 4, 4),
}


def make_store(path: Path, n: int, hw: tuple[int, int, int], dtype: str, chunk: int, shard: int,
               codec: str = "none") -> tuple[zarr.Array, np.ndarray]:
    """A store written by zarr itself, with random contents."""
    group = zarr.open_group(path, mode="w")
    array = create_images_array(group, "images", shape=(n, *hw), dtype=dtype,
                                chunk_images=chunk, shard_images=shard, codec=codec)
    rng = np.random.default_rng(n)
    if np.dtype(dtype).kind == "f":
        data = rng.standard_normal((n, *hw)).astype(dtype)
    else:
        data = rng.integers(0, np.iinfo(dtype).max, (n, *hw), endpoint=True).astype(dtype)
    array[...] = data
    return array, data


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_reads_equal_zarr_in_any_order(tmp_path: Path, case: tuple) -> None:
    n = case[0]
    array, _ = make_store(tmp_path / "s.zarr", *case)
    reader = open_shard_reader(array, tmp_path / "s.zarr" / "images")
    assert reader is not None
    oracle = np.asarray(zarr.open_array(tmp_path / "s.zarr" / "images", mode="r")[...])
    rng = np.random.default_rng(0)
    for rows in (np.arange(n), rng.permutation(n), rng.integers(0, n, 3 * n), np.array([n - 1])):
        got = reader.read(rows)
        assert got.dtype == oracle.dtype
        assert got.tobytes() == oracle[rows].tobytes()
    assert reader.read(np.array([], dtype=np.int64)).shape == (0, *oracle.shape[1:])
    with pytest.raises(IndexError):
        reader.read(np.array([n]))
    reader.close()


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_channels_first_reads_equal_transposed_zarr(tmp_path: Path, case: tuple) -> None:
    n = case[0]
    array, _ = make_store(tmp_path / "s.zarr", *case)
    reader = open_shard_reader(array, tmp_path / "s.zarr" / "images")
    assert reader is not None
    oracle = np.asarray(zarr.open_array(tmp_path / "s.zarr" / "images", mode="r")[...])
    rng = np.random.default_rng(1)
    # more rows than one staging step, a repeated row, and an empty read
    for rows in (rng.permutation(n), rng.integers(0, n, 3 * n), np.array([n - 1, n - 1])):
        got = reader.read_channels_first(rows)
        assert got.flags.c_contiguous
        assert got.dtype == oracle.dtype
        assert got.tobytes() == np.ascontiguousarray(oracle[rows].transpose(0, 3, 1, 2)).tobytes()
    empty = reader.read_channels_first(np.array([], dtype=np.int64))
    assert empty.shape == (0, oracle.shape[3], *oracle.shape[1:3])
    with pytest.raises(IndexError):
        reader.read_channels_first(np.array([n]))
    reader.close()


def test_compressed_and_remote_layouts_are_left_to_zarr(tmp_path: Path) -> None:
    array, data = make_store(tmp_path / "z.zarr", 9, (3, 3, 3), "uint8", 2, 4, codec="zstd")
    assert open_shard_reader(array, tmp_path / "z.zarr" / "images") is None
    plain, _ = make_store(tmp_path / "p.zarr", 9, (3, 3, 3), "uint8", 2, 4)
    assert open_shard_reader(plain, None) is None
    # read_samples still reads the compressed store, through zarr
    assert read_samples(str(tmp_path / "z.zarr" / "images"), 2, 7).tobytes() == data[2:7].tobytes()


def test_read_samples_and_selection_equal_zarr(tmp_path: Path) -> None:
    _, data = make_store(tmp_path / "s.zarr", 21, (3, 2, 3), "uint8", 4, 8)
    path = str(tmp_path / "s.zarr" / "images")
    assert read_samples(path, 3, 19).tobytes() == data[3:19].tobytes()
    assert read_samples(path, 0, 21, reuse_buffer=True).tobytes() == data.tobytes()
    assert read_selection(path, [0, 5, 6, 20]).tobytes() == data[[0, 5, 6, 20]].tobytes()


def shard_file(root: Path) -> Path:
    return root / "s.zarr" / "images" / "c" / "0" / "0" / "0" / "0"


def rewrite_index(file: Path, edit, fix_crc: bool = True) -> None:  # type: ignore[no-untyped-def]
    """Apply ``edit`` to the (chunks, 2) index table, then re-sign it so only the edit is bad."""
    raw = bytearray(file.read_bytes())
    chunks = 2  # shard 8 / chunk 4 in the store below
    start = len(raw) - chunks * 16 - 4
    table = np.frombuffer(bytes(raw[start:-4]), dtype="<u8").reshape(chunks, 2).copy()
    edit(table)
    raw[start:-4] = table.tobytes()
    if fix_crc:
        raw[-4:] = np.uint32(google_crc32c.value(table.tobytes())).astype("<u4").tobytes()
    file.write_bytes(bytes(raw))


def _flip_crc(t: np.ndarray) -> None:
    t[0, 0] ^= 1


def _oversize(t: np.ndarray) -> None:
    t[1, 1] = t[1, 1] * 2


def _past_end(t: np.ndarray) -> None:
    t[1, 0] = 10**6


def _missing(t: np.ndarray) -> None:
    t[1, :] = 2**64 - 1


DAMAGE = {
    "checksum": (_flip_crc, False, "CRC-32C"),
    "compressed-size chunk": (_oversize, True, "expected|past the end"),
    "offset past the end": (_past_end, True, "past the data|past the end"),
    "stored chunk marked missing": (_missing, True, "not stored"),
}


@pytest.mark.parametrize(("edit", "fix_crc", "words"), DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_index_is_a_store_error_naming_the_file(
    tmp_path: Path, edit, fix_crc: bool, words: str  # type: ignore[no-untyped-def]
) -> None:
    array, _ = make_store(tmp_path / "s.zarr", 16, (3, 2, 3), "uint8", 4, 8)
    rewrite_index(shard_file(tmp_path), edit, fix_crc)
    reader = open_shard_reader(array, tmp_path / "s.zarr" / "images")
    assert reader is not None
    with pytest.raises(StoreError, match=words) as info:
        reader.read(np.arange(8))
    assert str(shard_file(tmp_path)) in str(info.value)
    with pytest.raises(StoreError, match=words):
        read_samples(str(tmp_path / "s.zarr" / "images"), 0, 8)
    assert reader.read(np.arange(8, 16)).shape == (8, 3, 2, 3)  # the other shard still reads


@pytest.mark.parametrize("keep", [0, 10, 100], ids=["empty", "shorter than index", "cut data"])
def test_truncated_shard_is_a_store_error(tmp_path: Path, keep: int) -> None:
    array, _ = make_store(tmp_path / "s.zarr", 16, (3, 2, 3), "uint8", 4, 8)
    file = shard_file(tmp_path)
    raw = file.read_bytes()
    file.write_bytes(raw[:keep] if keep < 100 else raw[:keep] + raw[-36:])  # data cut, index kept
    reader = open_shard_reader(array, tmp_path / "s.zarr" / "images")
    assert reader is not None
    with pytest.raises(StoreError, match=str(file)):
        reader.read(np.arange(8))


def test_missing_shard_is_a_store_error(tmp_path: Path) -> None:
    array, _ = make_store(tmp_path / "s.zarr", 16, (3, 2, 3), "uint8", 4, 8)
    shard_file(tmp_path).unlink()
    reader = open_shard_reader(array, tmp_path / "s.zarr" / "images")
    assert reader is not None
    with pytest.raises(StoreError, match="cannot open shard"):
        reader.read(np.array([3]))
