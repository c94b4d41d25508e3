"""Publishing outputs on object storage (memory:// here): whole or not at all."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_hardening
from test_location import (
    check_failed_stage_keeps_old_output,
    local_digests,
    names,
    params_for,
    upload,
    url_digests,
    write_folder,
)

from pipeline.core.errors import StoreError
from pipeline.core.location import parse_location
from pipeline.core.publish import publish, root_markers
from pipeline.ingest.stage import run_ingest
from pipeline.zarrstore.store import open_prepared

tmpfs = test_hardening.tmpfs  # the fixture: a real 2 MB tmpfs


@pytest.fixture
def memory_root() -> Iterator[str]:
    url = f"memory://p-{uuid.uuid4().hex[:8]}"
    yield url
    parse_location(url).remove()


def test_root_markers() -> None:
    files = [
        "images.zarr/zarr.json",
        "images.zarr/images/zarr.json",
        "images.zarr/images/c/0/0/0/0",
        "stats.zarr/zarr.json",
        "stats.zarr/mean_image/zarr.json",
        "stats.json",
    ]
    assert root_markers(files) == ["images.zarr/zarr.json", "stats.zarr/zarr.json"]
    assert root_markers(["zarr.json", "a/zarr.json"]) == ["zarr.json"]


def test_failed_stage_leaves_old_output_and_no_temporary_prefix(
    tmp_path: Path, memory_root: str
) -> None:
    check_failed_stage_keeps_old_output(tmp_path, memory_root, "threads")


def test_skipped_files_are_compacted_the_same_as_locally(tmp_path: Path, memory_root: str) -> None:
    write_folder(tmp_path / "src")
    (tmp_path / "src" / "a" / "05.png").write_bytes(b"not a png")
    upload(tmp_path / "src", f"{memory_root}/src")
    run_ingest(tmp_path / "src", tmp_path / "prepared", params_for("threads", on_error="skip"))
    skip = params_for("threads", on_error="skip")
    run_ingest(f"{memory_root}/src", f"{memory_root}/prepared", skip)
    assert url_digests(f"{memory_root}/prepared") == local_digests(tmp_path / "prepared")
    assert "images.zarr/candidates/zarr.json" not in url_digests(f"{memory_root}/prepared")


def test_replacing_an_output_removes_old_objects(tmp_path: Path, memory_root: str) -> None:
    dest = parse_location(f"{memory_root}/out")
    (dest / "stale.json").write_bytes(b"{}")
    (dest / "images.zarr" / "zarr.json").write_bytes(b"{}")
    with publish(dest) as tmp:
        (tmp / "new.json").write_bytes(b"[]")
    assert url_digests(dest.url).keys() == {"new.json"}
    assert names(memory_root) == ["out"]


def test_interrupted_publish_shows_no_store(tmp_path: Path, memory_root: str) -> None:
    """Between deleting the old root marker and copying the new one last, readers see no
    store (and say to re-run), never a half store."""
    write_folder(tmp_path / "src")
    upload(tmp_path / "src", f"{memory_root}/src")
    out = f"{memory_root}/prepared"
    run_ingest(f"{memory_root}/src", out, params_for("threads"))
    parse_location(f"{out}/images.zarr/zarr.json").fs.rm(
        parse_location(f"{out}/images.zarr/zarr.json").path
    )
    with pytest.raises(StoreError, match=r"no zarr.json.*pipeline ingest"):
        open_prepared(f"{out}/images.zarr")


def test_url_output_that_is_not_ours_is_refused(tmp_path: Path, memory_root: str) -> None:
    write_folder(tmp_path / "src")
    upload(tmp_path / "src", f"{memory_root}/src")
    (parse_location(f"{memory_root}/mine") / "thesis.txt").write_bytes(b"years of work\n")
    with pytest.raises(StoreError, match=r"memory://.*/mine .*choose another OUT, or delete it"):
        run_ingest(f"{memory_root}/src", f"{memory_root}/mine", params_for("threads"))
    assert url_digests(f"{memory_root}/mine").keys() == {"thesis.txt"}
    with pytest.raises(StoreError, match="is a file"):
        run_ingest(f"{memory_root}/src", f"{memory_root}/mine/thesis.txt", params_for("threads"))


def test_url_rerun_and_interrupted_publish_are_replaced(tmp_path: Path, memory_root: str) -> None:
    """Our own output is replaced; so is one whose publish was interrupted after its root
    marker was deleted (the complete new output waits in the temporary sibling)."""
    write_folder(tmp_path / "src")
    upload(tmp_path / "src", f"{memory_root}/src")
    out = f"{memory_root}/prepared"
    run_ingest(f"{memory_root}/src", out, params_for("threads"))
    first = url_digests(out)
    run_ingest(f"{memory_root}/src", out, params_for("threads"))
    assert url_digests(out) == first
    tmp = parse_location(f"{memory_root}/.prepared.tmp-{uuid.uuid4().hex[:12]}")
    for rel, _ in first.items():
        (tmp / rel).write_bytes(parse_location(f"{out}/{rel}").read_bytes())
    marker = parse_location(f"{out}/images.zarr/zarr.json")
    marker.fs.rm(marker.path)
    user = parse_location(f"{memory_root}/.prepared.tmpfoo")
    user.write_bytes(b"mine\n")
    run_ingest(f"{memory_root}/src", out, params_for("threads"))
    assert url_digests(out) == first
    assert names(memory_root) == [".prepared.tmpfoo", "prepared", "src"]


def test_full_disk_names_the_output_and_removes_the_temporary(tmpfs: Path) -> None:
    dest = parse_location(tmpfs / "out")
    full = rf"Cannot write {tmpfs}/out: No space left on device"
    with pytest.raises(StoreError, match=full), publish(dest) as tmp:
        (Path(tmp) / "big.bin").write_bytes(b"\0" * (4 << 20))  # the tmpfs holds 2 MB
    assert sorted(p.name for p in tmpfs.iterdir()) == []  # no temporary folder, no lock file
