"""A full disk (or any SQLite error) degrades the time series, never the control side: `record()` keeps
returning at once, what cannot be kept is dropped oldest-first and counted, and writing resumes by
itself when space returns."""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import sqlite3
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from controller.storage.atomic import write_atomic, write_atomic_off_loop
from controller.storage.timeseries import MAX_QUEUED_ROWS, TimeSeriesStore, connect_default

SERIES = [f"measured.s{i}_kw" for i in range(10)] + ["state.safe"]
# A record() call may take this long at most: far below one write attempt on the slow disk below
# (hundreds of ms), above what a busy 2-core machine's scheduler costs a thread now and then.
RECORD_BUDGET_S = 0.1
# The slow disk: every this many SQLite VM steps the writer waits SLOW_PAUSE_S.
SLOW_EVERY_STEPS = 200
SLOW_PAUSE_S = 0.01
# How long the writer must be seen waiting on the slow disk while ticks come in: 0.2 s, twice the
# budget of a record() call; and how long that may take at most.
OUTAGE_SLOW_STEPS = 20
OUTAGE_DEADLINE_S = 30.0
# Recovery takes a retry (back-off capped at 50 ms here) and a few batches; a second is plenty.
RECOVERY_ATTEMPTS = 20
RECOVERY_FLUSH_S = 1.0


class Disk:
    """Connections whose database can hold only `max_pages` pages (SQLite's own disk-full error)."""

    def __init__(self, max_pages: int) -> None:
        self.max_pages = max_pages
        self.slow = True
        self.refuse_open: OSError | None = None
        self.connections = 0
        self.slow_steps = 0

    def connect(self, path: Path) -> sqlite3.Connection:
        if self.refuse_open is not None:
            raise self.refuse_open
        db = connect_default(path)
        db.execute(f"PRAGMA max_page_count={self.max_pages}")
        db.set_progress_handler(self._step, SLOW_EVERY_STEPS)
        self.connections += 1
        return db

    def _step(self) -> int:
        if self.slow:
            time.sleep(SLOW_PAUSE_S)
            self.slow_steps += 1
        return 0  # go on


def _store(tmp_path: Path, disk: Disk) -> TimeSeriesStore:
    return TimeSeriesStore(
        tmp_path / "ts.sqlite3", retention_days=400, max_queued_rows=2_000, write_period_s=0.01, batch_rows=200,
        retry_min_s=0.01, retry_max_s=0.05, connect=disk.connect,
    )  # fmt: skip


def _record(store: TimeSeriesStore, ticks: range) -> float:
    """Record ticks; returns the slowest record() call, in seconds."""
    slowest = 0.0
    for tick in ticks:
        started = time.perf_counter()
        store.record(float(tick), {name: tick + i / 10 for i, name in enumerate(SERIES)})
        slowest = max(slowest, time.perf_counter() - started)
    return slowest


def _stored_ticks(path: Path) -> list[int]:
    db = sqlite3.connect(path)
    try:
        return [int(ts) for (ts,) in db.execute("SELECT ts FROM ticks ORDER BY ts")]
    finally:
        db.close()


def _writers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("storage-writer")]


def test_disk_full_degrades_drops_oldest_counts_and_recovers(tmp_path: Path) -> None:
    disk = Disk(max_pages=16)
    store = _store(tmp_path, disk)
    tick, slowest = 0, 0.0
    while tick < 3_000:  # a site at its own pace: each batch written until the disk is full
        slowest = max(slowest, _record(store, range(tick, tick + 20)))
        tick += 20
        if not store.flush(RECOVERY_FLUSH_S):  # gives up as soon as a write fails
            break
    assert 0 < tick < 3_000
    # The outage goes on: ticks keep coming (30 times what the queue holds) while the writer retries
    # on the slow, full disk for a while; no record() call may wait for it.
    steps_before, deadline = disk.slow_steps, time.monotonic() + OUTAGE_DEADLINE_S
    while tick < 3_000 or disk.slow_steps < steps_before + OUTAGE_SLOW_STEPS:
        slowest = max(slowest, _record(store, range(tick, tick + 1)))
        tick += 1
        assert time.monotonic() < deadline, "the writer never got back to the disk"
    total = tick
    store.flush(RECOVERY_FLUSH_S)
    health = store.health_snapshot()
    assert health.state == "degraded"
    assert health.last_error is not None
    assert "full" in health.last_error
    assert health.dropped_rows > 0
    assert health.queued_rows <= 2_000
    assert health.written_rows + health.dropped_rows + health.queued_rows == total * len(SERIES)
    assert slowest < RECORD_BUDGET_S
    before_recovery = _stored_ticks(tmp_path / "ts.sqlite3")
    assert before_recovery == list(range(len(before_recovery)))  # what fitted is there, from the start

    disk.max_pages, disk.slow = 1_000_000, False  # space returns
    slowest = max(slowest, _record(store, range(total, total + 100)))
    assert any(store.flush(RECOVERY_FLUSH_S) for _ in range(RECOVERY_ATTEMPTS))
    health = store.health_snapshot()
    assert health.state == "ok"
    assert health.queued_rows == 0
    assert health.written_rows + health.dropped_rows == (total + 100) * len(SERIES)
    assert disk.connections > 1  # reopened after the failure
    stored = _stored_ticks(tmp_path / "ts.sqlite3")
    assert len(stored) * len(SERIES) == health.written_rows
    # One gap, in the middle of the outage: the oldest ticks went, the newest were kept and written.
    gaps = [(a, b) for a, b in itertools.pairwise(stored) if b != a + 1]
    assert len(gaps) == 1
    assert gaps[0][0] == before_recovery[-1]
    assert stored[-1] == total + 99
    assert stored[-1] - gaps[0][1] + 1 >= 100  # at least the ticks recorded after the recovery
    assert slowest < RECORD_BUDGET_S
    store.close()
    assert not _writers()


