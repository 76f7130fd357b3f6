"""What the dashboard shows of the past, computed on the server from the local time series: charts
downsampled to a few hundred points, today's and this month's bill against a baseline, today's PV.
Blocking (SQLite, numpy): the web handlers call these from a worker thread."""

from __future__ import annotations

import math
from datetime import date, datetime, time, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

from config import SiteConfig
from controller.storage.timeseries import Columns, TimeSeriesStore

__all__ = ["SPANS", "bills", "energy_kwh", "history", "today_energy_kwh"]

Span = Literal["day", "week", "month"]
# Each span ends now and is drawn in buckets of this many seconds: 288, 336 and 360 points, enough for a
# chart a screen wide and small enough to send every few seconds.
SPANS: dict[str, tuple[float, float]] = {"day": (86400.0, 300.0), "week": (7 * 86400.0, 1800.0),
                                         "month": (30 * 86400.0, 7200.0)}  # fmt: skip
# A minute row stands for a minute; a tick row for one tick, unless the next row comes sooner. A longer gap
# (the controller was off) counts as nothing: unknown energy is never guessed.
MINUTE_ROW_S = 60.0
# 15-minute blocks: what the utility's demand meter averages import over.
DEMAND_BLOCK_S = 900.0
_F = npt.NDArray[np.float64]


def _spans_s(cols: Columns, tick_period_s: float) -> _F:
    """How long each row stands for: up to the next row, at most its own length (a tick or a minute)."""
    n = len(cols.ts)
    own = np.where(cols.minute, MINUTE_ROW_S, tick_period_s)
    if n == 0:
        return own.astype(np.float64)
    gap = np.empty(n, np.float64)
    gap[:-1] = np.diff(cols.ts)
    gap[-1] = own[-1]
    return np.minimum(gap, own).astype(np.float64)


def energy_kwh(cols: Columns, name: str, tick_period_s: float, *, positive: bool = True) -> float:
    """Energy of a power series (kW): its positive (or negative) part integrated over the rows that hold it."""
    values = cols.values[name]
    part = np.clip(values, 0.0, None) if positive else np.clip(-values, 0.0, None)
    known = ~np.isnan(values)
    return float(np.sum(part[known] * _spans_s(cols, tick_period_s)[known]) / 3600.0)


def today_energy_kwh(store: TimeSeriesStore, site: SiteConfig, until: datetime) -> float:
    """PV energy recorded from local midnight until `until`, inclusive (the part of today before the day
    counter started: up to and with its first tick). Waits for the store to commit what is queued."""
    store.flush()
    midnight = datetime.combine(until.date(), time(), until.tzinfo)
    cols = store.columns(midnight.timestamp(), until.timestamp() + 1e-3, ["measured.pv_kw"])
    return energy_kwh(cols, "measured.pv_kw", site.control.tick_period_s)


def _ev_total(cols: Columns, chargers: list[str]) -> _F:
    """Cars' power per row: the sum when every charger is known, else NaN (a part is not the whole)."""
    if not chargers:
        return np.zeros(len(cols.ts))
    total = np.zeros(len(cols.ts))
    for name in chargers:
        total = total + cols.values[f"measured.{name}_kw"]
    return total


def _none_for_nan(values: _F, digits: int = 2) -> list[float | None]:
    return [None if math.isnan(v) else round(float(v), digits) for v in values]


