"""The own PV forecast leans with lead time from the last quarter hour's yield to the last whole days'."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from config import load_site
from controller.clock import SimClock
from controller.forecast import Forecaster
from controller.plant import Plant
from controller.runtime import Runtime
from controller.simulation import simulated_site

SITE = load_site(Path(__file__).parents[1] / "config" / "sites" / "zhongshan_school.toml", environment=False)
ZONE = ZoneInfo("Asia/Shanghai")
START = datetime(2026, 7, 6, tzinfo=ZONE)


def _fed() -> Forecaster:
    forecaster = Forecaster(SITE, 15)
    for second in range(0, 3 * 86400, 10):  # three dull days: 40 % of clear sky
        local = START + timedelta(seconds=second)
        forecaster.observe(local, 100.0, 0.4 * forecaster.sky_kw(local), pv_limited=False)
    bright = START + timedelta(days=3, hours=15)
    for second in range(0, 900):  # then a bright quarter hour on the fourth afternoon
        local = bright + timedelta(seconds=second)
        forecaster.observe(local, 100.0, 1.0 * forecaster.sky_kw(local), pv_limited=False)
    return forecaster


def test_near_steps_follow_the_recent_yield_and_tomorrow_the_last_days() -> None:
    forecaster = _fed()
    now = START + timedelta(days=3, hours=15, minutes=15)
    assert forecaster.yield_ratio() == pytest.approx(1.0)
    assert forecaster.days_yield_ratio(now.date()) == pytest.approx(0.4)
    soon = forecaster.pv_kw(now, 1, 15, now=now)[0] / forecaster.sky_kw(now + timedelta(minutes=7.5))
    tomorrow_noon = now.replace(hour=12) + timedelta(days=1)
    sky_kw = forecaster.sky_kw(tomorrow_noon + timedelta(minutes=7.5))
    tomorrow = forecaster.pv_kw(tomorrow_noon, 1, 15, now=now)[0] / sky_kw
    assert soon > 0.95
    assert tomorrow == pytest.approx(0.4, abs=0.01)


def test_the_days_yield_survives_a_restart() -> None:
    forecaster = _fed()
    again = Forecaster(SITE, 15)
    again.restore(forecaster.to_json())
    assert again.to_json() == forecaster.to_json()
    later = START + timedelta(days=4)
    assert again.days_yield_ratio(later.date()) == forecaster.days_yield_ratio(later.date())


async def test_a_rainy_morning_is_learned_under_the_export_guards_limit(tmp_path: Path) -> None:
    """At zero export the export guard keeps a PV limit in force all day (PV could outgive the school), but
    on a rainy morning PV gives far less than that limit: it is the sun's, and the forecast learns from it.
    Before, every reading under any limit was ignored, so the plans kept the sunny days' yield (87-130 kW
    planned, 12 kW given) and the battery covered the difference at the flat price."""
    site = SITE.model_copy(update={"storage": SITE.storage.model_copy(update={"path": tmp_path / "s.sqlite3",
                                                                              "state_path": tmp_path / "state.json"})})
    start = datetime(2026, 7, 7, 8, 0, tzinfo=ZONE)  # a Tuesday in term
    plant = Plant(site, start, weather="mixed", skies=("rain",))
    plant.soc = 0.5
    limited_well_above_pv: list[bool] = []
    async with simulated_site(site, start, 1, plant=plant) as (_, links, _sims):
        def on_tick(_now_s: float, _setpoints: object) -> None:
            limit_kw = runtime._pv_limit_kw
            limited_well_above_pv.append(limit_kw is not None and plant.pv_kw < limit_kw - 20.0)

        runtime = Runtime(site, clock=SimClock(start, None), links=links, line_timing=False,
                          before_tick=plant.advance, on_tick=on_tick)  # fmt: skip
        for second in range(-3 * 86400, -16 * 3600, 10):  # three sunny days before: 80 % of clear sky
            local = start + timedelta(seconds=second)
            runtime.forecaster.observe(local, 150.0, 0.8 * runtime.forecaster.sky_kw(local), pv_limited=False)
        assert runtime.forecaster.yield_ratio() == pytest.approx(0.8)
        await runtime.run(45 * 60)
    assert sum(limited_well_above_pv) > 0.9 * len(limited_well_above_pv)  # the guard's limit was in force
    now = start + timedelta(minutes=45)
    sky_kw = runtime.forecaster.sky_kw(now)
    actual_ratio = plant.pv_available_at(45 * 60) / sky_kw
    assert actual_ratio < 0.4  # rain
    assert runtime.forecaster.yield_ratio() == pytest.approx(actual_ratio, abs=0.1)
    next_step_kw = runtime.forecaster.pv_kw(now, 1, 15, now=now)[0]
    assert next_step_kw < 1.5 * plant.pv_available_at(45 * 60 + 450) + 5.0
