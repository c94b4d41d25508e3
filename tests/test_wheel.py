"""The wheel, installed into a fresh virtual environment outside the repository, runs the
README's "Use it in your own project" steps in a new git repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run
from PIL import Image

from pipeline import __version__


def build_wheel(tmp: Path) -> Path:
    """The wheel of a copy of the sources (the build writes nothing into the repository)."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src)
    shutil.copytree(
        ROOT / "pipeline", src / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    dist = tmp / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(dist), str(src)],
        tmp,
        dict(os.environ),
    )
    (wheel,) = dist.glob("*.whl")
    return wheel


@pytest.mark.slow
def test_the_wheel_in_a_fresh_venv_runs_a_users_project(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    assert wheel.name.startswith(f"dvc_image_norm-{__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pipeline/cli.py" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bin_dir = venv / "bin"
    base = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env = {**base, "PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin", "DVC_NO_ANALYTICS": "1"}
    # The repository's pins (so torch is not pulled in); pip reuses its wheel cache.
    run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "-c", str(ROOT / "constraints.txt"), str(wheel)],
        tmp_path,
        env,
    )

    work = tmp_path / "my-ml-project"
    work.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **env,
        "HOME": str(home),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    where = run([str(bin_dir / "python"), "-c", "import pipeline; print(pipeline.__file__)"],
                work, env, include_stderr=False)
    assert Path(where.strip()).is_relative_to(venv)
    assert run(["pipeline", "--version"], work, env).strip() == f"pipeline {__version__}"

    run(["git", "init", "-q"], work, env)
    (work / "params.yaml").write_text("train:\n  epochs: 3\n")
    rng = np.random.default_rng(11)
    for i in range(20):
        folder = work / "data" / "images" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (18, 22, 3), dtype=np.uint8)).save(
            folder / f"{i}.png"
        )
    run(["pipeline", "init"], work, env)
    params = work / "params.yaml"
    params.write_text(params.read_text().replace("image_size: [224, 224]", "image_size: [16, 16]"))
    run(["dvc", "add", "data/images"], work, env)
    run(["dvc", "repro"], work, env)
    run(["pipeline", "verify", "data/normalized"], work, env)
    script = (
        "from pipeline import open_normalized\n"
        "ds = open_normalized('data/normalized')\n"
        "image, label = ds.split('train')[0]\n"
        "print(len(ds), image.shape, image.dtype)\n"
    )
    out = run([str(bin_dir / "python"), "-c", script], work, env, include_stderr=False)
    assert out.split()[0] == "20"
    assert "(16, 16, 3) float32" in out

    fitted = run(["pipeline", "fit", "data/images", "--format", "json"], work, env,
                 include_stderr=False)
    exported = run(["pipeline", "export", "data/stats", "--format", "json"], work, env,
                   include_stderr=False)
    assert fitted == exported
    assert json.loads(fitted)["count"] == json.loads(
        (work / "data" / "stats" / "metrics.json").read_text()
    )["train"]["images"]
