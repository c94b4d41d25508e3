"""The real DVC pipeline in a temporary git repository: dvc.yaml, params.yaml and the stages."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_dvc_repo, run
from PIL import Image


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A git + DVC repo holding this project's dvc.yaml, params.yaml and code, small sample."""
    made = make_dvc_repo(
        tmp_path, {"sample": {"images_per_class": 4}, "ingest": {"image_size": [32, 32]}}
    )
    return made.work, made.env


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_repro_builds_then_does_nothing_then_reruns_only_ingest(
    repo: tuple[Path, dict[str, str]],
) -> None:
    work, env = repo
    run(["dvc", "repro"], work, env)
    assert (work / "data" / "sample" / "animals").is_dir()
    assert (work / "data" / "prepared" / "images.zarr" / "zarr.json").is_file()
    assert (work / "data" / "prepared" / "manifest.jsonl").is_file()
    lock = (work / "dvc.lock").read_text()
    sample_before = mtimes(work / "data" / "sample")
    prepared_before = mtimes(work / "data" / "prepared")

    out = run(["dvc", "repro"], work, env)
    assert "Running stage" not in out
    assert mtimes(work / "data" / "prepared") == prepared_before

    params = yaml.safe_load((work / "params.yaml").read_text())
    params["ingest"]["image_size"] = [16, 24]
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], work, env)
    assert "Running stage 'ingest'" in out
    assert "Running stage 'sample'" not in out
    assert mtimes(work / "data" / "sample") == sample_before
    assert (work / "dvc.lock").read_text() != lock


def test_forced_repro_reproduces_the_lock_file(repo: tuple[Path, dict[str, str]]) -> None:
    work, env = repo
    run(["dvc", "repro"], work, env)
    lock = (work / "dvc.lock").read_text()
    run(["dvc", "repro", "-f"], work, env)
    assert (work / "dvc.lock").read_text() == lock


def test_bad_param_fails_the_stage_with_a_named_key(repo: tuple[Path, dict[str, str]]) -> None:
    work, env = repo
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["ingest"]["resize"] = "squash"
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run(
        ["dvc", "repro"], cwd=work, env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode != 0
    assert "ingest.resize" in proc.stderr + proc.stdout
    assert "'squash'" in proc.stderr + proc.stdout
    assert not (work / "data" / "prepared").exists()


def test_metrics_and_experiment_with_another_mode(repo: tuple[Path, dict[str, str]]) -> None:
    work, env = repo
    run(["dvc", "repro"], work, env)
    out = run(["dvc", "metrics", "show", "--json"], work, env, include_stderr=False)
    metrics = json.loads(out)[""]["data"]["data/stats/metrics.json"]["data"]
    assert set(metrics["train"]["R"]) == {"mean", "std", "min", "max"}
    assert "sha256" not in out
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "baseline"], work, env)
    out = run(["dvc", "exp", "run", "-S", "normalize.mode=per_pixel"], work, env)
    assert "Running stage 'normalize'" in out
    assert "Running stage 'ingest'" not in out
    diff = run(["dvc", "params", "diff"], work, env)
    assert "normalize.mode" in diff
    assert "per_pixel" in diff
    from pipeline import open_normalized

    ds = open_normalized(work / "data" / "normalized")
    assert ds.lineage["mode"] == "per_pixel"


def test_a_grown_image_folder_reuses_the_cache_and_matches_a_rebuild(tmp_path: Path) -> None:
    """The user's path: `dvc add` a folder, repro, add files, repro again (cache used), then a
    forced rebuild without the cache reproduces dvc.lock byte for byte."""
    made = make_dvc_repo(tmp_path, {"ingest": {"source": "data/images", "image_size": [24, 24]}})
    work = made.work
    # The default place: ~/.cache/pipeline under the isolated HOME.
    env = {k: v for k, v in made.env.items() if k not in ("PIPELINE_CACHE_DIR", "XDG_CACHE_HOME")}
    rng = np.random.default_rng(5)

    def add_images(names: range) -> None:
        for i in names:
            folder = work / "data" / "images" / ("cat" if i % 2 else "dog")
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (20 + i % 7, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")

    add_images(range(0, 60, 2))
    run(["dvc", "add", "data/images"], work, env)
    out = run(["dvc", "repro"], work, env)
    assert "taken from the cache" not in out
    assert (made.home / ".cache" / "pipeline" / "packs").is_dir()

    add_images(range(1, 12, 2))
    run(["dvc", "add", "data/images"], work, env)
    out = run(["dvc", "repro"], work, env)
    assert "Running stage 'ingest'" in out
    assert "30 file(s) unchanged, taken from the cache" in out
    assert "reused the cached fit" in out
    lock = (work / "dvc.lock").read_text()

    out = run(["dvc", "repro", "-f"], work, {**env, "PIPELINE_CACHE_DIR": "off"})
    assert "taken from the cache" not in out
    assert (work / "dvc.lock").read_text() == lock
    info = run(["pipeline", "cache", "info"], work, env)
    # One pack per shard: the second version's; the first one's, all of whose images the
    # second holds, was removed when the cache was next looked at.
    assert re.search(r"packs +1 entries", info)
    assert re.search(r"moments +1 entries", info)
