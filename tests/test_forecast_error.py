"""The day-ahead forecast error tool: on the cloudy week the simulated provider's PV forecast is the better
one, and the calendar's days are forecast from their own kind (a holiday, a make-up working Sunday)."""

from __future__ import annotations

from hil_tests.forecast_error import day_ahead_errors
from hil_tests.scenario import load_scenarios

SCENARIOS = {s.name: s for s in load_scenarios()}


def test_an_external_pv_forecast_beats_the_own_on_a_cloudy_week() -> None:
    rows = day_ahead_errors(SCENARIOS["cloudy-week-external"], days=3)
    assert len(rows) == 3
    for row in rows:
        assert row.pv_external_kw is not None
        assert row.pv_external_kw < row.pv_own_kw


def test_holiday_and_make_up_working_day_are_forecast_from_their_own_kind() -> None:
    rows = {r.day: r for r in day_ahead_errors(SCENARIOS["stochastic-month"], days=26)}
    # Sunday 20 Sep 2026 is a working day, Friday 25 Sep the Mid-Autumn Festival: each forecast from the
    # profile of its kind, within the day's own variation (a school day's load is ~200 kW).
    assert rows["2026-09-20"].load_own_kw < 10.0
    assert rows["2026-09-25"].load_own_kw < 10.0
