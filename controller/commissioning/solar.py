"""Where the sun is: its elevation and the day's sunrise and sunset at a site, from astral (a small, well-kept
solar-position library on NOAA's algorithms: no hand-written ephemeris to maintain)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, tzinfo

import astral.sun
from astral import Observer

__all__ = ["NIGHT_BELOW_DEG", "SunDay", "is_night", "sun_day", "sun_elevation_deg"]

# Night for a PV array: the sun more than 6 degrees below the horizon (civil twilight over, the sky dark,
# an array makes nothing). The margin also covers the formulas' error (about a minute of time, a quarter
# degree) and a site whose clock is a few minutes off.
NIGHT_BELOW_DEG = -6.0


def _observer(latitude_deg: float, longitude_deg: float) -> Observer:
    return Observer(latitude=latitude_deg, longitude=longitude_deg, elevation=0.0)


def sun_elevation_deg(latitude_deg: float, longitude_deg: float, when: datetime) -> float:
    """The sun's elevation above the horizon in degrees (negative below it) at an aware instant, refraction
    included (astral's NOAA-based solar position)."""
    if when.tzinfo is None:
        raise ValueError("sun_elevation_deg needs an aware datetime (which instant is a naive one?)")
    return float(astral.sun.elevation(_observer(latitude_deg, longitude_deg), when))


def is_night(latitude_deg: float, longitude_deg: float, when: datetime) -> bool:
    return sun_elevation_deg(latitude_deg, longitude_deg, when) < NIGHT_BELOW_DEG


@dataclass(frozen=True, slots=True)
class SunDay:
    """A local day's sunrise and sunset; both None on a polar day or night (`polar` says which)."""

    sunrise: datetime | None
    sunset: datetime | None
    polar: str = ""  # "", "day" (the sun never sets) or "night" (it never rises)


def sun_day(latitude_deg: float, longitude_deg: float, day: date, zone: tzinfo) -> SunDay:
    """Sunrise and sunset of a local calendar day, in that zone."""
    observer = _observer(latitude_deg, longitude_deg)
    try:
        return SunDay(
            astral.sun.sunrise(observer, day, tzinfo=zone),
            astral.sun.sunset(observer, day, tzinfo=zone),
        )
    except ValueError:  # astral: the sun never reaches the horizon that day
        noon = datetime.combine(day, time(12), zone)
        return SunDay(None, None, "day" if sun_elevation_deg(latitude_deg, longitude_deg, noon) > 0 else "night")