def test_store_that_cannot_open_its_file_queues_and_catches_up(tmp_path: Path) -> None:
    disk = Disk(max_pages=1_000_000)
    disk.slow = False
    disk.refuse_open = PermissionError(errno.EACCES, "Permission denied", str(tmp_path))
    store = _store(tmp_path, disk)
    _record(store, range(50))
    assert not store.flush(RECOVERY_FLUSH_S)
    health = store.health_snapshot()
    assert health.state == "degraded"
    assert health.last_error is not None
    assert "Permission denied" in health.last_error
    assert health.queued_rows == 50 * len(SERIES)
    disk.refuse_open = None
    assert any(store.flush(RECOVERY_FLUSH_S) for _ in range(RECOVERY_ATTEMPTS))
    assert store.health()["state"] == "ok"
    assert [row[0] for row in store.rows(like="state.safe")] == [float(t) for t in range(50)]
    store.close()


def test_close_while_degraded_is_bounded_joins_and_counts_what_is_lost(tmp_path: Path) -> None:
    disk = Disk(max_pages=16)
    store = _store(tmp_path, disk)
    _record(store, range(1_000))
    store.flush(RECOVERY_FLUSH_S)
    started = time.monotonic()
    store.close(timeout_s=0.2)
    assert time.monotonic() - started < 0.2 + 1.0  # the flush bound, and one write attempt to finish
    assert not _writers()
    health = store.health_snapshot()
    assert health.queued_rows == 0
    assert health.written_rows + health.dropped_rows == 1_000 * len(SERIES)
    store.record(1_000.0, {"late_kw": 1.0})  # after close: counted, never raised
    assert store.health_snapshot().dropped_rows == health.dropped_rows + 1


async def test_state_file_written_off_loop_survives_cancellation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.json"
    write_atomic(target, b'{"old": 1}')
    in_fsync, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:  # an SD card taking its time
        in_fsync.set()
        release.wait()
        real_fsync(fd)

    monkeypatch.setattr("controller.storage.atomic.os.fsync", slow_fsync)
    task = asyncio.create_task(write_atomic_off_loop(target, b'{"new": 1}'))
    await asyncio.to_thread(in_fsync.wait)
    ticks = 0
    for _ in range(5):  # the loop keeps running while the write waits on the disk
        await asyncio.sleep(0)
        ticks += 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    await asyncio.to_thread(write_atomic, target, b'{"newer": 1}')  # waits for the cancelled write's lock
    assert ticks == 5
    assert target.read_bytes() == b'{"newer": 1}'
    assert not await asyncio.to_thread(lambda: list(tmp_path.glob(".state.json.*")))  # no temp file left


def test_memory_stays_bounded_however_long_the_outage(tmp_path: Path) -> None:
    def no_space(path: Path) -> sqlite3.Connection:
        raise OSError(errno.ENOSPC, "No space left on device")

    store = TimeSeriesStore(tmp_path / "ts.sqlite3", retention_days=400, retry_min_s=60.0, connect=no_space)
    tracemalloc.start()
    try:
        _record(store, range(10_000))  # 110,000 values: the queue is full from here on
        filled = tracemalloc.get_traced_memory()[0]
        _record(store, range(10_000, 40_000))
        grown = tracemalloc.get_traced_memory()[0] - filled
    finally:
        tracemalloc.stop()
    health = store.health_snapshot()
    assert health.queued_rows <= MAX_QUEUED_ROWS
    assert health.dropped_rows == 40_000 * len(SERIES) - health.queued_rows
    assert grown < 100_000  # bytes: 330,000 more values recorded, none of them kept beyond the bound
    store.close(timeout_s=0.1)
