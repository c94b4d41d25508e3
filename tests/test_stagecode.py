"""dvc.yaml's code deps are exactly the files each stage runs (issue: dvc.lock is the truth)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.stagecode import STAGES, stage_code_sha256, stage_files

ROOT = Path(__file__).resolve().parents[1]


def dvc_code_deps(stage: str) -> list[str]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return sorted(d for d in stages[stage]["deps"] if str(d).startswith("pipeline/"))


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_dvc_yaml_lists_exactly_the_code_the_stage_runs(stage: str) -> None:
    assert dvc_code_deps(stage) == stage_files(stage)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_command_imports_only_its_listed_files(stage: str) -> None:
    """Oracle: what a real `pipeline STAGE --help`-free import of the command loads."""
    module = STAGES[stage]
    code = (
        f"import sys, pipeline.cli, pipeline.{module}; "
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('pipeline'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = {
        f"pipeline/{m.split('.', 1)[1]}.py" if "." in m else "pipeline/__init__.py"
        for m in out.stdout.split()
    }
    # Everything loaded is listed (function-level imports may add more, never fewer).
    assert loaded <= set(stage_files(stage))


def test_normalize_records_the_digest_of_its_listed_deps() -> None:
    h = hashlib.sha256()
    for rel in dvc_code_deps("normalize"):
        h.update(rel.encode() + b"\0" + hashlib.sha256((ROOT / rel).read_bytes()).digest())
    assert stage_code_sha256("normalize") == h.hexdigest()


def test_every_module_of_the_package_is_run_by_some_stage_or_is_a_tool() -> None:
    tools = {"audit", "export", "revisions", "show", "verify", "batches", "shardread"}
    tools |= {"fit", "project"}  # `pipeline fit` and `pipeline init`: not stages
    tools |= {"reader", "onread"}  # the training-side API: no stage runs it
    covered = {Path(f).stem for s in STAGES for f in stage_files(s)}
    modules = {p.stem for p in (ROOT / "pipeline").glob("*.py")}
    assert modules - covered <= tools | {"stagecode"} | {"lineage"}
