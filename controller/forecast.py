"""Default forecasts: load from the recent days' profile per kind of day (working day, vacation, weekend,
holiday: controller.day_kinds), PV from the arrays' clear-sky curve (controller.clear_sky) scaled by
recent yield; an external forecast (controller.external_forecast) replaces either while it is fresh.

Deliberately simple and honest: it sees only what the meters measured, never the simulator's truth.
Replaceable: the runtime needs only `observe`, `load_kw` and `pv_kw`.
"""

from __future__ import annotations

import math
from collections import deque
from datetime import date, datetime, timedelta
from typing import Any

from config import SiteConfig
from controller import clear_sky
from controller.day_kinds import FALLBACK, DayKind, SiteCalendar
from controller.external_forecast import ExternalForecast

__all__ = ["Forecaster", "clear_sky_kw"]

# How fast the per-slot profile forgets: a new day counts this much against the old average.
PROFILE_WEIGHT = 0.3
# The yield ratio (measured / clear sky) is taken over this many recent observations in sun.
YIELD_WINDOW = 900
# Day-ahead, the last quarter hour's yield says little of tomorrow's sky: the ratio leans, with the lead
# time, from the recent one to the mean of the last few whole days (a day-ahead forecast from the days
# before). At a lead of LEAD_DECAY_H the recent ratio still has 1/e of the weight.
DAILY_YIELD_DAYS = 3
LEAD_DECAY_H = 3.0
# The low PV forecast (`pv_low_kw`) expects the worst whole day of the last LOW_YIELD_DAYS: a week holds a
# rainy day in the wet season, and a sunny dry season lets the low forecast rise with it.
LOW_YIELD_DAYS = 7
# A kind of day is known once the profile holds this share of its slots; before that, plans built
# on the fallback (the recent mean load) are not trusted with the battery.
KNOWN_DAY_SHARE = 0.9


def clear_sky_kw(peak_kw: float, local: datetime) -> float:
    """The fixed southern-China curve (sites without arrays); kept for callers of earlier versions."""
    return clear_sky.legacy_curve_kw(peak_kw, local)


