"""`--report DIR`: a PNG per simulated (or real) day from the stored time series, and the summary."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np

from config import SiteConfig
from controller.storage.atomic import write_atomic
from controller.storage.timeseries import TimeSeriesStore

__all__ = ["write_report"]

# Plotted at one point a minute: 1440 points a day is plenty for a person, a day of seconds is not.
BUCKET_S = 60.0


def _minute_means(store: TimeSeriesStore, since: float, until: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    sums: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
    for ts, series, value in store.rows(since, until):
        cell = sums[series][int((ts - since) // BUCKET_S)]
        cell[0] += value
        cell[1] += 1
    out = {}
    for series, cells in sums.items():
        keys = np.array(sorted(cells))
        out[series] = (keys * BUCKET_S / 3600, np.array([cells[k][0] / cells[k][1] for k in keys]))
    return out


def write_report(
    site: SiteConfig, store: TimeSeriesStore, directory: Path, *, start: datetime, end: datetime, summary: str
) -> list[Path]:
    """One PNG per day between start and end, plus summary.md; returns the files written."""
    import matplotlib  # noqa: PLC0415 - optional extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    zone = ZoneInfo(site.site.timezone)
    day = start.astimezone(zone).replace(hour=0, minute=0, second=0, microsecond=0)
    while day < end:
        nxt = day + timedelta(days=1)
        data = _minute_means(store, day.timestamp(), nxt.timestamp())
        if data:
            fig, (ax_price, ax_power, ax_soc) = plt.subplots(
                3, 1, figsize=(12, 9), sharex=True, height_ratios=[1, 3, 1.2]
            )
            hours = np.arange(0, 24, 0.25)
            prices = [site.tariff.band_at(day + timedelta(hours=float(h)))[1] for h in hours]
            ax_price.step(hours, prices, where="post", color="black")
            ax_price.set_ylabel("CNY/kWh")
            for series, label, colour in (
                ("measured.grid_kw", "grid (+import)", "red"),
                ("measured.pv_kw", "PV", "orange"),
                ("measured.battery_kw", "battery (+charge)", "green"),
            ):
                if series in data:
                    ax_power.plot(*data[series], label=label, color=colour, linewidth=1)
            for series in sorted(s for s in data if s.startswith("measured.ev")):
                ax_power.plot(*data[series], label=series.removeprefix("measured.").removesuffix("_kw"), linewidth=1)
            ax_power.axhline(0, color="black", linewidth=0.5)
            ax_power.axhline(site.import_limit_kw, color="red", linestyle=":", linewidth=0.8, label="import limit")
            ax_power.set_ylabel("kW")
            ax_power.legend(loc="upper left", fontsize="small", ncol=3)
            if "measured.soc" in data:
                ax_soc.plot(*data["measured.soc"], color="green")
            ax_soc.set_ylim(0, 1)
            ax_soc.set_ylabel("SoC")
            ax_soc.set_xlabel(f"hour of {day:%A %Y-%m-%d}")
            ax_soc.set_xlim(0, 24)
            fig.suptitle(f"{site.site.name}: {day:%Y-%m-%d}")
            fig.tight_layout()
            path = directory / f"day-{day:%Y-%m-%d}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(path)
        day = nxt
    summary_path = directory / "summary.md"
    write_atomic(summary_path, ("# greensite run\n\n```\n" + summary + "```\n").encode())
    written.append(summary_path)
    return written
