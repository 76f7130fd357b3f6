"""A process killed at a random moment (SIGKILL: no exit code runs) leaves the time series, the state
file and a file kept with its .prev (as the tuning overrides) intact, and loses at most what was still
queued: every committed tick is there, in order, with no hole, including while retention downsamples
and deletes."""

from __future__ import annotations

import json
import mmap
import os
import random
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

REPO = Path(__file__).parents[1]
KILLS = 30
SERIES = [f"measured.s{i}_kw" for i in range(10)] + ["state.safe"]
# The child's pace: 500 ticks a second (a simulation at speed), so a kill finds batches in flight.
TICK_PAUSE_S = 0.002
# Ticks at full resolution in the child: ten minutes, so downsampling runs all the time.
FULL_RESOLUTION_S = 600.0
# The child writes a batch at least this often.
CHILD_WRITE_PERIOD_S = 0.05
# What the child may lose: what is queued plus the transaction in flight. At its pace a batch is
# ~25 ticks; the bound allows a writer starved for seconds by this busy 2-core machine.
MAX_LOST_TICKS = 20_000 // len(SERIES)
# Python start and imports of the child, on a loaded machine.
CHILD_READY_TIMEOUT_S = 60.0
_PROGRESS = struct.Struct("<qq")  # ticks recorded, values reported written


def _child(db_path: Path, state_path: Path, progress_path: Path) -> None:
    """Record ticks 0, 1, 2... (continuing what is in the database) and save a state file, until killed."""
    from controller.storage.atomic import write_atomic  # the child imports its own copy
    from controller.storage.timeseries import TimeSeriesStore

    start = 0
    if db_path.exists():
        db = sqlite3.connect(db_path)
        row = db.execute("SELECT max(ts) FROM ticks").fetchone() if _has_ticks(db) else (None,)
        db.close()
        start = 0 if row[0] is None else int(row[0]) + 1
    store = TimeSeriesStore(
        db_path, retention_days=400, full_resolution_days=FULL_RESOLUTION_S / 86400, write_period_s=CHILD_WRITE_PERIOD_S
    )
    with progress_path.open("r+b") as handle:
        progress = mmap.mmap(handle.fileno(), _PROGRESS.size)  # shared: what the child did survives its kill
        tick = start
        while True:
            store.record(float(tick), {name: tick * 0.001 + i for i, name in enumerate(SERIES)})
            tick += 1
            progress[:] = _PROGRESS.pack(tick, int(store.health_snapshot().written_rows))
            if tick % 20 == 0:
                payload = list(range(tick % 997, tick % 997 + 20_000))  # ~130 kB: kills land inside writes
                body = json.dumps({"tick": tick, "payload": payload}, separators=(",", ":"))
                data = json.dumps({"crc": zlib.crc32(body.encode()), "body": body}).encode()
                write_atomic(state_path, data)
                write_atomic(state_path.with_name("tuning.json"), data, keep_previous=True)  # as the overrides
            if tick % 100 == 0:
                store.prune()
            time.sleep(TICK_PAUSE_S)


def _has_ticks(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE name = 'ticks'").fetchone() is not None


def _check_state(state_path: Path) -> None:
    outer = json.loads(state_path.read_bytes())
    assert zlib.crc32(outer["body"].encode()) == outer["crc"]
    body = json.loads(outer["body"])
    assert len(body["payload"]) == 20_000


def _check_db(db_path: Path, recorded_ticks: int, written_values: int) -> int:
    """The database is intact and holds a gapless prefix of the ticks; returns how many ticks it holds."""
    db = sqlite3.connect(db_path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        if not _has_ticks(db):
            assert written_values == 0
            return 0
        ticks = [int(ts) for (ts,) in db.execute("SELECT ts FROM ticks ORDER BY ts")]
        minutes = [int(ts) for (ts,) in db.execute("SELECT ts FROM minutes ORDER BY ts")]
        first = ticks[0] if ticks else 0
        assert ticks == list(range(first, first + len(ticks))), "a hole in the ticks"
        assert first % 60 == 0, "downsampled part of a minute"
        assert minutes == list(range(0, first, 60)), "a minute missing before the full-resolution window"
        held = first + len(ticks)
        assert held * len(SERIES) >= written_values, "a batch reported written is not there"
        assert held <= recorded_ticks + 1  # +1: killed between record() and updating the progress
        return held
    finally:
        db.close()


def test_sigkill_at_random_moments_never_corrupts_and_loses_at_most_the_queue(tmp_path: Path) -> None:
    db_path, state_path, progress_path = tmp_path / "ts.sqlite3", tmp_path / "state.json", tmp_path / "progress"
    rnd = random.Random(16)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    lost: list[int] = []
    for _ in range(KILLS):
        progress_path.write_bytes(bytes(_PROGRESS.size))
        child = subprocess.Popen(
            [sys.executable, __file__, str(db_path), str(state_path), str(progress_path)], cwd=REPO, env=env
        )
        try:
            deadline = time.monotonic() + CHILD_READY_TIMEOUT_S
            while _PROGRESS.unpack(progress_path.read_bytes())[0] == 0:
                assert child.poll() is None, "the child died by itself"
                assert time.monotonic() < deadline, "the child did not start"
                time.sleep(0.01)
            time.sleep(rnd.uniform(0.0, 0.8))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        recorded, written = _PROGRESS.unpack(progress_path.read_bytes())
        held = _check_db(db_path, recorded, written)
        if state_path.exists():
            _check_state(state_path)
        tuning = tmp_path / "tuning.json"
        if tuning.with_name("tuning.json.prev").exists():
            assert tuning.exists(), "only the .prev is left"
            _check_state(tuning.with_name("tuning.json.prev"))
        if tuning.exists():
            _check_state(tuning)
        lost.append(recorded - held)
        assert recorded - held <= MAX_LOST_TICKS
    leftovers = len(list(tmp_path.glob(".*.tmp")))  # a kill inside a write leaves its temp file
    sys.stderr.write(f"ticks lost per kill: max {max(lost)}, median {sorted(lost)[len(lost) // 2]}; "
                     f"temp files left: {leftovers}\n")  # fmt: skip
    assert state_path.exists()


if __name__ == "__main__":
    _child(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
