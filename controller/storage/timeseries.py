"""Local time series in SQLite, written by its own thread: the control tick only queues.

`record()` puts one tick on a bounded in-memory queue and returns; a writer thread commits the queue in
batches (one transaction each, WAL, `synchronous=FULL`), downsamples and prunes on its own schedule.
Any error on the writer's side (disk full, I/O error, a locked or damaged file) degrades the store:
the rows stay queued and are retried with back-off; when the queue is full the *oldest* ticks are
dropped and counted; `health()` says so. The store recovers by itself when writing works again.

Layout (measured with `python -m controller.storage.bench`; figures in the README):

- `ticks`: one row per tick, the values packed as little-endian doubles in the order of a named
  series set (`series_sets`), for the last `full_resolution_days`;
- `minutes`: after that, one row per minute with the mean, minimum and maximum of each series, until
  `retention_days`;
- `plans`: each plan's totals (JSON), until `retention_days`;
- `samples`: the long-format table of earlier versions, read and pruned but no longer written.

Why the oldest ticks go when the queue is full: the queue only fills while writing fails, and what
matters after the failure is the present. Dropping the oldest keeps the newest minutes ready to be
written when the disk comes back, so the record resumes contiguous with now and the gap is one
stretch in the middle of the outage, never a hole after the recovery. Whole ticks are dropped, never
some series of a tick.
"""

from __future__ import annotations

import contextlib
import csv
import heapq
import json
import logging
import math
import sqlite3
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Literal, TextIO

import numpy as np
import numpy.typing as npt

__all__ = [
    "FULL_RESOLUTION_DAYS",
    "MAX_QUEUED_ROWS",
    "Columns",
    "Stat",
    "StorageHealth",
    "TimeSeriesStore",
    "connect_default",
]

_log = logging.getLogger(__name__)

