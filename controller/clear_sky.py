"""Clear-sky PV power of a site's arrays from the sun's position (astral, NOAA's algorithms) at its
latitude and longitude, each array's tilt and azimuth; the simulated plant and the forecaster share it.

Irradiance: the sun's beam through the air mass of Kasten and Young (1989) with Meinel's attenuation
(1976), diffuse light a tenth of the beam, isotropic onto the tilted plane, ground albedo 0.2. Good to
a few percent of a clear day's energy, which is what a forecast scaled by measured yield needs; pvlib
would add pandas (~60 MB) to a small box for no gain in that use.

A site without arrays keeps the fixed southern-China curve of earlier versions (sunrise ~06:10, sunset
~18:50, no latitude), so its behaviour does not change.
"""

from __future__ import annotations

import functools
import math
from datetime import UTC, datetime

import astral.sun
from astral import Observer

from config import PvRating

__all__ = [
    "PERFORMANCE_RATIO",
    "SOLAR_CONSTANT_W_PER_M2",
    "clear_sky_kw",
    "legacy_curve_kw",
    "plane_irradiance_w_per_m2",
]

SOLAR_CONSTANT_W_PER_M2 = 1353.0  # Meinel's extraterrestrial beam
STC_W_PER_M2 = 1000.0  # a module's peak is rated at this irradiance
DIFFUSE_SHARE = 0.1  # clear-sky diffuse on the horizontal, as a share of the beam
ALBEDO = 0.2  # grass, concrete: what a school roof's surroundings reflect
# Cables, inverter, heat and dirt: a clear noon at 1000 W/m2 gives this share of the modules' peak (the
# plant's; the forecaster learns its own site's share as the yield ratio).
PERFORMANCE_RATIO = 0.82
# Sun positions are cached per minute of the day: the forecaster asks every tick and every plan step.
_CACHE_SIZE = 8192


def legacy_curve_kw(peak_kw: float, local: datetime) -> float:
    """The fixed curve of earlier versions, peak_kw at noon, for sites without arrays."""
    hour = local.hour + local.minute / 60 + local.second / 3600
    return float(peak_kw * max(0.0, math.sin(math.pi * (hour - 6.2) / 12.6)) ** 1.3)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _sun(latitude_deg: float, longitude_deg: float, minute_ts: int) -> tuple[float, float]:
    """(zenith, azimuth) in degrees at a UTC minute."""
    when = datetime.fromtimestamp(minute_ts * 60, tz=UTC)
    observer = Observer(latitude=latitude_deg, longitude=longitude_deg, elevation=0.0)
    zenith = float(astral.sun.zenith(observer, when, with_refraction=True))
    return zenith, float(astral.sun.azimuth(observer, when))


def plane_irradiance_w_per_m2(zenith_deg: float, sun_azimuth_deg: float, tilt_deg: float, azimuth_deg: float) -> float:
    """Clear-sky irradiance on a plane (W/m2) for the sun at this zenith and azimuth."""
    if zenith_deg >= 90.0:
        return 0.0
    cos_z = math.cos(math.radians(zenith_deg))
    air_mass = 1.0 / (cos_z + 0.50572 * (96.07995 - zenith_deg) ** -1.6364)
    beam = SOLAR_CONSTANT_W_PER_M2 * 0.7 ** (air_mass**0.678)
    diffuse = DIFFUSE_SHARE * beam
    tilt, zen = math.radians(tilt_deg), math.radians(zenith_deg)
    cos_incidence = math.cos(zen) * math.cos(tilt) + math.sin(zen) * math.sin(tilt) * math.cos(
        math.radians(sun_azimuth_deg - azimuth_deg)
    )
    horizontal = beam * cos_z + diffuse
    return float(
        beam * max(0.0, cos_incidence)
        + diffuse * (1 + math.cos(tilt)) / 2
        + horizontal * ALBEDO * (1 - math.cos(tilt)) / 2
    )


def clear_sky_kw(pv: PvRating | None, latitude_deg: float, longitude_deg: float, when: datetime) -> float:
    """The arrays' rated share under a clear sky at an aware instant (kW at the modules' peak rating; times
    a performance ratio for AC)."""
    if pv is None:
        return 0.0
    if not pv.arrays:
        return legacy_curve_kw(pv.peak_kw, when)
    if when.tzinfo is None:
        raise ValueError("clear_sky_kw needs an aware datetime")
    zenith, azimuth = _sun(latitude_deg, longitude_deg, int(when.timestamp() // 60))
    if zenith >= 90.0:
        return 0.0
    total = 0.0
    for array in pv.arrays:
        poa = plane_irradiance_w_per_m2(zenith, azimuth, array.tilt_deg, array.azimuth_deg)
        total += array.peak_kw * poa / STC_W_PER_M2
    return total
