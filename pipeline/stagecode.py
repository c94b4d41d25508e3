"""Which source files of this package each DVC stage runs, found from the imports themselves.

``dvc.yaml`` lists a stage's code as its deps, and the normalized store records a digest of the
code that made it. Both must name exactly the code the stage runs, or ``dvc status`` says "up
to date" after an edit that changes outputs (or re-runs stages for edits that cannot). Rather
than keep lists by hand, :func:`stage_files` follows the imports (module-level and inside
functions) from the stage's entry module, plus what every command runs (``pipeline/cli.py``
with its module-level imports, and the package's ``__init__.py``); a test checks that
``dvc.yaml`` lists exactly these files.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

__all__ = ["STAGES", "stage_code_sha256", "stage_files"]

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE = PACKAGE_DIR.name
# DVC stage -> the module its command calls into.
STAGES = {
    "sample": "sample",
    "ingest": "ingest",
    "stats": "stats_stage",
    "normalize": "normalize",
    "report": "plots",
}


def _module_file(name: str) -> Path | None:
    """The file of module ``pipeline.<name>`` (``name`` may be dotted), if it is ours."""
    parts = name.split(".")
    for candidate in (
        PACKAGE_DIR.joinpath(*parts).with_suffix(".py"),
        PACKAGE_DIR.joinpath(*parts, "__init__.py"),
    ):
        if candidate.is_file():
            return candidate
    return None


@cache
def _imports(path: Path, module_level_only: bool) -> frozenset[Path]:
    """Our modules that ``path`` imports directly."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found: set[Path] = set()
    for node in nodes:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            head, _, rest = name.partition(".")
            if head == PACKAGE and rest and (file := _module_file(rest)) is not None:
                found.add(file)
    return frozenset(found)


def _closure(start: set[Path]) -> set[Path]:
    seen: set[Path] = set()
    todo = list(start)
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(_imports(path, module_level_only=False))
    return seen


def stage_files(stage: str) -> list[str]:
    """The package's source files that stage ``stage`` runs, as sorted POSIX paths relative to
    the repository (``pipeline/ingest.py``, ...)."""
    entry = _module_file(STAGES[stage])
    assert entry is not None, stage
    cli = PACKAGE_DIR / "cli.py"
    files = _closure({entry, PACKAGE_DIR / "__init__.py"}) | {cli, PACKAGE_DIR / "__main__.py"}
    files |= _closure(set(_imports(cli, module_level_only=True)))
    return sorted(f"{PACKAGE}/{p.relative_to(PACKAGE_DIR).as_posix()}" for p in files)


def stage_code_sha256(stage: str) -> str:
    """sha256 over the files of :func:`stage_files`, names and contents, in order."""
    h = hashlib.sha256()
    for rel in stage_files(stage):
        data = (PACKAGE_DIR.parent / rel).read_bytes()
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()
