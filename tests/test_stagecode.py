"""dvc.yaml's code deps are exactly the folders and files each stage runs (dvc.lock is the truth)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.stagecode import STAGES, stage_code_sha256, stage_deps, stage_files

ROOT = Path(__file__).resolve().parents[1]


def dvc_code_deps(stage: str) -> list[str]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return sorted(d for d in stages[stage]["deps"] if str(d).startswith("pipeline/"))


def dep_of(module: str) -> str:
    """The dvc.yaml dep that holds module ``module`` (oracle: the module's name only)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "pipeline/__init__.py"
    if (ROOT / "pipeline" / parts[1]).is_dir():
        return f"pipeline/{parts[1]}"
    return f"pipeline/{parts[1]}.py"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_dvc_yaml_lists_exactly_the_code_the_stage_runs(stage: str) -> None:
    assert dvc_code_deps(stage) == stage_deps(stage)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_command_imports_only_its_listed_deps(stage: str) -> None:
    """Oracle: the modules a real import of the command and its stage module loads."""
    module = STAGES[stage]
    code = (
        f"import sys, pipeline.cli, pipeline.{module}; "
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('pipeline'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = {dep_of(m) for m in out.stdout.split()}
    # Everything loaded is listed (function-level imports may add more, never fewer).
    assert loaded <= set(dvc_code_deps(stage))
    assert f"pipeline/{module.split('.')[0]}" in loaded


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_the_stage_digest_covers_every_file_under_its_deps(stage: str) -> None:
    files: list[str] = []
    for dep in dvc_code_deps(stage):
        path = ROOT / dep
        found = path.rglob("*.py") if path.is_dir() else [path]
        files += [p.relative_to(ROOT).as_posix() for p in found if "__pycache__" not in p.parts]
    assert stage_files(stage) == sorted(files)
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + hashlib.sha256((ROOT / rel).read_bytes()).digest())
    assert stage_code_sha256(stage) == h.hexdigest()


def test_every_folder_of_the_package_is_run_by_some_stage_or_holds_tools() -> None:
    covered = {Path(d).name for s in STAGES for d in stage_deps(s)}
    folders = {p.name for p in (ROOT / "pipeline").iterdir() if (p / "__init__.py").is_file()}
    # reader: the training-side API; tools: verify/show/export/fit/init, not stages.
    assert folders - covered == {"reader", "tools"}


def test_stage_deps_follow_the_flow_one_way() -> None:
    """ingest does not run stats or normalize code; stats does not run normalize code."""
    assert not {"pipeline/stats", "pipeline/normalize"} & set(stage_deps("ingest"))
    assert "pipeline/normalize" not in stage_deps("stats")
    assert "pipeline/ingest" not in stage_deps("stats")
