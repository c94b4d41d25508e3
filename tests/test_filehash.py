"""Remembered sha256 of source files: trusted only while a file's identity is unchanged."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pipeline.cache.entries import Cache
from pipeline.cache.filehash import hash_files, identities, known_hashes, remember_hashes

PAST_NS = 1_600_000_000 * 10**9  # 2020: long before any run, so not "racily" new


def put(root: Path, rel: str, data: bytes, mtime_ns: int | None = PAST_NS) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(root=tmp_path / "cache", limit=10**9)


def test_hash_files_matches_hashlib_and_skips_unreadable(tmp_path: Path) -> None:
    root = tmp_path / "src"
    blobs = {f"d/{i}.bin": os.urandom(i * 1000 + 1) for i in range(30)}
    for rel, data in blobs.items():
        put(root, rel, data)
    got = hash_files(root, [*blobs, "d/missing.bin"], workers=2)
    assert got == {rel: sha(data) for rel, data in blobs.items()}


def test_unchanged_files_are_known(cache: Cache, tmp_path: Path) -> None:
    root = tmp_path / "src"
    put(root, "a.jpg", b"one")
    put(root, "b.jpg", b"two")
    ids = identities(root, ["a.jpg", "b.jpg", "gone.jpg"])
    assert sorted(ids) == ["a.jpg", "b.jpg"]
    remember_hashes(cache, root, ids, {"a.jpg": sha(b"one"), "b.jpg": sha(b"two")})
    again = identities(root, ["a.jpg", "b.jpg"])
    assert known_hashes(cache, root, again) == {"a.jpg": sha(b"one"), "b.jpg": sha(b"two")}


def test_a_rename_keeps_the_hash_a_replacement_does_not(cache: Cache, tmp_path: Path) -> None:
    root = tmp_path / "src"
    put(root, "a.jpg", b"one")
    put(root, "b.jpg", b"two")
    ids = identities(root, ["a.jpg", "b.jpg"])
    remember_hashes(cache, root, ids, {"a.jpg": sha(b"one"), "b.jpg": sha(b"two")})
    os.rename(root / "a.jpg", root / "c.jpg")  # same inode
    put(root, "b.tmp", b"TWO")  # replaced as rsync does: same size and mtime, new inode
    os.replace(root / "b.tmp", root / "b.jpg")
    now = identities(root, ["b.jpg", "c.jpg"])
    assert known_hashes(cache, root, now) == {"c.jpg": sha(b"one")}


@pytest.mark.parametrize(
    "change",
    ["content and mtime", "size only", "mtime only"],
)
def test_a_file_changed_in_place_is_not_known(cache: Cache, tmp_path: Path, change: str) -> None:
    root = tmp_path / "src"
    put(root, "a.jpg", b"one")
    remember_hashes(cache, root, identities(root, ["a.jpg"]), {"a.jpg": sha(b"one")})
    path = root / "a.jpg"
    if change == "content and mtime":
        with open(path, "r+b") as f:
            f.write(b"ONE")
    elif change == "size only":
        with open(path, "ab") as f:
            f.write(b"!")
        os.utime(path, ns=(PAST_NS, PAST_NS))
    else:
        os.utime(path, ns=(PAST_NS + 1, PAST_NS + 1))
    assert known_hashes(cache, root, identities(root, ["a.jpg"])) == {}


def test_files_modified_moments_ago_are_not_remembered(cache: Cache, tmp_path: Path) -> None:
    """Git's racy-clean rule: a change within the same clock tick would keep size and mtime."""
    root = tmp_path / "src"
    put(root, "old.jpg", b"old")
    put(root, "new.jpg", b"new", mtime_ns=None)  # written just now
    ids = identities(root, ["old.jpg", "new.jpg"])
    remember_hashes(cache, root, ids, {"old.jpg": sha(b"old"), "new.jpg": sha(b"new")})
    assert known_hashes(cache, root, ids) == {"old.jpg": sha(b"old")}


def test_each_source_folder_has_its_own_record(cache: Cache, tmp_path: Path) -> None:
    put(tmp_path / "x", "a.jpg", b"one")
    ids = identities(tmp_path / "x", ["a.jpg"])
    remember_hashes(cache, tmp_path / "x", ids, {"a.jpg": sha(b"one")})
    assert known_hashes(cache, tmp_path / "y", ids) == {}
    off = Cache(root=cache.root, limit=0, enabled=False)
    assert known_hashes(off, tmp_path / "x", ids) == {}