class Forecaster:
    def __init__(self, site: SiteConfig, slot_minutes: int) -> None:
        self._pv = site.pv
        self._peak_kw = site.pv.peak_kw if site.pv else 0.0
        self._lat_deg, self._lon_deg = site.site.latitude_deg, site.site.longitude_deg
        self._slot_minutes = slot_minutes
        self.calendar = SiteCalendar(site.calendar)
        self._profile: dict[tuple[DayKind, int], float] = {}  # (kind of day, slot of day) -> kW
        self._known_slots = dict.fromkeys(DayKind, 0)  # profile slots per kind of day (asked every tick)
        self._slot_sum: dict[tuple[DayKind, int], tuple[float, int]] = {}
        self._recent_load: deque[float] = deque(maxlen=3600)
        self._yield: deque[tuple[float, float]] = deque(maxlen=YIELD_WINDOW)
        # The window's sums, kept as it moves (asked every tick), summed afresh at each full turn.
        self._yield_pv_kw = self._yield_sky_kw = 0.0
        self._yield_added = 0
        self._day_yield: dict[date, tuple[float, float]] = {}  # day -> (measured, clear sky) sums of its yield
        # The latest external forecast taken (file or MQTT), and how old it may be to be used.
        self.external: ExternalForecast | None = None
        self.external_max_age_h = site.forecast.external_max_age_h

    def sky_kw(self, local: datetime) -> float:
        return clear_sky.clear_sky_kw(self._pv, self._lat_deg, self._lon_deg, local)

    def _key(self, local: datetime) -> tuple[DayKind, int]:
        return self.calendar.kind(local.date()), (local.hour * 60 + local.minute) // self._slot_minutes

    def observe(self, local: datetime, load_kw: float, pv_kw: float, pv_limited: bool) -> None:
        """One reading: `load_kw` is the building's own (EV charging already taken out by the caller).
        `pv_limited`: PV was held back by its limit, so the sun gave at least `pv_kw`."""
        key = self._key(local)
        total, count = self._slot_sum.get(key, (0.0, 0))
        self._slot_sum[key] = (total + max(load_kw, 0.0), count + 1)
        # When a slot is over, fold its mean into the profile.
        for other in [k for k in self._slot_sum if k != key]:
            total, count = self._slot_sum.pop(other)
            mean = total / count
            old = self._profile.get(other)
            if old is None:
                self._known_slots[other[0]] += 1
            self._profile[other] = mean if old is None else (1 - PROFILE_WEIGHT) * old + PROFILE_WEIGHT * mean
        self._recent_load.append(max(load_kw, 0.0))
        sky = self.sky_kw(local)
        if sky > 0.1 * self._peak_kw:
            if pv_limited:
                # Held back, PV says only that the sun gave at least this much: it counts at the yield
                # believed now unless it shows more. Left out, only the moments a cloud brought PV under
                # the limit were counted, and a sunny day at zero export was learned as a cloudy one.
                pv_kw = max(pv_kw, self.yield_ratio() * sky)
            self._add_yield(pv_kw, sky)
            day = local.date()
            measured, clear = self._day_yield.get(day, (0.0, 0.0))
            self._day_yield[day] = (measured + pv_kw, clear + sky)
            if len(self._day_yield) > LOW_YIELD_DAYS + 1:
                del self._day_yield[min(self._day_yield)]

    def _add_yield(self, pv_kw: float, sky_kw: float) -> None:
        window = self._yield
        if len(window) == window.maxlen:
            old_pv_kw, old_sky_kw = window[0]
            self._yield_pv_kw -= old_pv_kw
            self._yield_sky_kw -= old_sky_kw
        window.append((pv_kw, sky_kw))
        self._yield_pv_kw += pv_kw
        self._yield_sky_kw += sky_kw
        self._yield_added += 1
        if self._yield_added >= YIELD_WINDOW:  # no rounding carried beyond one turn of the window
            self._resum_yield()

    def _resum_yield(self) -> None:
        self._yield_pv_kw = sum(p for p, _ in self._yield)
        self._yield_sky_kw = sum(s for _, s in self._yield)
        self._yield_added = 0

    def to_json(self) -> dict[str, Any]:
        """What was learned, for the state file: a restart must not begin from a cold forecast."""
        return {
            "slot_minutes": self._slot_minutes,
            "profile": {f"{kind}:{slot}": kw for (kind, slot), kw in self._profile.items()},
            "yield": [list(pair) for pair in self._yield],
            "day_yield": {day.isoformat(): list(sums) for day, sums in self._day_yield.items()},
        }

    def restore(self, body: dict[str, Any]) -> None:
        """Take back what `to_json` saved; raises ValueError (or KeyError/TypeError) on a damaged body.
        A file of earlier versions keys days 1 (school day) and 0 (not): working day and weekend."""
        if int(body["slot_minutes"]) != self._slot_minutes:
            raise ValueError("saved with another step length")
        profile: dict[tuple[DayKind, int], float] = {}
        for key, kw in body["profile"].items():
            kind, slot = str(key).split(":")
            value = float(kw)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"profile {key}: {kw!r}")
            day = {"1": DayKind.WORKDAY, "0": DayKind.REST}.get(kind) or DayKind(kind)
            profile[(day, int(slot))] = value
        pairs = [(float(p), float(s)) for p, s in body["yield"]]
        self._profile = profile
        self._known_slots = {kind: sum(1 for day, _ in profile if day == kind) for kind in DayKind}
        days = {date.fromisoformat(str(d)): (float(m), float(c)) for d, (m, c) in body.get("day_yield", {}).items()}
        if any(not (math.isfinite(m) and math.isfinite(c)) or m < 0 or c < 0 for m, c in days.values()):
            raise ValueError("day_yield: negative or not finite")
        self._yield.clear()
        self._yield.extend(pairs[-YIELD_WINDOW:])
        self._resum_yield()
        self._day_yield = dict(sorted(days.items())[-(LOW_YIELD_DAYS + 1):])

    def _learned_kind(self, kind: DayKind, share: float) -> DayKind | None:
        """This kind if its profile is known, else its fallback's if that is."""
        slots = 24 * 60 // self._slot_minutes
        fallback = FALLBACK[kind]
        for candidate in (kind, fallback):
            if candidate is not None and self._known_slots[candidate] >= share * slots:
                return candidate
        return None

    def knows_day(self, local: datetime, share: float = KNOWN_DAY_SHARE) -> bool:
        """Whether the load profile covers this kind of day (or the kind it falls back to) well enough to plan on."""
        return self._learned_kind(self.calendar.kind(local.date()), share) is not None

    def yield_ratio(self) -> float:
        measured, sky = self._yield_pv_kw, self._yield_sky_kw
        return min(1.2, measured / sky) if sky > 0 else 0.8

    def _external(self, quantity: str, local: datetime, now: datetime | None) -> float | None:
        forecast = self.external
        if forecast is None or not forecast.fresh(now or local, self.external_max_age_h):
            return None
        return forecast.value_at(quantity, local)

    def own_load_kw(self, start: datetime, steps: int, step_minutes: int) -> list[float]:
        fallback = sum(self._recent_load) / len(self._recent_load) if self._recent_load else 0.0
        out = []
        for step in range(steps):
            local = start + timedelta(minutes=step * step_minutes)
            kind, slot = self._key(local)
            learned = self._learned_kind(kind, KNOWN_DAY_SHARE) or kind
            value = self._profile.get((learned, slot))
            fallback_kind = FALLBACK[kind]
            if value is None and fallback_kind is not None:
                value = self._profile.get((fallback_kind, slot))
            out.append(max(0.0, fallback if value is None else value))
        return out

    def days_yield_ratio(self, before: date) -> float | None:
        """Measured over clear sky across the last DAILY_YIELD_DAYS whole days before `before` (None: none yet)."""
        days = [sums for day, sums in self._day_yield.items() if day < before][-DAILY_YIELD_DAYS:]
        clear = sum(c for _, c in days)
        return min(1.2, sum(m for m, _ in days) / clear) if clear > 0 else None

    def low_days_yield_ratio(self, before: date) -> float | None:
        """The lowest day's measured over clear sky among the last LOW_YIELD_DAYS whole days before `before`."""
        days = [sums for day, sums in self._day_yield.items() if day < before][-LOW_YIELD_DAYS:]
        ratios = [measured / clear for measured, clear in days if clear > 0]
        return min(1.2, *ratios) if ratios else None

    def own_pv_kw(self, start: datetime, steps: int, step_minutes: int, now: datetime | None = None,
                  *, low: bool = False) -> list[float]:  # fmt: skip
        recent = self.yield_ratio()
        at = now or start
        days = self.low_days_yield_ratio(at.date()) if low else self.days_yield_ratio(at.date())
        out = []
        for step in range(steps):
            middle = start + timedelta(minutes=(step + 0.5) * step_minutes)
            ratio = recent
            if days is not None:
                weight = math.exp(-max(0.0, (middle - at).total_seconds() / 3600) / LEAD_DECAY_H)
                ratio = weight * recent + (1 - weight) * days
            out.append(self.sky_kw(middle) * ratio)
        return out

    def load_kw(self, start: datetime, steps: int, step_minutes: int, now: datetime | None = None) -> list[float]:
        """The plan's load: an external forecast's where it is fresh and covers the step, the own otherwise."""
        own = self.own_load_kw(start, steps, step_minutes)
        return self._merge("load_kw", own, start, step_minutes, now)

    def pv_kw(self, start: datetime, steps: int, step_minutes: int, now: datetime | None = None) -> list[float]:
        own = self.own_pv_kw(start, steps, step_minutes, now)
        return self._merge("pv_kw", own, start, step_minutes, now)

    def pv_low_kw(self, start: datetime, steps: int, step_minutes: int, now: datetime | None = None) -> list[float]:
        """PV on a day as poor as the worst of the last week (the near term still from the recent yield):
        what a plan may count on where too little sun would cost more than too much. A fresh external
        forecast is taken as it is: it has seen the weather coming, the days before have not."""
        own = self.own_pv_kw(start, steps, step_minutes, now, low=True)
        return self._merge("pv_kw", own, start, step_minutes, now)

    def _merge(self, quantity: str, own: list[float], start: datetime, step_minutes: int,
               now: datetime | None) -> list[float]:  # fmt: skip
        if self.external is None:
            return own
        out = []
        for step, value in enumerate(own):
            middle = start + timedelta(minutes=(step + 0.5) * step_minutes)
            external = self._external(quantity, middle, now or start)
            out.append(value if external is None else external)
        return out
