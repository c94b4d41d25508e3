"""One error family: every member also subclasses the builtin a caller would catch."""

from __future__ import annotations

__all__ = [
    "BadImagesError",
    "ParamsError",
    "PipelineError",
    "StoreError",
]


class PipelineError(Exception):
    """Base of every error this package raises on purpose; the CLI prints it as one line."""


class ParamsError(PipelineError, ValueError):
    """A params.yaml key, type or value is wrong; the message names the key and the fix."""


class StoreError(PipelineError, OSError):
    """A store or output path is missing, corrupt or not what the stage expects."""


class BadImagesError(PipelineError, ValueError):
    """One or more input files could not be used (``ingest.on_error: fail``)."""

    def __init__(self, rejected: list[tuple[str, str]]) -> None:
        self.rejected = rejected
        if len(rejected) == 1:  # one file: one line
            path, reason = rejected[0]
            super().__init__(
                f"1 input file cannot be used; nothing was written: {path}: {reason}. Fix or "
                f"remove it, or set ingest.on_error: skip to record it in rejected.json."
            )
            return
        lines = [f"  {path}: {reason}" for path, reason in rejected]
        super().__init__(
            f"{len(rejected)} input file(s) cannot be used; nothing was written:\n"
            + "\n".join(lines)
            + "\nFix or remove these files, or set ingest.on_error: skip to record them "
            "in rejected.json and go on without them."
        )
