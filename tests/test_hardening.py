"""Hardening: bad inputs, interruptions, a full or read-only disk, corrupt stores, determinism.

Real components only: files made by Pillow (tests/corpus.py), real Zarr stores on disk,
``python -m pipeline`` subprocesses killed with real SIGKILLs sent to their whole process group
(so Dask's worker processes die too), a real tmpfs mount, a real dask.distributed LocalCluster.
The oracles are independent of the code under test: Pillow's own decode for pixels, sha256 of
every file of whole output trees for "unchanged" and "byte-identical".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
import zarr
from conftest import mounted_tmpfs
from corpus import (
    CASES,
    CLASSES,
    DUPLICATES,
    MAX_PIXELS,
    OK,
    REJECTED,
    SIZE,
    Case,
    encode,
    flip_idat_byte,
    oracle,
    pillow_decode,
    png_chunks,
    walk_entries,
    write_corpus,
)
from PIL import Image

from pipeline import open_normalized
from pipeline.core.errors import BadImagesError, PipelineError, StoreError
from pipeline.core.runner import SCHEDULER_ENV
from pipeline.ingest.stage import IngestResult, run_ingest
from pipeline.normalize.stage import run_normalize
from pipeline.params import Params, parse_params
from pipeline.stats.stage import run_stats
from pipeline.tools.verify import verify_store

PY = sys.executable
ENV = {k: v for k, v in os.environ.items() if k != SCHEDULER_ENV}
# pytest.raises / pytest.fail raise this; xfails below accept only it and AssertionError, so a
# crash of another kind still shows up as a real failure.
FAILED = pytest.fail.Exception


# --- helpers -----------------------------------------------------------------------------------


def tree(root: Path, *, skip_hidden: bool = False) -> dict[str, str] | None:
    """sha256 of every file under ``root`` by relative path; None when ``root`` is absent.

    ``skip_hidden`` leaves out top-level entries starting with "." (the temporary files that
    the stats stage keeps inside its output folder).
    """
    if not root.exists():
        return None
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if skip_hidden and rel.parts[0].startswith("."):
            continue
        if p.is_file():
            out[rel.as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def diff(a: dict[str, str] | None, b: dict[str, str] | None) -> str:
    """A short description of how two trees differ, for assertion messages."""
    if a is None or b is None:
        return f"{'absent' if a is None else len(a)} vs {'absent' if b is None else len(b)}"
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return f"{len(keys)} differing file(s): {keys[:6]}"


def cli(*args: object, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pipeline ARGS`` to completion."""
    return subprocess.run(
        [PY, "-m", "pipeline", *map(str, args)],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def write_params(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=True))
    return path


def edit_attrs(store: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite a Zarr group's attributes through zarr itself (plain JSON round trip)."""
    group = zarr.open_group(store, mode="r+")
    attrs = json.loads(json.dumps(group.attrs.asdict()))
    change(attrs)
    group.attrs.put(attrs)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="ascii").splitlines()]


# =============================================================================================
# 1. Bad and awkward inputs, end to end through run_ingest (tests/corpus.py holds the table)
# =============================================================================================


def corpus_params(**ingest: Any) -> Params:
    base = ingest.pop("base", {"scheduler": "threads", "workers": 2})
    settings = {
        "image_size": list(SIZE),
        "max_pixels": MAX_PIXELS,
        "chunk_images": 2,
        "shard_images": 4,
        "on_error": "skip",
        **ingest,
    }
    return parse_params({"base": base, "ingest": settings})


@dataclass(frozen=True)
class Ingested:
    source: Path
    out: Path
    result: IngestResult
    rows: list[dict[str, Any]]  # manifest.jsonl, in file order
    rejected: dict[str, str]  # rejected.json: path -> reason
    images: np.ndarray  # the stored pixels, read back with zarr

    @property
    def manifest(self) -> dict[str, dict[str, Any]]:
        return {r["path"]: r for r in self.rows}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Ingested:
    """The corpus folder, ingested once with ``on_error: skip``."""
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root / "src")
    result = run_ingest(root / "src", root / "prepared", corpus_params())
    rejected = json.loads((root / "prepared" / "rejected.json").read_text(encoding="ascii"))
    images = zarr.open_array(root / "prepared" / "images.zarr" / "images", mode="r")
    return Ingested(
        source=root / "src",
        out=root / "prepared",
        result=result,
        rows=read_jsonl(root / "prepared" / "manifest.jsonl"),
        rejected={r["path"]: r["reason"] for r in rejected},
        images=np.asarray(images[...]),
    )


def test_corpus_table_lists_every_entry_of_the_folder(corpus: Ingested) -> None:
    assert walk_entries(corpus.source) == {c.path for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[ascii(c.path)[1:-1] for c in CASES])
