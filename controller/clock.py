"""Injected time: the runtime asks a Clock, never the system, so it runs in real or simulated time."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Protocol

__all__ = ["Clock", "RealClock", "SimClock"]


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the run started (monotonic)."""

    def local(self) -> datetime:
        """Local wall-clock time of the site (tariffs and profiles go by it)."""

    async def sleep_until(self, at_s: float) -> None: ...

    def lateness(self, at_s: float) -> float:
        """How late, in seconds, `now` is against a deadline (tick jitter)."""


class RealClock:
    def __init__(self, start_local: datetime) -> None:
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        self._start = start_local

    def now(self) -> float:
        return self._loop.time() - self._t0

    def local(self) -> datetime:
        return self._start + timedelta(seconds=self.now())

    async def sleep_until(self, at_s: float) -> None:
        await asyncio.sleep(max(0.0, at_s - self.now()))

    def lateness(self, at_s: float) -> float:
        return self.now() - at_s


class SimClock:
    """Simulated time: `speed` simulated seconds per wall second, or as fast as possible (None)."""

    def __init__(self, start_local: datetime, speed: float | None) -> None:
        self._start = start_local
        self._speed = speed
        self._now = 0.0
        self._loop = asyncio.get_running_loop()
        self._wall_lateness = 0.0

    def now(self) -> float:
        return self._now

    def local(self) -> datetime:
        return self._start + timedelta(seconds=self._now)

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
