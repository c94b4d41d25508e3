"""Stages on S3 (a moto server on loopback): outputs byte-identical to a local threaded run,
with worker processes and on a dask.distributed cluster; unreachable buckets are one error."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_location import (
    check_failed_stage_keeps_old_output,
    local_cluster,
    local_digests,
    names,
    params_for,
    run_all,
    upload,
    url_digests,
    write_folder,
)

from pipeline import open_normalized
from pipeline.core.errors import StoreError
from pipeline.ingest.stage import run_ingest

# zarr's FsspecStore makes its own asynchronous s3fs instance (aiohttp session) and never
# closes it; when it is garbage-collected aiohttp warns. Nothing is lost: the objects are
# written by then.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Unclosed client session:ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture(autouse=True)
def collect_sessions() -> Iterator[None]:
    """Collect those sessions while the filters above apply, not at the session's end."""
    yield
    gc.collect()


def test_processes_scheduler_on_s3_is_byte_identical(tmp_path: Path, s3_bucket: str) -> None:
    write_folder(tmp_path / "src")
    run_all(tmp_path / "src", tmp_path / "local", "threads")
    upload(tmp_path / "src", f"{s3_bucket}/src")
    run_all(f"{s3_bucket}/src", f"{s3_bucket}/out", "processes")
    assert url_digests(f"{s3_bucket}/out") == local_digests(tmp_path / "local")
    assert names(f"{s3_bucket}/out") == ["normalized", "prepared", "stats"]
    ds = open_normalized(f"{s3_bucket}/out/normalized")
    local = open_normalized(tmp_path / "local" / "normalized")
    assert ds[5][0].tobytes() == local[5][0].tobytes()


def test_cluster_on_s3_is_byte_identical(tmp_path: Path, s3_bucket: str) -> None:
    pytest.importorskip("distributed")
    write_folder(tmp_path / "src")
    run_all(tmp_path / "src", tmp_path / "local", "threads")
    upload(tmp_path / "src", f"{s3_bucket}/src")
    # Started here, after s3_bucket set the environment the worker processes inherit.
    with local_cluster() as cluster:
        run_all(f"{s3_bucket}/src", f"{s3_bucket}/out", cluster.scheduler_address)
    assert url_digests(f"{s3_bucket}/out") == local_digests(tmp_path / "local")


def test_missing_bucket_is_one_clear_error(tmp_path: Path, s3_bucket: str) -> None:
    write_folder(tmp_path / "src")
    missing = f"{s3_bucket}-missing"
    with pytest.raises(StoreError, match=rf"{missing}/prepared.*cannot write.*AWS_PROFILE"):
        run_ingest(tmp_path / "src", f"{missing}/prepared", params_for("threads"))
    with pytest.raises(StoreError, match=rf"{missing}/src.*cannot read"):
        run_ingest(f"{missing}/src", tmp_path / "prepared", params_for("threads"))
    assert not (tmp_path / "prepared").exists()


def test_failed_stage_on_s3_leaves_old_output(tmp_path: Path, s3_bucket: str) -> None:
    check_failed_stage_keeps_old_output(tmp_path, s3_bucket, "processes")