def test_each_entry_is_decoded_rejected_or_ignored(corpus: Ingested, case: Case) -> None:
    path = os.path.join(os.fsencode(corpus.source), os.fsencode(case.path))
    manifest = corpus.manifest
    if case.kind == "ok":
        assert case.path not in corpus.rejected, corpus.rejected.get(case.path)
        row = manifest[case.path]
        with open(path, "rb") as fh:
            assert row["sha256"] == hashlib.sha256(fh.read()).hexdigest()
        with Image.open(path) as im:
            seen = (
                im.format,
                im.mode,
                *im.size,
                getattr(im, "n_frames", 1),
                im.getexif().get(0x0112, 1),
            )
        recorded = tuple(
            row[k] for k in ("format", "mode", "width", "height", "frames", "orientation")
        )
        assert recorded == seen
        assert row["frames"] == case.frames
        assert row["label"] == case.path.split("/")[0]
        np.testing.assert_array_equal(corpus.images[row["index"]], oracle(path))
    elif case.kind == "rejected":
        assert case.path not in manifest
        assert re.search(case.reason, corpus.rejected[case.path]), corpus.rejected[case.path]
    else:
        assert case.path not in manifest
        assert case.path not in corpus.rejected
        assert not [p for p in [*manifest, *corpus.rejected] if p.startswith(case.path + "/")]


def test_nothing_disappears_without_a_record(corpus: Ingested) -> None:
    paths = [r["path"] for r in corpus.rows]
    assert len(paths) == len(set(paths)), "a file was stored twice"
    assert set(paths) == {c.path for c in OK}
    assert set(corpus.rejected) == {c.path for c in REJECTED}
    assert [r["index"] for r in corpus.rows] == list(range(len(OK)))
    assert corpus.result.count == len(OK) == corpus.images.shape[0]
    assert corpus.images.shape[1:] == (*SIZE, 3)
    assert corpus.result.rejected == sorted(corpus.rejected.items())
    group = zarr.open_group(corpus.out / "images.zarr", mode="r")
    assert group.attrs["classes"] == CLASSES  # bad/, lonely/ and empty_class/ keep no image
    labels = np.asarray(group["label"][...])
    assert [CLASSES[k] for k in labels] == [r["label"] for r in corpus.rows]
    duplicates = json.loads((corpus.out / "duplicates.json").read_text())
    assert [sorted(g["paths"]) for g in duplicates] == DUPLICATES


def test_on_error_fail_lists_every_bad_file_and_writes_nothing(
    corpus: Ingested, tmp_path: Path
) -> None:
    with pytest.raises(BadImagesError) as info:
        run_ingest(corpus.source, tmp_path / "prepared", corpus_params(on_error="fail"))
    assert info.value.rejected == sorted(corpus.rejected.items())
    for path in corpus.rejected:
        assert f"  {path}: " in str(info.value)
    assert os.listdir(tmp_path) == []  # no output folder, no temporary folder


