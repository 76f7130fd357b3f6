"""The site calendar: China's holidays and make-up working days from chinesecalendar, the site file's own
lists for years it does not know, school terms; the forecaster learns each kind of day apart."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from config import CalendarConfig, SiteConfig, load_site
from controller.day_kinds import DayKind, SiteCalendar
from controller.forecast import Forecaster

SITE = load_site(Path(__file__).parents[1] / "config" / "sites" / "zhongshan_school.toml", environment=False)
ZONE = ZoneInfo("Asia/Shanghai")


@pytest.mark.parametrize(
    ("day", "kind"),
    [
        ("2026-02-17", DayKind.HOLIDAY),  # Spring Festival
        ("2026-02-21", DayKind.HOLIDAY),  # a Saturday inside the Spring Festival block
        ("2026-02-14", DayKind.WORKDAY),  # make-up working Saturday (调休)
        ("2026-05-09", DayKind.WORKDAY),  # make-up working Saturday after Labour Day
        ("2026-10-06", DayKind.HOLIDAY),  # a Tuesday off for National Day
        ("2026-07-04", DayKind.REST),
        ("2026-07-06", DayKind.WORKDAY),
    ],
)
def test_china_holidays_and_make_up_days(day: str, kind: DayKind) -> None:
    assert SiteCalendar(CalendarConfig()).kind(date.fromisoformat(day)) is kind


def test_a_year_the_library_does_not_know_takes_the_site_files_lists(caplog: pytest.LogCaptureFixture) -> None:
    calendar = SiteCalendar(CalendarConfig(holidays=[date(2027, 2, 8)], workdays=[date(2027, 2, 20)]))
    assert calendar.kind(date(2027, 2, 8)) is DayKind.HOLIDAY
    assert calendar.kind(date(2027, 2, 20)) is DayKind.WORKDAY  # a Saturday
    assert calendar.kind(date(2027, 2, 9)) is DayKind.WORKDAY
    assert calendar.kind(date(2027, 2, 13)) is DayKind.REST
    assert "does not know this year" in caplog.text


def test_school_terms_make_vacation_days() -> None:
    terms = {"school_terms": [{"start": "2026-03-02", "end": "2026-07-10"}]}
    calendar = SiteCalendar(CalendarConfig.model_validate(terms))
    assert calendar.kind(date(2026, 7, 10)) is DayKind.WORKDAY
    assert calendar.kind(date(2026, 7, 13)) is DayKind.VACATION
    assert calendar.kind(date(2026, 7, 11)) is DayKind.REST


def test_a_day_listed_both_ways_is_refused() -> None:
    with pytest.raises(ValueError, match="both list 2027-02-08"):
        CalendarConfig(holidays=[date(2027, 2, 8)], workdays=[date(2027, 2, 8)])


def test_forecaster_learns_holidays_apart_and_falls_back_to_the_weekend() -> None:
    data = SITE.model_dump()
    data["calendar"] = {"school_terms": [{"start": "2026-03-02", "end": "2026-07-10"}]}
    forecaster = Forecaster(SiteConfig.model_validate(data), 15)
    start = datetime(2026, 6, 29, tzinfo=ZONE)  # Monday; school days to Fri 10 Jul, then vacation
    for minute in range(0, 21 * 24 * 60, 5):
        local = start + timedelta(minutes=minute)
        kind = forecaster.calendar.kind(local.date())
        load = {DayKind.WORKDAY: 150.0, DayKind.REST: 40.0, DayKind.VACATION: 70.0}[kind]
        forecaster.observe(local, load, 0.0, pv_limited=False)
    noon = timedelta(hours=12)
    assert forecaster.load_kw(datetime(2026, 7, 20, tzinfo=ZONE) + noon, 1, 15) == [70.0]  # vacation, learned
    assert forecaster.load_kw(datetime(2026, 7, 9, tzinfo=ZONE) + noon, 1, 15) == [150.0]
    # 1 Oct is a holiday never seen: the weekend's profile, and a known day to plan on.
    national_day = datetime(2026, 10, 1, tzinfo=ZONE) + noon
    assert forecaster.load_kw(national_day, 1, 15) == [40.0]
    assert forecaster.knows_day(national_day)


def test_state_of_earlier_versions_is_restored_as_working_day_and_weekend() -> None:
    forecaster = Forecaster(SITE, 15)
    forecaster.restore({"slot_minutes": 15, "profile": {"1:48": 150.0, "0:48": 40.0}, "yield": []})
    noon_monday = datetime(2026, 7, 6, 12, tzinfo=ZONE)
    assert forecaster.load_kw(noon_monday, 1, 15) == [150.0]
    assert forecaster.load_kw(noon_monday - timedelta(days=1), 1, 15) == [40.0]
    assert forecaster.to_json()["profile"] == {"workday:48": 150.0, "rest:48": 40.0}
