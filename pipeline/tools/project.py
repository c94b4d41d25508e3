"""``pipeline init``: add this tool's stages and params to someone else's git + DVC project.

The user's files are edited as text, so every byte outside what is added stays as it was
(comments, quoting, order, indentation): blocks are inserted, never re-serialized. Each edit is
checked by parsing the result, and nothing is written before every check has passed.

Our stages are recognized by their command, ``pipeline --version-check V [--params-prefix P]
<stage> ...``: the version written into it makes the command refuse to run under another
installed version, and ``pipeline init --upgrade`` rewrites it, so DVC re-runs the stages.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline import __version__
from pipeline.core.errors import PipelineError
from pipeline.params import SECTIONS, Params, parse_params, parse_prefix, quote

__all__ = [
    "COMMENTS",
    "STAGE_NAMES",
    "InitResult",
    "check_version",
    "init_project",
    "params_block",
    "stages_block",
]

STAGE_NAMES = ("ingest", "stats", "normalize", "report")
# The sections a user project needs: the sample stage (the embedded photos) is this repo's own.
PARAM_SECTIONS = ("base", "ingest", "stats", "normalize")
DEFAULT_SOURCE = "data/images"
# A path DVC pastes into a shell command and a YAML plain scalar: no quoting needed or allowed.
SOURCE_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]*")
OUR_COMMAND = re.compile(
    r"pipeline --version-check (?P<version>\S+) (?:--params-prefix (?P<prefix>\S+) )?"
    r"(?P<stage>ingest|stats|normalize|report)\b"
)
GITIGNORE = (
    "# pipeline (image normalization): temporary siblings and locks of its outputs",
    "/data/.*.tmp-*",
    "/data/.*.old-*",
    "/data/.*.lock",
)

# One line per key of the sections written into params.yaml (README "Params" has the detail).
COMMENTS = {
    "base.scheduler": "auto | threads | processes | synchronous | tcp://host:8786",
    "base.workers": "null = one per core",
    "ingest.source": "the image folder (`dvc add` it)",
    "ingest.image_size": "[height, width], or null to keep the native size (all must match)",
    "ingest.resize": "shorter_side_center_crop | stretch | pad",
    "ingest.resample": "nearest | box | bilinear | hamming | bicubic | lanczos",
    "ingest.pad_value": "colour of the padding with resize: pad",
    "ingest.color": "rgb | gray | keep",
    "ingest.alpha": "composite (over background) | drop",
    "ingest.background": "background colour for alpha: composite",
    "ingest.bit_depth": "8 | 16",
    "ingest.split.method": "hash (of the relative path) | folders (train/ val/ test/)",
    "ingest.split.val": "share of files in val with method: hash",
    "ingest.split.test": "share of files in test with method: hash",
    "ingest.on_error": "fail | skip (record in rejected.json)",
    "ingest.duplicates": "keep | drop (files with the same bytes as an earlier one)",
    "ingest.max_pixels": "larger images are rejected as decompression bombs",
    "ingest.max_file_bytes": "larger files are rejected before they are read",
    "ingest.chunk_images": "images per Zarr chunk (the unit of reading)",
    "ingest.shard_images": "images per shard file (a multiple of chunk_images)",
    "ingest.codec": "none | zstd | lz4",
    "ingest.codec_level": "compression level",
    "stats.fit_split": "train | val | test | all (anything but train needs the override)",
    "stats.allow_non_train_fit": "the explicit override for fitting on evaluation data",
    "stats.zero_std": "a zero std (constant channel or pixel) becomes: one | eps",
    "stats.eps": "the replacement with zero_std: eps",
    "stats.percentiles": "percentiles reported per channel",
    "stats.block_images": "images per Dask task; null = one shard",
    "stats.split_every": "partial results merged per combine task",
    "normalize.mode": "per_channel | per_pixel | global | per_image | per_image_per_channel "
    "| mean_only | min_max",
    "normalize.eps": "added to the std of the per_image modes",
    "normalize.dtype": "float32 | float16",
    "normalize.input_scale": "pixel (x in 0..pixel_max) | unit (x / pixel_max first)",
    "normalize.codec": "none | zstd | lz4",
    "normalize.codec_level": "compression level",
    "normalize.record_git_revision": "true: also record HEAD (changes the store every commit)",
    "normalize.store": "float | lineage (lineage and constants only: normalize on read)",
}


@dataclass(frozen=True)
class InitResult:
    """What ``init_project`` did: the files it changed, and whether it ran ``dvc init``."""

    changed: list[str]
    dvc_initialized: bool


def check_version(required: str) -> None:
    """Refuse to run a stage written for another installed version of this tool."""
    if required != __version__:
        raise PipelineError(
            f"This stage was written for pipeline {required}, but {__version__} is installed. "
            f"Run `pipeline init --upgrade` (DVC then re-runs the stages), or install "
            f"{required}."
        )


# --- the blocks we add ---------------------------------------------------------------------


def _command(stage: str, args: str, prefix: str) -> str:
    option = f" --params-prefix {prefix}" if prefix else ""
    return f"pipeline --version-check {__version__}{option} {stage} {args}"


def stages_block(prefix: str, indent: str = "  ") -> list[str]:
    """Our four stages as dvc.yaml lines (no newlines), each stage key indented by ``indent``."""
    p = prefix
    i1, i2, i3 = indent, indent * 2, indent * 3
    outs_json = [f"{i3}- data/stats/stats.json:", f"{i3}{indent}  cache: false"]
    return [
        f"{i1}ingest:",
        f"{i2}cmd: {_command('ingest', f'${{{p}ingest.source}} data/prepared', p)}",
        f"{i2}deps:",
        f"{i3}- ${{{p}ingest.source}}",
        f"{i2}params:",
        f"{i3}- {p}base",
        f"{i3}- {p}ingest",
        f"{i2}outs:",
        f"{i3}- data/prepared",
        f"{i1}stats:",
        f"{i2}cmd: {_command('stats', 'data/prepared data/stats', p)}",
        f"{i2}deps:",
        f"{i3}- data/prepared",
        f"{i2}params:",
        f"{i3}- {p}base",
        f"{i3}- {p}stats",
        f"{i2}outs:",
        f"{i3}- data/stats/stats.zarr",
        *outs_json,
        f"{i2}metrics:",
        f"{i3}- data/stats/metrics.json:",
        f"{i3}{indent}  cache: false",
        f"{i1}normalize:",
        f"{i2}cmd: {_command('normalize', 'data/prepared data/stats data/normalized', p)}",
        f"{i2}deps:",
        f"{i3}- data/prepared",
        f"{i3}- data/stats/stats.json",
        f"{i3}- data/stats/stats.zarr",
        f"{i2}params:",
        f"{i3}- {p}base",
        f"{i3}- {p}normalize",
        f"{i2}outs:",
        f"{i3}- data/normalized",
        f"{i1}report:",
        f"{i2}cmd: {_command('report', 'data/stats data/reports', p)}",
        f"{i2}deps:",
        f"{i3}- data/stats/stats.json",
        f"{i3}- data/stats/stats.zarr",
        f"{i2}outs:",
        f"{i3}- data/reports:",
        f"{i3}{indent}  cache: false",
    ]


def _scalar(value: Any) -> str:
    """``value`` as YAML that both PyYAML (YAML 1.1) and DVC's ruamel read back the same."""
    text: str = yaml.safe_dump(value, default_flow_style=True, width=1000)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _section_lines(name: str, values: dict[str, Any], key: str, depth: int) -> list[str]:
    lines = []
    pad = "  " * depth
    for field, value in values.items():
        full = f"{name}.{field}" if not key else f"{key}.{field}"
        if isinstance(value, dict):
            lines.append(f"{pad}{field}:")
            lines += _section_lines(name, value, full, depth + 1)
        else:
            lines.append(f"{pad}{field}: {_scalar(value)}  # {COMMENTS[full]}")
    return lines


