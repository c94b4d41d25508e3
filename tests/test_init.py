"""`pipeline init` in someone else's git repository: merge, never overwrite; then real DVC runs
the stages there."""

from __future__ import annotations

import dataclasses
import difflib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import run, tool_env
from PIL import Image

from pipeline import __version__
from pipeline.params import SECTIONS, load_params

# The user's own files, with comments, odd indentation and a section `base:` would collide with
# only when asked for (see test_a_params_section_of_ours_suggests_a_prefix).
USER_DVC = """\
# my project: the model
stages:
    train:   # trains the model
        cmd: python -c "print('training')"
        params:
            - train.lr

# the plots come last
plots:
  - metrics.json
"""
USER_PARAMS = """\
train:
  lr: 0.1   # learning rate
  epochs: 3
"""
USER_IGNORE = "*.log\n/model.pt"  # no final newline


def env_for(tmp: Path) -> dict[str, str]:
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    return tool_env(home)


def user_repo(tmp: Path, *, dvc: str | None = USER_DVC, params: str | None = USER_PARAMS) -> Path:
    work = tmp / "project"
    work.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    for name, text in (("dvc.yaml", dvc), ("params.yaml", params), (".gitignore", USER_IGNORE)):
        if text is not None:
            (work / name).write_bytes(text.encode())
    return work


def pipeline(work: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["pipeline", *args], cwd=work, env=env, capture_output=True, text=True, check=False
    )


def only_added(before: str, after: str) -> list[str]:
    """The lines ``after`` adds to ``before``; fails when any line of ``before`` was changed or
    removed (the user's bytes are kept, line for line)."""
    a, b = before.splitlines(keepends=True), after.splitlines(keepends=True)
    added = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        assert op in ("equal", "insert"), (op, a[i1:i2], b[j1:j2])
        if op == "insert":
            added += b[j1:j2]
    return added


def snapshot(work: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(work)): p.read_bytes()
        for p in sorted(work.rglob("*"))
        if p.is_file() and ".git" not in p.relative_to(work).parts[:1]
    }


