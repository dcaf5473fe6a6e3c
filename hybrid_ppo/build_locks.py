"""Stale JIT-build locks: DeepSpeed builds its CPU ops with torch's cpp_extension, which guards a
build with a bare `lock` file (torch.utils.file_baton) and makes every other process wait, with no
time limit, until that file is gone. A builder killed midway (out of memory, SIGKILL, a dead box)
never removes it, and every later run that needs the op hangs at start, silently, for ever.

A live builder holds its lock file open (FileBaton keeps the descriptor until release), so a lock
that no process has open is stale. Linux only: elsewhere /proc is missing and nothing is removed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = "lock"


def open_files() -> set[Path]:
    """Every file some process of this machine (that we may inspect) has open."""
    found: set[Path] = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                try:
                    found.add(Path(os.readlink(fd)))
                except OSError:  # closed meanwhile
                    pass
        except OSError:  # the process exited, or is not ours to read
            pass
    return found


def remove_stale_locks(extensions_dir: Path) -> list[Path]:
    """Delete the build locks under `extensions_dir` that no process holds; returns them."""
    locks = list(extensions_dir.glob(f"*/{LOCK_NAME}")) if extensions_dir.is_dir() else []
    if not locks or not Path("/proc/self/fd").is_dir():
        return []
    held = open_files()
    stale = [lock for lock in locks if lock.resolve() not in held]
    for lock in stale:
        lock.unlink(missing_ok=True)
        log.warning("removed the stale JIT-build lock %s (its builder died midway; the op is rebuilt)", lock)
    return stale
