"""Outputs never destroy inputs or files the tool did not write; killed and concurrent runs.

Through the real CLI in subprocesses (``python -m pipeline``), on real folders of Pillow-made
PNGs. The oracle for "intact" is the sha256 of every file of the whole tree before and after.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from conftest import write_rgb_source
from PIL import Image

from pipeline.core.errors import StoreError
from pipeline.core.location import parse_location
from pipeline.core.registry import FILE, known_outputs
from pipeline.ingest.stage import run_ingest
from pipeline.normalize.stage import run_normalize
from pipeline.params import parse_params
from pipeline.stats.stage import run_stats

PARAMS = {
    "base": {"scheduler": "synchronous"},
    "sample": {"images_per_class": 1},
    "ingest": {"image_size": None, "chunk_images": 2, "shard_images": 4},
}


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file (and the target of every symlink) under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cli(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m pipeline ARGS --params`` in ``cwd``, with this test's environment."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        cwd=cwd, env=dict(os.environ), capture_output=True, text=True, timeout=180, check=False,
    )


def refused(proc: subprocess.CompletedProcess[str], *names: object) -> str:
    """Assert exit 1 with one error line naming every one of ``names``; return the line."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """tmp/data/photos (PNG class folders), tmp/data/prepared, stats, normalized, reports."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    data = tmp_path / "data"
    write_rgb_source(data / "photos")
    p = parse_params(PARAMS)
    run_ingest(data / "photos", data / "prepared", p)
    run_stats(data / "prepared" / "images.zarr", data / "stats", p)
    run_normalize(data / "prepared", data / "stats", data / "normalized", p)
    return tmp_path


OVER_INPUTS = {
    "ingest-same": (["ingest", "data/photos", "data/photos"], "data/photos"),
    "ingest-contains": (["ingest", "data/photos", "data"], "data/photos"),
    "ingest-inside": (["ingest", "data/photos", "data/photos/out"], "data/photos"),
    "stats-same": (["stats", "data/prepared", "data/prepared"], "data/prepared"),
    "normalize-over-stats": (
        ["normalize", "data/prepared", "data/stats", "data/stats"], "data/stats"),
    "normalize-over-prepared": (
        ["normalize", "data/prepared", "data/stats", "data"], "data/prepared"),
    "report-over-stats": (["report", "data/stats", "data/stats"], "data/stats"),
    "audit-plots-in-stats": (
        ["audit", "--stats", "data/stats/stats.json", "--plots", "data/stats/plots"],
        "data/stats"),
    "show-inside-store": (
        ["show", "data/normalized", "0", "--out", "data/normalized/pictures"], "data/normalized"),
}


@pytest.mark.parametrize("case", sorted(OVER_INPUTS))
def test_output_over_an_input_is_refused_and_nothing_changes(work: Path, case: str) -> None:
    args, victim = OVER_INPUTS[case]
    before = digests(work)
    with_params = args[0] in ("ingest", "stats", "normalize")
    proc = cli(*args, *(["--params", "params.yaml"] if with_params else []), cwd=work)
    out = args[-1]
    line = refused(proc, out, victim)
    assert "input" in line
    assert digests(work) == before


def test_output_over_an_input_through_a_symlink_is_refused(work: Path) -> None:
    (work / "link").symlink_to(work / "data" / "photos")
    before = digests(work)
    refused(cli("ingest", "data/photos", "link", "--params", "params.yaml", cwd=work), "link")
    assert digests(work) == before


def test_sample_refuses_a_folder_of_the_users_images(work: Path) -> None:
    before = digests(work)
    refused(cli("sample", "data/photos", "--params", "params.yaml", cwd=work), "data/photos",
            "choose another OUT, or delete it yourself")
    assert digests(work) == before


