"""Where a demand charge makes too little sun dearer than too much, the plans count on a day as poor as the
last week's worst: the battery is charged in the valley for the rainy day that may come."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from config import SiteConfig, load_site
from controller.runtime import Runtime
from firmware_bridge.transport import SerialLink
from optimiser import solve

SCHOOL = Path(__file__).parents[1] / "config" / "sites" / "zhongshan_school.toml"
ZONE = ZoneInfo("Asia/Shanghai")
WEDNESDAY = datetime(2026, 9, 16, tzinfo=ZONE)  # in term
PEAK_SO_FAR_KW = 150.0
RAINY_YIELD = 0.15
SUNNY_YIELD = 0.9


class _Clock:
    realtime = False

    def __init__(self, local: datetime) -> None:
        self.at = local

    def now(self) -> float:
        return self.at.timestamp()

    def local(self) -> datetime:
        return self.at

    def lateness(self, at_s: float) -> float:
        return 0.0


def _school_load_kw(local: datetime) -> float:
    minutes = local.hour * 60 + local.minute
    return 200.0 if local.weekday() < 5 and 7 * 60 + 30 <= minutes < 17 * 60 + 30 else 45.0


def _runtime(site: SiteConfig, tmp_path: Path, *, history: bool = True) -> Runtime:
    """A week of history before WEDNESDAY: sunny days and one rainy Thursday; a peak of 150 kW so far."""
    links = {bus.name: SerialLink(bus, str(tmp_path / "unused")) for bus in site.buses}
    runtime = Runtime(site, clock=_Clock(WEDNESDAY), links=links)  # type: ignore[arg-type]
    if not history:
        return runtime
    forecaster = runtime.forecaster
    first = WEDNESDAY - timedelta(days=7)
    for minute in range(7 * 24 * 60):
        local = first + timedelta(minutes=minute)
        ratio = RAINY_YIELD if local.date() == (first + timedelta(days=1)).date() else SUNNY_YIELD
        forecaster.observe(local, _school_load_kw(local), ratio * forecaster.sky_kw(local), pv_limited=False)
    runtime.month_peak_kw = PEAK_SO_FAR_KW
    return runtime


def test_a_rainy_day_in_the_last_week_is_planned_for_where_the_peak_is_at_stake(tmp_path: Path) -> None:
    site = load_site(SCHOOL, environment=False)
    assert site.tariff.demand_charge_cny_per_kw_month > 0
    assert site.battery is not None
    runtime = _runtime(site, tmp_path)
    sky = runtime.forecaster.sky_kw
    step = timedelta(minutes=site.control.step_minutes)
    scenario = runtime._scenario(WEDNESDAY)
    expected = runtime.forecaster.pv_kw(WEDNESDAY, len(scenario.pv_kw), site.control.step_minutes, now=WEDNESDAY)

    def ratio(pv_kw: list[float], local: datetime) -> float:
        index = int((local - WEDNESDAY) / step)
        return pv_kw[index] / sky(WEDNESDAY + (index + 0.5) * step)

    noon, saturday_noon = WEDNESDAY.replace(hour=12), WEDNESDAY.replace(hour=12) + timedelta(days=3)
    # School-day noon: 200 kW of load less a rainy day's PV is above the month's peak: the rainy day's PV.
    assert ratio(list(scenario.pv_kw), noon) == pytest.approx(RAINY_YIELD, abs=0.02)
    assert ratio(expected, noon) > 0.7  # the days before were mostly sunny
    if len(scenario.pv_kw) > int((saturday_noon - WEDNESDAY) / step):  # a 48 h+ horizon reaches a weekend
        assert ratio(list(scenario.pv_kw), saturday_noon) == pytest.approx(ratio(expected, saturday_noon))
    # The plan then charges in the valley for the rainy day; on the expected sun alone it left the battery
    # for PV to fill, and a rainy day set the month's peak.
    guarded = solve(scenario)
    hopeful = solve(scenario.model_copy(update={"pv_kw": expected}))
    school_starts = int((WEDNESDAY.replace(hour=7, minute=30) - WEDNESDAY) / step)
    assert guarded.soc[school_starts] >= hopeful.soc[school_starts] + 0.2
    assert guarded.soc[school_starts] >= 0.8


def test_without_a_demand_charge_the_plan_counts_on_the_expected_sun(tmp_path: Path) -> None:
    site = load_site(SCHOOL, environment=False)
    tariff = site.tariff.model_copy(update={"demand_charge_cny_per_kw_month": 0.0})
    site = site.model_copy(update={"tariff": tariff})
    runtime = _runtime(site, tmp_path)
    scenario = runtime._scenario(WEDNESDAY)
    expected = runtime.forecaster.pv_kw(WEDNESDAY, len(scenario.pv_kw), site.control.step_minutes, now=WEDNESDAY)
    assert list(scenario.pv_kw) == pytest.approx(expected)


def test_the_worst_day_of_the_week_is_kept_across_a_restart(tmp_path: Path) -> None:
    site = load_site(SCHOOL, environment=False)
    runtime = _runtime(site, tmp_path)
    again = _runtime(site, tmp_path, history=False).forecaster
    assert again.low_days_yield_ratio(WEDNESDAY.date()) is None
    again.restore(runtime.forecaster.to_json())
    assert again.low_days_yield_ratio(WEDNESDAY.date()) == pytest.approx(RAINY_YIELD, abs=0.01)
    assert again.days_yield_ratio(WEDNESDAY.date()) == pytest.approx(SUNNY_YIELD, abs=0.01)
