"""`pipeline audit` and `pipeline report` on a real git + DVC repository, three data versions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
import zarr
from conftest import make_dvc_repo, run
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.report.audit import audit_revisions, js_distance
from pipeline.report.plots import write_audit_plots

runner = CliRunner()

REPORT_STAGE = {
    "cmd": "pipeline report data/stats data/reports",
    "deps": ["data/stats/stats.json", "data/stats/stats.zarr", "pipeline/report/plots.py"],
    "outs": [{"data/reports": {"cache": False}}],
}
PLOTS = [
    {
        "data/reports/histogram.json": {
            "x": "value",
            "y": ["R", "G", "B"],
            "template": "linear",
            "title": "Share of pixels per value, by channel (fit split)",
            "x_label": "pixel value",
            "y_label": "share of pixels",
        }
    },
    "data/reports/mean_image.png",
    "data/reports/std_image.png",
]
TAGS = ["v1", "v2", "v3"]


def add_images(folder: Path, n: int, low: int, high: int, seed: int) -> None:
    """n noise PNGs, 48x32 (not square, so `resize: pad` adds black bars), values in [low, high)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = rng.integers(low, high, size=(32, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{seed}-{i}.png")


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """init commit (no stats); v1; v2 = brighter images added; v3 = `ingest.resize: pad`."""
    base = tmp_path_factory.mktemp("audit")

    def edit_dvc(dvc: dict[str, Any]) -> None:
        for stage in ("sample", "normalize"):  # not needed here: keep the repro runs short
            dvc["stages"].pop(stage, None)
        dvc["stages"].setdefault("report", REPORT_STAGE)  # the project's own once dvc.yaml has them
        dvc.setdefault("plots", PLOTS)

    repo = make_dvc_repo(
        base,
        {
            "base": {"scheduler": "synchronous"},
            "ingest": {"source": "data/images", "image_size": [32, 32]},
        },
        edit_dvc,
    )
    work, home, env, params = repo.work, repo.home, repo.env, repo.params
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "init"], work, env)
    docs, histograms = {}, {}
    for tag in TAGS:
        if tag == "v1":
            add_images(work / "data" / "images" / "a", 10, 40, 160, seed=1)
        elif tag == "v2":
            add_images(work / "data" / "images" / "b", 6, 150, 250, seed=2)
        else:
            params["ingest"]["resize"] = "pad"
            (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        run(["dvc", "add", "-q", "data/images"], work, env)
        run(["dvc", "repro", "-q"], work, env)
        run(["git", "add", "-A"], work, env)
        run(["git", "commit", "-qm", tag], work, env)
        run(["git", "tag", tag], work, env)
        docs[tag] = json.loads(
            run(["git", "show", f"{tag}:data/stats/stats.json"], work, env, include_stderr=False)
        )
        group = zarr.open_group(work / "data" / "stats" / "stats.zarr", mode="r")
        histograms[tag] = np.asarray(group["histogram"][...])
    return {"work": work, "home": home, "env": env, "docs": docs, "histograms": histograms}


@pytest.fixture
def in_repo(versions: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run the CLI in-process from the repository, with its isolated HOME."""
    monkeypatch.chdir(versions["work"])
    monkeypatch.setenv("HOME", str(versions["home"]))
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    return versions


def audit_json(*args: str) -> dict[str, Any]:
    result = runner.invoke(app, ["audit", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def js_oracle(p: np.ndarray, q: np.ndarray) -> float:
    """JS distance as H(M) - (H(P) + H(Q)) / 2, in bits (another formula than the module's)."""

    def entropy(a: np.ndarray) -> float:
        a = a[a > 0]
        return float(-(a * np.log2(a)).sum())

    p, q = p / p.sum(), q / q.sum()
    return float(np.sqrt(max(entropy((p + q) / 2) - (entropy(p) + entropy(q)) / 2, 0.0)))


def test_js_distance_is_0_for_equal_1_for_disjoint_and_symmetric() -> None:
    p, q = np.array([3, 1, 0, 0]), np.array([0, 0, 2, 5])
    assert js_distance(p, 2 * p) == 0.0
    assert js_distance(p, q) == pytest.approx(1.0)
    r = np.array([1, 2, 3, 4])
    assert js_distance(p, r) == js_distance(r, p)
    assert js_distance(p, r) == pytest.approx(js_oracle(p.astype(float), r.astype(float)))


def test_default_revisions_are_tags_head_and_workspace_with_exact_deltas(
    in_repo: dict[str, Any],
) -> None:
    out = audit_json()
    names = [r["name"] for r in out["revisions"]]
    assert names == [*TAGS, "HEAD", "workspace"]
    assert all(r["stats"] and r["arrays"] and not r["notes"] for r in out["revisions"])
    docs, hists = in_repo["docs"], in_repo["histograms"]
    comps = {(c["before"], c["after"]): c["channels"] for c in out["comparisons"]}
    for before, after in [("v1", "v2"), ("v2", "v3")]:
        for k, name in enumerate(["R", "G", "B"]):
            b, a = docs[before]["channels"][name], docs[after]["channels"][name]
            got = comps[(before, after)][name]
            assert got["delta_mean"] == a["mean"] - b["mean"]
            assert got["delta_std"] == a["std"] - b["std"]
            assert got["mean_drift"] == abs(a["mean"] - b["mean"]) / b["std"]
            assert got["std_drift"] == (a["std"] - b["std"]) / b["std"]
            oracle = js_oracle(hists[before][k].astype(float), hists[after][k].astype(float))
            assert got["js_distance"] == pytest.approx(oracle, abs=1e-9)
            assert 0 < got["js_distance"] <= 1
    assert all(c["delta_mean"] > 20 for c in comps[("v1", "v2")].values())  # brighter files
    assert all(c["delta_mean"] < -20 for c in comps[("v2", "v3")].values())  # black padding
    assert all(c["delta_std"] > 0 for c in comps[("v2", "v3")].values())
    for same in [("v3", "HEAD"), ("HEAD", "workspace")]:
        assert all(c["js_distance"] == 0.0 for c in comps[same].values())
        assert all(c["delta_mean"] == 0.0 for c in comps[same].values())
    counts = {r["name"]: r["count"] for r in out["revisions"]}
    assert counts["v1"] == docs["v1"]["count"]["images"] < counts["v2"]


def test_table_shows_counts_means_fit_split_and_fingerprints(in_repo: dict[str, Any]) -> None:
    result = runner.invoke(app, ["audit", "v1", "v2"])
    assert result.exit_code == 0, result.output
    docs = in_repo["docs"]
    for tag in ("v1", "v2"):
        assert docs[tag]["fingerprint"][:12] in result.stdout
        assert f"{docs[tag]['channels']['G']['mean']:.3f}" in result.stdout
    delta = docs["v2"]["channels"]["B"]["mean"] - docs["v1"]["channels"]["B"]["mean"]
    assert f"{delta:+.3f}" in result.stdout
    assert "channel R" in result.stdout
    assert "train" in result.stdout


def test_named_revisions_and_a_revision_without_stats(in_repo: dict[str, Any]) -> None:
    out = audit_json("HEAD~3", "v1", "v3")
    first = out["revisions"][0]
    assert first["name"] == "HEAD~3"
    assert not first["stats"]
    assert first["notes"] == ["no stats at HEAD~3: data/stats/stats.json not found"]
    (comp,) = out["comparisons"]
    assert (comp["before"], comp["after"]) == ("v1", "v3")
    docs = in_repo["docs"]
    r3, r1 = docs["v3"]["channels"]["R"], docs["v1"]["channels"]["R"]
    assert comp["channels"]["R"]["delta_mean"] == r3["mean"] - r1["mean"]
    result = runner.invoke(app, ["audit", "HEAD~3", "v1"])
    assert result.exit_code == 0, result.output
    assert "no stats at HEAD~3: data/stats/stats.json not found" in result.stdout


def test_older_schema_gets_a_clear_note(in_repo: dict[str, Any]) -> None:
    old = in_repo["work"] / "old" / "stats.json"
    old.parent.mkdir(exist_ok=True)
    old.write_text(json.dumps({"schema": "pipeline.stats/0"}))
    try:
        result = runner.invoke(app, ["audit", "workspace", "--stats", "old/stats.json"])
    finally:
        shutil.rmtree(old.parent)
    assert result.exit_code == 0, result.output
    assert "older stats schema 'pipeline.stats/0' at workspace: re-run dvc repro" in result.stdout


def test_fail_on_drift_gates_on_the_largest_drift(in_repo: dict[str, Any]) -> None:
    docs = in_repo["docs"]
    largest = max(
        max(abs(a["mean"] - b["mean"]), abs(a["std"] - b["std"])) / b["std"]
        for before, after in [("v1", "v2"), ("v2", "v3")]
        for b, a in (
            (docs[before]["channels"][c], docs[after]["channels"][c]) for c in ("R", "G", "B")
        )
    )
    below = runner.invoke(app, ["audit", *TAGS, "--fail-on-drift", str(largest * 0.99)])
    assert below.exit_code == 1
    assert "exceeds --fail-on-drift" in below.stderr
    assert "channel R" in below.stdout  # the tables are printed first
    above = runner.invoke(app, ["audit", *TAGS, "--fail-on-drift", str(largest * 1.01)])
    assert above.exit_code == 0, above.output


def test_user_errors_are_one_line_and_exit_1(
    in_repo: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = runner.invoke(app, ["audit", "v1", "no-such-tag"])
    assert result.exit_code == 1
    assert "unknown revision 'no-such-tag'" in result.stderr
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["audit"])
    assert result.exit_code == 1
    assert "not in a git repository" in result.stderr


def test_without_the_dvc_cache_only_stats_json_is_read(
    in_repo: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(in_repo["work"]), str(clone)], tmp_path, in_repo["env"])
    monkeypatch.chdir(clone)
    out = audit_json("v1", "v2")
    for rev in out["revisions"]:
        assert rev["stats"]
        assert not rev["arrays"]
        assert rev["notes"][0].startswith(f"only stats.json could be read at {rev['name']}")
    (comp,) = out["comparisons"]
    assert comp["channels"]["R"]["js_distance"] is None
    assert comp["channels"]["R"]["delta_mean"] > 0


def test_plots_are_pngs_of_fixed_size_that_differ_between_revisions(
    in_repo: dict[str, Any], tmp_path: Path
) -> None:
    result = runner.invoke(app, ["audit", "--plots", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    files = {p.name: p for p in (tmp_path / "a").iterdir()}
    for channel in ("R", "G", "B"):
        with Image.open(files[f"histogram_{channel}.png"]) as im:
            assert (im.format, im.size) == ("PNG", (640, 400))
    pixels = {}
    for name in ("v1", "v2", "v3", "HEAD", "workspace"):
        for kind in ("mean_image", "std_image"):
            with Image.open(files[f"{kind}_{name}.png"]) as im:
                assert im.width >= 256
                pixels[kind, name] = np.asarray(im.convert("RGB"))
    assert not np.array_equal(pixels["mean_image", "v1"], pixels["mean_image", "v2"])
    assert not np.array_equal(pixels["std_image", "v2"], pixels["std_image", "v3"])
    for pair in ("v1_to_v2", "v2_to_v3", "v3_to_HEAD", "HEAD_to_workspace"):
        assert f"mean_diff_{pair}.png" in files
    # deterministic bytes: drawing the same audit again gives the same files
    written, notes = write_audit_plots(audit_revisions(), tmp_path / "b")
    assert not notes
    for path in written:
        assert path.read_bytes() == files[path.name].read_bytes()


def test_report_output_and_dvc_plots(in_repo: dict[str, Any], tmp_path: Path) -> None:
    work, env = in_repo["work"], in_repo["env"]
    rows = json.loads((work / "data" / "reports" / "histogram.json").read_text())
    assert len(rows) == 256
    assert [r["value"] for r in rows] == list(range(256))
    hist = in_repo["histograms"]["v3"]
    for k, name in enumerate(["R", "G", "B"]):
        shares = np.array([r[name] for r in rows])
        np.testing.assert_allclose(shares, hist[k] / hist[k].sum(), rtol=0, atol=1e-15)
    for name in ("mean_image.png", "std_image.png"):
        with Image.open(work / "data" / "reports" / name) as im:
            assert im.format == "PNG"
    run(["dvc", "plots", "show", "-o", str(tmp_path / "show")], work, env)
    assert (tmp_path / "show" / "index.html").is_file()
    run(["dvc", "plots", "diff", "v1", "-o", str(tmp_path / "diff")], work, env)
    html = (tmp_path / "diff" / "index.html").read_text()
    assert '"rev": "v1"' in html
    assert '"rev": "workspace"' in html
