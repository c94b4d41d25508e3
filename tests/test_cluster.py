"""Stages on a real dask.distributed cluster (LocalCluster, worker processes, loopback)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_location import local_cluster, local_digests, run_all, write_folder

from pipeline.core.errors import ParamsError, PipelineError
from pipeline.core.runner import SCHEDULER_ENV, resolve_scheduler
from pipeline.ingest.stage import run_ingest
from pipeline.params import parse_params

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster_address() -> Iterator[str]:
    with local_cluster() as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cluster") / "src"
    write_folder(root)
    return root


def test_cluster_outputs_are_byte_identical_to_threads(
    folder: Path, tmp_path: Path, cluster_address: str
) -> None:
    run_all(folder, tmp_path / "threads", "threads")
    run_all(folder, tmp_path / "cluster", cluster_address)
    assert local_digests(tmp_path / "cluster") == local_digests(tmp_path / "threads")


def test_environment_variable_overrides_params(
    monkeypatch: pytest.MonkeyPatch, cluster_address: str
) -> None:
    params = parse_params({"base": {"scheduler": "threads"}})
    monkeypatch.setenv(SCHEDULER_ENV, cluster_address)
    assert resolve_scheduler(params.base, "decode")[0] == cluster_address
    monkeypatch.setenv(SCHEDULER_ENV, "gpu")
    with pytest.raises(ParamsError, match=SCHEDULER_ENV):
        resolve_scheduler(params.base, "decode")


def test_unreachable_scheduler_is_a_clear_error(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="Cannot reach the Dask scheduler"):
        run_all(folder, tmp_path, "tcp://127.0.0.1:9")


def test_url_the_workers_cannot_reach_is_one_error_before_any_work(
    folder: Path, cluster_address: str
) -> None:
    """memory:// exists only in this process: every worker process sees an empty one."""
    import fsspec

    from pipeline.core.location import parse_location

    fs = fsspec.filesystem("memory")
    for p in sorted(folder.rglob("*.png")):
        fs.pipe_file(f"/unreachable/src/{p.relative_to(folder).as_posix()}", p.read_bytes())
    try:
        params = parse_params(
            {
                "base": {"scheduler": cluster_address, "workers": 2},
                "ingest": {"image_size": [16, 16], "chunk_images": 2, "shard_images": 4},
            }
        )
        with pytest.raises(
            PipelineError,
            match=r"Dask workers cannot reach .*memory://unreachable/src on 2 worker\(s\).*"
            r"does not exist.*threads or synchronous",
        ):
            run_ingest("memory://unreachable/src", "memory://unreachable/out", params)
        assert fs.ls("/unreachable", detail=False) == ["/unreachable/src"]  # nothing written
    finally:
        parse_location("memory://unreachable").remove()
