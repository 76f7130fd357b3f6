"""Local time series in SQLite: measurements, setpoints and plans, WAL, bounded retention.

Samples are buffered in memory and written in one transaction per batch, so a tick never waits on
the disk for more than one batch a minute; a crash loses at most the unflushed batch, never leaves
a half-written database (SQLite's journal), and `close()` flushes everything.
"""

from __future__ import annotations

import csv
import json
import math
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TextIO

__all__ = ["TimeSeriesStore"]

# Samples kept in memory before a batch goes to disk (about a minute of ticks on the school site).
FLUSH_EVERY_ROWS = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (ts REAL NOT NULL, series TEXT NOT NULL, value REAL NOT NULL);
CREATE INDEX IF NOT EXISTS samples_ts ON samples (ts);
CREATE TABLE IF NOT EXISTS plans (ts REAL NOT NULL, plan TEXT NOT NULL);
"""


class TimeSeriesStore:
    def __init__(self, path: str | Path, retention_days: int) -> None:
        self.path = Path(path)
        self.retention_s = retention_days * 86400.0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at each checkpoint, fast
        self._db.executescript(_SCHEMA)
        self._rows: list[tuple[float, str, float]] = []

    def record(self, ts: float, values: Mapping[str, float]) -> None:
        """Buffer one sample per series at epoch time `ts`; non-finite values are skipped."""
        self._rows.extend((ts, name, float(v)) for name, v in values.items() if math.isfinite(v))
        if len(self._rows) >= FLUSH_EVERY_ROWS:
            self.flush()

    def record_plan(self, ts: float, plan: Mapping[str, object]) -> None:
        with self._db:
            self._db.execute("INSERT INTO plans VALUES (?, ?)", (ts, json.dumps(plan)))

    def flush(self) -> None:
        if not self._rows:
            return
        with self._db:  # one transaction: all of the batch or none of it
            self._db.executemany("INSERT INTO samples VALUES (?, ?, ?)", self._rows)
        self._rows.clear()

    def prune(self, now_ts: float) -> int:
        """Drop what is older than the retention; returns how many samples went."""
        self.flush()
        with self._db:
            cursor = self._db.execute("DELETE FROM samples WHERE ts < ?", (now_ts - self.retention_s,))
            self._db.execute("DELETE FROM plans WHERE ts < ?", (now_ts - self.retention_s,))
        return cursor.rowcount

    def close(self) -> None:
        self.flush()
        self._db.close()

    def series(self) -> list[str]:
        self.flush()
        return [row[0] for row in self._db.execute("SELECT DISTINCT series FROM samples ORDER BY series")]

    def rows(
        self, since: float | None = None, until: float | None = None, like: str = "%"
    ) -> Iterable[tuple[float, str, float]]:
        self.flush()
        query = "SELECT ts, series, value FROM samples WHERE series LIKE ? AND ts >= ? AND ts < ? ORDER BY ts, series"
        return self._db.execute(
            query, (like, since if since is not None else -1e18, until if until is not None else 1e18)
        )

    def export_csv(self, out: TextIO, since: float | None = None, until: float | None = None, like: str = "%") -> int:
        """Write `ts_epoch_s,series,value` rows; returns how many."""
        writer = csv.writer(out)
        writer.writerow(["ts_epoch_s", "series", "value"])
        count = 0
        for row in self.rows(since, until, like):
            writer.writerow(row)
            count += 1
        return count
