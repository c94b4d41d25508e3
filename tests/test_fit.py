"""`pipeline fit FOLDER`: the stages' exact statistics in one command, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN, write_rgb_source
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()
FORMATS = ("torchvision", "albumentations", "timm", "keras", "json")
PARAMS = "base:\n  scheduler: synchronous\ningest:\n  image_size: null\n  chunk_images: 2\n"


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write_rgb_source(tmp_path / "src")
    (tmp_path / "params.yaml").write_text(PARAMS + "  shard_images: 4\n")
    return tmp_path / "src"


def test_fit_equals_ingest_stats_export_bit_for_bit(folder: Path, tmp_path: Path) -> None:
    params = str(tmp_path / "params.yaml")
    # first with a cold cache, then the stages, then fit again on the warm cache
    cold = cli("fit", str(folder), "--format", "json", "--params", params)
    cli("ingest", str(folder), str(tmp_path / "prepared"), "--params", params)
    cli("stats", str(tmp_path / "prepared"), str(tmp_path / "stats"), "--params", params)
    for fmt in FORMATS:
        exported = cli("export", str(tmp_path / "stats"), "--format", fmt)
        assert cli("fit", str(folder), "--format", fmt, "--params", params) == exported
    assert cold == cli("export", str(tmp_path / "stats"), "--format", "json")
    doc = json.loads((tmp_path / "stats" / "stats.json").read_text())
    constants = json.loads(cold)
    assert constants["fingerprint"] == doc["fingerprint"]
    assert constants["mean"] == [doc["channels"][c]["mean"] for c in "RGB"]
    torch_text = cli("fit", str(folder), "--params", params)  # torchvision is the default
    assert doc["fingerprint"] in torch_text
    assert "transforms.Normalize(mean=" in torch_text


def test_fit_matches_a_float64_oracle_of_pillows_decode(folder: Path, tmp_path: Path) -> None:
    params = str(tmp_path / "params.yaml")
    out = cli("fit", str(folder), "--split", "all", "--format", "json", "--params", params)
    got = json.loads(out)
    pixels = np.stack(
        [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.rglob("*.png"))]
    ).astype(np.int64)
    assert got["count"] == len(pixels) == 30
    assert got["fit_split"] == "all"
    flat = pixels.reshape(-1, 3)
    n = flat.shape[0]
    for c in range(3):
        total, squares = int(flat[:, c].sum()), int((flat[:, c] ** 2).sum())
        mean = Fraction(total, n)
        assert got["mean"][c] == float(mean)  # correctly rounded
        variance = Fraction(squares, n) - mean * mean
        std = float(variance) ** 0.5
        assert abs(got["std"][c] - std) <= 2 * np.spacing(std)
    x = pixels.astype(np.float64)
    np.testing.assert_allclose(got["std"], x.std(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(got["std_01"], x.std(axis=(0, 1, 2)) / 255, rtol=1e-12)


def test_fit_uses_params_yaml_of_the_working_directory(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(
        "train:\n  lr: 0.1\n" + PARAMS + "  color: gray\n"  # someone else's section: ignored
    )
    monkeypatch.chdir(work)
    got = json.loads(cli("fit", str(folder), "--format", "json", "--image-size", "6x5"))
    assert got["channels"] == ["L"]
    assert sorted(p.name for p in work.iterdir()) == ["params.yaml"]


def _env(tmp: Path) -> dict[str, str]:
    temp = tmp / "tmpdir"
    temp.mkdir()
    return {
        **os.environ,
        "TMPDIR": str(temp),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def test_fit_leaves_nothing_behind(folder: Path, tmp_path: Path) -> None:
    env = _env(tmp_path)
    work = tmp_path / "empty"
    work.mkdir()
    args = ["pipeline", "fit", str(folder), "--params", str(tmp_path / "params.yaml")]
    proc = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "transforms.Normalize" in proc.stdout
    assert list(work.iterdir()) == []
    assert list(Path(env["TMPDIR"]).iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--format", "caffe"], "--format", id="format"),
        pytest.param(["--format", "timm", "--mode", "per_pixel"], "per_pixel", id="mode"),
        pytest.param(["--image-size", "big"], "--image-size", id="size-text"),
        pytest.param(["--image-size", "0x5"], "--image-size", id="size-zero"),
        pytest.param(["--split", "holdout"], "--split", id="split"),
    ],
)
def test_bad_options_are_one_line_before_any_work(
    folder: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    env = _env(tmp_path)
    proc = subprocess.run(
        ["pipeline", "fit", str(folder), *args, "--params", str(tmp_path / "params.yaml")],
        env=env, capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 1
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(Path(env["TMPDIR"]).iterdir()) == []


def test_ctrl_c_removes_the_temporary_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    src = tmp_path / "many"
    (src / "x").mkdir(parents=True)
    for i in range(800):
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(
            src / "x" / f"{i:04d}.png"
        )
    env = _env(tmp_path)
    temp = Path(env["TMPDIR"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "fit", str(src), "--image-size", "native"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group: Ctrl-C reaches it and its workers
    )
    deadline = time.monotonic() + 60
    while not any(p.name.startswith("pipeline-fit-") for p in temp.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)  # into the decoding
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    # The command's own last word; Dask's spawned workers, hit by the same Ctrl-C while they
    # start, may print their own tracebacks above it (the stages do the same).
    assert err.strip().splitlines()[-1] == "interrupted"
    assert list(temp.iterdir()) == []


def test_an_empty_split_names_the_folder_not_a_temporary_path(folder: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS + "  split:\n    val: 0.0\n    test: 0.0\n")
    result = runner.invoke(app, ["fit", str(folder), "--split", "val", "--params", str(params)])
    assert result.exit_code == 1
    assert f"the images of {folder}" in result.stderr
    assert "pipeline-fit-" not in result.stderr
