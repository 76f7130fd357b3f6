"""Local persistence: the time series survives, is bounded, and exports; files are never half-written."""

from __future__ import annotations

import csv
import io
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from controller.cli import main
from controller.storage.atomic import STALE_TEMP_S, write_atomic
from controller.storage.timeseries import Stat, TimeSeriesStore

SCHOOL = Path(__file__).parents[1] / "config" / "sites" / "zhongshan_school.toml"


def test_samples_survive_reopening_and_export_in_order(tmp_path: Path) -> None:
    store = TimeSeriesStore(tmp_path / "ts.sqlite3", retention_days=30)
    for second in range(5):
        store.record(1_000.0 + second, {"measured.grid_kw": second * 1.5, "setpoint.battery_kw": -second})
    store.record(2_000.0, {"measured.grid_kw": float("nan")})  # not a number: not stored
    store.close()
    reopened = TimeSeriesStore(tmp_path / "ts.sqlite3", retention_days=30)
    out = io.StringIO()
    assert reopened.export_csv(out, like="measured.%") == 5
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert rows[0] == ["ts_epoch_s", "series", "value"]
    assert [float(r[2]) for r in rows[1:]] == [0.0, 1.5, 3.0, 4.5, 6.0]
    assert reopened.series() == ["measured.grid_kw", "setpoint.battery_kw"]
    reopened.close()


def test_retention_drops_only_old_samples(tmp_path: Path) -> None:
    store = TimeSeriesStore(tmp_path / "ts.sqlite3", retention_days=1)
    store.record(0.0, {"a_kw": 1.0})
    store.record(90_000.0, {"a_kw": 2.0})
    store.prune(now_ts=100_000.0)
    assert store.settle()
    assert [row[2] for row in store.rows()] == [2.0]
    store.close()


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "site.toml"
    write_atomic(target, b"old")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr("controller.storage.atomic.os.fsync", disk_full)
        with pytest.raises(OSError, match="No space"):
            write_atomic(target, b"new", keep_previous=True)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["site.toml"]  # no temp file left behind
    write_atomic(target, b"new", keep_previous=True)
    assert target.read_bytes() == b"new"
    assert (tmp_path / "site.toml.prev").read_bytes() == b"old"


def test_export_command_writes_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = TimeSeriesStore(tmp_path / "ts.sqlite3", retention_days=30)
    store.record(1_783_267_200.0, {"measured.grid_kw": 45.0})
    store.close()
    out = tmp_path / "out.csv"
    args = ["export", str(SCHOOL), "--store", str(tmp_path / "ts.sqlite3"), "--csv", str(out)]
    assert main(args) == 0
    assert out.read_text().splitlines()[1] == "1783267200.0,measured.grid_kw,45.0"
    assert main(["export", str(SCHOOL), "--store", str(tmp_path / "none.sqlite3"), "--csv", str(out)]) == 2
    assert "run the site first" in capsys.readouterr().err


def test_older_ticks_become_minute_mean_min_max_and_go_after_the_retention(tmp_path: Path) -> None:
    store = TimeSeriesStore(tmp_path / "ts.sqlite3", retention_days=2, full_resolution_days=1)
    values = {second: float((second * 7) % 13) for second in range(0, 3 * 86400, 10)}  # 3 days, every 10 s
    for second, value in values.items():
        store.record(float(second), {"a_kw": value, "b_kw": -value} if second % 20 else {"a_kw": value})
    store.record_plan(100.0, {"cost_cny": 1.0})
    store.record_plan(2.5 * 86400, {"cost_cny": 2.0})
    assert store.settle()
    newest = 3 * 86400 - 10
    # Full resolution for the last day, counted back from the newest tick (in whole minutes).
    full_from = (newest - 86400) // 60 * 60
    rows = list(store.rows(like="a_kw"))
    ticks = [r for r in rows if r[0] >= full_from]
    assert [(ts, v) for ts, _, v in ticks] == [(float(s), v) for s, v in values.items() if s >= full_from]
    # Before that, one row a minute back to the retention (two days), each the minute's mean.
    minutes = [r for r in rows if r[0] < full_from]
    assert minutes[0][0] == (newest - 2 * 86400) // 60 * 60 + 60
    assert [ts for ts, _, _ in minutes] == [float(m) for m in range(int(minutes[0][0]), full_from, 60)]
    reducers: list[tuple[Stat, Callable[[list[float]], float]]] = [
        ("mean", lambda xs: sum(xs) / len(xs)), ("min", min), ("max", max)
    ]  # fmt: skip
    for stat, reduce in reducers:
        got = {ts: v for ts, _, v in store.rows(minutes[0][0], minutes[3][0], like="b%", stat=stat)}
        want = {
            float(m): reduce([-values[s] for s in range(m, m + 60, 10) if s % 20])
            for m in range(int(minutes[0][0]), int(minutes[3][0]), 60)
        }
        assert got == pytest.approx(want)
    assert store.series() == ["a_kw", "b_kw"]
    db = sqlite3.connect(tmp_path / "ts.sqlite3")
    assert [row[0] for row in db.execute("SELECT ts FROM plans")] == [2.5 * 86400]  # the older one is gone
    db.close()
    store.close()


