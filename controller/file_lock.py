"""An exclusive advisory lock shared by every process that writes one file (`fcntl.flock` on a lock
file beside it), taken with a deadline so a stuck writer cannot hang the others."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LockTimeout", "exclusive_lock"]

# How often a waiting writer tries again; writers hold the lock for one read-validate-fsync (~10 ms).
_RETRY_S = 0.005


class LockTimeout(TimeoutError):
    """Another writer held the lock past the deadline."""


@contextlib.contextmanager
def exclusive_lock(path: Path, timeout_s: float) -> Iterator[None]:
    """Hold `path` (created if missing, never removed: removing a lock file races its next user)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Read-only is enough for flock, and lets a writer under another account (a shell as root, the
    # controller as its own user) take a lock file the other created.
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"{path} held by another writer for more than {timeout_s} s") from None
                time.sleep(_RETRY_S)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
