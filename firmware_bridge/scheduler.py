"""Bus scheduling: poll each device on its period, serve setpoint writes first, skip lost devices."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from firmware_bridge.bus import Bus, Health
from firmware_bridge.device import DeviceDriver, Readings
from firmware_bridge.errors import BridgeError, DeviceException, PortError

__all__ = ["Measurement", "Poller", "WriteResult"]

_log = logging.getLogger(__name__)

# When nothing is due the poller sleeps at most this long, so a queued write waits no longer.
IDLE_WAIT_S = 0.05
# A port that cannot be opened is retried by the bus with back-off; the poller just does not spin.
PORT_DOWN_WAIT_S = 0.5


@dataclass(frozen=True, slots=True)
class Measurement:
    device: str
    values: Readings
    at_s: float  # monotonic clock of the poller
    health: Health


@dataclass(frozen=True, slots=True)
class WriteResult:
    device: str
    quantity: str
    value: float
    ok: bool
    error: str = ""


class Poller:
    """Drives one bus. Measurements and write results go to callbacks; it never blocks the caller."""

    def __init__(
        self,
        bus: Bus,
        drivers: list[DeviceDriver],
        periods_s: dict[str, float],
        on_measurement: Callable[[Measurement], None],
        on_write: Callable[[WriteResult], None] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bus = bus
        self.drivers = {d.name: d for d in drivers}
        self._periods = periods_s
        self._on_measurement = on_measurement
        self._on_write = on_write
        self._clock = clock
        self._due = dict.fromkeys(self.drivers, 0.0)
        self._cycles = dict.fromkeys(self.drivers, 0)
        # Latest value wins per (device, quantity): a stale setpoint is never worth sending.
        self._writes: dict[tuple[str, str], float] = {}
        self._wake = asyncio.Event()
        self.polls = dict.fromkeys(self.drivers, 0)

    def write(self, device: str, quantity: str, value: float) -> None:
        if device not in self.drivers:
            raise KeyError(f"bus {self.bus.name} has no device {device!r}")
        self._writes[(device, quantity)] = value
        self._wake.set()

    async def run(self) -> None:
        while True:
            if self._writes:
                await self._write_one()
                continue
            name = self._next_due()
            if name is None:
                await self._idle()
                continue
            await self._poll(name)

    def _next_due(self) -> str | None:
        now = self._clock()
        due = [(at, n) for n, at in self._due.items() if at <= now and self.bus.is_due(n)]
        return min(due)[1] if due else None

    async def _idle(self) -> None:
        now = self._clock()
        soonest = min((max(at, self.bus.health(n).retry_at) for n, at in self._due.items()), default=now + IDLE_WAIT_S)
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=min(max(soonest - now, 0.001), IDLE_WAIT_S))

    async def _poll(self, name: str) -> None:
        driver = self.drivers[name]
        self._due[name] = self._clock() + self._periods.get(name, 1.0)
        values: Readings = {}
        try:
            for exchange in driver.read_exchanges(self._cycles[name]):
                values.update(await self.bus.transact(exchange))
        except PortError:
            await asyncio.sleep(PORT_DOWN_WAIT_S)
        except DeviceException as err:
            _log.warning("device refused a read", extra={"device": name, "error": str(err)})
        except BridgeError as err:
            _log.debug("poll failed", extra={"device": name, "error": str(err)})
        self._cycles[name] += 1
        if values:
            self.polls[name] += 1
            self._on_measurement(Measurement(name, values, self._clock(), self.bus.health(name).state))

    async def _write_one(self) -> None:
        (device, quantity), value = next(iter(self._writes.items()))
        del self._writes[(device, quantity)]
        try:
            exchange = self.drivers[device].write_exchange(quantity, value)
            await self.bus.transact(exchange)
        except ValueError as err:
            result = WriteResult(device, quantity, value, ok=False, error=str(err))
        except BridgeError as err:
            result = WriteResult(device, quantity, value, ok=False, error=str(err))
            if isinstance(err, PortError):
                await asyncio.sleep(PORT_DOWN_WAIT_S)
        else:
            result = WriteResult(device, quantity, value, ok=True)
        if self._on_write is not None:
            self._on_write(result)