def history(store: TimeSeriesStore, site: SiteConfig, span: str, end_s: float) -> dict[str, Any]:
    """Bucket means of the site's flows over the span ending at `end_s` (epoch s); null where nothing known."""
    length_s, bucket_s = SPANS[span]
    start_s = math.floor((end_s - length_s) / bucket_s) * bucket_s
    chargers = [c.name for c in site.ev_chargers]
    names = ["measured.grid_kw", "measured.pv_kw", "measured.battery_kw", "measured.soc",
             *(f"measured.{c}_kw" for c in chargers)]  # fmt: skip
    cols = store.columns(start_s, end_s, names)
    grid, pv, battery = (cols.values[f"measured.{n}_kw"] for n in ("grid", "pv", "battery"))
    ev = _ev_total(cols, chargers)
    series = {
        "grid_kw": grid,
        "pv_kw": pv,
        "battery_kw": battery,
        "ev_kw": ev,
        "load_kw": grid + pv - battery - ev,  # NaN wherever one of them is unknown
        "soc_pct": cols.values["measured.soc"] * 100.0,
    }
    buckets = math.ceil((end_s - start_s) / bucket_s)
    index = np.clip(((cols.ts - start_s) // bucket_s).astype(np.int64), 0, max(buckets - 1, 0))
    out: dict[str, list[float | None]] = {}
    for key, values in series.items():
        known = ~np.isnan(values)
        sums = np.bincount(index[known], weights=values[known], minlength=buckets)
        counts = np.bincount(index[known], minlength=buckets)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        out[key] = _none_for_nan(means)
    return {"span": span, "bucket_s": bucket_s, "start_s": start_s,
            "t_s": [start_s + i * bucket_s for i in range(buckets)], "series": out,
            "rows": len(cols.ts)}  # fmt: skip


def _prices(site: SiteConfig, cols: Columns, zone: ZoneInfo) -> _F:
    """The import price in force at each row (the tariff's band at the row's local minute)."""
    prices = np.empty(len(cols.ts))
    if len(cols.ts) == 0:
        return prices
    first = datetime.fromtimestamp(float(cols.ts[0]), zone).date()
    last = datetime.fromtimestamp(float(cols.ts[-1]), zone).date()
    day = first
    tables: dict[str, _F] = {}
    while day <= last:
        season = site.tariff.season_for(day.month)
        table = tables.get(season.name)
        if table is None:
            table = tables[season.name] = np.array(
                [season.prices_cny_per_kwh[season.band_at_minute(m)] for m in range(1440)]
            )
        lo = datetime.combine(day, time(), zone).timestamp()
        hi = datetime.combine(day + timedelta(days=1), time(), zone).timestamp()
        rows = (cols.ts >= lo) & (cols.ts < hi)
        minutes = np.clip(((cols.ts[rows] - lo) // 60).astype(np.int64), 0, 1439)
        prices[rows] = table[minutes]
        day += timedelta(days=1)
    return prices


def _bill(site: SiteConfig, cols: Columns, grid: _F, prices: _F, start_s: float) -> dict[str, float]:
    spans_h = _spans_s(cols, site.control.tick_period_s) / 3600.0
    known = ~np.isnan(grid)
    g, h, p = grid[known], spans_h[known], prices[known]
    imported, exported = np.clip(g, 0.0, None) * h, np.clip(-g, 0.0, None) * h
    energy = float(np.sum(imported * p) - np.sum(exported) * site.tariff.export_price_cny_per_kwh)
    peak = 0.0
    if len(g):
        blocks = ((cols.ts[known] - start_s) // DEMAND_BLOCK_S).astype(np.int64)
        kwh = np.bincount(blocks, weights=imported)
        hours = np.bincount(blocks, weights=h)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(hours > 0, kwh / np.maximum(hours, 1e-12), 0.0)
        peak = float(np.max(means))
    return {"energy_cny": round(energy, 2), "import_kwh": round(float(np.sum(imported)), 2),
            "export_kwh": round(float(np.sum(exported)), 2), "peak_kw": round(peak, 2)}  # fmt: skip


def bills(store: TimeSeriesStore, site: SiteConfig, now: datetime) -> dict[str, Any]:
    """Today's and this month's bill as metered (TOU energy, export revenue, the demand charge on the month's
    largest 15-minute import) against the baseline: the same measurements without the battery (grid minus
    battery power, tick by tick). Rows whose battery power is unknown count alike in both."""
    zone = ZoneInfo(site.site.timezone)
    now = now.astimezone(zone)
    month_start = datetime.combine(date(now.year, now.month, 1), time(), zone)
    day_start = datetime.combine(now.date(), time(), zone)
    cols = store.columns(month_start.timestamp(), now.timestamp(), ["measured.grid_kw", "measured.battery_kw"])
    grid = cols.values["measured.grid_kw"]
    battery = cols.values["measured.battery_kw"]
    baseline = grid - np.where(np.isnan(battery), 0.0, battery)
    prices = _prices(site, cols, zone)
    rate = site.tariff.demand_charge_cny_per_kw_month
    out: dict[str, Any] = {"baseline": "the same measurements without the battery (grid minus battery power)",
                           "battery_unknown_rows": int(np.sum(np.isnan(battery) & ~np.isnan(grid)))}  # fmt: skip
    today = cols.ts >= day_start.timestamp()
    for key, rows, start in (("today", today, day_start), ("month", np.ones(len(cols.ts), np.bool_), month_start)):
        part = Columns(cols.ts[rows], cols.minute[rows], {})
        actual = _bill(site, part, grid[rows], prices[rows], start.timestamp())
        base = _bill(site, part, baseline[rows], prices[rows], start.timestamp())
        entry: dict[str, Any] = {"actual": actual, "baseline": base}
        if key == "month":
            for bill in (actual, base):
                bill["demand_cny"] = round(bill["peak_kw"] * rate, 2)
                bill["total_cny"] = round(bill["energy_cny"] + bill["demand_cny"], 2)
            entry["saved_cny"] = round(base["total_cny"] - actual["total_cny"], 2)
        else:
            entry["saved_cny"] = round(base["energy_cny"] - actual["energy_cny"], 2)
        out[key] = entry
    out["from"] = {"today": day_start.isoformat(timespec="minutes"), "month": month_start.isoformat(timespec="minutes")}
    out["demand_charge_cny_per_kw_month"] = rate
    return out
