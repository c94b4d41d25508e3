"""Locations, and whole stage runs on a URL (memory://) compared object by object with a
local run: the same files, byte for byte."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline import open_normalized
from pipeline.core.errors import BadImagesError, ParamsError
from pipeline.core.location import Location, parse_location
from pipeline.ingest.stage import run_ingest
from pipeline.normalize.stage import run_normalize
from pipeline.params import parse_params
from pipeline.stats.stage import run_stats


def write_folder(root: Path) -> None:
    """24 PNGs in 2 class folders, plus files ingest must ignore."""
    rng = np.random.default_rng(5)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(12):
            img = rng.integers(0, 256, (int(rng.integers(14, 30)), 20, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / c / f"{i:02d}.png")
    (root / "a" / ".hidden.png").write_bytes(b"not read")
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "Thumbs.db").write_bytes(b"junk")


def upload(local: Path, url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            fs.pipe_file(f"{path}/{p.relative_to(local).as_posix()}", p.read_bytes())


def local_digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def url_digests(url: str) -> dict[str, str]:
    loc = parse_location(url)
    return {rel: hashlib.sha256((loc / rel).read_bytes()).hexdigest() for rel in loc.files()}


@pytest.fixture
def memory_root() -> Iterator[str]:
    """A fresh memory:// prefix, removed afterwards (the memory filesystem is per process)."""
    url = f"memory://t-{uuid.uuid4().hex[:8]}"
    yield url
    parse_location(url).remove()


def params_for(scheduler: str, **ingest: object):
    return parse_params(
        {
            "base": {"scheduler": scheduler, "workers": 2},
            "ingest": {"image_size": [16, 16], "chunk_images": 2, "shard_images": 4, **ingest},
        }
    )


def run_all(source: str | Path, out: str | Path, scheduler: str) -> None:
    params = params_for(scheduler)
    out = str(out)
    run_ingest(source, f"{out}/prepared", params)
    run_stats(f"{out}/prepared/images.zarr", f"{out}/stats", params)
    run_normalize(f"{out}/prepared", f"{out}/stats", f"{out}/normalized", params)


@pytest.mark.parametrize(
    ("given", "url", "local"),
    [
        ("data/x", "data/x", Path("data/x")),
        ("file:///tmp/a%20b/c", "/tmp/a b/c", Path("/tmp/a b/c")),
        ("memory://bucket/key/", "memory://bucket/key", None),
    ],
    ids=["relative", "file-url", "memory"],
)
def test_parse(given: str, url: str, local: Path | None) -> None:
    loc = parse_location(given)
    assert (loc.url, loc.local) == (url, local)


def test_urls_never_go_through_pathlib() -> None:
    loc = parse_location("s3://bucket/runs/prepared") if _has("s3") else None
    mem = parse_location("memory://bucket/runs/prepared")
    assert str(mem / "images.zarr") == "memory://bucket/runs/prepared/images.zarr"
    assert str(mem.parent) == "memory://bucket/runs"
    assert (
        str(mem / "images.zarr" / "../../stats/stats.json")
        == "memory://bucket/runs/stats/stats.json"
    )
    assert mem.with_name(".prepared.tmp-1").url == "memory://bucket/runs/.prepared.tmp-1"
    assert mem.zarr() == mem.url
    if loc is not None:
        assert loc.path == "bucket/runs/prepared"
    with pytest.raises(TypeError):
        Path(mem)  # type: ignore[arg-type]


def _has(protocol: str) -> bool:
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError:
        return False
    return True


def test_unknown_scheme_names_the_argument_and_the_fix() -> None:
    with pytest.raises(ParamsError, match=r"SOURCE.*nosuch://x.*Install"):
        parse_location("nosuch://x", "SOURCE")


def test_location_pickles_as_strings() -> None:
    import pickle

    loc = parse_location("memory://b/x")
    assert pickle.loads(pickle.dumps(loc)) == loc
    assert isinstance(loc, Location)


@pytest.mark.parametrize("scheduler", ["threads", "synchronous"])
def test_memory_run_is_byte_identical_to_local(
    tmp_path: Path, memory_root: str, scheduler: str
) -> None:
    write_folder(tmp_path / "src")
    run_all(tmp_path / "src", tmp_path / "local", "threads")
    upload(tmp_path / "src", f"{memory_root}/src")
    run_all(f"{memory_root}/src", f"{memory_root}/out", scheduler)
    local = local_digests(tmp_path / "local")
    assert url_digests(f"{memory_root}/out") == local
    assert "prepared/images.zarr/images/c/5/0/0/0" in local  # 24 images, 4 per shard
    # no temporary or probe objects left beside the outputs
    assert sorted(parse_location(memory_root).fs.ls(f"{memory_root}/out", detail=False)) == [
        f"/{memory_root.split('://')[1]}/out/{n}" for n in ("normalized", "prepared", "stats")
    ]


