"""Every failure of the real CLI is one stderr line naming the key, value or file: no traceback.

Each row of CASES runs ``python -m pipeline`` in a subprocess, in a temp folder with its own
params.yaml and cache. Add a row to cover a new failure; ``{normalized}`` in the arguments is
replaced by a real normalized folder of ``{n}`` samples, ``{tmp}`` by the temp folder; names
are formatted the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import Fitted
from PIL import Image

from pipeline.ingest.stage import run_ingest
from pipeline.normalize.stage import run_normalize
from pipeline.params import parse_params

# 10**9 values once expanded, in under 400 bytes
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 10)}]\n"
    for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)
HUGE = "x" * 500_000


@dataclass(frozen=True)
class Case:
    """One CLI run: its params.yaml, its arguments, what the single stderr line must contain."""

    id: str
    params: str | None  # text of params.yaml in the working folder; None: no file
    args: list[str]
    names: list[str]  # substrings of the one stderr line: the key, the value, the range
    status: int = 1
    env: dict[str, str] = field(default_factory=dict)


def _ingest(yaml_text: str, *names: str) -> Case:
    return Case("", yaml_text, ["ingest", "{tmp}/no-such-source", "{tmp}/out"], list(names))


def _case(case_id: str, case: Case) -> Case:
    return Case(case_id, case.params, case.args, case.names, case.status, case.env)


NORMALIZE = ["normalize", "{tmp}/prepared", "{tmp}/stats", "{tmp}/out"]

CASES = [
    _case("image_size-huge", _ingest(
        "ingest:\n  image_size: [100000, 100000]\n", "ingest.image_size", "100000", "1..65536"
    )),
    _case("chunk_images-huge", _ingest(
        "ingest:\n  chunk_images: 1000000000\n", "ingest.chunk_images", "1000000000", "1..",
    )),
    _case("shard-buffer-over-2GiB", _ingest(
        "ingest:\n  image_size: [1024, 1024]\n  chunk_images: 1024\n  shard_images: 1024\n",
        "ingest.chunk_images is 1024", "1024x1024", "GiB", "Allowed: 1..682",
    )),
    _case("ingest-zstd-level-23", _ingest(
        "ingest:\n  codec: zstd\n  codec_level: 23\n", "ingest.codec_level", "23", "1..22"
    )),
    _case("ingest-lz4-level-10", _ingest(
        "ingest:\n  codec: lz4\n  codec_level: 10\n", "ingest.codec_level", "10", "0..9"
    )),
    Case("normalize-zstd-level-0", "normalize:\n  codec: zstd\n  codec_level: 0\n", NORMALIZE,
         ["normalize.codec_level", "0", "1..22"]),
    Case("normalize-lz4-level--1", "normalize:\n  codec: lz4\n  codec_level: -1\n", NORMALIZE,
         ["normalize.codec_level", "-1", "0..9"]),
    Case("stats-eps-inf", "stats:\n  eps: .inf\n", ["stats", "{tmp}/prepared", "{tmp}/stats"],
         ["stats.eps", "inf", "finite"]),
    Case("normalize-eps-nan", "normalize:\n  eps: .nan\n", NORMALIZE,
         ["normalize.eps", "nan", "finite"]),
    Case("normalize-store-unknown", "normalize:\n  store: uint8\n", NORMALIZE,
         ["normalize.store", "uint8", "'float', 'lineage'"]),
    _case("duplicate-key", _ingest(
        "ingest:\n  codec: zstd\n  codec: lz4\n", "Duplicate key 'codec'", "line 3", "params.yaml"
    )),
    _case("duplicate-section", _ingest(
        "stats: {}\ningest: {}\nstats: {}\n", "Duplicate key 'stats'", "line 3"
    )),
    _case("alias-bomb", _ingest(ALIAS_BOMB, "params.yaml", "aliases")),
    _case("nested-40-deep", _ingest(
        "ingest: " + "[" * 40 + "]" * 40 + "\n", "params.yaml", "nested more than 32"
    )),
    _case("nested-5000-deep", _ingest(
        "ingest: " + "[" * 5000 + "]" * 5000 + "\n", "params.yaml", "nested too deeply"
    )),
    _case("huge-string-value", _ingest(
        f"ingest:\n  resize: {HUGE}\n", "ingest.resize", "'xxxxxxxx", "..."
    )),
    _case("huge-list-value", _ingest(
        f"stats:\n  percentiles: [{', '.join(['50'] * 2000)}]\n", "stats.percentiles", "1001"
    )),
    _case("params-file-over-1MiB", _ingest(
        f"# {HUGE}{HUGE}{HUGE}\n", "params.yaml", "larger than 1 MiB"
    )),
    _case("invalid-yaml-is-one-line", _ingest(
        "ingest:\n  codec: [zstd\n", "params.yaml", "not valid YAML", "line"
    )),
    Case("show-index-out-of-range", None, ["show", "{normalized}", "0", "{n}"],
         ["Sample index {n} ", "out of range", "-{n}..{last}"]),
    Case("show-negative-index-out-of-range", None, ["show", "{normalized}", "--", "-{past}"],
         ["Sample index -{past}", "-{n}..{last}"]),
    Case("verify-sample--1", None, ["verify", "{normalized}", "--sample", "-1"],
         ["--sample", "-1", ">= 1"]),
    Case("verify-sample-0", None, ["verify", "{normalized}", "--sample", "0"],
         ["--sample", "0", ">= 1"]),
    Case("audit-fail-on-drift-nan", None, ["audit", "--fail-on-drift", "nan"],
         ["--fail-on-drift", "nan", "finite"]),
    Case("audit-fail-on-drift-negative", None, ["audit", "--fail-on-drift", "-1"],
         ["--fail-on-drift", "-1.0", ">= 0"]),
    Case("normalized-attribute-missing", None, ["verify", "{norm_missing}"],
         ["cli-errors-norm_missing", "stats is missing"]),
    Case("normalized-attribute-wrong-type", None, ["show", "{norm_typed}", "0"],
         ["cli-errors-norm_typed", "splits.train is not a list"]),
    Case("stats-json-wrong-type", None, ["export", "{stats_typed}"],
         ["stats.json", "count.images is not an integer"]),
    Case("source-file-of-several-GB", None, ["ingest", "{big_source}", "{tmp}/out"],
         ["huge.png", "ingest.max_file_bytes"]),
    Case("verify-seed--1", None, ["verify", "{normalized}", "--sample", "2", "--seed", "-1"],
         ["--seed", "-1", "0..4294967295"]),
]


@pytest.fixture(scope="module")
def normalized(rgb8: Fitted, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The placeholders of CASES: a normalized folder and its sample count."""
    # beside the prepared and stats folders: a store's lineage paths stay inside its parent
    base = rgb8.prepared.parent
    out = base / "cli-errors-normalized"
    run_normalize(rgb8.prepared, rgb8.stats, out, parse_params({}))
    n = len(rgb8.images)
    broken = {
        "norm_missing": lambda a: a.pop("stats"),
        "norm_typed": lambda a: a.update(splits={"train": "all", "val": [0, 0], "test": [0, 0]}),
    }
    places: dict[str, object] = {}
    for name, edit in broken.items():
        copy = base / f"cli-errors-{name}"
        shutil.copytree(out, copy)
        meta = copy / "images.zarr" / "zarr.json"
        doc = json.loads(meta.read_text())
        edit(doc["attributes"])
        meta.write_text(json.dumps(doc))
        places[name] = copy
    stats = base / "cli-errors-stats"
    shutil.copytree(rgb8.stats, stats)
    doc = json.loads((stats / "stats.json").read_text())
    doc["count"]["images"] = "many"
    (stats / "stats.json").write_text(json.dumps(doc))
    big = base / "cli-errors-big-source"
    (big / "cls").mkdir(parents=True)
    with open(big / "cls" / "huge.png", "wb") as f:
        f.truncate(3 * 2**30)  # a sparse 3 GiB file: no disk used, never read
    return {
        "normalized": out, "n": n, "last": n - 1, "past": n + 1, **places,
        "stats_typed": stats, "big_source": big,
    }


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``python -m pipeline ARGS`` in ``cwd`` with a cache of its own."""
    full_env = {**os.environ, "PIPELINE_CACHE_DIR": str(cwd / "cache"), **(env or {})}
    full_env.pop("PIPELINE_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def assert_one_line(stdout: str, stderr: str) -> str:
    assert "Traceback" not in stdout + stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_failure_is_one_line(case: Case, tmp_path: Path, normalized: dict[str, object]) -> None:
    if case.params is not None:
        (tmp_path / "params.yaml").write_text(case.params, encoding="utf-8")
    args = [a.format(tmp=tmp_path, **normalized) for a in case.args]
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_cli(args, tmp_path, case.env)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == case.status, stderr
    line = assert_one_line(stdout, stderr)
    for name in (n.format(**normalized) for n in case.names):
        assert name in line, f"{name!r} not in: {line}"
    assert len(line) < 400, "a bad value must be quoted short"
    # nothing was written beside the inputs (the cache folder may be created)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == before


def test_table_ids_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


# --- Ctrl-C ------------------------------------------------------------------------------------


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def write_jpegs(root: Path, count: int, side: int) -> None:
    """``count`` distinct noisy JPEGs in two class folders (JPEG: cheap to write, slow to read)."""
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    for i in range(count):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        image = base.copy()
        image[0, : i % side + 1] = i % 256  # different bytes for each file
        Image.fromarray(image).save(folder / f"{i:04d}.jpg", quality=95)


PARAMS = "base:\n  scheduler: threads\ningest:\n  image_size: [32, 32]\n  chunk_images: 4\n  " \
    "shard_images: 8\n"


def test_ctrl_c_is_one_line_exit_130_and_the_old_output_survives(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(PARAMS, encoding="utf-8")
    small, big, out = tmp_path / "small", tmp_path / "big", tmp_path / "out"
    write_jpegs(small, 4, 16)
    run_ingest(small, out, parse_params(yaml.safe_load(PARAMS)))
    before = tree_digest(out)
    assert before
    write_jpegs(big, 600, 512)  # about 4 s of decoding on 2 cores

    proc = run_cli(["ingest", str(big), str(out)], tmp_path)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.tmp-*")):  # the work has started
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.3)
    assert proc.poll() is None, "ingest finished before the interrupt: make the folder bigger"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 130, stderr
    assert assert_one_line(stdout, stderr) == "interrupted"
    assert tree_digest(out) == before
    assert not list(tmp_path.glob(".out.*"))  # the temporary folder is removed



# --- the wrapper itself: an unexpected exception, and Ctrl-C raised inside a Dask task ---------

# The real app with one extra command wrapped like the others, so the test does not depend on
# some stage still having a bug.
EXTRA_COMMAND = """
import dask
import sys
from pipeline.cli import _reports_errors, app