def test_on_error_fail_through_the_cli(corpus: Ingested, tmp_path: Path) -> None:
    params = write_params(
        tmp_path / "params.yaml",
        {
            "base": {"scheduler": "synchronous"},
            "ingest": {"image_size": list(SIZE), "max_pixels": MAX_PIXELS, "on_error": "fail"},
        },
    )
    proc = cli("ingest", corpus.source, tmp_path / "prepared", "--params", params, cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: {len(REJECTED)} input file(s) cannot be used")
    for path in corpus.rejected:
        assert f"  {path}: " in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["params.yaml"]


# Permission denied cannot be simulated as root (root reads files whatever their mode bits):
# this case is skipped here and runs on a developer's non-root machine.
@pytest.mark.skipif(
    os.geteuid() == 0,
    reason="root reads a file whatever its mode bits, so a permission-denied file cannot be "
    "made here; this case runs on a non-root machine",
)
def test_unreadable_file_is_rejected(tmp_path: Path) -> None:
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    (src / "ok.png").write_bytes(encode(Image.new("RGB", (40, 30), (1, 2, 3)), "PNG"))
    locked = src / "locked.png"
    locked.write_bytes(encode(Image.new("RGB", (40, 30), (4, 5, 6)), "PNG"))
    locked.chmod(0)
    try:
        run_ingest(tmp_path / "src", tmp_path / "out", corpus_params())
    finally:
        locked.chmod(0o644)
    rejected = json.loads((tmp_path / "out" / "rejected.json").read_text())
    assert [r["path"] for r in rejected] == ["a/locked.png"]
    assert "Permission denied" in rejected[0]["reason"]


def silently_corrupt_png() -> tuple[bytes, bytes]:
    """A PNG and a copy with one IDAT byte flipped that Pillow still decodes, to other pixels."""
    yy, xx = np.mgrid[0:40, 0:50]
    good = encode(Image.fromarray(np.stack([xx * 5, yy * 6, xx + yy], -1).astype(np.uint8)), "PNG")
    want = pillow_decode(good)
    _, _, length, _ = next(c for c in png_chunks(good) if c[0] == b"IDAT")
    for offset in range(length):
        for mask in (0x01, 0x80):
            bad = flip_idat_byte(good, offset, mask)
            got = pillow_decode(bad)
            if got is not None and not np.array_equal(got, want):
                return good, bad
    raise AssertionError("no silently corrupting flip found")


def test_premise_pillow_decodes_a_png_with_a_stale_idat_crc() -> None:
    good, bad = silently_corrupt_png()
    idat = next(c for c in png_chunks(bad) if c[0] == b"IDAT")
    assert not idat[3]  # the chunk's CRC no longer matches its bytes
    got, want = pillow_decode(bad), pillow_decode(good)
    assert got is not None
    assert want is not None
    assert (got != want).any()


def test_png_whose_idat_crc_does_not_match_is_rejected(tmp_path: Path) -> None:
    _, bad = silently_corrupt_png()
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    (src / "good.png").write_bytes(encode(Image.new("RGB", (50, 40), (9, 99, 199)), "PNG"))
    (src / "corrupt.png").write_bytes(bad)
    run_ingest(tmp_path / "src", tmp_path / "out", corpus_params(base={"scheduler": "synchronous"}))
    rejected = json.loads((tmp_path / "out" / "rejected.json").read_text())
    assert [r["path"] for r in rejected] == ["a/corrupt.png"]


# =============================================================================================
# 2. Interruptions: SIGKILL to `python -m pipeline ...` and its Dask workers
# =============================================================================================

# Params of the killed runs ("B") and of the different output already in place ("A").
BIG_SHARD = 8
PARAMS_B: dict[str, Any] = {
    "base": {"scheduler": "auto", "workers": 2},
    "ingest": {"image_size": [32, 32], "chunk_images": 4, "shard_images": BIG_SHARD},
    "stats": {},
    "normalize": {"mode": "per_pixel"},
}
PARAMS_A: dict[str, Any] = {
    "base": {"scheduler": "auto", "workers": 2},
    "ingest": {"image_size": [24, 24], "chunk_images": 4, "shard_images": BIG_SHARD},
    "stats": {"fit_split": "all", "allow_non_train_fit": True},
    "normalize": {"mode": "per_channel"},
}


def with_base(raw: dict[str, Any], **base: Any) -> dict[str, Any]:
    return {**raw, "base": base}


@dataclass(frozen=True)
class Big:
    """400 small photos (50 shards of 8) and uninterrupted reference outputs made in-process."""

    source: Path
    refs: Path  # refs/B/{prepared,stats,normalized}, refs/A/{prepared,stats,normalized}
    params_b: Path


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Big:
    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(42)
    yy, xx = np.mgrid[0:48, 0:64]
    base = np.stack([xx * 4, yy * 5, xx + yy], axis=-1)
    for c in "abcd":
        (root / "src" / c).mkdir(parents=True)
        for i in range(100):
            a = np.clip(base + rng.integers(-25, 26, base.shape), 0, 255).astype(np.uint8)
            im = Image.fromarray(a)
            if i % 2:
                im.save(root / "src" / c / f"{i:03d}.png")
            else:
                im.save(root / "src" / c / f"{i:03d}.jpg", quality=85)
    params_b = write_params(root / "B.yaml", PARAMS_B)
    refs = root / "refs"
    for name, raw in (("B", PARAMS_B), ("A", PARAMS_A)):
        p = parse_params(with_base(raw, scheduler="threads", workers=2))
        run_ingest(root / "src", refs / name / "prepared", p)
        prepared_b = refs / "B" / "prepared"
        run_stats(prepared_b / "images.zarr", refs / name / "stats", p)
        run_normalize(prepared_b, refs / "B" / "stats", refs / name / "normalized", p)
    return Big(source=root / "src", refs=refs, params_b=params_b)


@dataclass
class Setup:
    """One stage run to interrupt: its command, output and the trees it may leave."""

    stage: str
    args: list[str]
    cwd: Path
    out: Path
    reference: dict[str, str]
    previous: dict[str, str] | None

    def outputs(self) -> dict[str, str] | None:
        return tree(self.out, skip_hidden=self.stage == "stats")

    def temporaries(self) -> list[Path]:
        """Temporary and old folders of atomic publish (hidden names beside the outputs)."""
        return sorted(self.out.parent.glob(f".{self.out.name}.*"))


def make_setup(big: Big, stage: str, work: Path, previous: bool) -> Setup:
    """Inputs laid out like the references (lineage holds relative paths), output absent or
    holding the other params' output."""
    b, a = big.refs / "B", big.refs / "A"
    params = str(big.params_b)
    if stage == "ingest":
        out = work / "prepared"
        args = ["ingest", str(big.source), str(out), "--params", params]
    elif stage == "stats":
        out = work / "stats"
        args = ["stats", str(b / "prepared"), str(out), "--params", params]
    else:
        shutil.copytree(b / "prepared", work / "prepared")
        shutil.copytree(b / "stats", work / "stats")
        out = work / "normalized"
        args = [
            "normalize",
            str(work / "prepared"),
            str(work / "stats"),
            str(out),
            "--params",
            params,
        ]
    reference = tree(b / out.name)
    assert reference
    if previous:
        shutil.copytree(a / out.name, out)
    return Setup(stage, args, work, out, reference, tree(out) if previous else None)


@dataclass
class Kill:
    point: str
    finished: bool  # the run ended on its own before the kill point came
    partial_on_disk: bool  # a temporary folder existed when the signal was sent


def _reached(setup: Setup, point: str, elapsed: float) -> bool:
    """Whether the kill point is reached: "<s>s" (seconds), "temp" (a temporary folder exists),
    "shards:N" (N shard files written), "late" (all shards written, publish not done)."""
    if point.endswith("s") and point[:-1].replace(".", "").isdigit():
        return elapsed >= float(point[:-1])
    try:
        temps = [p for p in setup.temporaries() if ".tmp-" in p.name]
        if point == "temp":
            return bool(temps)
        if point.startswith("shards:"):
            shards = [
                f
                for t in temps
                for f in (t / "images.zarr" / "images" / "c").rglob("*")
                if f.is_file()
            ]
            return len(shards) >= int(point.split(":")[1])
        if point == "late":
            marker = "manifest.jsonl" if setup.stage == "ingest" else "images.zarr/offset"
            return any((t / marker).exists() for t in temps)
    except OSError:  # a folder vanished while we looked
        return False
    raise ValueError(point)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the whole process group, reap the leader and wait until no member is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not group_members(proc.pid), "Dask worker processes outlived the kill"


def kill_at(setup: Setup, point: str, timeout: float = 120) -> Kill:
    """Start the stage in its own session and SIGKILL its process group at ``point``."""
    with open(setup.cwd / "killed.log", "ab") as log:
        proc = subprocess.Popen(
            [PY, "-m", "pipeline", *setup.args],
            cwd=setup.cwd,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
    start = time.monotonic()
    try:
        while proc.poll() is None:
            elapsed = time.monotonic() - start
            if _reached(setup, point, elapsed):
                break
            assert elapsed < timeout, f"kill point {point} never came"
            time.sleep(0.002)
        partial = any(".tmp-" in p.name for p in setup.temporaries())
    finally:
        kill_group(proc)
    finished = proc.returncode == 0
    assert finished or proc.returncode == -signal.SIGKILL, (setup.cwd / "killed.log").read_text()
    return Kill(point, finished, partial and not finished)


def check_after_kill(setup: Setup, kill: Kill) -> None:
    """The output is the previous complete output or nothing (or the new complete output, when
    the signal came after the publish); never a partial one."""
    now = setup.outputs()
    if not now or now == setup.reference:
        return
    assert setup.previous is not None, (
        f"{kill.point}: a killed run left partial output: {diff(now, setup.reference)}"
    )
    assert now == setup.previous, (
        f"{kill.point}: output is neither the previous one nor absent: {diff(now, setup.previous)}"
    )


def rerun_and_check(setup: Setup) -> None:
    """A re-run completes, equals the uninterrupted run byte for byte, and leaves no leftovers."""
    proc = cli(*setup.args, cwd=setup.cwd)
    assert proc.returncode == 0, proc.stderr
    assert setup.outputs() == setup.reference, diff(setup.outputs(), setup.reference)
    assert setup.stage != "stats" or sorted(os.listdir(setup.out)) == [
        "metrics.json",
        "stats.json",
        "stats.zarr",
    ]
    assert setup.temporaries() == []


# The default run kills each stage twice in a row (each run also cleans up after the last kill),
# then re-runs it once; the slow run below kills once per point and re-runs after each kill.
CHAINS = {
    "ingest-fresh": ["0.3s", "shards:25"],
    "ingest-previous": ["1.5s", "late"],
    "stats-fresh": ["0.3s", "temp"],
    "stats-previous": ["0.8s", "temp"],
    "normalize-fresh": ["0.3s", "shards:25"],
    "normalize-previous": ["temp", "late"],
}


@pytest.mark.parametrize("chain", list(CHAINS))
def test_killed_runs_leave_previous_output_or_nothing(big: Big, tmp_path: Path, chain: str) -> None:
    stage, state = chain.split("-")
    setup = make_setup(big, stage, tmp_path, previous=state == "previous")
    kills = []
    for point in CHAINS[chain]:
        kill = kill_at(setup, point)
        check_after_kill(setup, kill)
        kills.append(kill)
    assert any(k.partial_on_disk for k in kills), "no kill caught a half-written output"
    rerun_and_check(setup)


SLOW_POINTS = {
    "ingest": ["0.3s", "0.8s", "1.5s", "temp", "shards:10", "shards:40", "late"],
    "stats": ["0.3s", "0.8s", "1.5s", "temp"],
    "normalize": ["0.3s", "0.8s", "temp", "shards:10", "shards:40", "late"],
}


@pytest.mark.slow
@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "previous"])
@pytest.mark.parametrize(
    ("stage", "point"), [(s, p) for s, points in SLOW_POINTS.items() for p in points]
)
def test_each_kill_point_then_rerun(
    big: Big, tmp_path: Path, stage: str, point: str, previous: bool
) -> None:
    setup = make_setup(big, stage, tmp_path, previous)
    check_after_kill(setup, kill_at(setup, point))
    rerun_and_check(setup)


