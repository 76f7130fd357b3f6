"""The plant's realism options: off by default (today's plant, to the watt), each day's sky and load drawn
from the seed and the date alone, recorded data replayed, the site calendar's days followed."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from config import SiteConfig, load_site
from controller.day_kinds import DayKind
from controller.interval_csv import parse_interval_csv
from controller.plant import Plant, school_arrivals

SITE = load_site(Path(__file__).parents[1] / "config" / "sites" / "zhongshan_school.toml", environment=False)
ZONE = ZoneInfo("Asia/Shanghai")
MONDAY = datetime(2026, 7, 6, tzinfo=ZONE)


def _earlier_plant_pv_kw(peak_kw: float, local: datetime) -> float:
    """The sunny PV of the plant before issue #20, copied here as the reference."""
    hour = local.hour + local.minute / 60 + local.second / 3600
    return float(peak_kw * 0.82 * max(0.0, math.sin(math.pi * (hour - 6.2) / 12.6)) ** 1.3)


def _earlier_school_load_kw(at_s: float, local: datetime) -> float:
    hour = local.hour + local.minute / 60
    working = local.weekday() < 5
    base = 45.0 + (120.0 if working and 7.5 <= hour < 17.5 else 0.0)
    base += 35.0 if working and 11.5 <= hour < 13 else 0.0
    base += 25.0 if 17.5 <= hour < 21.0 else 0.0
    return base * (1 + 0.05 * math.sin(at_s / 97.0) + 0.03 * math.sin(at_s / 13.0))


def test_by_default_the_plant_is_the_one_before() -> None:
    plant = Plant(SITE, MONDAY, weather="sunny")
    assert SITE.pv is not None
    for at_s in range(0, 7 * 86400, 1777):
        local = MONDAY + timedelta(seconds=at_s)
        # The same formula, its factors multiplied in another order: equal to the last bits.
        assert plant.pv_available_at(at_s) == pytest.approx(_earlier_plant_pv_kw(SITE.pv.peak_kw, local), rel=1e-12)
        assert plant.load_at(at_s) == _earlier_school_load_kw(at_s, local)


def _arrays_site() -> SiteConfig:
    data = SITE.model_dump()
    data["pv"]["arrays"] = [{"name": "south", "peak_kw": 300.0, "tilt_deg": 15.0, "azimuth_deg": 180.0}]
    return SiteConfig.model_validate(data)


def test_mixed_weather_is_the_seeds_and_the_dates_alone() -> None:
    site = _arrays_site()
    a = Plant(site, MONDAY, seed=3, weather="mixed", variation=True)
    again = Plant(site, MONDAY - timedelta(days=7), seed=3, weather="mixed", variation=True)
    other = Plant(site, MONDAY, seed=4, weather="mixed", variation=True)
    days = [(MONDAY + timedelta(days=d)).date() for d in range(30)]
    assert [a.day_draw(d) for d in days] == [again.day_draw(d) for d in days]  # history sees the same days
    assert [a.day_draw(d).sky for d in days] != [other.day_draw(d).sky for d in days]
    assert {a.day_draw(d).sky for d in days} == {"sunny", "cloudy", "overcast", "rain"}
    noon = [a.pv_available_at(d * 86400 + 12 * 3600) for d in range(30)]
    assert max(noon) > 3 * min(noon)  # a sunny noon against a rainy one


def test_skies_given_day_by_day_and_a_hot_day_cools_more() -> None:
    plant = Plant(_arrays_site(), MONDAY, weather="mixed", skies=("sunny", "rain"), variation=True)
    assert [plant.day_draw((MONDAY + timedelta(days=d)).date()).sky for d in range(4)] == ["sunny", "rain"] * 2
    hot, cool = plant.day_draw(MONDAY.date()), plant.day_draw((MONDAY + timedelta(days=1)).date())
    assert hot.max_temp_c > cool.max_temp_c
    afternoon = 15 * 3600
    hot_load = plant.load_at(afternoon) / hot.occupancy
    cool_load = plant.load_at(86400 + afternoon) / cool.occupancy
    assert hot_load > cool_load


def test_recorded_data_is_replayed_and_wraps() -> None:
    raw = b"time,load_kw,pv_kw\n2026-07-06T00:00:00+08:00,50,0\n2026-07-06T00:15:00+08:00,60,900\n"
    plant = Plant(SITE, MONDAY, replay=parse_interval_csv(raw, ZONE))
    assert plant.load_at(100) == 50.0
    assert plant.load_at(900) == 60.0
    assert plant.load_at(1800) == 50.0  # the recording's half an hour wraps
    assert SITE.pv is not None
    assert plant.pv_available_at(900) == SITE.pv.peak_kw  # never beyond the array


def test_the_calendar_rules_the_load_and_the_cars() -> None:
    spring_festival = datetime(2026, 2, 17, 12, tzinfo=ZONE)  # a Tuesday
    make_up_saturday = datetime(2026, 2, 28, 12, tzinfo=ZONE)
    plant = Plant(SITE, spring_festival, weather="sunny")
    assert plant.day_kind(spring_festival.date()) is DayKind.HOLIDAY
    assert plant.load_at(0) < 100.0  # the weekend's load
    saturday_s = (make_up_saturday - spring_festival).total_seconds()
    assert plant.load_at(saturday_s) > 150.0  # school is in
    cars = school_arrivals(SITE, datetime(2026, 2, 14, tzinfo=ZONE), 16)
    days = {a.arrive.date().isoformat() for a in cars}
    assert "2026-02-14" in days  # make-up Saturday
    assert "2026-02-28" in days
    assert "2026-02-17" not in days
