"""Bytes per day of the time series and the cost of `record()` on the control side.

    python -m controller.storage.bench --series 20 --days 1

Records `--days` simulated days of `--series` series at 1 Hz through the real `TimeSeriesStore`
(the school's eleven series, then slow points such as voltages and energies), measures what each
table takes on disk (SQLite's dbstat), downsamples the same days to minutes and measures again, and
projects the file size for a retention of full-resolution days plus minute means.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from controller.storage.timeseries import FULL_RESOLUTION_DAYS, TimeSeriesStore

# The school's series as the runtime records them, then slow points a site may add (issue 16).
SCHOOL_SERIES = [
    "measured.pv_kw", "measured.battery_kw", "measured.grid_kw", "measured.soc", "measured.ev1_kw",
    "measured.ev2_kw", "setpoint.battery_kw", "setpoint.pv_limit_kw", "setpoint.ev1_a", "setpoint.ev2_a",
    "state.safe",
]  # fmt: skip
EXTRA_SERIES = [
    "measured.grid_v_l1", "measured.grid_v_l2", "measured.grid_v_l3", "measured.grid_hz",
    "measured.grid_import_kwh", "measured.grid_export_kwh", "measured.pv_kwh", "measured.battery_temp_c",
    "measured.ev1_kwh", "measured.ev2_kwh", "measured.load_kw", "measured.pv_v_dc",
]  # fmt: skip
START_EPOCH_S = 1_783_267_200.0  # 2026-07-06 00:00 +08:00, the school's simulated day
# The whole run's writes and downsampling must be done within this; a day takes a few seconds.
SETTLE_TIMEOUT_S = 600.0


def _names(count: int) -> list[str]:
    names = (SCHOOL_SERIES + EXTRA_SERIES)[:count]
    return names + [f"measured.extra{i}" for i in range(count - len(names))]


def _table_bytes(path: Path) -> dict[str, int]:
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        rows = db.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name").fetchall()
        return {str(name): int(size) for name, size in rows}
    finally:
        db.close()


def _record_days(store: TimeSeriesStore, names: list[str], days: float, seed: int) -> list[float]:
    """Returns the control side's time per `record()` call, in seconds."""
    rnd = random.Random(seed)
    levels = {n: rnd.uniform(0, 100) for n in names}
    costs: list[float] = []
    for second in range(round(days * 86400)):
        for name in names:  # random walks at a meter's resolution: the values do not change the size
            levels[name] = round(levels[name] + rnd.gauss(0, 0.5), 3)
        values = dict(levels)
        started = time.perf_counter()
        store.record(START_EPOCH_S + second, values)
        costs.append(time.perf_counter() - started)
    return costs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=20, help="series recorded each second (school: 11)")
    parser.add_argument("--days", type=float, default=1.0, help="simulated days to record")
    parser.add_argument("--full-days", type=int, default=FULL_RESOLUTION_DAYS, help="projection: days at 1 s")
    parser.add_argument("--retention-days", type=int, default=400, help="projection: days kept in all")
    args = parser.parse_args(argv)
    names = _names(args.series)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.sqlite3"
        # Recorded far faster than a site ticks: a queue that holds the whole run, so nothing is dropped.
        store = TimeSeriesStore(path, retention_days=10_000, full_resolution_days=10_000, max_queued_rows=1 << 30)
        wall = time.perf_counter()
        costs = _record_days(store, names, args.days, seed=1)
        assert store.settle(SETTLE_TIMEOUT_S), store.health()
        write_s = time.perf_counter() - wall
        full = _table_bytes(path)
        health = store.health()
        store.close()
        # The same days downsampled: the full-resolution window shrunk to nothing, retention run to the end.
        store = TimeSeriesStore(path, retention_days=10_000, full_resolution_days=0)
        store.prune()
        assert store.settle(SETTLE_TIMEOUT_S), store.health()
        store.close()
        minutes = _table_bytes(path)
    full_per_day = full.get("ticks", 0) / args.days
    minute_per_day = minutes.get("minutes", 0) / args.days
    overhead = sum(v for k, v in full.items() if k not in {"ticks", "minutes"})
    projected = args.full_days * full_per_day + (args.retention_days - args.full_days) * minute_per_day + overhead
    costs.sort()
    print(f"series: {args.series} at 1 Hz, {args.days:g} simulated day(s), written in {write_s:.1f} s wall")
    print(
        f"full resolution (ticks): {full_per_day / 1e6:.2f} MB/day ({full_per_day / 86400 / args.series:.1f} B/value)"
    )
    print(f"minute mean/min/max (minutes): {minute_per_day / 1e6:.3f} MB/day")
    print(f"other tables and schema: {overhead / 1e3:.0f} kB")
    print(
        f"projected: {args.full_days} d full + {args.retention_days - args.full_days} d minutes = {projected / 1e9:.2f} GB"
    )
    print(
        f"record() on the control side: median {statistics.median(costs) * 1e6:.1f} us, "
        f"p99 {costs[int(len(costs) * 0.99)] * 1e6:.1f} us, max {costs[-1] * 1e3:.2f} ms"
    )
    print(f"store health: {health}")


if __name__ == "__main__":
    main()
