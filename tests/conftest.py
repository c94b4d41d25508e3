"""Shared test inputs, built for real.

* Prepared + stats folders: Pillow-made PNG folders run through the real ingest and stats
  stages (``rgb8`` / ``gray16`` fixtures, built once per test module), used by test_normalize,
  test_reader and test_transform.
* A temporary git + DVC repository holding this project's dvc.yaml, params.yaml and code, with an
  isolated HOME (``make_dvc_repo``, ``run``), used by test_dvc and test_audit.
* ``oracle_dataset_constants`` (numpy float64 reference for the dataset-statistics modes) and
  ``assert_bits_equal``, used by test_normalize and test_transform.
* ``moto_server`` / ``s3_bucket``: a local S3 server and a fresh bucket on it, with the
  environment set for plain ``fsspec`` S3 access; defined in objectstore.py, imported here.

pytest finds the fixtures here by itself. The plain names the test modules need at import time
(``MODES``, ``H``, ``W``, ``Fitted``, ``run``, ``make_dvc_repo`` ...) are imported with
``from conftest import ...``: pytest's default ``prepend`` import mode puts tests/ (which has no
``__init__.py``) on sys.path and registers this file as the module ``conftest``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
import zarr
from objectstore import moto_server, s3_bucket  # noqa: F401  (fixtures)
from PIL import Image

from pipeline.ingest.stage import run_ingest
from pipeline.params import parse_params
from pipeline.stats.stage import run_stats

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Written out here rather than imported from pipeline, so that a mode dropped from the code
# fails the tests instead of silently shrinking them.
MODES = (
    "per_channel",
    "per_pixel",
    "global",
    "per_image",
    "per_image_per_channel",
    "mean_only",
    "min_max",
)
PER_IMAGE = ("per_image", "per_image_per_channel")
H, W = 12, 10  # not square, so a transposed axis would show
CHUNK, SHARD = 2, 4  # ingest.chunk_images / ingest.shard_images of the fixtures below


@contextlib.contextmanager
def mounted_tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` (mount(8) syntax, e.g. ``2m``) at ``mnt``; skips the test where
    mounting is not permitted (it needs root on Linux)."""
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("needs Linux mount(8) to make a small tmpfs")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here (needs root): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


# Commands that tests run with an environment copied at import time get a cache of their own,
# never the working directory's; it is removed when the session ends.
SESSION_CACHE = tempfile.mkdtemp(prefix="pipeline-cache-")
os.environ["PIPELINE_CACHE_DIR"] = SESSION_CACHE
atexit.register(shutil.rmtree, SESSION_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def isolated_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Each test gets its own decode/stats cache (inherited by the commands it runs), outside
    its tmp_path, so no test reuses another's work; test_incremental.py tests the reuse."""
    path = tmp_path_factory.mktemp("pipeline-cache")
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(path))
    monkeypatch.delenv("PIPELINE_CACHE_LIMIT", raising=False)
    return path


# --- real inputs: prepared + stats folders ---------------------------------------------------


@dataclass(frozen=True)
class Fitted:
    """A prepared folder and its stats folder, with the prepared store read back by plain zarr."""

    prepared: Path  # the folder holding images.zarr
    stats: Path  # the stats folder (stats.json, stats.zarr)
    images: np.ndarray  # (n, H, W, C) uint8 / uint16, all splits
    train: np.ndarray  # the train split: what the stats were fitted on
    pixel_max: int
    labels: np.ndarray
    splits: dict[str, list[int]]
    classes: list[str]


def write_rgb_source(root: Path) -> None:
    """30 lossless PNGs in 3 class folders; pixel (0, 0) is the same in every image (zero
    per-pixel std) and one image is a single constant colour (zero per-image std)."""
    rng = np.random.default_rng(1234)
    for cls in ("ant", "bee", "cow"):
        (root / cls).mkdir(parents=True)
        for i in range(10):
            a = np.stack(
                [
                    rng.integers(30, 221, (H, W)),  # min/max away from 0/255
                    rng.integers(0, 256, (H, W)),
                    rng.integers(60, 100, (H, W)),
                ],
                axis=-1,
            ).astype(np.uint8)
            a[0, 0] = 60
            if cls == "cow" and i == 0:
                a[...] = 60
            Image.fromarray(a).save(root / cls / f"{i:02d}.png")


def write_gray16_source(root: Path) -> None:
    """14 16-bit gray PNGs with values that are not multiples of 257 (true 16-bit data)."""
    rng = np.random.default_rng(99)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(7):
            a = rng.integers(1000, 64001, (H, W)).astype(np.uint16)
            a[0, 0] = 4321
            if cls == "b" and i == 0:
                a[...] = 4321
            Image.fromarray(a).save(root / cls / f"{i:02d}.png")


