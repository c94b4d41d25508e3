"""One writer per local output, and the leftovers of killed runs.

A run that writes ``DIR/NAME`` holds an ``fcntl.flock`` on ``DIR/.NAME.lock`` from before it
creates its temporary folder ``DIR/.NAME.tmp-<12 hex>`` until after it renamed that into place;
the lock file (holding the pid) is removed at the end. A second run writing the same output
meanwhile stops with "another run (pid N) is writing OUT" instead of deleting the first run's
temporary folder. The kernel drops the lock when a process dies, so a killed run never blocks
the next one; its leftovers (``.NAME.tmp-*``, ``.NAME.old-*`` of exactly that pattern, nothing
else) are removed by whoever next takes the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline.core.errors import StoreError

__all__ = ["hold", "leftover_names", "refuse_if_locked", "sweep_leftovers", "try_hold"]


def leftover_names(name: str, names: Iterable[str]) -> list[str]:
    """The ``names`` that are temporary siblings of the output ``name``: exactly
    ``.NAME.tmp-<12 hex>`` or ``.NAME.old-<12 hex>`` (not ``.NAME.tmpfoo``, a user's file)."""
    pattern = re.compile(rf"\.{re.escape(name)}\.(tmp|old)-[0-9a-f]{{12}}")
    return sorted(n for n in names if pattern.fullmatch(n))


def lock_path(dest: Path) -> Path:
    """The lock file beside ``dest``."""
    return dest.parent / f".{dest.name}.lock"


def _holder(path: Path) -> str:
    """The pid written into the lock file, or ``?``."""
    try:
        text = path.read_bytes()[:32].decode("ascii", "replace").strip()
    except OSError:
        return "?"
    return text if text.isdigit() else "?"


def _open_locked(dest: Path) -> int | None:
    """A descriptor of ``dest``'s lock file holding its lock, or None when another process
    holds it. Retries when the file was removed or replaced between open and lock (its
    holder unlinks it when done), so two runs never hold locks on different inodes."""
    path = lock_path(dest)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _release(dest: Path, fd: int) -> None:
    """Remove the lock file (while still holding it), then drop the lock."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lock_path(dest))
    os.close(fd)


def _busy(dest: Path) -> StoreError:
    pid = _holder(lock_path(dest))
    return StoreError(
        f"another run (pid {pid}) is writing {dest}; wait for it to finish, or stop it, then "
        f"run again."
    )


@contextlib.contextmanager
def hold(dest: Path) -> Iterator[None]:
    """Hold ``dest``'s lock for the block, or raise StoreError naming the run that has it."""
    fd = _open_locked(dest)
    if fd is None:
        raise _busy(dest)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        yield
    finally:
        _release(dest, fd)


@contextlib.contextmanager
def try_hold(dest: Path) -> Iterator[bool]:
    """Hold ``dest``'s lock for the block when nobody else does; yield whether we got it."""
    fd = _open_locked(dest)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            _release(dest, fd)


def refuse_if_locked(dest: Path) -> None:
    """Raise StoreError when another run is writing ``dest`` right now."""
    if not dest.parent.is_dir():
        return
    try:
        with try_hold(dest) as free:
            if not free:
                raise _busy(dest)
    except StoreError:
        raise
    except OSError:  # a read-only folder, say: publish reports it, naming the output
        return


def sweep_leftovers(dest: Path) -> list[Path]:
    """Remove the temporary siblings of ``dest`` (call with its lock held); return them."""
    try:
        names = os.listdir(dest.parent)
    except OSError:
        return []
    removed = []
    for name in leftover_names(dest.name, names):
        path = dest.parent / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed.append(path)
    return removed