def fail(kind):
    if kind == "interrupt":
        raise KeyboardInterrupt
    raise ZeroDivisionError("a bug\\nsecond line " + "y" * 1000)

@app.command()
@_reports_errors
def broken(kind: str) -> None:
    dask.compute(dask.delayed(fail)(kind), scheduler="threads")

app(prog_name="pipeline")
"""


def run_extra(kind: str, tmp_path: Path, env: dict[str, str]) -> tuple[int, str, str]:
    full_env = {**os.environ, "PIPELINE_CACHE_DIR": str(tmp_path / "cache"), **env}
    proc = subprocess.run(
        [sys.executable, "-c", EXTRA_COMMAND, "broken", kind],
        cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=120, check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_unexpected_exception_is_one_line_with_the_debug_hint(tmp_path: Path) -> None:
    status, stdout, stderr = run_extra("bug", tmp_path, {"PIPELINE_DEBUG": "0"})
    assert status == 1
    line = assert_one_line(stdout, stderr)
    assert line.startswith("error: internal error: ZeroDivisionError: a bug")
    assert "second line" not in line
    assert "PIPELINE_DEBUG=1" in line
    assert len(line) < 400


def test_pipeline_debug_shows_the_traceback(tmp_path: Path) -> None:
    status, _, stderr = run_extra("bug", tmp_path, {"PIPELINE_DEBUG": "1"})
    assert status == 1
    assert "Traceback" in stderr
    assert "ZeroDivisionError" in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: internal error: ZeroDivisionError")


def test_ctrl_c_inside_a_dask_task_is_interrupted(tmp_path: Path) -> None:
    status, stdout, stderr = run_extra("interrupt", tmp_path, {})
    assert status == 130
    assert assert_one_line(stdout, stderr) == "interrupted"