def test_sample_rerun_over_its_own_output_gives_the_same_bytes(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    assert cli("sample", "s", "--params", "params.yaml", cwd=tmp_path).returncode == 0
    first = digests(tmp_path / "s")
    assert first[".pipeline-sample"] == hashlib.sha256(b"pipeline.sample/1\n").hexdigest()
    proc = cli("sample", "s", "--params", "params.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert digests(tmp_path / "s") == first


def _foreign(work: Path, kind: str) -> Path:
    """An existing OUT that is not ingest's output."""
    out = work / "out"
    if kind == "regular-file":
        out.write_bytes(b"my notes\n")
    elif kind == "symlink":
        out.symlink_to(work / "data" / "prepared")  # even to a prepared folder
    elif kind == "foreign-folder":
        out.mkdir()
        (out / "thesis.txt").write_text("years of work\n")
    elif kind == "other-kind":
        return work / "data" / "stats"
    return out


@pytest.mark.parametrize("kind", ["regular-file", "symlink", "foreign-folder", "other-kind"])
def test_ingest_refuses_an_existing_output_that_is_not_its_own(work: Path, kind: str) -> None:
    out = _foreign(work, kind)
    before = digests(work)
    line = refused(cli("ingest", "data/photos", out, "--params", "params.yaml", cwd=work), out)
    assert "choose another OUT, or delete it yourself" in line
    if kind == "other-kind":
        assert "pipeline stats" in line
    assert digests(work) == before


def test_each_stage_reruns_over_its_own_output(work: Path) -> None:
    data = work / "data"
    (data / "stats" / ".gitignore").write_text("/stats.zarr\n")  # as DVC writes it
    before = digests(data)
    for args in (
        ["ingest", "data/photos", "data/prepared"],
        ["stats", "data/prepared", "data/stats"],
        ["normalize", "data/prepared", "data/stats", "data/normalized"],
    ):
        proc = cli(*args, "--params", "params.yaml", cwd=work)
        assert proc.returncode == 0, (args, proc.stderr)
    for _ in range(2):
        proc = cli("report", "data/stats", "data/reports", cwd=work)
        assert proc.returncode == 0, (args, proc.stderr)
    after = digests(data)
    assert {k: v for k, v in after.items() if not k.startswith("reports/")} == before
    assert after["reports/.pipeline-report"] == hashlib.sha256(b"pipeline.report/1\n").hexdigest()
    assert sorted(p.name for p in data.iterdir()) == [
        "normalized", "photos", "prepared", "reports", "stats"]


def test_dvc_emptied_stats_folder_is_fine(work: Path) -> None:
    """DVC deletes stats.json and stats.zarr before it runs the stage; .gitignore stays."""
    stats = work / "data" / "stats"
    for p in sorted(stats.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (stats / ".gitignore").write_text("/stats.zarr\n")
    proc = cli("stats", "data/prepared", "data/stats", "--params", "params.yaml", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert (stats / ".gitignore").read_text() == "/stats.zarr\n"


def test_only_exact_leftover_names_are_removed(work: Path) -> None:
    data = work / "data"
    user = data / ".prepared.tmpfoo"
    user.write_text("mine\n")
    user_dir = data / ".prepared.old-notours"
    user_dir.mkdir()
    leftover = data / f".prepared.tmp-{uuid.uuid4().hex[:12]}"
    (leftover / "images.zarr").mkdir(parents=True)
    proc = cli("ingest", "data/photos", "data/prepared", "--params", "params.yaml", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert user.read_text() == "mine\n"
    assert user_dir.is_dir()
    assert not leftover.exists()
    assert not (data / ".prepared.lock").exists()


def test_memory_urls_equal_or_inside_are_refused() -> None:
    root = f"memory://o-{uuid.uuid4().hex[:8]}"
    p = parse_params(PARAMS)
    cases = [
        (lambda: run_ingest(f"{root}/src", f"{root}/src", p), "is the same as"),
        (lambda: run_ingest(f"{root}/src", f"{root}/src/out", p), "lies inside"),
        (lambda: run_ingest(f"{root}/src/", root, p), "contains"),
        (lambda: run_stats(f"{root}/prep/images.zarr", f"{root}/prep", p), "contains"),
        (lambda: run_normalize(f"{root}/prep", f"{root}/st", f"{root}/st", p), "is the same as"),
    ]
    for call, how in cases:
        with pytest.raises(StoreError, match=how):
            call()
    assert not parse_location(root).exists()  # nothing written
    # Other protocols or other paths do not collide.
    from pipeline.core.outputs import check_outside

    check_outside(f"{root}/a", {"IN": f"{root}/ab"})
    check_outside(f"{root}/a", {"IN": "a"})


@pytest.fixture
def held_lock(work: Path) -> Iterator[int]:
    """The lock of data/prepared held by a child process (pid yielded), as a running run."""
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, f'{os.getpid()}\\n'.encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"
    )
    lock = work / "data" / ".prepared.lock"
    holder = subprocess.Popen([sys.executable, "-c", code, lock], stdout=subprocess.PIPE)
    assert holder.stdout is not None
    assert holder.stdout.readline() == b"locked\n"
    yield holder.pid
    holder.kill()
    holder.wait()
    holder.stdout.close()


def test_a_second_run_writing_the_same_output_stops(work: Path, held_lock: int) -> None:
    data = work / "data"
    running = data / f".prepared.tmp-{uuid.uuid4().hex[:12]}"  # the first run's temporary
    (running / "images.zarr").mkdir(parents=True)
    before = digests(work)
    proc = cli("ingest", "data/photos", "data/prepared", "--params", "params.yaml", cwd=work)
    line = refused(proc, f"another run (pid {held_lock}) is writing", "prepared")
    assert line
    assert digests(work) == before
    # Nor does a run of another stage sweep the running one's temporary folder.
    proc = cli("stats", "data/prepared", "data/stats", "--params", "params.yaml", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert running.is_dir()


def test_lock_is_free_again_after_the_holder_dies(work: Path) -> None:
    lock = work / "data" / ".prepared.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.close(fd)  # what the kernel does when a run is killed
    proc = cli("ingest", "data/photos", "data/prepared", "--params", "params.yaml", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert not lock.exists()


def test_stale_leftovers_are_swept_by_another_stage_and_by_cache_clear(
    work: Path, isolated_cache: Path
) -> None:
    data = work / "data"
    proc = cli("ingest", "data/photos", "data/prepared", "--params", "params.yaml", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert (data / "prepared").resolve() in known_outputs(isolated_cache)
    user = data / ".prepared.tmpfoo"
    user.write_text("mine\n")

    def leftovers() -> list[Path]:
        made = [data / f".prepared.{k}-{uuid.uuid4().hex[:12]}" for k in ("tmp", "old")]
        for p in made:
            (p / "images.zarr").mkdir(parents=True)
        return made

    made = leftovers()  # a killed run; DVC's run-cache would never run ingest again
    proc = cli("report", "data/stats", "data/reports", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert not any(p.exists() for p in made)
    made = leftovers()
    proc = cli("cache", "clear", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert not any(p.exists() for p in made)
    assert user.read_text() == "mine\n"


@pytest.mark.parametrize(
    "content", [b"", b"{not json", b'{"schema": "pipeline.outputs/1", "outputs": [1]}',
                b"[" * 2_000_000],
    ids=["empty", "malformed", "wrong-type", "huge"],
)
def test_a_bad_registry_reads_as_empty(isolated_cache: Path, content: bytes) -> None:
    (isolated_cache / FILE).write_bytes(content)
    assert known_outputs(isolated_cache) == []


def test_sigkill_of_the_main_process_ends_its_workers(tmp_path: Path) -> None:
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    # 600 copies of one large noise JPEG (about 10 ms each to decode): the run lasts seconds.
    Image.fromarray(rng.integers(0, 256, (900, 1200, 3), dtype=np.uint8)).save(
        src / "000.jpg", quality=90
    )
    data = (src / "000.jpg").read_bytes()
    for i in range(1, 600):
        (src / f"{i:03d}.jpg").write_bytes(data)
    params = {**PARAMS, "base": {"scheduler": "processes", "workers": 2},
              "ingest": {**PARAMS["ingest"], "image_size": [32, 32], "shard_images": 8}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "ingest", "src", "out", "--params", "params.yaml"],
        cwd=tmp_path, env=dict(os.environ), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    main = psutil.Process(proc.pid)
    deadline = time.monotonic() + 60
    children: list[psutil.Process] = []
    while time.monotonic() < deadline and proc.poll() is None:
        children = main.children(recursive=True)
        if len(children) >= 3:  # two workers and the resource tracker
            break
        time.sleep(0.05)
    time.sleep(0.5)  # let the workers start
    children = main.children(recursive=True)
    assert proc.poll() is None, "the run ended before it could be killed: make it bigger"
    assert len(children) >= 2, children
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    alive = children
    while time.monotonic() < deadline:
        alive = [c for c in children if _alive(c)]
        if not alive:
            break
        time.sleep(0.1)
    for c in alive:
        c.kill()
    assert not alive, [c.cmdline() for c in alive]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
