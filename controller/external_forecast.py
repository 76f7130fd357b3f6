"""External forecasts (PV, optionally load) from a file or over MQTT, decoded as hostile input.

The shape (JSON; units in the key names; Solcast's and Open-Meteo's outputs map onto it, see the README):

    {"issued_at": "2026-07-06T05:00:00+08:00", "start": "2026-07-06T06:00:00+08:00", "step_minutes": 30,
     "pv_kw": [0.0, 3.1, ...], "load_kw": [52.0, ...], "source": "solcast"}

`pv_kw[i]` is the mean power over [start + i*step, start + (i+1)*step). Bytes are decoded by
controller.strict_json (size, depth, number length, duplicate keys, NaN refused); every refusal names
the field and, in a list, the index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from controller.strict_json import JsonLimits, JsonRefused, decode_json, json_type_name

__all__ = ["MAX_FORECAST_BYTES", "MAX_POINTS", "ExternalForecast", "ForecastRefused", "parse_forecast"]

# Seven days at 5-minute steps is 2,016 values of at most ~12 characters: 64 kB holds it with room.
MAX_FORECAST_BYTES = 64 * 1024
MAX_POINTS = 7 * 24 * 12
MAX_LOAD_KW = 100_000.0
# A clear, cold, bright day can push modules past their rating; beyond this share it is an error.
PV_OVER_PEAK = 1.5
# A forecast issued "in the future" by more than this is a clock or a time-zone mistake.
FUTURE_SLACK = timedelta(minutes=10)
MAX_SOURCE_CHARS = 40
KEYS = frozenset({"issued_at", "start", "step_minutes", "pv_kw", "load_kw", "source"})
MAX_ERRORS = 10


class ForecastRefused(ValueError):
    """The forecast is not taken; `errors` names each field (and index) at fault."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors[:MAX_ERRORS]
        super().__init__("; ".join(self.errors))


@dataclass(frozen=True, slots=True)
class ExternalForecast:
    issued_at: datetime
    start: datetime
    step_minutes: int
    pv_kw: tuple[float, ...] | None
    load_kw: tuple[float, ...] | None
    source: str = ""

    @property
    def end(self) -> datetime:
        points = len(self.pv_kw or self.load_kw or ())
        return self.start + timedelta(minutes=points * self.step_minutes)

    def value_at(self, quantity: str, when: datetime) -> float | None:
        """The forecast mean power (kW) of `quantity` ("pv_kw"/"load_kw") in the step holding `when`."""
        values = self.pv_kw if quantity == "pv_kw" else self.load_kw
        if values is None or when < self.start:
            return None
        index = int((when - self.start).total_seconds() // (self.step_minutes * 60))
        return values[index] if index < len(values) else None

    def fresh(self, now: datetime, max_age_h: float) -> bool:
        return timedelta(0) - FUTURE_SLACK <= now - self.issued_at <= timedelta(hours=max_age_h)


def _instant(body: dict[str, Any], key: str, errors: list[str]) -> datetime | None:
    value = body.get(key)
    if not isinstance(value, str) or len(value) > 40:
        errors.append(f"{key}: an ISO 8601 time with its UTC offset, e.g. 2026-07-06T05:00:00+08:00")
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        errors.append(f"{key}: {value[:40]!r} is not an ISO 8601 time")
        return None
    if when.tzinfo is None:
        errors.append(f"{key}: {value!r} has no UTC offset (+08:00 or Z); which instant is it?")
        return None
    return when


def _series(body: dict[str, Any], key: str, high_kw: float, errors: list[str]) -> tuple[float, ...] | None:
    if key not in body:
        return None
    values = body[key]
    if not isinstance(values, list):
        errors.append(f"{key}: expected a list of kW, got {json_type_name(values)}")
        return None
    if not 0 < len(values) <= MAX_POINTS:
        errors.append(f"{key}: {len(values)} values; 1 to {MAX_POINTS} are accepted")
        return None
    out: list[float] = []
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.append(f"{key}[{index}]: expected a number (kW), got {json_type_name(value)}")
        elif not math.isfinite(value) or not 0.0 <= value <= high_kw:
            errors.append(f"{key}[{index}]: {value!r} kW is outside 0 to {high_kw:g} kW")
        else:
            out.append(float(value))
            continue
        if len(errors) >= MAX_ERRORS:
            break
    return tuple(out) if len(out) == len(values) else None


def parse_forecast(raw: bytes, *, now: datetime, pv_peak_kw: float | None) -> ExternalForecast:
    """Decode and check one forecast; raises ForecastRefused naming every field at fault."""
    try:
        body = decode_json(raw, JsonLimits(max_bytes=MAX_FORECAST_BYTES, max_depth=3), what="forecast")
    except JsonRefused as err:
        raise ForecastRefused(err.errors) from None
    if not isinstance(body, dict):
        raise ForecastRefused([f"forecast: expected a JSON object, got {json_type_name(body)}"])
    errors: list[str] = []
    unknown = sorted(set(body) - KEYS)
    if unknown:
        errors.append(f"forecast: unknown keys {[k[:40] for k in unknown[:5]]}; expected {', '.join(sorted(KEYS))}")
    issued_at = _instant(body, "issued_at", errors)
    start = _instant(body, "start", errors)
    if issued_at is not None and issued_at - now > FUTURE_SLACK:
        errors.append(f"issued_at: {issued_at.isoformat()} is after the controller's clock ({now.isoformat()})")
    step = body.get("step_minutes")
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= 60 or 60 % step:
        errors.append("step_minutes: an integer that divides 60 (1, 5, 10, 15, 30, 60)")
        step = None
    source = body.get("source", "")
    if not isinstance(source, str) or len(source) > MAX_SOURCE_CHARS:
        errors.append(f"source: a string of at most {MAX_SOURCE_CHARS} characters")
        source = ""
    if "pv_kw" not in body and "load_kw" not in body:
        errors.append("pv_kw: missing; a forecast carries pv_kw, load_kw or both")
    pv_kw = None
    if "pv_kw" in body and pv_peak_kw is None:
        errors.append("pv_kw: this site has no PV")
    elif pv_peak_kw is not None:
        pv_kw = _series(body, "pv_kw", PV_OVER_PEAK * pv_peak_kw, errors)
    load_kw = _series(body, "load_kw", MAX_LOAD_KW, errors)
    if pv_kw is not None and load_kw is not None and len(pv_kw) != len(load_kw):
        errors.append(f"load_kw: {len(load_kw)} values, pv_kw has {len(pv_kw)}; both cover the same steps")
    if errors:
        raise ForecastRefused(errors)
    assert issued_at is not None
    assert start is not None
    assert isinstance(step, int)
    return ExternalForecast(issued_at, start, step, pv_kw, load_kw, source)