def test_init_merges_into_the_users_files_byte_for_byte(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    work = user_repo(tmp_path)
    proc = pipeline(work, env, "init")
    assert proc.returncode == 0, proc.stderr
    assert (work / ".dvc").is_dir()  # dvc init ran

    dvc_text = (work / "dvc.yaml").read_text()
    added = only_added(USER_DVC, dvc_text)
    assert added[0] == "    ingest:\n"  # at the stages' own indentation
    dvc = yaml.safe_load(dvc_text)
    assert list(dvc["stages"]) == ["train", "ingest", "stats", "normalize", "report"]
    assert dvc["stages"]["train"] == yaml.safe_load(USER_DVC)["stages"]["train"]
    assert dvc["plots"] == ["metrics.json"]
    for name, stage in dvc["stages"].items():
        if name != "train":
            assert stage["cmd"].startswith(f"pipeline --version-check {__version__} {name} ")
            assert not any(str(d).startswith("pipeline/") for d in stage.get("deps", []))
    assert dvc["stages"]["stats"]["metrics"] == [{"data/stats/metrics.json": {"cache": False}}]

    params_text = (work / "params.yaml").read_text()
    assert params_text.startswith(USER_PARAMS)
    params = yaml.safe_load(params_text)
    assert params["train"] == {"lr": 0.1, "epochs": 3}
    assert set(params) == {"train", "base", "ingest", "stats", "normalize"}
    # every key of our sections, at its default, with a one-line comment
    for line in params_text[len(USER_PARAMS) :].splitlines():
        if line.startswith(" ") and not line.rstrip().endswith(":"):
            assert "  # " in line, line
    for name in ("base", "ingest", "stats", "normalize"):
        assert set(params[name]) == {f.name for f in dataclasses.fields(SECTIONS[name])}
    assert set(params["ingest"]["split"]) == {"method", "val", "test"}
    loaded = load_params(work / "params.yaml")
    assert loaded.ingest.source == "data/images"
    assert loaded.normalize == load_params(None).normalize

    ignore = (work / ".gitignore").read_text()
    assert ignore.startswith(USER_IGNORE + "\n")
    assert "/data/.*.tmp-*" in ignore.splitlines()

    before = snapshot(work)
    again = pipeline(work, env, "init")
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert snapshot(work) == before  # byte-identical: running it twice changes nothing


def test_init_into_an_empty_repository(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    work = user_repo(tmp_path, dvc=None, params=None)
    assert pipeline(work, env, "init", "--source", "images").returncode == 0
    dvc = yaml.safe_load((work / "dvc.yaml").read_text())
    assert list(dvc) == ["stages"]
    assert dvc["stages"]["ingest"]["deps"] == ["${ingest.source}"]
    assert load_params(work / "params.yaml").ingest.source == "images"


@pytest.mark.parametrize("stage", ["ingest", "stats", "normalize", "report"])
def test_a_users_stage_with_our_name_is_refused_and_nothing_changes(
    tmp_path: Path, stage: str
) -> None:
    env = env_for(tmp_path)
    dvc = USER_DVC.replace("    train:", f"    {stage}:")
    work = user_repo(tmp_path, dvc=dvc)
    before = snapshot(work)
    for args in (["init"], ["init", "--force"]):  # --force is for our own stages only
        proc = pipeline(work, env, *args)
        assert proc.returncode == 1
        assert f"stage {stage!r}" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert "Traceback" not in proc.stderr
    assert snapshot(work) == before
    assert not (work / ".dvc").exists()


def test_a_params_section_of_ours_suggests_a_prefix(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    user_params = "base:  # DVC's example projects keep their seed here\n  seed: 42\n"
    work = user_repo(tmp_path, params=user_params)
    proc = pipeline(work, env, "init")
    assert proc.returncode == 1
    assert "'base'" in proc.stderr
    assert "--prefix" in proc.stderr
    assert (work / "params.yaml").read_text() == user_params

    assert pipeline(work, env, "init", "--prefix", "imgnorm_").returncode == 0
    text = (work / "params.yaml").read_text()
    assert text.startswith(user_params)
    params = yaml.safe_load(text)
    assert params["base"] == {"seed": 42}
    assert {f"imgnorm_{s}" for s in ("base", "ingest", "stats", "normalize")} <= set(params)
    stages = yaml.safe_load((work / "dvc.yaml").read_text())["stages"]
    assert stages["ingest"]["cmd"] == (
        f"pipeline --version-check {__version__} --params-prefix imgnorm_ ingest "
        f"${{imgnorm_ingest.source}} data/prepared"
    )
    assert stages["normalize"]["params"] == ["imgnorm_base", "imgnorm_normalize"]
    assert load_params(work / "params.yaml", prefix="imgnorm_").ingest.source == "data/images"
    # the same prefix again: a no-op; another prefix: refused
    before = snapshot(work)
    assert pipeline(work, env, "init", "--prefix", "imgnorm_").returncode == 0
    assert snapshot(work) == before
    other = pipeline(work, env, "init")
    assert other.returncode == 1
    assert "imgnorm_" in other.stderr
    assert snapshot(work) == before


def test_not_a_git_repository_is_one_line(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    folder = tmp_path / "plain"
    folder.mkdir()
    proc = pipeline(folder, {**env, "GIT_CEILING_DIRECTORIES": str(tmp_path)}, "init")
    assert proc.returncode == 1
    assert "not in a git repository" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert list(folder.iterdir()) == []


def test_version_check_upgrade_and_force(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    work = user_repo(tmp_path)
    assert pipeline(work, env, "init").returncode == 0
    current = (work / "dvc.yaml").read_text()
    old = current.replace(f"--version-check {__version__} ", "--version-check 0.0.1 ")
    (work / "dvc.yaml").write_text(old)

    # the stage command refuses under another installed version
    stage = pipeline(work, env, "--version-check", "0.0.1", "report", "data/stats", "out")
    assert stage.returncode == 1
    assert "pipeline init --upgrade" in stage.stderr
    assert len(stage.stderr.strip().splitlines()) == 1
    assert not (work / "out").exists()

    refused = pipeline(work, env, "init")
    assert refused.returncode == 1
    assert "--upgrade" in refused.stderr
    assert (work / "dvc.yaml").read_text() == old

    assert pipeline(work, env, "init", "--upgrade").returncode == 0
    assert (work / "dvc.yaml").read_text() == current  # only the versions changed back

    # --force rewrites our stages (here: one the user edited) and keeps theirs
    theirs = "        params:\n            - base\n            - stats\n"
    edited = current.replace(theirs, "        params:\n            - stats\n", 1)
    assert edited != current
    (work / "dvc.yaml").write_text(edited)
    assert pipeline(work, env, "init").returncode == 0
    assert (work / "dvc.yaml").read_text() == edited  # not ours to undo without --force
    assert pipeline(work, env, "init", "--force").returncode == 0
    forced = yaml.safe_load((work / "dvc.yaml").read_text())
    assert forced == yaml.safe_load(current)
    only_added(USER_DVC, (work / "dvc.yaml").read_text())


def make_images(folder: Path, n: int, seed: int = 3) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = folder / ("cat" if i % 2 else "dog")
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20 + i % 5, 24, 3), dtype=np.uint8)).save(
            cls / f"{i:03d}.png"
        )


def run_user_project(work: Path, env: dict[str, str], prefix: str) -> None:
    """The README's steps: images, init, dvc add, small image size, repro, verify, metrics,
    an experiment with another mode."""
    make_images(work / "data" / "images", 24)
    args = ["init", "--prefix", prefix] if prefix else ["init"]
    run(["pipeline", *args], work, env)
    params = work / "params.yaml"
    params.write_text(params.read_text().replace("image_size: [224, 224]", "image_size: [16, 16]"))
    run(["dvc", "add", "data/images"], work, env)
    out = run(["dvc", "repro"], work, env)
    assert "Running stage 'train'" in out  # the user's own stage runs too
    run(["pipeline", "verify", "data/normalized"], work, {**env, "PIPELINE_PARAMS_PREFIX": prefix})

    shown = json.loads(run(["dvc", "metrics", "show", "--json"], work, env, include_stderr=False))
    files = shown[""]["data"]
    assert list(files) == ["data/stats/metrics.json"]

    def leaves(value: object) -> list[object]:
        if isinstance(value, dict):
            return [leaf for v in value.values() for leaf in leaves(v)]
        return [value]

    metrics = files["data/stats/metrics.json"]["data"]
    assert all(type(v) in (int, float) for v in leaves(metrics)), metrics
    stats = json.loads((work / "data" / "stats" / "stats.json").read_text())
    assert metrics["train"]["R"]["mean"] == stats["channels"]["R"]["mean"]
    table = run(["dvc", "metrics", "show"], work, env)
    assert "train.R.mean" in table
    assert "sha256" not in table

    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "baseline"], work, env)
    out = run(["dvc", "exp", "run", "-S", f"{prefix}normalize.mode=per_pixel"], work, env)
    assert "Running stage 'normalize'" in out
    assert "Running stage 'ingest'" not in out
    from pipeline import open_normalized

    assert open_normalized(work / "data" / "normalized").lineage["mode"] == "per_pixel"
    shown = run(["dvc", "exp", "show", "--csv"], work, env, include_stderr=False)
    header = shown.splitlines()[0].split(",")
    assert "train.R.mean" in header
    assert f"{prefix}normalize.mode" in header
    assert not [h for h in header if "sha256" in h or h.startswith(("arrays", "channels."))]