# A real SIGKILL at an exact point: the process wraps one function to signal itself.
DRIVER = """
import os, signal, sys
mode, args = sys.argv[1], sys.argv[2:]
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
if mode.startswith("replace:"):
    real_replace, prefix = os.replace, mode.split(":", 1)[1]
    def replace(src, dst, *a, **k):
        if os.path.basename(os.fspath(src)).startswith(prefix):
            die()
        return real_replace(src, dst, *a, **k)
    os.replace = replace
from pipeline.cli import app
app(prog_name="pipeline", args=args)
"""


def run_driver(mode: str, setup: Setup) -> None:
    with open(setup.cwd / "driver.log", "wb") as log:
        proc = subprocess.Popen(
            [PY, "-c", DRIVER, mode, *setup.args],
            cwd=setup.cwd,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
        proc.wait(timeout=120)
    kill_group(proc)
    assert proc.returncode == -signal.SIGKILL, (setup.cwd / "driver.log").read_text()


def test_kill_between_the_two_renames_of_publish(big: Big, tmp_path: Path) -> None:
    """Killed after the previous output moved aside and before the new one moved in: nothing
    at the output path, the previous output whole in .prepared.old-*; a re-run recovers."""
    setup = make_setup(big, "ingest", tmp_path, previous=True)
    threads = write_params(tmp_path / "threads.yaml", with_base(PARAMS_B, scheduler="threads"))
    setup.args[-1] = str(threads)  # same values, quicker to start than the process pool
    run_driver("replace:.prepared.tmp-", setup)
    assert setup.outputs() is None
    olds = [p for p in setup.temporaries() if ".old-" in p.name]
    assert len(olds) == 1
    assert tree(olds[0]) == setup.previous
    rerun_and_check(setup)


def test_stats_folder_is_published_with_one_rename(big: Big, tmp_path: Path) -> None:
    """Killed at the rename that publishes the stats folder: never a stats.json from one run
    beside a stats.zarr from another; a re-run recovers."""
    setup = make_setup(big, "stats", tmp_path, previous=True)
    run_driver("replace:.stats.tmp-", setup)
    after = setup.outputs()
    assert after is None or after == setup.previous, diff(after, setup.previous)
    rerun_and_check(setup)


def test_failed_run_leaves_no_temporary_folder_while_tasks_are_in_flight(
    big: Big, tmp_path: Path
) -> None:
    prepared = tmp_path / "prepared"
    shutil.copytree(big.refs / "B" / "prepared", prepared)
    shard = prepared / "images.zarr" / "images" / "c" / "2" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # sample 16 changed in place: found only when its shard is read
    shard.write_bytes(bytes(data))
    params = parse_params(
        {
            "base": {"scheduler": "threads", "workers": 4},
            # slow shard writes, so that other tasks are still running when one fails
            "normalize": {"codec": "zstd", "codec_level": 19},
        }
    )
    for attempt in range(15):  # the race is lost in most attempts; 15 make it near certain
        with pytest.raises(StoreError, match=r"cannot read samples 16\.\.23|sample\(s\) 16 do"):
            run_normalize(prepared, big.refs / "B" / "stats", tmp_path / "normalized", params)
        time.sleep(0.25)  # let the tasks that were still running finish
        left = sorted(p.name for p in tmp_path.glob(".normalized.*"))
        assert not left, f"attempt {attempt}: left behind {left}"


# =============================================================================================
# 3. Disk full and read-only output (a real 2 MB tmpfs)
# =============================================================================================


@pytest.fixture(scope="module")
def tmpfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path_factory.mktemp("tmpfs"), "2m") as mnt:
        yield mnt


