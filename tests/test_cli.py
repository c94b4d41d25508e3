"""The `pipeline` command: stages end to end through typer's CliRunner, tools and errors."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sample -> ingest -> stats -> normalize through the CLI, with a small params file."""
    root = tmp_path_factory.mktemp("cli")
    params = root / "params.yaml"
    params.write_text(
        "sample: {images_per_class: 3}\n"
        "ingest: {image_size: [24, 20], chunk_images: 2, shard_images: 4}\n"
        "base: {scheduler: threads}\n"
    )
    for args in (
        ["sample", str(root / "sample")],
        ["ingest", str(root / "sample"), str(root / "prepared")],
        ["stats", str(root / "prepared"), str(root / "stats")],
        ["normalize", str(root / "prepared"), str(root / "stats"), str(root / "normalized")],
    ):
        result = runner.invoke(app, [*args, "--params", str(params)])
        assert result.exit_code == 0, result.output
    return root


def test_stages_write_their_outputs(built: Path) -> None:
    images = [p for p in (built / "sample").rglob("*.*") if not p.name.startswith(".")]
    assert len(images) == 21
    assert (built / "sample" / ".pipeline-sample").read_bytes() == b"pipeline.sample/1\n"
    assert (built / "prepared" / "images.zarr" / "zarr.json").is_file()
    assert (built / "stats" / "stats.json").is_file()
    group = zarr.open_group(built / "normalized" / "images.zarr", mode="r")
    assert group["images"].shape[1:] == (24, 20, 3)


def test_verify_passes_then_catches_a_changed_value(built: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["verify", str(built / "normalized")])
    assert result.exit_code == 0, result.output
    assert "samples match" in result.output
    import shutil

    copy = built / f"normalized-{tmp_path.name}"  # beside the original: same lineage paths
    shutil.copytree(built / "normalized", copy)
    images = zarr.open_array(copy / "images.zarr" / "images", mode="r+")
    block = np.asarray(images[4:8])
    block[1, 0, 0, 0] += 0.5
    images[4:8] = block
    result = runner.invoke(app, ["verify", str(copy)])
    assert result.exit_code == 1
    assert "1 sample(s) differ: 5" in result.output


def test_verify_refuses_lineage_paths_that_leave_the_store_folder(
    built: Path, tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "normalized"  # one folder deeper than the stats it names
    shutil.copytree(built / "normalized", copy)
    group = zarr.open_group(copy / "images.zarr", mode="r+")
    lineage = dict(group.attrs)
    stats_rel = Path("..") / ".." / ".." / built.name / "stats" / "stats.json"
    assert (copy / "images.zarr" / stats_rel).resolve() == (built / "stats" / "stats.json")
    lineage["stats"] = {**lineage["stats"], "path": stats_rel.as_posix()}
    group.attrs.update(lineage)
    result = runner.invoke(app, ["verify", str(copy)])
    assert result.exit_code == 1
    assert "outside" in result.output
    for absolute in ("/etc/passwd", "file:///etc/passwd"):
        group.attrs.update({**lineage, "stats": {**lineage["stats"], "path": absolute}})
        result = runner.invoke(app, ["verify", str(copy)])
        assert result.exit_code == 1
        assert "not relative" in result.output

def test_show_writes_side_by_side_pictures(built: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["show", str(built / "normalized"), "0", "3", "--out", str(tmp_path / "show")]
    )
    assert result.exit_code == 0, result.output
    pictures = sorted((tmp_path / "show").glob("*.png"))
    assert len(pictures) == 2
    with Image.open(pictures[0]) as im:
        assert im.size == (3 * 20, 24)
        row = np.asarray(im)
    raw = zarr.open_array(built / "prepared" / "images.zarr" / "images", mode="r")[0]
    np.testing.assert_array_equal(row[:, :20], raw)  # raw panel
    np.testing.assert_array_equal(row[:, 40:], raw)  # denormalized panel == raw


@pytest.mark.parametrize(
    ("fmt", "expect"),
    [
        pytest.param("torchvision", "transforms.Normalize(mean=", id="torchvision"),
        pytest.param("albumentations", "max_pixel_value=255.0", id="albumentations"),
        pytest.param("timm", "data_config = {'mean':", id="timm"),
        pytest.param("keras", "variance=", id="keras"),
    ],
)
def test_export_gives_constants_in_library_units(built: Path, fmt: str, expect: str) -> None:
    result = runner.invoke(app, ["export", str(built / "stats"), "--format", fmt])
    assert result.exit_code == 0, result.output
    assert expect in result.output
    doc = json.loads((built / "stats" / "stats.json").read_text())
    r_mean = doc["channels"]["R"]["mean"]
    unit_mean = r_mean / 255 if fmt != "keras" else r_mean
    assert repr(unit_mean) in result.output
    code = "\n".join(line for line in result.output.splitlines() if not line.startswith("#"))
    ast.parse(code)  # pastes as valid Python


def test_export_refuses_per_pixel_where_it_cannot_be_expressed(built: Path) -> None:
    result = runner.invoke(
        app, ["export", str(built / "stats"), "--format", "torchvision", "--mode", "per_pixel"]
    )
    assert result.exit_code == 1
    assert "cannot be expressed" in result.output
    result = runner.invoke(
        app, ["export", str(built / "stats"), "--format", "json", "--mode", "per_pixel"]
    )
    assert result.exit_code == 0
    assert np.asarray(json.loads(result.output)["mean_image"]).shape == (24, 20, 3)


def test_bad_param_is_one_line_naming_the_key(tmp_path: Path, built: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("ingest: {on_error: ignore}\n")
    result = runner.invoke(
        app, ["ingest", str(built / "sample"), str(tmp_path / "out"), "--params", str(params)]
    )
    assert result.exit_code == 1
    assert "ingest.on_error" in result.output
    assert "'fail', 'skip'" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_missing_params_file_is_refused(built: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["ingest", str(built / "sample"), str(tmp_path / "o"), "--params", "nope.yaml"]
    )
    assert result.exit_code == 2
    assert "nope.yaml" in result.output


def test_python_dash_m_runs_the_same_app() -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0
    for command in ("sample", "ingest", "stats", "normalize", "verify", "show", "export"):
        assert command in proc.stdout