def build(tmp: Path, write_source: Callable[[Path], None], **ingest: object) -> Fitted:
    """Write the source PNGs under tmp/src, run the real ingest and stats stages."""
    src = tmp / "src"
    write_source(src)
    p = parse_params(
        {
            "base": {"scheduler": "synchronous"},
            "ingest": {"image_size": None, "chunk_images": CHUNK, "shard_images": SHARD, **ingest},
        }
    )
    run_ingest(src, tmp / "prepared", p)
    run_stats(tmp / "prepared" / "images.zarr", tmp / "stats", p)
    group = zarr.open_group(tmp / "prepared" / "images.zarr", mode="r")
    images = np.asarray(group["images"][...])
    start, stop = group.attrs["splits"]["train"]
    return Fitted(
        prepared=tmp / "prepared",
        stats=tmp / "stats",
        images=images,
        train=images[start:stop],
        pixel_max=int(np.iinfo(images.dtype).max),
        labels=np.asarray(group["label"][...]),
        splits=dict(group.attrs["splits"]),
        classes=list(group.attrs["classes"]),
    )


@pytest.fixture(scope="module")
def rgb8(tmp_path_factory: pytest.TempPathFactory) -> Fitted:
    return build(tmp_path_factory.mktemp("rgb8"), write_rgb_source)


@pytest.fixture(scope="module")
def gray16(tmp_path_factory: pytest.TempPathFactory) -> Fitted:
    return build(tmp_path_factory.mktemp("gray16"), write_gray16_source, bit_depth=16, color="gray")


# --- the float64 oracle for the dataset-statistics modes, and a bit-exact comparison ------------


def oracle_dataset_constants(
    mode: str, train: np.ndarray, d: float
) -> tuple[np.ndarray, np.ndarray]:
    """offset and scale in input-scale units, from the train pixels with numpy float64, for the
    dataset-statistics modes (not per_image / per_image_per_channel)."""
    x = train.astype(np.float64)
    c = x.shape[-1]
    if mode == "per_channel":
        offset, scale = x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))
    elif mode == "per_pixel":
        offset, scale = x.mean(axis=0), x.std(axis=0)
    elif mode == "global":
        offset, scale = np.full(c, x.mean()), np.full(c, x.std())
    elif mode == "mean_only":
        return x.mean(axis=(0, 1, 2)) / d, np.ones(c)
    else:  # min_max: (x - min) / (max - min) per channel
        lo, hi = x.min(axis=(0, 1, 2)), x.max(axis=(0, 1, 2))
        offset, scale = lo, hi - lo
    scale = np.where(scale > 0, scale, 1.0)  # stats.zero_std: one (the default)
    return offset / d, scale / d


def assert_bits_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    """Same dtype, shape and bit pattern (so -0.0 vs 0.0 or a NaN would show)."""
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    uint = np.dtype(f"u{actual.dtype.itemsize}")
    diff = actual.view(uint) != expected.view(uint)
    assert not diff.any(), (
        f"{int(diff.sum())} of {diff.size} values differ; first at "
        f"{np.argwhere(diff)[0].tolist()}: {actual[diff][0]!r} != {expected[diff][0]!r}"
    )


# --- a temporary git + DVC repository --------------------------------------------------------


def run(cmd: list[str], cwd: Path, env: dict[str, str], *, include_stderr: bool = True) -> str:
    """Run cmd, fail the test if it fails; return stdout (+ stderr unless include_stderr=False)."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr if include_stderr else proc.stdout


@dataclass(frozen=True)
class DvcRepo:
    work: Path  # the git + DVC repository
    home: Path  # the isolated HOME in env
    env: dict[str, str]
    params: dict[str, Any]  # params.yaml as written into work



def tool_env(home: Path) -> dict[str, str]:
    """Environment for real git/dvc/pipeline subprocesses: this venv's tools first, HOME at
    ``home``, analytics off, a git identity."""
    return {
        **os.environ,
        "HOME": str(home),
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }

def make_dvc_repo(
    base: Path,
    params_overrides: Mapping[str, Mapping[str, Any]],
    edit_dvc: Callable[[dict[str, Any]], None] | None = None,
) -> DvcRepo:
    """``git init`` + ``dvc init`` in base/repo holding this project's pipeline/ code, its
    dvc.yaml (copied as is, or loaded, passed to edit_dvc and written back) and its params.yaml
    with each section's keys updated from params_overrides; HOME is base/home, analytics off."""
    work, home = base / "repo", base / "home"
    work.mkdir()
    home.mkdir()
    env = tool_env(home)
    if edit_dvc is None:
        shutil.copy(ROOT / "dvc.yaml", work)
    else:
        dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
        edit_dvc(dvc)
        (work / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    shutil.copytree(
        ROOT / "pipeline", work / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in params_overrides.items():
        params[section].update(values)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], work, env)
    run(["dvc", "init", "-q"], work, env)
    return DvcRepo(work, home, env, params)