@dataclass
class Outcome:
    before: dict[str, str] | None
    after: dict[str, str] | None = None
    error: BaseException | None = None
    proc: subprocess.CompletedProcess[str] | None = None


DISK_CASES = [
    "full-api-ingest",
    "full-cli-ingest",
    "full-api-normalize",
    "full-cli-normalize",
    "readonly-api-ingest",
    "readonly-cli-ingest",
    "readonly-api-normalize",
    "readonly-cli-normalize",
]


@pytest.fixture(scope="module")
def disk_runs(
    tmpfs: Path, big: Big, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Outcome]:
    """Each stage into a 2 MB tmpfs that already holds a small previous output: first full,
    then remounted read-only. Synchronous scheduler: a failed run with tasks still running is
    a separate bug (test_failed_run_leaves_no_temporary_folder_while_tasks_are_in_flight)."""
    work = tmp_path_factory.mktemp("disk")
    raw = {
        **with_base(PARAMS_B, scheduler="synchronous"),
        "ingest": {**PARAMS_B["ingest"], "image_size": [64, 64]},
    }  # 4.9 MB of pixels
    params_file = write_params(work / "params.yaml", raw)
    params = parse_params(raw)
    small = work / "small" / "a"
    small.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (20, 20), (i, 2 * i, 3 * i)).save(small / f"{i}.png")
    run_ingest(small.parent, tmpfs / "prepared", params)  # the previous output
    b = big.refs / "B"
    runs: dict[str, Outcome] = {}
    for case in DISK_CASES:
        if case == "readonly-api-ingest":
            subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
        _, how, stage = case.split("-")
        outcome = Outcome(before=tree(tmpfs))
        if how == "api":
            try:
                if stage == "ingest":
                    run_ingest(big.source, tmpfs / "prepared", params)
                else:
                    run_normalize(b / "prepared", b / "stats", tmpfs / "normalized", params)
            except Exception as exc:
                outcome.error = exc
        elif stage == "ingest":
            outcome.proc = cli(
                "ingest", big.source, tmpfs / "prepared", "--params", params_file, cwd=work
            )
        else:
            outcome.proc = cli(
                "normalize",
                b / "prepared",
                b / "stats",
                tmpfs / "normalized",
                "--params",
                params_file,
                cwd=work,
            )
        outcome.after = tree(tmpfs)
        runs[case] = outcome
    return runs


