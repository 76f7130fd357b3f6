"""Which kind of day a date is at a site: a working day in term, a working day of a school vacation, a
weekend, a public holiday. China's holidays and make-up working days (调休) come from the chinesecalendar
package (the State Council's schedule, updated each November by its maintainer); it refuses a year it
does not know, and then Monday-Friday applies with the site file's own lists on top."""

from __future__ import annotations

import logging
from datetime import date
from enum import StrEnum

from config import CalendarConfig

__all__ = ["FALLBACK", "DayKind", "SiteCalendar"]

_log = logging.getLogger(__name__)


class DayKind(StrEnum):
    WORKDAY = "workday"  # a working day (in term, where the site has school terms)
    VACATION = "vacation"  # a working day outside every school term
    REST = "rest"  # a weekend day that is not a make-up working day
    HOLIDAY = "holiday"  # a public holiday (or a day off given for one)


# A kind of day not learned yet is forecast from the profile of this one (None: from recent load).
FALLBACK: dict[DayKind, DayKind | None] = {
    DayKind.WORKDAY: None,
    DayKind.VACATION: DayKind.REST,
    DayKind.HOLIDAY: DayKind.REST,
    DayKind.REST: None,
}


def _library_says(day: date) -> DayKind | None:
    """HOLIDAY, REST or WORKDAY by China's schedule; None where the library does not know the year."""
    import chinese_calendar  # noqa: PLC0415 - loaded on first use; a site with china_holidays off never pays

    try:
        off, name = chinese_calendar.get_holiday_detail(day)
    except NotImplementedError:
        return None
    if not off:
        return DayKind.WORKDAY  # a make-up Saturday too
    # A plain weekend has no name; a holiday (or a weekend day inside a holiday's block) has one.
    return DayKind.HOLIDAY if name or day.weekday() < 5 else DayKind.REST


class SiteCalendar:
    """Day kinds of one site, cached per date."""

    def __init__(self, config: CalendarConfig) -> None:
        self._config = config
        self._holidays = frozenset(config.holidays)
        self._workdays = frozenset(config.workdays)
        self._kinds: dict[date, DayKind] = {}
        self._unknown_years: set[int] = set()

    def kind(self, day: date) -> DayKind:
        known = self._kinds.get(day)
        if known is None:
            known = self._kinds[day] = self._work_out(day)
        return known

    def working(self, day: date) -> bool:
        return self.kind(day) in {DayKind.WORKDAY, DayKind.VACATION}

    def _work_out(self, day: date) -> DayKind:
        if day in self._holidays:
            return DayKind.HOLIDAY
        if day in self._workdays:
            return self._term(day)
        if self._config.china_holidays:
            said = _library_says(day)
            if said is DayKind.WORKDAY:
                return self._term(day)
            if said is not None:
                return said
            if day.year not in self._unknown_years:
                self._unknown_years.add(day.year)
                _log.warning("chinesecalendar does not know this year: Monday-Friday plus the site file's"
                             " calendar.holidays and calendar.workdays", extra={"year": day.year})  # fmt: skip
        return self._term(day) if day.weekday() < 5 else DayKind.REST

    def _term(self, day: date) -> DayKind:
        terms = self._config.school_terms
        if not terms or any(t.start <= day <= t.end for t in terms):
            return DayKind.WORKDAY
        return DayKind.VACATION