# A billing month at one second: enough to replay any demand-charge or limit question of the month.
FULL_RESOLUTION_DAYS = 31
# Queue bound, in values (rows of the long format): 50 minutes of a 20-series site at 1 Hz, about 3 MB.
# It only fills while writing fails; at `--speed max` it rides out a stall of ~9 s of wall time.
MAX_QUEUED_ROWS = 60_000
# The longest a simulated run's `record()` waits for room (wait_when_full): a healthy writer frees a
# batch in well under a second; a writer stuck this long is treated as a real loop treats it.
FULL_WAIT_MAX_S = 5.0
# A transaction is committed at most this often when ticks are few: a power cut loses at most this
# much (plus the transaction in flight); each commit is one fsync of the WAL, cheap for an SD card.
WRITE_PERIOD_S = 5.0
# ...or as soon as this many values are queued (the simulation at full speed fills it in ~0.3 s).
BATCH_ROWS = 2_000
# One transaction never holds more than this, so a commit after an outage takes well under a second.
MAX_BATCH_ROWS = 20_000
# Retry after a failed write: first quickly (a transient lock), doubling to a minute (a full disk is
# freed by a person; a minute is soon enough and keeps a log line a minute at most).
RETRY_MIN_S = 0.5
RETRY_MAX_S = 60.0
# How often the writer looks for data to downsample or drop when nothing else is going on.
RETENTION_PERIOD_S = 60.0
# Retention works through the data an hour at a time, so a step never delays a batch for long.
RETENTION_CHUNK_S = 3600.0
# Rows of the minute, plan or legacy tables deleted per retention step, for the same reason.
RETENTION_DELETE_ROWS = 50_000
# What `flush()` waits at most by default: a few batches on a slow SD card, well under systemd's stop
# timeout (90 s).
FLUSH_TIMEOUT_S = 10.0
# Waiting for the writer thread to end after its last flush; it only finishes a commit in flight.
JOIN_TIMEOUT_S = 5.0
# Another process (an export) may hold the write lock briefly; wait this long before calling it a failure.
BUSY_TIMEOUT_MS = 5_000
# The WAL file is truncated back to this after a checkpoint, so one large batch does not keep it large.
WAL_SIZE_LIMIT_BYTES = 16 * 1024 * 1024
_MINUTE_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series_sets (id INTEGER PRIMARY KEY, names TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS ticks (ts REAL PRIMARY KEY, set_id INTEGER NOT NULL, vals BLOB NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS minutes (ts REAL PRIMARY KEY, set_id INTEGER NOT NULL, mean BLOB NOT NULL,
    min BLOB NOT NULL, max BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS plans (ts REAL NOT NULL, plan TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS plans_ts ON plans (ts);
"""

Stat = Literal["mean", "min", "max"]
# A queued tick: (sequence number, epoch s, series names, values); or a plan: (seq, epoch s, None, json).
_Item = tuple[int, float, tuple[str, ...] | None, tuple[float, ...] | str]


def connect_default(path: Path) -> sqlite3.Connection:
    """The writer's connection: WAL, every commit durable (it runs off the control loop)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    # FULL: a power cut loses at most the transaction in flight. NORMAL would keep the file intact too
    # but may roll back every commit since the last checkpoint (minutes of data).
    db.execute("PRAGMA synchronous=FULL")
    db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
    return db


@dataclass(frozen=True)
class StorageHealth:
    state: Literal["ok", "degraded"]
    queued_rows: int
    written_rows: int
    dropped_rows: int
    failures: int
    last_error: str | None
    last_error_at_epoch_s: float | None

    def to_json(self) -> dict[str, object]:
        return {
            "state": self.state,
            "queued_rows": self.queued_rows,
            "written_rows": self.written_rows,
            "dropped_rows": self.dropped_rows,
            "failures": self.failures,
            "last_error": self.last_error,
            "last_error_at_epoch_s": self.last_error_at_epoch_s,
        }


@dataclass(frozen=True)
class Columns:
    """Rows of a time range as arrays, for arithmetic over many rows (history charts, bills): `ts` ascending
    (epoch s), `minute` True where the row is a minute's mean (stamped at the minute's start) rather than
    one tick, and each asked series with NaN where a row does not hold it (unknown, never 0)."""

    ts: npt.NDArray[np.float64]
    minute: npt.NDArray[np.bool_]
    values: dict[str, npt.NDArray[np.float64]]


def _rows_of(item: _Item) -> int:
    values = item[3]
    return len(values) if isinstance(values, tuple) else 1


def _pack(values: Iterable[float]) -> bytes:
    vals = tuple(values)
    return struct.pack(f"<{len(vals)}d", *vals)


def _unpack(blob: bytes) -> tuple[float, ...]:
    return struct.unpack(f"<{len(blob) // 8}d", blob)


class TimeSeriesStore:
    """Measurements, setpoints and plans of a site; `record()` never waits on the disk."""

    def __init__(
        self,
        path: str | Path,
        retention_days: int,
        *,
        full_resolution_days: float = FULL_RESOLUTION_DAYS,
        max_queued_rows: int = MAX_QUEUED_ROWS,
        write_period_s: float = WRITE_PERIOD_S,
        batch_rows: int = BATCH_ROWS,
        retry_min_s: float = RETRY_MIN_S,
        retry_max_s: float = RETRY_MAX_S,
        connect: Callable[[Path], sqlite3.Connection] = connect_default,
        wait_when_full: bool = False,
    ) -> None:
        """`wait_when_full`: a full queue makes `record()` wait for the writer (up to FULL_WAIT_MAX_S) instead
        of dropping the oldest samples, unless writing is failing. For simulated time only: a simulation
        at `--speed max` may outrun the disk, a real loop must never wait on it."""
        self.path = Path(path)
        self._wait_when_full = wait_when_full
        self.retention_s = retention_days * 86400.0
        self.full_resolution_s = min(full_resolution_days * 86400.0, self.retention_s)
        self._max_queued_rows = max_queued_rows
        self._write_period_s = write_period_s
        self._batch_rows = batch_rows
        self._retry_min_s, self._retry_max_s = retry_min_s, retry_max_s
        self._connect = connect
        self._cond = threading.Condition(threading.Lock())
        # Guarded by _cond:
        self._queue: deque[_Item] = deque()
        self._queued_rows = 0
        self._oldest_queued_at_s = 0.0  # monotonic
        self._seq = 0  # last sequence number handed out
        self._in_flight_seq: int | None = None  # first sequence number of the batch being written
        self._in_flight_rows = 0
        self._drop_logged = False  # one log line per episode of drops
        self._written_rows = 0
        self._dropped_rows = 0
        self._failures = 0
        self._degraded = False
        self._last_error: str | None = None
        self._last_error_at_epoch_s: float | None = None
        self._flush_requested = False
        self._flush_through_seq = 0  # the writer writes without waiting until this item is written
        self._retention_requested = False
        self._prune_ref_ts = -math.inf
        self._stopping = False
        self._closed = False
        self._names_cache: dict[tuple[str, ...], tuple[str, ...]] = {}
        # Writer thread only:
        self._db: sqlite3.Connection | None = None
        self._set_ids: dict[tuple[str, ...], int] = {}
        self._newest_ts = -math.inf
        # Reader side (the caller's thread):
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()
        # Daemon: a caller that forgets close() must not keep the process alive at exit; close() joins.
        self._thread = threading.Thread(target=self._writer, name=f"storage-writer:{self.path.name}", daemon=True)
        self._thread.start()

    # --- the control side: never blocks on the disk ------------------------------------------------------

    def record(self, ts: float, values: Mapping[str, float]) -> None:
        """Queue one sample per series at epoch time `ts`; non-finite values are skipped. Returns at once."""
        names: list[str] = []
        vals: list[float] = []
        for name, value in values.items():
            v = float(value)
            if math.isfinite(v):
                names.append(name)
                vals.append(v)
        if not names:
            return
        key = tuple(names)
        shared = self._names_cache.get(key)
        if shared is None:  # a tick's names are new strings; one shared tuple per set keeps the queue small
            if len(self._names_cache) > 256:
                self._names_cache.clear()
            shared = self._names_cache[key] = key
        self._put(float(ts), shared, tuple(vals))

    def record_plan(self, ts: float, plan: Mapping[str, object]) -> None:
        """Queue a plan's summary (JSON) at epoch time `ts`. Returns at once."""
        self._put(float(ts), None, json.dumps(plan))

    def _put(self, ts: float, names: tuple[str, ...] | None, payload: tuple[float, ...] | str) -> None:
        with self._cond:
            if self._closed:
                self._dropped_rows += len(payload) if isinstance(payload, tuple) else 1
                return
            if self._wait_when_full:
                self._wait_for_room(len(payload) if isinstance(payload, tuple) else 1)
            self._seq += 1
            item: _Item = (self._seq, ts, names, payload)
            if not self._queue:
                self._oldest_queued_at_s = time.monotonic()
            self._queue.append(item)
            self._queued_rows += _rows_of(item)
            self._drop_overflow()
            if self._queued_rows >= self._batch_rows:
                self._cond.notify_all()

    def _wait_for_room(self, rows: int) -> None:
        """Called with _cond held: wait until `rows` more fit, the writer is failing, or FULL_WAIT_MAX_S."""
        deadline = time.monotonic() + FULL_WAIT_MAX_S
        while self._queued_rows + rows > self._max_queued_rows and not self._degraded and not self._stopping:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                return  # a writer stuck without failing: drop as the real loop would
            self._cond.notify_all()  # the writer takes a batch as soon as it is free
            self._cond.wait(remaining_s)

    def _drop_overflow(self) -> None:
        """Called with _cond held: drop the oldest whole items until the queue fits its bound."""
        dropped = 0
        while self._queued_rows > self._max_queued_rows and len(self._queue) > 1:
            item = self._queue.popleft()
            rows = _rows_of(item)
            self._queued_rows -= rows
            dropped += rows
        if dropped:
            if not self._drop_logged:
                self._drop_logged = True
                _log.warning("storage queue full, dropping the oldest samples",
                             extra={"file": str(self.path), "dropped_rows": self._dropped_rows + dropped})  # fmt: skip
            self._dropped_rows += dropped
            self._cond.notify_all()

    def _done_through(self, seq: int) -> bool:
        """Called with _cond held: nothing up to `seq` is queued or being written any more."""
        queued = bool(self._queue) and self._queue[0][0] <= seq
        in_flight = self._in_flight_seq is not None and self._in_flight_seq <= seq
        return not queued and not in_flight

    def health(self) -> dict[str, object]:
        """`state` ok/degraded, queued/written/dropped rows, failures, the last error and when (epoch s)."""
        return self.health_snapshot().to_json()

    def health_snapshot(self) -> StorageHealth:
        with self._cond:
            if not self._closed and not self._thread.is_alive() and not self._degraded:  # cannot happen; if it did
                self._degraded, self._last_error = True, "the storage writer thread ended"
                self._last_error_at_epoch_s = time.time()
                _log.error("storage writer thread ended", extra={"file": str(self.path)})
            return StorageHealth(
                state="degraded" if self._degraded else "ok",
                queued_rows=self._queued_rows + self._in_flight_rows,  # in flight: not written yet
                written_rows=self._written_rows,
                dropped_rows=self._dropped_rows,
                failures=self._failures,
                last_error=self._last_error,
                last_error_at_epoch_s=self._last_error_at_epoch_s,
            )

    def prune(self, now_ts: float | None = None) -> None:
        """Apply retention now (the writer does it by itself every minute); returns at once.

        Retention is measured from the newest tick written, or from `now_ts` if that is later."""
        with self._cond:
            if now_ts is not None:
                self._prune_ref_ts = max(self._prune_ref_ts, now_ts)
            self._retention_requested = True
            self._cond.notify_all()

    # --- blocking calls, for exit and for readers --------------------------------------------------------

    def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> bool:
        """Write what is queued now; waits at most `timeout_s`, less if a write fails. True if nothing
        queued at the call is still waiting (what was dropped instead is counted in `health()`).

        Blocks the calling thread: from the event loop use `await asyncio.to_thread(store.flush)`."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            target, failures = self._seq, self._failures
            self._flush_requested = True
            self._flush_through_seq = max(self._flush_through_seq, target)
            self._cond.notify_all()
            while not self._done_through(target) and self._failures == failures and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._done_through(target)

    def settle(self, timeout_s: float = FLUSH_TIMEOUT_S) -> bool:
        """Flush, then wait until retention has nothing left to do (tests, benchmarks, `--report`)."""
        deadline = time.monotonic() + timeout_s
        if not self.flush(timeout_s):
            return False
        with self._cond:
            self._retention_requested = True
            self._cond.notify_all()
            while self._retention_requested and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return not self._degraded

    def close(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Flush (bounded), stop and join the writer; what could not be written is counted as dropped."""
        with self._cond:
            if self._closed:
                return
        self.flush(timeout_s)
        with self._cond:
            self._closed = self._stopping = True
            self._cond.notify_all()
        self._thread.join(JOIN_TIMEOUT_S)
        if self._thread.is_alive():
            _log.error("storage writer did not stop; leaving it", extra={"file": str(self.path)})
        with self._cond:
            if self._queue:
                self._dropped_rows += self._queued_rows
                _log.error("storage closed with samples unwritten",
                           extra={"file": str(self.path), "lost_rows": self._queued_rows})  # fmt: skip
                self._queue.clear()
                self._queued_rows = 0
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    # --- the writer thread -------------------------------------------------------------------------------

    def _writer(self) -> None:
        backoff_s = self._retry_min_s
        retry_at: float | None = None
        # Not at once: a store opened to read (`greensite export`) should not start by deleting.
        next_retention_at = time.monotonic() + RETENTION_PERIOD_S
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if self._stopping:
                        break
                    if retry_at is not None:
                        if now >= retry_at or self._flush_requested:  # a flush tries once more at once
                            break
                        self._cond.wait(retry_at - now)
                        continue
                    if self._queue and self._queue[0][0] <= self._flush_through_seq:
                        break
                    if self._queued_rows >= self._batch_rows:
                        break
                    if self._queue and now >= self._oldest_queued_at_s + self._write_period_s:
                        break
                    if self._retention_requested or now >= next_retention_at:
                        break
                    wake_at = next_retention_at
                    if self._queue:
                        wake_at = min(wake_at, self._oldest_queued_at_s + self._write_period_s)
                    self._cond.wait(max(wake_at - now, 0.0))
                batch = self._take()
                stopping = self._stopping
                self._flush_requested = False
                retention = not stopping and (self._retention_requested or time.monotonic() >= next_retention_at)
            try:
                self._open()
                worked = bool(batch) or retention
                if batch:
                    self._write(batch)
                    self._written(batch)
                    batch = []
                if retention:  # one chunk between batches: a backlog never holds the samples up for long
                    more = self._retention_step()
                    next_retention_at = time.monotonic() + (0.0 if more else RETENTION_PERIOD_S)
                    if not more:
                        with self._cond:
                            self._retention_requested = False
                            self._cond.notify_all()
            except Exception as err:  # any failure of the historian degrades it, never the controller
                self._failed(err, batch)
                retry_at = time.monotonic() + backoff_s
                backoff_s = min(backoff_s * 2, self._retry_max_s)
                if stopping:
                    break
                continue
            retry_at, backoff_s = None, self._retry_min_s
            if worked:
                self._recovered()
            if stopping:
                with self._cond:
                    if not self._queue:
                        break
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    def _take(self) -> list[_Item]:
        """Called with _cond held: the oldest items, up to one transaction's worth."""
        batch: list[_Item] = []
        rows = 0
        while self._queue and rows < MAX_BATCH_ROWS:
            item = self._queue.popleft()
            batch.append(item)
            rows += _rows_of(item)
        self._queued_rows -= rows
        self._in_flight_seq = batch[0][0] if batch else None
        self._in_flight_rows = rows
        if self._queue:
            self._oldest_queued_at_s = time.monotonic()
        return batch

    def _open(self) -> None:
        if self._db is not None:
            return
        db = self._connect(self.path)
        try:
            db.executescript(_SCHEMA)
            self._set_ids = {tuple(json.loads(n)): i for i, n in db.execute("SELECT id, names FROM series_sets")}
            newest = db.execute("SELECT max(ts) FROM ticks").fetchone()[0]
            if newest is not None:
                self._newest_ts = max(self._newest_ts, float(newest))
        except BaseException:
            db.close()
            raise
        self._db = db

    def _set_id(self, db: sqlite3.Connection, names: tuple[str, ...]) -> int:
        found = self._set_ids.get(names)
        if found is None:
            text = json.dumps(list(names))
            db.execute("INSERT OR IGNORE INTO series_sets (names) VALUES (?)", (text,))
            found = int(db.execute("SELECT id FROM series_sets WHERE names = ?", (text,)).fetchone()[0])
        return found

    def _write(self, batch: list[_Item]) -> None:
        """One transaction: the whole batch or none of it."""
        db = self._db
        assert db is not None
        ticks: list[tuple[float, int, bytes]] = []
        plans: list[tuple[float, str]] = []
        new_sets: dict[tuple[str, ...], int] = {}
        order_of: dict[tuple[str, ...], tuple[tuple[str, ...], list[int]]] = {}
        newest = self._newest_ts
        with db:
            for _, ts, names, payload in batch:
                if names is None:
                    assert isinstance(payload, str)
                    plans.append((ts, payload))
                    continue
                assert isinstance(payload, tuple)
                sorted_names, order = order_of.get(names) or order_of.setdefault(names, _sorted(names))
                set_id = new_sets.get(sorted_names)
                if set_id is None:
                    set_id = new_sets[sorted_names] = self._set_id(db, sorted_names)
                ticks.append((ts, set_id, _pack(payload[i] for i in order)))
                newest = max(newest, ts)
            # A tick stamped again (a clock stepped back) replaces the earlier one, as one sample would.
            db.executemany("INSERT OR REPLACE INTO ticks VALUES (?, ?, ?)", ticks)
            db.executemany("INSERT INTO plans VALUES (?, ?)", plans)
        self._set_ids.update(new_sets)  # only once committed: a rolled-back set id must be looked up again
        self._newest_ts = newest

    def _written(self, batch: list[_Item]) -> None:
        rows = sum(_rows_of(item) for item in batch)
        with self._cond:
            self._written_rows += rows
            self._in_flight_seq, self._in_flight_rows = None, 0
            self._drop_logged = False
            self._cond.notify_all()

    def _recovered(self) -> None:
        with self._cond:
            if self._degraded:
                self._degraded = False
                _log.warning("storage writing again",
                             extra={"file": str(self.path), "dropped_rows": self._dropped_rows})  # fmt: skip
                self._cond.notify_all()

    def _failed(self, err: Exception, batch: list[_Item]) -> None:
        if self._db is not None:  # reopened on the next try: a replaced, unlocked or freed file is picked up
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        self._set_ids.clear()
        with self._cond:
            self._failures += 1
            self._last_error = f"{type(err).__name__}: {err}"[:500]
            self._last_error_at_epoch_s = time.time()
            if not self._degraded:
                self._degraded = True
                _log.error("storage degraded: samples are queued and the oldest dropped until writing works",
                           exc_info=not isinstance(err, sqlite3.Error | OSError),
                           extra={"file": str(self.path), "error": self._last_error})  # fmt: skip
            # The batch is older than anything queued: back at the front, where overflow drops first.
            self._in_flight_seq, self._in_flight_rows = None, 0
            self._queue.extendleft(reversed(batch))
            self._queued_rows += sum(_rows_of(item) for item in batch)
            if batch:
                self._oldest_queued_at_s = time.monotonic()
            self._drop_overflow()
            self._cond.notify_all()

    def _retention_step(self) -> bool:
        """Downsample or delete one chunk of what has aged; True if there may be more to do."""
        db = self._db
        assert db is not None
        with self._cond:
            ref = max(self._newest_ts, self._prune_ref_ts)
        # A sample stamped ahead of the wall clock (a clock stepped forward by years) never makes the
        # history go: retention counts at most from now.
        ref = min(ref, time.time())
        if not math.isfinite(ref):
            return False
        keep_from = ref - self.retention_s
        full_from = math.floor((ref - self.full_resolution_s) / _MINUTE_S) * _MINUTE_S
        oldest = db.execute("SELECT min(ts) FROM ticks").fetchone()[0]
        if oldest is not None and oldest < full_from:
            start = math.floor(oldest / _MINUTE_S) * _MINUTE_S
            end = min(full_from, start + RETENTION_CHUNK_S)
            with db:
                if end > keep_from:
                    self._downsample(db, start, end)
                db.execute("DELETE FROM ticks WHERE ts < ?", (end,))
            return True
        more = False
        with db:
            for table in ("minutes", "plans"):
                more |= self._delete_before(db, table, "rowid" if table == "plans" else "ts", keep_from)
            if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'samples'").fetchone():
                more |= self._delete_before(db, "samples", "rowid", keep_from)
        return more

    @staticmethod
    def _delete_before(db: sqlite3.Connection, table: str, key: str, ts: float) -> bool:
        query = f"DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} WHERE ts < ? LIMIT ?)"
        return db.execute(query, (ts, RETENTION_DELETE_ROWS)).rowcount >= RETENTION_DELETE_ROWS

    def _downsample(self, db: sqlite3.Connection, start: float, end: float) -> None:
        """Ticks in [start, end) (whole minutes) to one row a minute: mean, min and max of each series."""
        names_of = {i: names for names, i in self._set_ids.items()}
        for i, text in db.execute("SELECT id, names FROM series_sets"):
            names_of.setdefault(i, tuple(json.loads(text)))
        minutes: dict[float, dict[str, list[float]]] = {}
        for ts, set_id, blob in db.execute("SELECT ts, set_id, vals FROM ticks WHERE ts >= ? AND ts < ?", (start, end)):
            cells = minutes.setdefault(math.floor(ts / _MINUTE_S) * _MINUTE_S, {})
            for name, value in zip(names_of[set_id], _unpack(blob), strict=True):
                cell = cells.get(name)
                if cell is None:
                    cells[name] = [value, value, value, 1.0]
                else:
                    cell[0] += value
                    cell[1] = min(cell[1], value)
                    cell[2] = max(cell[2], value)
                    cell[3] += 1.0
        rows = []
        for minute, cells in minutes.items():
            names = tuple(sorted(cells))
            set_id = self._set_id(db, names)
            self._set_ids[names] = set_id
            stats = [cells[n] for n in names]
            rows.append((minute, set_id, _pack(c[0] / c[3] for c in stats), _pack(c[1] for c in stats),
                         _pack(c[2] for c in stats)))  # fmt: skip
        db.executemany("INSERT OR REPLACE INTO minutes VALUES (?, ?, ?, ?, ?)", rows)

    # --- readers (the caller's thread) -------------------------------------------------------------------

    def _read_db(self) -> sqlite3.Connection | None:
        with self._reader_lock:
            if self._reader is None:
                if not self.path.exists():
                    return None
                self._reader = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
            return self._reader

    def series(self) -> list[str]:
        self.flush()
        db = self._read_db()
        if db is None:
            return []
        tables = _tables(db)
        names: set[str] = set()
        if "series_sets" in tables:
            for (text,) in db.execute("SELECT names FROM series_sets"):
                names.update(json.loads(text))
        if "samples" in tables:
            names.update(row[0] for row in db.execute("SELECT DISTINCT series FROM samples"))
        return sorted(names)

    def rows(
        self, since: float | None = None, until: float | None = None, like: str = "%", stat: Stat = "mean"
    ) -> Iterator[tuple[float, str, float]]:
        """`(epoch s, series, value)` ordered by time then series, for series matching `like` (SQL LIKE).

        Within the full-resolution window one row per tick; older, one row per minute stamped at the
        minute's start, holding the minute's `stat` (mean, min or max)."""
        self.flush()
        db = self._read_db()
        if db is None:
            return iter(())
        lo = since if since is not None else -math.inf
        hi = until if until is not None else math.inf
        tables = _tables(db)
        sources: list[Iterator[tuple[float, str, float]]] = []
        if "samples" in tables:
            query = "SELECT ts, series, value FROM samples WHERE series LIKE ? AND ts >= ? AND ts < ?"
            sources.append(iter(db.execute(query + " ORDER BY ts, series", (like, lo, hi))))
        if "series_sets" in tables:
            matches: dict[str, bool] = {}  # SQLite decides what `like` matches, as it did on the old table
            sets: dict[int, list[tuple[int, str]]] = {}
            for set_id, text in db.execute("SELECT id, names FROM series_sets"):
                for name in json.loads(text):
                    if name not in matches:
                        matches[name] = bool(db.execute("SELECT ? LIKE ?", (name, like)).fetchone()[0])
                sets[set_id] = [(i, n) for i, n in enumerate(json.loads(text)) if matches[n]]
            column = {"mean": "mean", "min": "min", "max": "max"}[stat]
            window = "WHERE ts >= ? AND ts < ? ORDER BY ts"
            sources.append(_unpacked(db.execute(f"SELECT ts, set_id, {column} FROM minutes {window}", (lo, hi)), sets))
            sources.append(_unpacked(db.execute(f"SELECT ts, set_id, vals FROM ticks {window}", (lo, hi)), sets))
        return heapq.merge(*sources)

    def columns(self, since: float, until: float, names: Iterable[str]) -> Columns:
        """The named series over `[since, until)` as arrays (see `Columns`): blobs are decoded a series set at a
        time with numpy, so a month of ticks takes about a second, not the minute `rows()` would. Reads what is
        committed (up to WRITE_PERIOD_S behind the tick); call it from a worker thread."""
        wanted = list(dict.fromkeys(names))
        db = self._read_db()
        parts: list[tuple[npt.NDArray[np.float64], bool, dict[str, npt.NDArray[np.float64]]]] = []
        if db is not None:
            tables = _tables(db)
            if "series_sets" in tables:
                for set_id, text in list(db.execute("SELECT id, names FROM series_sets")):
                    set_names: list[str] = json.loads(text)
                    index = {name: i for i, name in enumerate(set_names)}
                    if not any(name in index for name in wanted):
                        continue
                    for table, column, minute in (("minutes", "mean", True), ("ticks", "vals", False)):
                        query = f"SELECT ts, {column} FROM {table} WHERE ts >= ? AND ts < ? AND set_id = ?"
                        found = db.execute(query, (since, until, set_id)).fetchall()
                        if not found:
                            continue
                        ts = np.fromiter((row[0] for row in found), np.float64, len(found))
                        matrix = np.frombuffer(b"".join(row[1] for row in found), "<f8").reshape(len(found), -1)
                        parts.append((ts, minute, {n: matrix[:, index[n]] for n in wanted if n in index}))
            if "samples" in tables and wanted:  # the long format of earlier versions, one row per value
                marks = ",".join("?" * len(wanted))
                query = f"SELECT ts, series, value FROM samples WHERE ts >= ? AND ts < ? AND series IN ({marks})"
                by_ts: dict[float, dict[str, float]] = {}
                for ts_s, name, value in db.execute(query, (since, until, *wanted)):
                    by_ts.setdefault(ts_s, {})[name] = value
                if by_ts:
                    stamps = sorted(by_ts)
                    cols = {n: np.array([by_ts[t].get(n, math.nan) for t in stamps]) for n in wanted}
                    parts.append((np.array(stamps, np.float64), False, cols))
        total = sum(len(ts) for ts, _, _ in parts)
        ts_all = np.empty(total, np.float64)
        minute_all = np.zeros(total, np.bool_)
        values = {name: np.full(total, math.nan) for name in wanted}
        at = 0
        for ts, minute, cols in parts:
            ts_all[at : at + len(ts)] = ts
            minute_all[at : at + len(ts)] = minute
            for name, col in cols.items():
                values[name][at : at + len(ts)] = col
            at += len(ts)
        order = np.argsort(ts_all, kind="stable")
        return Columns(ts_all[order], minute_all[order], {name: col[order] for name, col in values.items()})

    def export_csv(self, out: TextIO, since: float | None = None, until: float | None = None, like: str = "%") -> int:
        """Write `ts_epoch_s,series,value` rows; returns how many."""
        writer = csv.writer(out)
        writer.writerow(["ts_epoch_s", "series", "value"])
        count = 0
        rows = self.rows(since, until, like)
        while chunk := list(islice(rows, 10_000)):
            writer.writerows(chunk)
            count += len(chunk)
        return count


def _sorted(names: tuple[str, ...]) -> tuple[tuple[str, ...], list[int]]:
    order = sorted(range(len(names)), key=names.__getitem__)
    return tuple(names[i] for i in order), order


def _tables(db: sqlite3.Connection) -> set[str]:
    return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _unpacked(
    cursor: Iterable[tuple[float, int, bytes]], sets: Mapping[int, list[tuple[int, str]]]
) -> Iterator[tuple[float, str, float]]:
    for ts, set_id, blob in cursor:
        wanted = sets.get(set_id)
        if not wanted:
            continue
        values = _unpack(blob)
        for i, name in wanted:
            yield ts, name, values[i]
