"""Local persistence: the time series survives, is bounded, and exports; files are never half-written."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from controller.cli import main
from controller.storage.atomic import write_atomic
from controller.storage.timeseries import TimeSeriesStore

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
