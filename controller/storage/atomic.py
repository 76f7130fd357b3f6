"""Write a file so that a crash leaves either the old or the new content, never half of it."""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["STALE_TEMP_S", "write_atomic", "write_atomic_off_loop"]

# One writer at a time per file: two saves racing (a periodic one still in a thread when the exit
# save starts) must not interleave their renames.
_locks_guard = threading.Lock()
_locks: dict[Path, threading.Lock] = {}
# A temp file this old was left by a process killed inside a write (no write takes an hour); younger
# ones may belong to another process writing the same file right now.
STALE_TEMP_S = 3600.0


def _lock_for(path: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(path.resolve(), threading.Lock())


def write_atomic(path: Path, data: bytes, *, keep_previous: bool = False) -> None:
    """Temp file in the same directory, fsync, rename over; optionally keep the old file as `<name>.prev`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock_for(path):
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            if keep_previous and path.exists():
                _keep_previous(path)
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself must survive a power cut
        finally:
            os.close(dir_fd)
        _remove_stale_temps(path)


def _keep_previous(path: Path) -> None:
    """`<name>.prev` becomes the current content while `path` stays in place: a cut at any moment
    leaves `path` whole (old or new), never only the `.prev`."""
    staged = path.with_name(f".{path.name}.prev-{os.getpid()}-{threading.get_ident()}.tmp")
    staged.unlink(missing_ok=True)
    try:
        os.link(path, staged)  # the same inode: nothing copied, nothing to fsync
    except OSError:  # a file system without hard links (FAT): copy it
        with path.open("rb") as source, staged.open("wb") as copy:
            copy.write(source.read())
            copy.flush()
            os.fsync(copy.fileno())
    try:
        os.replace(staged, path.with_name(path.name + ".prev"))
    finally:
        # Gone after the rename, unless `.prev` was already this inode (a cut after the last one):
        # then POSIX rename does nothing and the link is left to remove.
        staged.unlink(missing_ok=True)


def _remove_stale_temps(path: Path) -> None:
    """Temp files of writes that were killed halfway, so a crash loop does not fill the disk."""
    cutoff = time.time() - STALE_TEMP_S
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if stale.stat().st_mtime < cutoff:
                stale.unlink()
        except OSError:  # gone meanwhile, or not ours to remove: it is only litter
            continue


async def write_atomic_off_loop(path: Path, data: bytes, *, keep_previous: bool = False) -> None:
    """`write_atomic` in a worker thread, so its fsyncs never hold up the event loop.

    Cancelling the caller does not stop a write already started: it completes (old or new content,
    as ever) and the CancelledError reaches the caller."""
    await asyncio.to_thread(write_atomic, path, data, keep_previous=keep_previous)