@pytest.mark.parametrize(
    "prefix",
    [
        pytest.param("", id="no-prefix"),
        pytest.param("imgnorm_", id="prefix", marks=pytest.mark.slow),
    ],
)
def test_dvc_repro_in_the_users_project(tmp_path: Path, prefix: str) -> None:
    env = env_for(tmp_path)
    # with a prefix, the user's own `base:` section (not ours) lives beside ours
    work = user_repo(tmp_path, params=USER_PARAMS + ("base:\n  seed: 42\n" if prefix else ""))
    run_user_project(work, env, prefix)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("stages:\n", id="empty-stages"),
        pytest.param("stages:\nplots:\n  - a.json\n", id="empty-stages-then-plots"),
        pytest.param("plots:\n  - a.json\n", id="no-stages"),
        pytest.param("# only a comment\n", id="comment-only"),
        pytest.param("stages:\n  a:\n    cmd: echo a", id="no-final-newline"),
        pytest.param("stages:\r\n  a:\r\n    cmd: echo a\r\n", id="crlf"),
        pytest.param(
            "vars:\n  - x: 1\nstages:\n  a:\n    cmd: echo a\n    # about a\n\n# trailer\n",
            id="comments-after-the-last-stage",
        ),
        pytest.param(
            "stages:\n  a:\n    cmd: >-\n      echo a\n      b\n  b:\n    cmd: 'echo b'\n",
            id="folded-and-quoted-commands",
        ),
    ],
)
def test_merge_keeps_every_layout(text: str) -> None:
    from pipeline.tools.project import STAGE_NAMES, merge_dvc_yaml

    merged, initialized = merge_dvc_yaml(text, "", force=False, upgrade=False)
    assert not initialized
    body = text if text.endswith("\n") else text + "\n"  # a final newline is added, nothing else
    only_added(body, merged)
    before = yaml.safe_load(text) or {}
    after = yaml.safe_load(merged)
    assert {k: v for k, v in after.items() if k != "stages"} == {
        k: v for k, v in before.items() if k != "stages"
    }
    assert list(after["stages"]) == [*(before.get("stages") or {}), *STAGE_NAMES]
    if "\r\n" in text:
        assert "\n" not in merged.replace("\r\n", "")
    again, initialized = merge_dvc_yaml(merged, "", force=False, upgrade=False)
    assert initialized
    assert again == merged


def test_a_flow_style_stages_mapping_is_refused() -> None:
    from pipeline.core.errors import PipelineError
    from pipeline.tools.project import merge_dvc_yaml

    with pytest.raises(PipelineError, match="block"):
        merge_dvc_yaml("stages: {a: {cmd: echo}}\n", "", force=False, upgrade=False)


def test_init_in_a_repository_that_already_uses_dvc(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    work = user_repo(tmp_path)
    run(["dvc", "init", "-q"], work, env)
    config = (work / ".dvc" / "config").read_bytes()
    proc = pipeline(work, env, "init")
    assert proc.returncode == 0, proc.stderr
    assert "dvc init" not in proc.stdout
    assert (work / ".dvc" / "config").read_bytes() == config
    assert "ingest" in yaml.safe_load((work / "dvc.yaml").read_text())["stages"]