def params_block(prefix: str, source: str, sections: tuple[str, ...] = PARAM_SECTIONS) -> list[str]:
    """Our params sections with every key at its default and a one-line comment."""
    defaults = dataclasses.replace(
        Params(), ingest=dataclasses.replace(Params().ingest, source=source)
    ).to_dict()
    lines = []
    for name in sections:
        lines.append(f"{prefix}{name}:")
        lines += _section_lines(name, defaults[name], "", 1)
    return lines


# --- reading the user's files ----------------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path} is not UTF-8 text ({exc.reason}); save it as UTF-8.") from exc


def _compose(text: str, name: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise PipelineError(
            f"{name} is not valid YAML ({' '.join(str(exc).split())[:160]}); fix it, then run "
            f"`pipeline init` again. Nothing was changed."
        ) from exc


def _mapping_root(node: yaml.Node | None, name: str) -> yaml.MappingNode | None:
    if node is None or (isinstance(node, yaml.ScalarNode) and node.value == ""):
        return None
    if not isinstance(node, yaml.MappingNode):
        raise PipelineError(f"{name} is not a mapping at its top level; nothing was changed.")
    return node


def _key(node: yaml.MappingNode, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key:
            return k, v
    return None


def _newline(text: str) -> str:
    return "\r\n" if "\r\n" in text else "\n"


def _ends_with_newline(text: str) -> str:
    return text if not text or text.endswith("\n") else text + _newline(text)


def _insertion_line(lines: list[str], node: yaml.MappingNode) -> int:
    """The line index after the last entry of the block mapping ``node``: blank lines and
    comments less indented than its keys, which belong to what follows, stay below it."""
    end = node.end_mark
    line = end.line + 1 if end.column > 0 else end.line
    line = min(line, len(lines))
    column = node.value[0][0].start_mark.column
    while line > node.start_mark.line + 1:
        previous = lines[line - 1]
        stripped = previous.strip()
        if stripped and not (stripped.startswith("#") and _indent(previous) < column):
            break
        line -= 1
    return line


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


# --- dvc.yaml ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stage:
    name: str
    command: str | None  # None: not a plain string cmd
    first: int  # first line of the stage's key
    cmd_span: tuple[int, int] | None  # character span of the cmd scalar


def _stages(text: str) -> tuple[yaml.MappingNode | None, yaml.Node | None, list[_Stage]]:
    """The root mapping, the ``stages`` value node and the stages of dvc.yaml text."""
    root = _mapping_root(_compose(text, "dvc.yaml"), "dvc.yaml")
    found = _key(root, "stages") if root is not None else None
    if found is None:
        return root, None, []
    value = found[1]
    if isinstance(value, yaml.ScalarNode) and value.value == "":
        return root, value, []
    if not isinstance(value, yaml.MappingNode) or value.flow_style:
        raise PipelineError(
            "dvc.yaml: `stages` is not a block mapping (one stage per indented key); write it "
            "in block style, then run `pipeline init` again. Nothing was changed."
        )
    stages = []
    for k, v in value.value:
        cmd = _key(v, "cmd") if isinstance(v, yaml.MappingNode) else None
        command = cmd[1].value if cmd and isinstance(cmd[1], yaml.ScalarNode) else None
        span = (cmd[1].start_mark.index, cmd[1].end_mark.index) if cmd and command else None
        stages.append(_Stage(str(k.value), command, k.start_mark.line, span))
    return root, value, stages


def _ours(stage: _Stage) -> re.Match[str] | None:
    match = OUR_COMMAND.match(stage.command or "")
    return match if match and match["stage"] == stage.name else None


def _remove(text: str, names: set[str]) -> str:
    """``text`` without the stages ``names`` (each from its key to the next stage's key)."""
    _, value, stages = _stages(text)
    if not names or not isinstance(value, yaml.MappingNode):
        return text
    lines = text.splitlines(keepends=True)
    last = _insertion_line(lines, value)
    drop: set[int] = set()
    for i, stage in enumerate(stages):
        if stage.name in names:
            stop = stages[i + 1].first if i + 1 < len(stages) else last
            drop.update(range(stage.first, stop))
    return "".join(line for i, line in enumerate(lines) if i not in drop)


def _insert_stages(text: str, prefix: str, missing: list[str]) -> str:
    """``text`` with our stages in ``missing`` added at the end of its ``stages`` mapping."""
    if not missing:
        return text
    text = _ends_with_newline(text)
    nl = _newline(text)
    root, value, _ = _stages(text)
    lines = text.splitlines(keepends=True)
    if isinstance(value, yaml.MappingNode):
        column = value.value[0][0].start_mark.column
        at = _insertion_line(lines, value)
        indent = " " * column
    elif value is not None and root is not None:  # `stages:` with nothing under it
        found = _key(root, "stages")
        assert found is not None
        at, indent = found[0].start_mark.line + 1, "  "
    else:
        at, indent = len(lines), "  "
    block = _only(stages_block(prefix, indent), missing, indent)
    head = [] if value is not None else ["stages:"]
    if value is None and root is None and text.strip() == "":
        lines, at = [], 0
    added = [line + nl for line in head + block]
    return "".join(lines[:at] + added + lines[at:])


def _only(block: list[str], names: list[str], indent: str) -> list[str]:
    """The lines of ``block`` that belong to the stages ``names``."""
    kept, keep = [], False
    for line in block:
        if _indent(line) == len(indent):
            keep = line.strip().removesuffix(":") in names
        if keep:
            kept.append(line)
    return kept


def _upgrade(text: str, stages: list[_Stage]) -> str:
    """``text`` with the version in our stages' commands set to the installed one."""
    for stage in sorted(stages, key=lambda s: s.cmd_span or (0, 0), reverse=True):
        match = _ours(stage)
        if match is None or stage.cmd_span is None or match["version"] == __version__:
            continue
        a, b = stage.cmd_span
        old = text[a:b]
        if old != stage.command:  # a quoted or folded scalar: rewrite only a plain one
            raise PipelineError(
                f"dvc.yaml: the cmd of stage {stage.name!r} is not written on one line; set "
                f"its `--version-check` to {__version__} by hand."
            )
        old_option = f"--version-check {match['version']} "
        new = old.replace(old_option, f"--version-check {__version__} ", 1)
        text = text[:a] + new + text[b:]
    return text


def merge_dvc_yaml(
    text: str | None, prefix: str, *, force: bool, upgrade: bool
) -> tuple[str, bool]:
    """The new dvc.yaml text, and whether our stages were there already (initialized)."""
    original = text or ""
    _, _, stages = _stages(original)
    by_name = {s.name: s for s in stages}
    foreign = [n for n in STAGE_NAMES if n in by_name and _ours(by_name[n]) is None]
    if foreign:
        raise PipelineError(
            f"dvc.yaml already has a stage {foreign[0]!r} that `pipeline init` did not write "
            f"(its cmd is {quote(by_name[foreign[0]].command)}); rename or remove it, then run "
            f"`pipeline init` again. Nothing was changed."
        )
    ours = {n: m for n in STAGE_NAMES if n in by_name and (m := _ours(by_name[n])) is not None}
    prefixes = {m["prefix"] or "" for m in ours.values()}
    if ours and prefixes != {prefix} and not force:
        shown = ", ".join(repr(p) for p in sorted(prefixes))
        raise PipelineError(
            f"dvc.yaml has this tool's stages with --params-prefix {shown}, not {prefix!r}; run "
            f"`pipeline init` with that prefix, or `--force` to rewrite the stages (the "
            f"sections with the new prefix are added at their defaults; move your values)."
        )
    versions = sorted({m["version"] for m in ours.values()} - {__version__})
    if versions and not (upgrade or force):
        raise PipelineError(
            f"dvc.yaml has this tool's stages written for pipeline {versions[0]}; "
            f"{__version__} is installed. Run `pipeline init --upgrade` to rewrite their "
            f"commands (DVC then re-runs them)."
        )
    if force:
        new = _remove(original, set(ours))
        new = _insert_stages(new, prefix, list(STAGE_NAMES))
    else:
        new = _upgrade(original, stages) if upgrade else original
        new = _insert_stages(new, prefix, [n for n in STAGE_NAMES if n not in ours])
    _check_dvc_merge(original, new, prefix)
    return new, bool(ours)


def _load_both(old: str, new: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        return yaml.safe_load(old) or {}, yaml.safe_load(new) or {}
    except yaml.YAMLError as exc:
        raise PipelineError(
            f"{name} is laid out in a way `pipeline init` cannot merge into as text; add this "
            f"tool's entries by hand (README: Use it in your own project). Nothing was changed."
        ) from exc


def _check_dvc_merge(old: str, new: str, prefix: str) -> None:
    """The merged file parses to the old content plus exactly our stages."""
    before, after = _load_both(old, new, "dvc.yaml")
    ours = yaml.safe_load("stages:\n" + "\n".join(stages_block(prefix)) + "\n")["stages"]
    expected_stages = {
        k: v for k, v in (before.get("stages") or {}).items() if k not in STAGE_NAMES
    }
    got_stages = after.get("stages") or {}
    others_same = {k: v for k, v in after.items() if k != "stages"} == {
        k: v for k, v in before.items() if k != "stages"
    }
    foreign_same = {k: v for k, v in got_stages.items() if k not in STAGE_NAMES} == expected_stages
    ours_ok = all(
        name in got_stages and _ours(_Stage(name, got_stages[name].get("cmd"), 0, None))
        for name in STAGE_NAMES
    ) and all(
        {k: v for k, v in got_stages[n].items() if k != "cmd"}
        == {k: v for k, v in ours[n].items() if k != "cmd"}
        for n in STAGE_NAMES
        if n not in (before.get("stages") or {})
    )
    if not (others_same and foreign_same and ours_ok):
        raise PipelineError(
            "dvc.yaml is laid out in a way `pipeline init` cannot merge into as text; add the "
            "stages by hand (README: Use it in your own project). Nothing was changed."
        )


# --- params.yaml and .gitignore ----------------------------------------------------------------


def merge_params_yaml(text: str | None, prefix: str, source: str, *, initialized: bool) -> str:
    """params.yaml text with our missing sections appended; a section of ours that exists
    before init ever ran is someone else's: an error suggesting --prefix."""
    original = text or ""
    root = _mapping_root(_compose(original, "params.yaml"), "params.yaml")
    present = {str(k.value) for k, _ in root.value} if root is not None else set()
    taken = [f"{prefix}{n}" for n in SECTIONS if f"{prefix}{n}" in present]
    if taken and not initialized:
        raise PipelineError(
            f"params.yaml already has a section {taken[0]!r}, and this tool's sections would "
            f"share its name. Choose a prefix for ours: `pipeline init --prefix imgnorm_` "
            f"(sections imgnorm_ingest, ...). Nothing was changed."
        )
    missing = tuple(n for n in PARAM_SECTIONS if f"{prefix}{n}" not in present)
    if not missing:
        return original
    new = _ends_with_newline(original)
    nl = _newline(new)
    if root is not None and root.flow_style:
        raise PipelineError("params.yaml is written in flow style ({...}); nothing was changed.")
    head = [
        "# pipeline (image normalization): every key at its default; README \"Params\".",
    ]
    spacer = [""] if new.strip() else []
    added = spacer + head + params_block(prefix, source, missing)
    new = new + "".join(line + nl for line in added)
    _check_params_merge(original, new, prefix)
    return new


def _check_params_merge(old: str, new: str, prefix: str) -> None:
    before, after = _load_both(old, new, "params.yaml")
    if {k: v for k, v in after.items() if k in before} != before:
        raise PipelineError(
            "params.yaml cannot be merged into as text; add the sections by hand. "
            "Nothing was changed."
        )
    parse_params(after, origin="params.yaml", prefix=prefix)


def merge_gitignore(text: str | None) -> str:
    """.gitignore text with the lines of GITIGNORE it does not have yet appended."""
    original = text or ""
    have = {line.strip() for line in original.splitlines()}
    missing = [line for line in GITIGNORE[1:] if line not in have]
    if not missing:
        return original
    new = _ends_with_newline(original)
    nl = _newline(new)
    return new + "".join(line + nl for line in [GITIGNORE[0], *missing])


# --- the command -------------------------------------------------------------------------------


def _git_root(cwd: Path) -> Path:
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError as exc:
        raise PipelineError("git is not installed; `pipeline init` needs a git repo.") from exc
    if proc.returncode != 0:
        raise PipelineError(
            f"{cwd} is not in a git repository; run `git init` first (or cd into your project)."
        )
    return Path(proc.stdout.strip())


def _write(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` atomically, keeping its permission bits."""
    tmp = path.with_name(f".{path.name}.pipeline-init")
    tmp.write_bytes(text.encode("utf-8"))
    if path.exists():
        os.chmod(tmp, path.stat().st_mode & 0o7777)
    os.replace(tmp, path)


def init_project(
    cwd: Path,
    *,
    source: str = DEFAULT_SOURCE,
    prefix: str = "",
    force: bool = False,
    upgrade: bool = False,
) -> InitResult:
    """Merge our stages, params sections and .gitignore lines into the project at ``cwd`` (the
    top of a git repository, or a DVC project inside one); run ``dvc init`` when needed."""
    prefix = parse_prefix(prefix, "--prefix")
    if not SOURCE_PATTERN.fullmatch(source) or ".." in source.split("/"):
        raise PipelineError(
            f"--source is {quote(source)}; allowed: a relative path inside the project of "
            f"letters, digits, '_', '.', '-' and '/' (for example data/images)."
        )
    root = _git_root(cwd)
    dvc_needed = not (cwd / ".dvc").is_dir()
    if dvc_needed and root.resolve() != cwd.resolve():
        raise PipelineError(
            f"{cwd} is inside the git repository {root} but is not its top; run `pipeline init` "
            f"there, or run `dvc init --subdir` here first."
        )
    files = {name: cwd / name for name in ("dvc.yaml", "params.yaml", ".gitignore")}
    texts = {name: _read(path) for name, path in files.items()}
    dvc_text, initialized = merge_dvc_yaml(
        texts["dvc.yaml"], prefix, force=force, upgrade=upgrade
    )
    new = {
        "dvc.yaml": dvc_text,
        "params.yaml": merge_params_yaml(
            texts["params.yaml"], prefix, source, initialized=initialized
        ),
        ".gitignore": merge_gitignore(texts[".gitignore"]),
    }
    if dvc_needed:
        proc = subprocess.run(
            [sys.executable, "-m", "dvc", "init", "-q"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            detail = " ".join((proc.stderr or proc.stdout).split())[:200]
            raise PipelineError(f"`dvc init` failed in {cwd}: {detail}")
    changed = []
    for name, text in new.items():
        if text != (texts[name] or ""):
            _write(files[name], text)
            changed.append(name)
    return InitResult(changed=changed, dvc_initialized=dvc_needed)
