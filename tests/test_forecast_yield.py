"""The own PV forecast leans with lead time from the last quarter hour's yield to the last whole days'."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from config import load_site
from controller.forecast import Forecaster

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
