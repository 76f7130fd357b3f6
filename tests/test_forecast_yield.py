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
from controller.runtime import PV_LIMIT_SETTLE_S, Runtime
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


def test_a_sunny_hour_held_at_the_limit_is_not_learned_as_its_clouds() -> None:
    """Zero export on a sunny hour with passing clouds: in sun PV sits at the export guard's limit (held
    back: the sun gave at least that), under a cloud it falls below (the sun's). Counting only the cloudy
    readings learned the clouds' 30 % of clear sky for the hour; the readings at the limit count as
    lower bounds and keep the estimate up."""
    forecaster = Forecaster(SITE, 15)
    for second in range(0, 86400, 10):  # a day before at 65 % of clear sky
        local = START + timedelta(seconds=second)
        forecaster.observe(local, 150.0, 0.65 * forecaster.sky_kw(local), pv_limited=False)
    noon = START + timedelta(days=1, hours=11)
    seen_kw = sky_sum_kw = 0.0
    for second in range(3600):
        local = noon + timedelta(seconds=second)
        sky_kw = forecaster.sky_kw(local)
        sunny = (second // 120) % 2 == 0
        pv_kw = min(150.0, sky_kw) if sunny else 0.3 * sky_kw  # 150 kW: the load, the limit at zero export
        forecaster.observe(local, 150.0, pv_kw, pv_limited=sunny)
        if second >= 3600 - 900:  # the quarter hour the recent yield is taken over
            seen_kw, sky_sum_kw = seen_kw + pv_kw, sky_sum_kw + sky_kw
    assert 0.65 * forecaster.sky_kw(noon) > 150.0  # the limit did hold PV back in sun
    # At least what PV showed (the limit in sun: a lower bound, the truth above it is not seen), not
    # the clouds' 0.3 alone.
    assert forecaster.yield_ratio() >= seen_kw / sky_sum_kw - 0.01
    assert forecaster.yield_ratio() > 0.38


def test_pv_ramping_to_a_raised_limit_is_held_back_until_it_settles(tmp_path: Path) -> None:
    """The limit is raised (a probe, more load): PV still ramping up to it is below the new limit but
    held back all the same, until PV_LIMIT_SETTLE_S have passed; then PV below the limit is the sun's."""
    from firmware_bridge.transport import SerialLink

    links = {bus.name: SerialLink(bus, str(tmp_path / "unused")) for bus in SITE.buses}
    clock = SimClock.__new__(SimClock)  # a clock moved by hand (no event loop needed)
    now = [0.0]
    clock.now = lambda: now[0]  # type: ignore[method-assign]
    runtime = Runtime(SITE, clock=clock, links=links)  # type: ignore[arg-type]
    runtime._pv_limit_kw = 100.0
    assert runtime._pv_held_back(100.0)
    assert not runtime._pv_held_back(60.0)  # well below its limit: the sun's
    now[0] = 1.0
    runtime._pv_limit_kw = 150.0  # raised
    for second in range(2, 31):
        now[0] = float(second)
        assert runtime._pv_held_back(100.0 + 1.5 * second)  # ramping towards 150 kW
    now[0] = 1.0 + PV_LIMIT_SETTLE_S + 1.0
    assert not runtime._pv_held_back(140.0)  # settled at 140 kW under a 150 kW limit: the sun's
    runtime._pv_limit_kw = None
    now[0] += PV_LIMIT_SETTLE_S + 1.0
    assert not runtime._pv_held_back(290.0)
