"""The cache folder: entries round-trip, damage is detected, the size limit holds, the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cache.entries import Cache, Entry, cache_key, open_cache, parse_size
from pipeline.cli import app
from pipeline.core.errors import ParamsError


def entry(seed: int, n: int = 1000) -> Entry:
    rng = np.random.default_rng(seed)
    return Entry(
        header={"record": {"format": "PNG", "width": 7}, "seed": seed},
        arrays={
            "pixels": rng.integers(0, 256, (n,), dtype=np.uint8),
            "sums": rng.integers(-(2**62), 2**62, (3, 4), dtype=np.int64),
            "std": rng.random((5, 3)),
        },
    )


def assert_same(a: Entry, b: Entry) -> None:
    assert a.header == b.header
    assert sorted(a.arrays) == sorted(b.arrays)
    for name, array in a.arrays.items():
        assert b.arrays[name].dtype == array.dtype
        np.testing.assert_array_equal(b.arrays[name], array)


def test_entry_round_trip(tmp_path: Path) -> None:
    cache = Cache(root=tmp_path, limit=10**9)
    cache.put("hashes", "ab" * 32, entry(1))
    got = cache.get("hashes", "ab" * 32)
    assert got is not None
    assert_same(entry(1), got)
    assert cache.get("hashes", "cd" * 32) is None
    assert cache.get("moments", "ab" * 32) is None  # kinds do not mix


def test_zero_size_and_empty_arrays_round_trip(tmp_path: Path) -> None:
    cache = Cache(root=tmp_path, limit=10**9)
    e = Entry(header={}, arrays={"empty": np.zeros((0, 3), dtype=np.uint16)})
    cache.put("moments", "00" * 32, e)
    got = cache.get("moments", "00" * 32)
    assert got is not None
    assert got.arrays["empty"].shape == (0, 3)


@pytest.mark.parametrize(
    "damage",
    ["flip_payload_byte", "truncate", "empty", "garbage", "bad_header", "extra_bytes"],
)
def test_damaged_entry_is_detected_and_removed(tmp_path: Path, damage: str) -> None:
    cache = Cache(root=tmp_path, limit=10**9)
    key = "ef" * 32
    cache.put("hashes", key, entry(2))
    (path,) = (tmp_path / "hashes").rglob(key)
    data = bytearray(path.read_bytes())
    if damage == "flip_payload_byte":
        data[-10] ^= 0x01
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = bytearray()
    elif damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    elif damage == "bad_header":
        data[len(b"pipeline-cache/2\n") + 2] = ord("}")
    else:
        data += b"\0" * 8
    path.write_bytes(bytes(data))
    assert cache.get("hashes", key) is None
    assert not path.exists()  # removed, so the next run rebuilds it
    cache.put("hashes", key, entry(2))
    got = cache.get("hashes", key)
    assert got is not None
    assert_same(entry(2), got)


def test_payload_bytes_swapped_between_arrays_are_detected(tmp_path: Path) -> None:
    """Same bytes, other layout: the header's array layout is covered by the check too."""
    cache = Cache(root=tmp_path, limit=10**9)
    cache.put("hashes", "aa" * 32, entry(3, n=8))
    (path,) = (tmp_path / "hashes").rglob("aa" * 32)
    data = path.read_bytes().replace(b'"shape":[8]', b'"shape":[4]', 1)
    path.write_bytes(data)
    assert cache.get("hashes", "aa" * 32) is None


def test_edited_header_is_detected(tmp_path: Path) -> None:
    """The header (a manifest record, for decoded images) is covered by the check too."""
    cache = Cache(root=tmp_path, limit=10**9)
    cache.put("hashes", "bb" * 32, entry(4))
    (path,) = (tmp_path / "hashes").rglob("bb" * 32)
    path.write_bytes(path.read_bytes().replace(b'"width":7', b'"width":8', 1))
    assert cache.get("hashes", "bb" * 32) is None


