"""`python -m hil_tests.forecast_error SCENARIO [--days N]`: the day-ahead forecast error of a scenario's
plant without running the controller (seconds, not an hour). The forecaster is fed the plant's truth once a
minute (the history days, then the run; its profile keeps slot means, so a minute says what a second
would), and at each local midnight its forecast for the day, its own and with the scenario's simulated
provider (if it has one), is set against the true 15-minute means.

The feed is kinder than a run's: a run's forecaster sees the load its meters imply and no PV while the
inverter is curtailed; here it sees both always.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

from controller.external_forecast import parse_forecast
from controller.forecast import YIELD_WINDOW, Forecaster
from controller.logs import configure_logging
from controller.plant import Plant
from hil_tests.harness import DAY_AHEAD_STEP_MINUTES, ScenarioResult, _replay, _Run, _site
from hil_tests.scenario import HilScenario, load_scenarios

__all__ = ["DayError", "day_ahead_errors"]

STEPS = 24 * 60 // DAY_AHEAD_STEP_MINUTES
SAMPLE_S = 60


@dataclass(frozen=True, slots=True)
class DayError:
    day: str
    sky: str
    load_own_kw: float
    pv_own_kw: float
    pv_external_kw: float | None


def _mae(forecast: list[float], truth: list[float]) -> float:
    return sum(abs(f - t) for f, t in zip(forecast, truth, strict=True)) / len(truth)


def day_ahead_errors(scenario: HilScenario, days: int | None = None) -> list[DayError]:
    with tempfile.TemporaryDirectory(prefix="greensite-fe-") as work:
        site = _site(scenario, Path(work), None)
    zone = ZoneInfo(site.site.timezone)
    start = scenario.start.replace(tzinfo=zone) if scenario.start.tzinfo is None else scenario.start
    plant = Plant(site, start, seed=scenario.seed, weather=scenario.weather, variation=scenario.variation,
                  replay=_replay(scenario, site), skies=tuple(scenario.skies))  # fmt: skip
    provider = _Run(scenario, site, plant, ScenarioResult(scenario.name, "", short=False))
    forecaster = Forecaster(site, site.control.step_minutes)
    # The yield window counts observations: a run's are its ticks. Fed once a minute, the window is cut to
    # span the time it spans in a run of the site's ticks.
    window = max(1, int(YIELD_WINDOW * site.control.tick_period_s // SAMPLE_S))
    forecaster._yield = deque(maxlen=window)  # a test tool mimicking the tick rate
    run_days = days if days is not None else int(scenario.duration // 86400)
    issue_hours = scenario.external_forecast.issue_hours if scenario.external_forecast else []
    out: list[DayError] = []
    for at_s in range(-scenario.history_days * 86400, run_days * 86400, SAMPLE_S):
        local = plant.local_time(at_s)
        if at_s >= 0 and at_s % 86400 == 0:
            midnight = local
            own_load = forecaster.own_load_kw(midnight, STEPS, DAY_AHEAD_STEP_MINUTES)
            own_pv = forecaster.own_pv_kw(midnight, STEPS, DAY_AHEAD_STEP_MINUTES)
            with_external = forecaster.pv_kw(midnight, STEPS, DAY_AHEAD_STEP_MINUTES, now=midnight)
            step_s = DAY_AHEAD_STEP_MINUTES * 60
            samples = [[at_s + i * step_s + 30 + 60 * k for k in range(DAY_AHEAD_STEP_MINUTES)] for i in range(STEPS)]
            true_load = [sum(plant.load_at(t) for t in s) / len(s) for s in samples]
            true_pv = [sum(plant.pv_available_at(t) for t in s) / len(s) for s in samples]
            out.append(DayError(
                local.date().isoformat(), plant.day_draw(local.date()).sky, _mae(own_load, true_load),
                _mae(own_pv, true_pv), _mae(with_external, true_pv) if forecaster.external else None,
            ))  # fmt: skip
        if at_s >= -86400 and local.minute == 0 and local.second < SAMPLE_S and local.hour in issue_hours:
            forecaster.external = parse_forecast(provider._provider_forecast(at_s), now=local,
                                                 pv_peak_kw=site.pv.peak_kw if site.pv else None)  # fmt: skip
        forecaster.observe(local, plant.load_at(at_s), plant.pv_available_at(at_s), pv_limited=False)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hil_tests.forecast_error", description=__doc__)
    parser.add_argument("scenario")
    parser.add_argument("--days", type=int, help="only the first N days of the run")
    args = parser.parse_args(argv)
    configure_logging("ERROR")
    scenario = next((s for s in load_scenarios() if s.name == args.scenario), None)
    if scenario is None:
        parser.error(f"no scenario {args.scenario!r}")
    rows = day_ahead_errors(scenario, args.days)
    write = sys.stdout.write
    write("| day | sky | load MAE kW (own) | PV MAE kW (own) | PV MAE kW (external) |\n|---|---|---|---|---|\n")
    for r in rows:
        external = "n/a" if r.pv_external_kw is None else f"{r.pv_external_kw:.1f}"
        write(f"| {r.day} | {r.sky} | {r.load_own_kw:.1f} | {r.pv_own_kw:.1f} | {external} |\n")
    n = len(rows)
    if n:
        ext = [r.pv_external_kw for r in rows if r.pv_external_kw is not None]
        mean_ext = f"{sum(ext) / len(ext):.1f}" if ext else "n/a"
        write(f"| all {n} days | | {sum(r.load_own_kw for r in rows) / n:.1f} |"
              f" {sum(r.pv_own_kw for r in rows) / n:.1f} | {mean_ext} |\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