@pytest.mark.parametrize("case", DISK_CASES)
def test_full_or_readonly_disk_is_a_clear_error_and_changes_nothing(
    disk_runs: dict[str, Outcome], tmpfs: Path, case: str
) -> None:
    outcome = disk_runs[case]
    assert outcome.before is not None
    assert "prepared/images.zarr/zarr.json" in outcome.before  # the previous output
    assert outcome.after == outcome.before, diff(outcome.after, outcome.before)
    expected = "No space left on device" if case.startswith("full") else "Read-only file system"
    if outcome.proc is None:
        assert isinstance(outcome.error, PipelineError | OSError), repr(outcome.error)
        assert expected in str(outcome.error) or str(tmpfs) in str(outcome.error)
    else:
        assert outcome.proc.returncode == 1, outcome.proc.stderr
        assert expected in outcome.proc.stderr


@pytest.mark.parametrize("case", [c for c in DISK_CASES if "-cli-" in c])
def test_cli_reports_a_full_or_readonly_disk_in_one_line(
    disk_runs: dict[str, Outcome], case: str
) -> None:
    proc = disk_runs[case].proc
    assert proc is not None
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines[-3:]
    assert lines[0].startswith("error: ")


# =============================================================================================
# 4. Corrupt stores (test_stats_stage and test_normalize already cover damaged prepared shards
#    in stats and normalize; test_reader covers edited mode/constants in open_normalized)
# =============================================================================================


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepared, stats, normalized (per_channel) and normalized_pi (per_image) side by side."""
    root = tmp_path_factory.mktemp("chain")
    rng = np.random.default_rng(5)
    for cls in ("ant", "bee", "cow"):
        (root / "src" / cls).mkdir(parents=True)
        for i in range(8):
            a = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / "src" / cls / f"{i}.png")
    p = parse_params(
        {
            "base": {"scheduler": "synchronous"},
            "ingest": {"image_size": None, "chunk_images": 2, "shard_images": 4},
        }
    )
    run_ingest(root / "src", root / "prepared", p)
    run_stats(root / "prepared" / "images.zarr", root / "stats", p)
    run_normalize(root / "prepared", root / "stats", root / "normalized", p)
    pi = parse_params({"base": {"scheduler": "synchronous"}, "normalize": {"mode": "per_image"}})
    run_normalize(root / "prepared", root / "stats", root / "normalized_pi", pi)
    shutil.rmtree(root / "src")
    return root


def copy_chain(chain: Path, dest: Path) -> Path:
    shutil.copytree(chain, dest)
    return dest


def shard_file(array_dir: Path, index: int = 1) -> Path:
    return array_dir / "c" / str(index) / "0" / "0" / "0"


def drop_shard(array_dir: Path) -> None:
    shard_file(array_dir).unlink()


def truncate_shard(array_dir: Path) -> None:
    shard = shard_file(array_dir)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def recreate_images(store: Path, dtype: str) -> None:
    """Rewrite ``images`` as a complete, readable array of another dtype (same layout)."""
    old = zarr.open_array(store / "images", mode="r")
    data, chunks, shards = np.asarray(old[...]), old.chunks, old.shards
    dims = old.metadata.dimension_names  # type: ignore[union-attr]
    shutil.rmtree(store / "images")
    new = zarr.open_group(store, mode="r+").create_array(
        "images",
        shape=data.shape,
        dtype=dtype,
        chunks=chunks,
        shards=shards,
        dimension_names=dims,
        fill_value=0,
    )
    new[...] = data.astype(dtype)


def retype_metadata(store: Path, dtype: str) -> None:
    """Change only the images array's data_type in zarr.json (the shards stay as they were)."""
    meta_path = store / "images" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["data_type"] = dtype
    meta_path.write_text(json.dumps(meta))


def shift_splits(attrs: dict[str, Any]) -> None:
    (a, b), (_, c) = attrs["splits"]["train"], attrs["splits"]["val"]
    attrs["splits"]["train"], attrs["splits"]["val"] = [a, b - 2], [b - 2, c]


