"""Where the sun is: its elevation and the day's sunrise and sunset at a site (NOAA's low-precision formulas)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo

__all__ = ["NIGHT_BELOW_DEG", "SunDay", "is_night", "sun_day", "sun_elevation_deg"]

# Night for a PV array: the sun more than 6 degrees below the horizon (civil twilight over, the sky dark,
# an array makes nothing). The margin also covers the formulas' error (about a minute of time, a quarter
# degree) and a site whose clock is a few minutes off.
NIGHT_BELOW_DEG = -6.0
# Sunrise and sunset as almanacs give them: the sun's upper limb on a horizon with standard refraction.
_HORIZON_DEG = -0.833


def _solar_terms(when_utc: datetime) -> tuple[float, float]:
    """(equation of time in minutes, declination in radians) at a UTC instant."""
    day_of_year = when_utc.timetuple().tm_yday
    hour = when_utc.hour + when_utc.minute / 60 + when_utc.second / 3600
    gamma = 2 * math.pi / 365 * (day_of_year - 1 + (hour - 12) / 24)
    eq_time_min = 229.18 * (
        0.000075
        + 0.001868 * math.cos(gamma)
        - 0.032077 * math.sin(gamma)
        - 0.014615 * math.cos(2 * gamma)
        - 0.040849 * math.sin(2 * gamma)
    )
    declination = (
        0.006918
        - 0.399912 * math.cos(gamma)
        + 0.070257 * math.sin(gamma)
        - 0.006758 * math.cos(2 * gamma)
        + 0.000907 * math.sin(2 * gamma)
        - 0.002697 * math.cos(3 * gamma)
        + 0.00148 * math.sin(3 * gamma)
    )
    return eq_time_min, declination


def sun_elevation_deg(latitude_deg: float, longitude_deg: float, when: datetime) -> float:
    """The sun's elevation above the horizon in degrees (negative below it) at an aware instant."""
    if when.tzinfo is None:
        raise ValueError("sun_elevation_deg needs an aware datetime (which instant is a naive one?)")
    utc = when.astimezone(UTC)
    eq_time_min, declination = _solar_terms(utc)
    minutes = utc.hour * 60 + utc.minute + utc.second / 60
    true_solar_min = minutes + eq_time_min + 4 * longitude_deg
    hour_angle = math.radians(true_solar_min / 4 - 180)
    lat = math.radians(latitude_deg)
    cos_zenith = math.sin(lat) * math.sin(declination) + math.cos(lat) * math.cos(declination) * math.cos(hour_angle)
    return 90.0 - math.degrees(math.acos(max(-1.0, min(1.0, cos_zenith))))


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
    noon_utc = datetime.combine(day, time(12), zone).astimezone(UTC)
    eq_time_min, declination = _solar_terms(noon_utc)
    lat = math.radians(latitude_deg)
    cos_hour_angle = (math.cos(math.radians(90 - _HORIZON_DEG)) / (math.cos(lat) * math.cos(declination))) - (
        math.tan(lat) * math.tan(declination)
    )
    if cos_hour_angle < -1:
        return SunDay(None, None, "day")
    if cos_hour_angle > 1:
        return SunDay(None, None, "night")
    half_day_deg = math.degrees(math.acos(cos_hour_angle))
    midnight_utc = datetime.combine(noon_utc.date(), time(0), UTC)
    # Minutes after 00:00 UTC of the day the local noon falls on.
    rise_min = 720 - 4 * (longitude_deg + half_day_deg) - eq_time_min
    set_min = 720 - 4 * (longitude_deg - half_day_deg) - eq_time_min
    return SunDay(
        (midnight_utc + timedelta(minutes=rise_min)).astimezone(zone),
        (midnight_utc + timedelta(minutes=set_min)).astimezone(zone),
    )