def test_a_database_of_the_long_format_is_read_merged_and_pruned(tmp_path: Path) -> None:
    path = tmp_path / "ts.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE samples (ts REAL NOT NULL, series TEXT NOT NULL, value REAL NOT NULL);"
        "CREATE INDEX samples_ts ON samples (ts);"
        "CREATE TABLE plans (ts REAL NOT NULL, plan TEXT NOT NULL);"
    )
    with db:
        db.executemany("INSERT INTO samples VALUES (?, ?, ?)", [(10.0, "a_kw", 1.0), (10.0, "old_kw", 2.0),
                                                                (86_400.0, "a_kw", 3.0)])  # fmt: skip
    db.close()
    store = TimeSeriesStore(path, retention_days=1)
    store.record(86_401.0, {"a_kw": 4.0})
    assert list(store.rows(like="a%")) == [(10.0, "a_kw", 1.0), (86_400.0, "a_kw", 3.0), (86_401.0, "a_kw", 4.0)]
    assert store.series() == ["a_kw", "old_kw"]
    store.prune(now_ts=86_400.0 + 20.0)  # retention counts from here: the samples at 10 s are older
    assert store.settle()
    assert list(store.rows()) == [(86_400.0, "a_kw", 3.0), (86_401.0, "a_kw", 4.0)]
    store.close()


def test_health_reports_the_queue_and_the_writer_is_joined(tmp_path: Path) -> None:
    store = TimeSeriesStore(tmp_path / "ts.sqlite3", retention_days=30, write_period_s=3600.0)
    store.record(1.0, {"a_kw": 1.0, "b_kw": float("inf")})
    health = store.health()
    assert health["state"] == "ok"
    assert health["queued_rows"] == 1  # the infinite value is not a sample
    assert health["dropped_rows"] == 0
    assert health["last_error"] is None
    store.close()
    assert store.health()["written_rows"] == 1
    assert not [t for t in threading.enumerate() if t.name.startswith("storage-writer")]


def test_a_sample_from_the_future_does_not_make_the_history_go(tmp_path: Path) -> None:
    store = TimeSeriesStore(tmp_path / "ts.sqlite3", retention_days=1)
    now = time.time()
    store.record(now - 3600.0, {"a_kw": 1.0})
    store.record(now + 10 * 365 * 86400.0, {"a_kw": 2.0})  # a clock stepped forward by ten years
    store.prune()
    assert store.settle()
    assert [row[2] for row in store.rows()] == [1.0, 2.0]
    store.close()


def test_atomic_write_removes_temp_files_left_by_a_killed_writer(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    stale, fresh = tmp_path / ".state.json.abc.tmp", tmp_path / ".state.json.def.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"being written by another process")
    old = time.time() - STALE_TEMP_S - 60
    os.utime(stale, (old, old))
    write_atomic(target, b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".state.json.def.tmp", "state.json"]


@pytest.mark.parametrize("hard_links", [True, False])
def test_keeping_the_previous_file_never_leaves_the_file_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hard_links: bool
) -> None:
    target = tmp_path / "tuning.json"
    write_atomic(target, b"v1")
    write_atomic(target, b"v2", keep_previous=True)
    if not hard_links:

        def no_links(src: str, dst: str) -> None:
            raise OSError(1, "Operation not permitted")  # as on FAT

        monkeypatch.setattr("controller.storage.atomic.os.link", no_links)
    real_replace = os.replace
    renames: list[str] = []

    def cut_after_the_prev(src: str, dst: str) -> None:
        renames.append(Path(dst).name)
        if Path(dst) == target:
            raise OSError(5, "power cut")  # the new content never lands
        real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr("controller.storage.atomic.os.replace", cut_after_the_prev)
        with pytest.raises(OSError, match="power cut"):
            write_atomic(target, b"v3", keep_previous=True)
    assert renames == ["tuning.json.prev", "tuning.json"]
    assert target.read_bytes() == b"v2"  # still there, whole
    assert (tmp_path / "tuning.json.prev").read_bytes() == b"v2"
    write_atomic(target, b"v3", keep_previous=True)
    assert target.read_bytes() == b"v3"
    assert (tmp_path / "tuning.json.prev").read_bytes() == b"v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tuning.json", "tuning.json.prev"]


@pytest.mark.parametrize("wait_when_full", [True, False])
def test_a_simulation_outrunning_the_disk_waits_instead_of_dropping(tmp_path: Path, wait_when_full: bool) -> None:
    """A producer far faster than the writer (a small queue bound): a simulated run's store waits and keeps
    every sample; a real loop's store drops the oldest rather than wait."""
    store = TimeSeriesStore(tmp_path / "s.sqlite3", 400, max_queued_rows=200, batch_rows=100,
                            wait_when_full=wait_when_full)  # fmt: skip
    try:
        for tick in range(5_000):
            store.record(1_780_000_000.0 + tick, {f"series.{i}": float(i) for i in range(20)})
        assert store.flush()
        health = store.health_snapshot()
    finally:
        store.close()
    if wait_when_full:
        assert health.dropped_rows == 0
        assert health.written_rows == 100_000
    else:
        assert health.dropped_rows > 0
