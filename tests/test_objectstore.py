"""The S3 test scaffolding itself (objectstore.py): a real moto server on loopback, real s3fs
clients through plain fsspec, in this process, a subprocess, Dask ``processes`` workers
(spawn) and LocalCluster worker processes. Nothing is mocked."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import dask
import fsspec
import pytest

# Run in a child: print the bytes of the object at argv[1], using no argument but the URL.
READ_IN_CHILD = """
import sys
import fsspec
with fsspec.open(sys.argv[1], "rb") as f:
    sys.stdout.buffer.write(f.read())
"""
WRITE_IN_CHILD = """
import sys
import fsspec
with fsspec.open(sys.argv[1], "wb") as f:
    f.write(sys.argv[2].encode())
"""


def read_object(url: str) -> tuple[int, bytes]:
    """A task for another process: its pid and the object's bytes."""
    with fsspec.open(url, "rb") as f:
        return os.getpid(), f.read()


def write_object(url: str, data: bytes) -> int:
    """A task for another process: write the object, return the pid."""
    with fsspec.open(url, "wb") as f:
        f.write(data)
    return os.getpid()


def test_write_and_read_back_in_this_process(s3_bucket: str, moto_server: str) -> None:
    data = bytes(range(256)) * 10
    with fsspec.open(f"{s3_bucket}/x", "wb") as f:
        f.write(data)
    with fsspec.open(f"{s3_bucket}/x", "rb") as f:
        assert f.read() == data
    fs = fsspec.filesystem("s3")
    assert fs.cat(f"{s3_bucket}/x") == data
    assert fs.info(f"{s3_bucket}/x")["size"] == len(data)
    # The client really talks to the local server (and not to a default AWS endpoint).
    assert fs.s3.meta.endpoint_url == moto_server
    assert moto_server.startswith("http://127.0.0.1:")


def test_a_fresh_python_subprocess_reads_the_object(s3_bucket: str) -> None:
    fsspec.filesystem("s3").pipe(f"{s3_bucket}/x", b"from the parent")
    proc = subprocess.run(
        [sys.executable, "-c", READ_IN_CHILD, f"{s3_bucket}/x"],
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"from the parent"


def test_find_lists_every_object(s3_bucket: str) -> None:
    fs = fsspec.filesystem("s3")
    name = s3_bucket.removeprefix("s3://")
    objects = {"a": b"1", "b/c": b"22", "b/d/e.zarr/zarr.json": b"{}", "z": b""}
    for key, data in objects.items():
        fs.pipe(f"{s3_bucket}/{key}", data)
    assert fs.find(s3_bucket) == sorted(f"{name}/{key}" for key in objects)
    sizes = {path: info["size"] for path, info in fs.find(s3_bucket, detail=True).items()}
    assert sizes == {f"{name}/{key}": len(data) for key, data in objects.items()}
    assert fs.ls(s3_bucket, detail=False) == [f"{name}/a", f"{name}/b", f"{name}/z"]


def test_a_listing_cached_before_another_process_wrote_is_stale_until_invalidate_cache(
    s3_bucket: str,
) -> None:
    """What code that lists, lets workers write, then reads must do: fs.invalidate_cache()."""
    fs = fsspec.filesystem("s3")
    name = s3_bucket.removeprefix("s3://")
    fs.pipe(f"{s3_bucket}/a", b"a")
    assert fs.ls(s3_bucket, detail=False) == [f"{name}/a"]  # the bucket's listing is now cached
    proc = subprocess.run(
        [sys.executable, "-c", WRITE_IN_CHILD, f"{s3_bucket}/b", "from the child"],
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()

    # s3fs answers from the cached listing, even for a read of the new object ...
    assert not fs.exists(f"{s3_bucket}/b")
    with pytest.raises(FileNotFoundError):
        fs.cat(f"{s3_bucket}/b")
    # ... though find always asks the server.
    assert fs.find(s3_bucket) == [f"{name}/a", f"{name}/b"]

    fs.invalidate_cache()
    assert fs.cat(f"{s3_bucket}/b") == b"from the child"
    assert fs.ls(s3_bucket, detail=False) == [f"{name}/a", f"{name}/b"]


def test_multipart_upload(s3_bucket: str) -> None:
    """Three parts: two of the 5 MiB minimum and a smaller last one."""
    part = 5 * 2**20
    blocks = [os.urandom(part), os.urandom(part), os.urandom(1000)]
    fs = fsspec.filesystem("s3")
    with fs.open(f"{s3_bucket}/big", "wb", block_size=part) as f:
        for block in blocks:
            f.write(block)
    assert fs.cat(f"{s3_bucket}/big") == b"".join(blocks)
    assert fs.info(f"{s3_bucket}/big")["ETag"].strip('"').endswith("-3")  # a 3-part upload


def test_dask_processes_scheduler_worker_reads_the_object(s3_bucket: str) -> None:
    fsspec.filesystem("s3").pipe(f"{s3_bucket}/x", b"for a dask worker")
    with dask.config.set({"multiprocessing.context": "spawn"}):
        pid, data = dask.delayed(read_object)(f"{s3_bucket}/x").compute(
            scheduler="processes", num_workers=1
        )
    assert pid != os.getpid()
    assert data == b"for a dask worker"


def test_local_cluster_worker_process_writes_an_object(s3_bucket: str) -> None:
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        pid = client.submit(
            write_object, f"{s3_bucket}/from-worker", b"written by a worker"
        ).result()
    assert pid != os.getpid()
    assert fsspec.filesystem("s3").cat(f"{s3_bucket}/from-worker") == b"written by a worker"