def test_trim_removes_least_recently_used_first(tmp_path: Path) -> None:
    cache = Cache(root=tmp_path, limit=10**9)
    keys = [f"{i:02d}" * 32 for i in range(6)]
    for i, key in enumerate(keys):
        cache.put("hashes", key, entry(i, n=10_000))
        path = next((tmp_path / "hashes").rglob(key))
        os.utime(path, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))
    size = next((tmp_path / "hashes").rglob(keys[0])).stat().st_size
    assert cache.get("hashes", keys[0]) is not None  # a hit makes it the most recent
    small = Cache(root=tmp_path, limit=3 * size)
    assert small.trim() == 3 * size
    left = {p.name for p in (tmp_path / "hashes").rglob("*") if p.is_file()}
    assert left == {keys[0], keys[4], keys[5]}
    assert small.info().entries == {"packs": 0, "hashes": 3, "moments": 0}


def test_trim_removes_stale_temporary_files(tmp_path: Path) -> None:
    cache = Cache(root=tmp_path, limit=10**9)
    cache.put("hashes", "ab" * 32, entry(1))
    stale = tmp_path / "hashes" / "ab" / (".x.tmp-0")
    fresh = tmp_path / "hashes" / "ab" / (".y.tmp-1")
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    os.utime(stale, ns=(10**18, 10**18))  # 2001: long dead
    cache.trim()
    assert not stale.exists()
    assert fresh.exists()  # may belong to a run in progress
    assert cache.get("hashes", "ab" * 32) is not None


def test_disabled_cache_stores_nothing(tmp_path: Path) -> None:
    cache = Cache(root=tmp_path / "c", limit=10**9, enabled=False)
    cache.put("hashes", "ab" * 32, entry(1))
    assert cache.get("hashes", "ab" * 32) is None
    assert not (tmp_path / "c").exists()


def test_unwritable_cache_only_costs_time(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = Cache(root=blocker, limit=10**9)
    cache.put("hashes", "ab" * 32, entry(1))  # no exception
    assert cache.get("hashes", "ab" * 32) is None


def test_cache_key_is_stable_and_order_free() -> None:
    assert cache_key({"a": 1, "b": [1, 2]}) == cache_key({"b": [1, 2], "a": 1})
    assert cache_key({"a": 1}) != cache_key({"a": 2})
    assert len(cache_key({})) == 64


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10GB", 10**10),
        ("512MiB", 512 * 2**20),
        ("1000", 1000),
        ("1.5 gb", 1_500_000_000),
        ("0", 0),
        ("20kb", 20_000),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "ten GB", "10XB", "-1GB", "1e9"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ParamsError, match="PIPELINE_CACHE_LIMIT"):
        parse_size(text)


def test_open_cache_reads_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "here"))
    monkeypatch.setenv("PIPELINE_CACHE_LIMIT", "2GB")
    cache = open_cache()
    assert (cache.root, cache.limit, cache.enabled) == (tmp_path / "here", 2 * 10**9, True)
    monkeypatch.setenv("PIPELINE_CACHE_DIR", "off")
    assert not open_cache().enabled
    monkeypatch.delenv("PIPELINE_CACHE_DIR")
    monkeypatch.delenv("PIPELINE_CACHE_LIMIT")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache = open_cache()
    assert (cache.root, cache.limit) == (tmp_path / "xdg" / "pipeline", 10 * 10**9)
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert open_cache().root == tmp_path / "home" / ".cache" / "pipeline"


def test_cli_info_and_clear(tmp_path: Path) -> None:
    cache = Cache(root=tmp_path / "c", limit=10**9)
    cache.put("hashes", "ab" * 32, entry(1, n=50_000))
    cache.put("moments", "cd" * 32, entry(2))
    runner = CliRunner()
    info = runner.invoke(app, ["cache", "info", "--dir", str(tmp_path / "c")])
    assert info.exit_code == 0, info.output
    assert str(tmp_path / "c") in info.output
    assert "hashes" in info.output
    assert "moments" in info.output
    assert "        1 entries" in info.output
    cleared = runner.invoke(app, ["cache", "clear", "--dir", str(tmp_path / "c")])
    assert cleared.exit_code == 0, cleared.output
    assert "cleared 0.1 MB" in cleared.output
    assert cache.info().entries == {"packs": 0, "hashes": 0, "moments": 0}
    assert cache.get("hashes", "ab" * 32) is None


def test_cli_bad_limit_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["cache", "info", "--dir", str(tmp_path)], env={"PIPELINE_CACHE_LIMIT": "lots"}
    )
    assert result.exit_code == 1
    assert "PIPELINE_CACHE_LIMIT" in result.output
