"""Injected time: the runtime asks a Clock, never the system, so it runs in real or simulated time."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from typing import Protocol

__all__ = ["Clock", "RealClock", "SimClock", "clock_plausible"]

# A box without a real-time clock boots in 1970 (or its image's build year) until NTP answers: before
# this year no tariff, profile or month peak can be trusted to the wall clock.
PLAUSIBLE_FROM_YEAR = 2024
# The wall clock moving this much more or less than the monotonic clock between two looks is a step
# (NTP, an operator, DST is not one: local times are zone-aware).
CLOCK_STEP_TOLERANCE_S = 2.0


def clock_plausible(local: datetime) -> bool:
    return local.year >= PLAUSIBLE_FROM_YEAR


_log = logging.getLogger(__name__)


class Clock(Protocol):
    realtime: bool  # True: a real plant's wall time (slow work goes to threads); False: simulated

    def now(self) -> float:
        """Seconds since the run started (monotonic)."""

    def local(self) -> datetime:
        """Local wall-clock time of the site (tariffs and profiles go by it)."""

    async def sleep_until(self, at_s: float) -> None: ...

    def lateness(self, at_s: float) -> float:
        """How late, in seconds, `now` is against a deadline (tick jitter)."""


class RealClock:
    """The wall clock, read every time it is asked (a DST change or an NTP step is seen at once), and the
    monotonic clock for intervals. A step between two reads is logged."""

    realtime = True

    def __init__(self, start_local: datetime) -> None:
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        self._zone = start_local.tzinfo
        self._last: tuple[float, datetime] | None = None
        self.steps = 0  # wall-clock steps seen

    def now(self) -> float:
        return self._loop.time() - self._t0

    def local(self) -> datetime:
        mono, wall = self.now(), datetime.now(self._zone)
        if self._last is not None:
            step_s = (wall - self._last[1]).total_seconds() - (mono - self._last[0])
            if abs(step_s) > CLOCK_STEP_TOLERANCE_S:
                self.steps += 1
                _log.warning("wall clock stepped", extra={"step_s": round(step_s, 3), "now": wall.isoformat(),
                                                          "plausible": clock_plausible(wall)})  # fmt: skip
        self._last = (mono, wall)
        return wall

    async def sleep_until(self, at_s: float) -> None:
        await asyncio.sleep(max(0.0, at_s - self.now()))

    def lateness(self, at_s: float) -> float:
        return self.now() - at_s


class SimClock:
    """Simulated time: `speed` simulated seconds per wall second, or as fast as possible (None)."""

    realtime = False

    def __init__(self, start_local: datetime, speed: float | None) -> None:
        self._start = start_local
        self._speed = speed
        self._now = 0.0
        self._loop = asyncio.get_running_loop()
        self._wall_lateness = 0.0
        self._local = (self._now, start_local)

    def now(self) -> float:
        return self._now

    def local(self) -> datetime:
        local = self._local
        if local[0] != self._now:  # asked several times a tick: one datetime per simulated second
            local = self._local = (self._now, self._start + timedelta(seconds=self._now))
        return local[1]

    async def sleep_until(self, at_s: float) -> None:
        if self._speed is None:
            await asyncio.sleep(0)  # let the pollers and the planner run between ticks
        else:
            wall_due = self._loop.time() + max(0.0, at_s - self._now) / self._speed
            await asyncio.sleep(max(0.0, wall_due - self._loop.time()))
            self._wall_lateness = self._loop.time() - wall_due
        self._now = max(self._now, at_s)

    def lateness(self, at_s: float) -> float:
        return self._wall_lateness * (self._speed or 0.0)