def test_open_normalized_reads_a_memory_store(tmp_path: Path, memory_root: str) -> None:
    write_folder(tmp_path / "src")
    run_all(tmp_path / "src", tmp_path / "local", "synchronous")
    upload(tmp_path / "src", f"{memory_root}/src")
    run_all(f"{memory_root}/src", f"{memory_root}/out", "synchronous")
    remote = open_normalized(f"{memory_root}/out/normalized")  # lineage checked on memory://
    local = open_normalized(tmp_path / "local" / "normalized")
    assert len(remote) == len(local) == 24
    for i in (0, 7, 23):
        (a, la), (b, lb) = remote[i], local[i]
        assert la == lb
        assert a.tobytes() == b.tobytes()
    # the stats file the lineage names is followed on the same filesystem
    stats_json = parse_location(f"{memory_root}/out/stats/stats.json")
    stats_json.write_bytes(stats_json.read_bytes().replace(b'"fit_split"', b'"fit_split" '))
    with pytest.raises(OSError, match="normalized with stats sha256"):
        open_normalized(f"{memory_root}/out/normalized")


def test_tools_take_urls_too(tmp_path: Path, memory_root: str) -> None:
    """verify, export, report and show read a memory:// run like a local one (CLI in-process)."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    write_folder(tmp_path / "src")
    run_all(tmp_path / "src", tmp_path / "local", "threads")
    upload(tmp_path / "src", f"{memory_root}/src")
    run_all(f"{memory_root}/src", f"{memory_root}/out", "threads")
    params = tmp_path / "params.yaml"
    params.write_text("base: {scheduler: threads, workers: 2}\n")
    runner = CliRunner()

    def cli(*args: str) -> str:
        result = runner.invoke(app, list(args))
        assert result.exit_code == 0, result.output
        return result.output

    cli("verify", f"{memory_root}/out/normalized", "--params", str(params))
    for fmt in ("json", "torchvision"):
        remote = cli("export", f"{memory_root}/out/stats", "--format", fmt)
        assert remote == cli("export", str(tmp_path / "local" / "stats"), "--format", fmt)
    cli("report", f"{memory_root}/out/stats", str(tmp_path / "r-remote"))
    cli("report", str(tmp_path / "local" / "stats"), str(tmp_path / "r-local"))
    assert local_digests(tmp_path / "r-remote") == local_digests(tmp_path / "r-local")
    shown = cli("show", f"{memory_root}/out/normalized", "3", "--out", str(tmp_path / "png"))
    assert shown.strip().endswith(".png")
    # A damaged remote store fails verify, as a local one does.
    shard = parse_location(f"{memory_root}/out/normalized/images.zarr/images/c/0/0/0/0")
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = runner.invoke(
        app, ["verify", f"{memory_root}/out/normalized", "--params", str(params)]
    )
    assert result.exit_code == 1
    assert "1 sample(s) differ: 0" in result.stderr


def test_prepared_store_matches_pillow(tmp_path: Path, memory_root: str) -> None:
    """Pixels read from the memory:// store equal Pillow's own resize of the source files."""
    import zarr
    from PIL import ImageOps

    write_folder(tmp_path / "src")
    upload(tmp_path / "src", f"{memory_root}/src")
    run_ingest(f"{memory_root}/src", f"{memory_root}/prepared", params_for("threads"))
    group = zarr.open_group(f"{memory_root}/prepared/images.zarr", mode="r")
    paths = [str(p) for p in group["path"][:]]
    assert len(paths) == 24
    assert not [p for p in paths if "hidden" in p or p.endswith(".txt")]
    for i in (0, 13):
        with Image.open(tmp_path / "src" / paths[i]) as im:
            want = np.asarray(ImageOps.fit(im.convert("RGB"), (16, 16), Image.Resampling.BILINEAR))
        assert np.array_equal(group["images"][i], want)


def names(url: str) -> list[str]:
    """The entries directly under ``url``."""
    where = parse_location(url)
    where.fs.invalidate_cache()
    return sorted(p.rsplit("/", 1)[-1] for p in where.fs.ls(where.path, detail=False))


def check_failed_stage_keeps_old_output(tmp_path: Path, root: str, scheduler: str) -> None:
    """A stage that fails (on_error: fail, a bad file) leaves the old output byte for byte and
    no temporary prefix behind: what publishing on object storage promises."""
    write_folder(tmp_path / "src")
    upload(tmp_path / "src", f"{root}/src")
    out = f"{root}/prepared"
    run_ingest(f"{root}/src", out, params_for("threads"))
    before = url_digests(out)
    parse_location(f"{root}/src/b/99.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    with pytest.raises(BadImagesError, match=r"b/99\.png"):
        run_ingest(f"{root}/src", out, params_for(scheduler))
    assert url_digests(out) == before
    assert names(root) == ["prepared", "src"]


def local_cluster() -> Any:
    """A real dask.distributed cluster on loopback: 2 worker processes of one thread each."""
    import distributed

    return distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=40,
    )