def stage_runner(stage: str, root: Path, out: Path) -> Callable[[], object]:
    """Run stats or normalize on the chain copy at ``root`` into ``out``."""
    p = parse_params({"base": {"scheduler": "synchronous"}})
    if stage == "stats":
        return lambda: run_stats(root / "prepared" / "images.zarr", out, p)
    return lambda: run_normalize(root / "prepared", root / "stats", out, p)


PREPARED_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing-shard": (lambda s: drop_shard(s / "images"), r"incomplete: 1 shard file"),
    "float32-images": (lambda s: recreate_images(s, "float32"), r"holds float32"),
    "uint16-metadata": (lambda s: retype_metadata(s, "uint16"), r"holds uint16 with pixel_max 255"),
}


@pytest.mark.parametrize("stage", ["stats", "normalize"])
@pytest.mark.parametrize("damage", list(PREPARED_DAMAGE))
def test_damaged_prepared_store_is_refused(
    chain: Path, tmp_path: Path, damage: str, stage: str
) -> None:
    root = copy_chain(chain, tmp_path / "chain")
    store = root / "prepared" / "images.zarr"
    change, message = PREPARED_DAMAGE[damage]
    change(store)
    out = root / "new"
    run = stage_runner(stage, root, out)
    with pytest.raises(StoreError, match=message) as info:
        run()
    assert str(store) in str(info.value)
    assert not out.exists()


@pytest.mark.parametrize(
    ("stage", "attr"),
    [
        pytest.param("stats", "fingerprint"),
        pytest.param("stats", "splits"),
        pytest.param("normalize", "fingerprint"),  # caught: the stats name another fingerprint
        pytest.param("normalize", "splits"),
    ],
)
def test_edited_prepared_attribute_is_refused(
    chain: Path, tmp_path: Path, stage: str, attr: str
) -> None:
    root = copy_chain(chain, tmp_path / "chain")
    store = root / "prepared" / "images.zarr"
    if attr == "fingerprint":
        edit_attrs(store, lambda a: a.update(fingerprint="f" * 64))
    else:
        edit_attrs(store, shift_splits)
    run = stage_runner(stage, root, root / "new")
    with pytest.raises(PipelineError, match=r"fingerprint|fitted on other data|split"):
        run()
    assert not (root / "new").exists()


# --- a normalized store, checked by open_normalized (in-process) and `pipeline verify` (CLI) --


def _edit_normalized(name: str, change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    return lambda root: edit_attrs(root / name / "images.zarr", change)


def _bump_constants(attrs: dict[str, Any]) -> None:
    attrs["constants"]["offset"] = [x + 1 for x in attrs["constants"]["offset"]]


# case -> (damage applied to a copy of the chain, store to check, regex for verify's message)
VERIFY_CASES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "normalized-missing-shard": (
        lambda r: drop_shard(r / "normalized" / "images.zarr" / "images"),
        "normalized",
        r"sample\(s\) differ|incomplete",
    ),
    "normalized-truncated-shard": (
        lambda r: truncate_shard(r / "normalized" / "images.zarr" / "images"),
        "normalized",
        r"sample\(s\) differ|damaged",
    ),
    "normalized-float16-images": (
        lambda r: recreate_images(r / "normalized" / "images.zarr", "float16"),
        "normalized",
        r"check failed for dtype",
    ),
    "mode-edited": (
        _edit_normalized("normalized", lambda a: a.update(mode="global")),
        "normalized",
        r"check failed for offset, scale",
    ),
    "constants-edited": (
        _edit_normalized("normalized", _bump_constants),
        "normalized",
        r"check failed for constants",
    ),
    "per-image-eps-edited": (
        _edit_normalized("normalized_pi", lambda a: a.update(eps=0.5)),
        "normalized_pi",
        r"sample\(s\) differ|check failed for eps",
    ),
    "prepared-missing-shard": (
        lambda r: drop_shard(r / "prepared" / "images.zarr" / "images"),
        "normalized",
        r"sample\(s\) differ|incomplete",
    ),
    "prepared-truncated-shard": (
        lambda r: truncate_shard(r / "prepared" / "images.zarr" / "images"),
        "normalized",
        r"sample\(s\) differ|damaged",
    ),
    "splits-edited": (
        _edit_normalized("normalized", shift_splits),
        "normalized",
        r"split",
    ),
    "per-channel-eps-edited": (
        _edit_normalized("normalized", lambda a: a.update(eps=0.5)),
        "normalized",
        r"eps",
    ),
    "prepared-fingerprint-edited": (
        lambda r: edit_attrs(
            r / "prepared" / "images.zarr", lambda a: a.update(fingerprint="f" * 64)
        ),
        "normalized",
        r"fingerprint",
    ),
}


@dataclass
class Damaged:
    root: Path
    store: Path
    message: str
    proc: subprocess.CompletedProcess[str] | None = None


