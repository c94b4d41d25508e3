"""Which source code of this package each DVC stage runs, found from the imports themselves.

``dvc.yaml`` lists a stage's code as its deps, and the normalized store records a digest of the
code that made it. Both must cover exactly the code the stage runs, or ``dvc status`` says "up
to date" after an edit that changes outputs. Rather than keep lists by hand,
:func:`stage_deps` follows the imports (module-level and inside functions) from the stage's
entry module, plus what every command runs (``pipeline/cli.py`` with its module-level imports,
and the package's ``__init__.py``), and names each subpackage it reaches as a whole folder: a
stage depends on the folders it runs, so the deps read like the layout. A test checks that
``dvc.yaml`` lists exactly these deps; ``.dvcignore`` keeps ``__pycache__`` out of DVC's hashes.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

__all__ = ["STAGES", "stage_code_sha256", "stage_deps", "stage_files"]

PACKAGE_DIR = Path(__file__).resolve().parents[1]
PACKAGE = PACKAGE_DIR.name
# DVC stage -> the module its command calls into.
STAGES = {
    "sample": "sample.stage",
    "ingest": "ingest.stage",
    "stats": "stats.stage",
    "normalize": "normalize.stage",
    "report": "report.stage",
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


def _reached(stage: str) -> set[Path]:
    entry = _module_file(STAGES[stage])
    assert entry is not None, stage
    cli = PACKAGE_DIR / "cli.py"
    files = _closure({entry, PACKAGE_DIR / "__init__.py"}) | {cli, PACKAGE_DIR / "__main__.py"}
    return files | _closure(set(_imports(cli, module_level_only=True)))


def stage_deps(stage: str) -> list[str]:
    """The code deps of stage ``stage`` as dvc.yaml lists them: the package's top-level files it
    runs and the subpackage folders it reaches, as sorted POSIX paths (``pipeline/cli.py``,
    ``pipeline/core``, ...)."""
    deps = set()
    for path in _reached(stage):
        rel = path.relative_to(PACKAGE_DIR)
        deps.add(f"{PACKAGE}/{rel.parts[0]}")
    return sorted(deps)


def stage_files(stage: str) -> list[str]:
    """Every source file under :func:`stage_deps`, as sorted POSIX paths relative to the
    repository."""
    files: set[str] = set()
    for dep in stage_deps(stage):
        path = PACKAGE_DIR.parent / dep
        found = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        files.update(p.relative_to(PACKAGE_DIR.parent).as_posix() for p in found)
    return sorted(files)


def stage_code_sha256(stage: str) -> str:
    """sha256 over the files of :func:`stage_files`, names and contents, in order."""
    h = hashlib.sha256()
    for rel in stage_files(stage):
        data = (PACKAGE_DIR.parent / rel).read_bytes()
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()
