"""Default forecasts: load from the recent days' profile, PV from a clear-sky curve scaled by recent yield.

Deliberately simple and honest: it sees only what the meters measured, never the simulator's truth.
Replaceable: the runtime needs only `observe`, `load_kw` and `pv_kw`.
"""

from __future__ import annotations

import math
from collections import deque
from datetime import datetime, timedelta
from typing import Any

from config import SiteConfig

__all__ = ["Forecaster", "clear_sky_kw"]

# How fast the per-slot profile forgets: a new day counts this much against the old average.
PROFILE_WEIGHT = 0.3
# The yield ratio (measured / clear sky) is taken over this many recent observations in sun.
YIELD_WINDOW = 900
# A kind of day is known once the profile holds this share of its slots; before that, plans built
# on the fallback (the recent mean load) are not trusted with the battery.
KNOWN_DAY_SHARE = 0.9


def clear_sky_kw(peak_kw: float, local: datetime) -> float:
    """A plain clear-sky shape for southern China (sunrise ~06:10, sunset ~18:50)."""
    hour = local.hour + local.minute / 60 + local.second / 3600
    return float(peak_kw * max(0.0, math.sin(math.pi * (hour - 6.2) / 12.6)) ** 1.3)


class Forecaster:
    def __init__(self, site: SiteConfig, slot_minutes: int) -> None:
        self._peak_kw = site.pv.peak_kw if site.pv else 0.0
        self._slot_minutes = slot_minutes
        self._profile: dict[tuple[bool, int], float] = {}  # (school day?, slot of day) -> kW
        self._known_slots = {True: 0, False: 0}  # profile slots per kind of day (asked every tick)
        self._slot_sum: dict[tuple[bool, int], tuple[float, int]] = {}
        self._recent_load: deque[float] = deque(maxlen=3600)
        self._yield: deque[tuple[float, float]] = deque(maxlen=YIELD_WINDOW)

    def _key(self, local: datetime) -> tuple[bool, int]:
        return local.weekday() < 5, (local.hour * 60 + local.minute) // self._slot_minutes

    def observe(self, local: datetime, load_kw: float, pv_kw: float, pv_limited: bool) -> None:
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
        sky = clear_sky_kw(self._peak_kw, local)
        if sky > 0.1 * self._peak_kw and not pv_limited:  # a curtailed inverter says nothing of the sun
            self._yield.append((pv_kw, sky))

    def to_json(self) -> dict[str, Any]:
        """What was learned, for the state file: a restart must not begin from a cold forecast."""
        return {
            "slot_minutes": self._slot_minutes,
            "profile": {f"{int(school)}:{slot}": kw for (school, slot), kw in self._profile.items()},
            "yield": [list(pair) for pair in self._yield],
        }

    def restore(self, body: dict[str, Any]) -> None:
        """Take back what `to_json` saved; raises ValueError (or KeyError/TypeError) on a damaged body."""
        if int(body["slot_minutes"]) != self._slot_minutes:
            raise ValueError("saved with another step length")
        profile: dict[tuple[bool, int], float] = {}
        for key, kw in body["profile"].items():
            school, slot = str(key).split(":")
            value = float(kw)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"profile {key}: {kw!r}")
            profile[(school == "1", int(slot))] = value
        pairs = [(float(p), float(s)) for p, s in body["yield"]]
        self._profile = profile
        self._known_slots = {school: sum(1 for day, _ in profile if day == school) for school in (True, False)}
        self._yield.clear()
        self._yield.extend(pairs[-YIELD_WINDOW:])

    def knows_day(self, local: datetime, share: float = KNOWN_DAY_SHARE) -> bool:
        """Whether the load profile covers this kind of day (school day or not) well enough to plan on."""
        slots = 24 * 60 // self._slot_minutes
        return self._known_slots[local.weekday() < 5] >= share * slots

    def yield_ratio(self) -> float:
        measured = sum(p for p, _ in self._yield)
        sky = sum(s for _, s in self._yield)
        return min(1.2, measured / sky) if sky > 0 else 0.8

    def load_kw(self, start: datetime, steps: int, step_minutes: int) -> list[float]:
        fallback = sum(self._recent_load) / len(self._recent_load) if self._recent_load else 0.0
        out = []
        for step in range(steps):
            local = start + timedelta(minutes=step * step_minutes)
            out.append(max(0.0, self._profile.get(self._key(local), fallback)))
        return out

    def pv_kw(self, start: datetime, steps: int, step_minutes: int) -> list[float]:
        ratio = self.yield_ratio()
        return [
            clear_sky_kw(self._peak_kw, start + timedelta(minutes=(step + 0.5) * step_minutes)) * ratio
            for step in range(steps)
        ]