@pytest.fixture(scope="module")
def verify_runs(chain: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Damaged]:
    """One damaged copy per case, and `python -m pipeline verify` on each, run concurrently."""
    base = tmp_path_factory.mktemp("verify")
    cases, running = {}, {}
    for name, (damage, store, message) in VERIFY_CASES.items():
        root = copy_chain(chain, base / name)
        damage(root)
        cases[name] = Damaged(root, root / store, message)
        running[name] = subprocess.Popen(
            [PY, "-m", "pipeline", "verify", str(root / store)],
            cwd=root,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for name, proc in running.items():
        out, err = proc.communicate(timeout=180)
        cases[name].proc = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return cases


@pytest.mark.parametrize(
    "case",
    list(VERIFY_CASES),
)
def test_verify_cli_refuses_a_corrupt_store(verify_runs: dict[str, Damaged], case: str) -> None:
    run = verify_runs[case]
    assert run.proc is not None
    assert "Traceback" not in run.proc.stderr
    assert run.proc.returncode == 1, run.proc.stdout + run.proc.stderr
    assert re.search(run.message, run.proc.stderr), run.proc.stderr
    assert run.proc.stderr.startswith("verify: ")


OPEN_CASES = {
    "normalized-missing-shard": r"incomplete: 1 shard file",
    "normalized-float16-images": r"check failed for dtype",
    "splits-edited": r"split",
    "per-channel-eps-edited": r"eps",
}


@pytest.mark.parametrize("case", list(OPEN_CASES))
def test_open_normalized_refuses_a_corrupt_store(chain: Path, tmp_path: Path, case: str) -> None:
    root = copy_chain(chain, tmp_path / "chain")
    damage, store, _ = VERIFY_CASES[case]
    damage(root)
    with pytest.raises(StoreError, match=OPEN_CASES[case]):
        open_normalized(root / store)


def test_truncated_normalized_shard_is_never_read_as_zeros(chain: Path, tmp_path: Path) -> None:
    root = copy_chain(chain, tmp_path / "chain")
    truncate_shard(root / "normalized" / "images.zarr" / "images")
    # every shard's index is checked on open: a truncated shard is refused before any read
    with pytest.raises(StoreError, match="truncated"):
        open_normalized(root / "normalized")


def test_truncated_normalized_shard_error_names_the_store(chain: Path, tmp_path: Path) -> None:
    root = copy_chain(chain, tmp_path / "chain")
    truncate_shard(root / "normalized" / "images.zarr" / "images")
    with pytest.raises(StoreError, match=re.escape(str(root / "normalized"))):
        open_normalized(root / "normalized")


def test_premise_the_undamaged_chain_verifies(chain: Path) -> None:
    for store in ("normalized", "normalized_pi"):
        report = verify_store(chain / store)
        assert report.ok, report
        assert report.checked == 24
        assert len(open_normalized(chain / store)) == 24


# =============================================================================================
# 5. Determinism: the whole chain, byte for byte, across schedulers and free chunkings
# =============================================================================================

MATRIX: dict[str, tuple[dict[str, Any] | None, dict[str, Any]]] = {
    "synchronous": ({"scheduler": "synchronous"}, {"block_images": None, "split_every": 8}),
    "threads-1": ({"scheduler": "threads", "workers": 1}, {"block_images": 1, "split_every": 2}),
    "threads-2": ({"scheduler": "threads", "workers": 2}, {"block_images": 3, "split_every": 3}),
    "processes-2": (
        {"scheduler": "processes", "workers": 2},
        {"block_images": 5, "split_every": 2},
    ),
    "cluster-2": (None, {"block_images": 2, "split_every": 4}),  # dask.distributed
}


def test_whole_chain_is_byte_identical_across_schedulers_and_chunkings(
    corpus: Ingested, tmp_path: Path
) -> None:
    """The corpus (rejects, duplicates, 16-bit, CMYK...) through ingest, stats and normalize."""
    distributed = pytest.importorskip("distributed")
    trees = {}
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.ERROR,
    ) as cluster:
        for name, (base, stats) in MATRIX.items():
            base = base or {"scheduler": cluster.scheduler_address, "workers": 2}
            params = parse_params(
                {
                    "base": base,
                    "ingest": {
                        "image_size": list(SIZE),
                        "max_pixels": MAX_PIXELS,
                        "chunk_images": 2,
                        "shard_images": 4,
                        "on_error": "skip",
                    },
                    "stats": stats,
                    "normalize": {"mode": "per_pixel"},
                }
            )
            out = tmp_path / name
            run_ingest(corpus.source, out / "prepared", params)
            run_stats(out / "prepared" / "images.zarr", out / "stats", params)
            run_normalize(out / "prepared", out / "stats", out / "normalized", params)
            trees[name] = tree(out)
    reference = trees["synchronous"]
    assert reference is not None
    for part in ("prepared/rejected.json", "stats/stats.json", "normalized/images.zarr/zarr.json"):
        assert part in reference
    assert (
        tree(corpus.out)
        == {  # the fixture's own run (threads-2, default stats) agrees too
            k[len("prepared/") :]: v for k, v in reference.items() if k.startswith("prepared/")
        }
    )
    for name, t in trees.items():
        assert t == reference, f"{name}: {diff(t, reference)}"
