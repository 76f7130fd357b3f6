"""One RS-485 port and the devices on it: one transaction at a time, retries, health and back-off."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from config import BusProtocol, SerialBusConfig
from firmware_bridge.device import Exchange, Readings
from firmware_bridge.errors import BridgeError, DeviceException, DeviceTimeout, FrameError, PortError
from firmware_bridge.transport import Link, bits_per_character

__all__ = ["Bus", "BusStats", "DeviceHealth", "Health"]

_log = logging.getLogger(__name__)

# A device is degraded after one failed transaction and lost after this many in a row.
LOST_AFTER_FAILURES = 3
# A lost device is tried again after this back-off, doubling to the cap, so one dead meter costs
# one timeout every few seconds instead of one per poll and cannot starve the other devices.
LOST_BACKOFF_INITIAL_S = 2.0
LOST_BACKOFF_MAX_S = 60.0
# With no success on any device for this many transactions the port itself is suspect: reopen it.
REOPEN_AFTER_BUS_FAILURES = 8
REOPEN_BACKOFF_INITIAL_S = 1.0
REOPEN_BACKOFF_MAX_S = 30.0
# Modbus silent interval t3.5 is fixed at 1.75 ms above 19200 baud (spec); below that, 3.5 characters.
T35_FIXED_S = 0.00175


class _PortDown(PortError):
    """The port is closed and its reopen back-off has not run out."""


class _OpenFailed(PortError):
    """Reopening the port failed (already counted in the back-off)."""


class Health(StrEnum):
    OK = "ok"
    DEGRADED = "degraded"
    LOST = "lost"


@dataclass(slots=True)
class DeviceHealth:
    state: Health = Health.OK
    consecutive_failures: int = 0
    last_ok_at: float | None = None
    retry_at: float = 0.0  # while lost: when the next attempt is allowed
    backoff_s: float = LOST_BACKOFF_INITIAL_S
    last_error: str = ""


@dataclass(slots=True)
class BusStats:
    transactions: int = 0
    ok: int = 0
    timeouts: int = 0
    bad_frames: int = 0
    refused: int = 0
    retries: int = 0
    reopens: int = 0
    bytes_discarded: int = 0


class Bus:
    """Owns one link. `transact` is the only way bytes reach the port, so ordering is guaranteed."""

    def __init__(
        self,
        config: SerialBusConfig,
        link: Link,
        *,
        clock: Callable[[], float] = time.monotonic,
        line_timing: bool = True,
        health_clock: Callable[[], float] | None = None,
    ) -> None:
        """`clock` times transactions (bytes on a wire: real time). `health_clock` times the back-off of
        lost devices and of the port (the controller's time, simulated or real; default `clock`).
        `line_timing=False`: a simulated line with no wire time, where Modbus silent intervals mean nothing."""
        self.config = config
        self.name = config.name
        self._link = link
        self._clock = clock
        self._health_clock = health_clock or clock
        self._lock = asyncio.Lock()
        self._health: dict[str, DeviceHealth] = {}
        self._bus_failures = 0
        self._reopen_at = 0.0
        self._reopen_backoff_s = REOPEN_BACKOFF_INITIAL_S
        self._quiet_until = 0.0
        self.stats = BusStats()
        char_s = bits_per_character(config) / config.baud_rate
        self._char_s = char_s
        self._silent_s = T35_FIXED_S if config.baud_rate > 19200 else 3.5 * char_s
        if config.protocol is BusProtocol.DLT645 or not line_timing:
            self._silent_s = 0.0  # DL/T 645 frames are delimited; a pty without wire time has no gaps

    # --- lifetime ---------------------------------------------------------------------------------

    async def __aenter__(self) -> Bus:
        try:
            await self._link.open()
        except PortError as err:
            # The bus still starts: transactions fail fast and the port is retried with back-off.
            self._note_port_failure(err)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._link.close()

    # --- health -----------------------------------------------------------------------------------

    def health(self, device: str) -> DeviceHealth:
        return self._health.setdefault(device, DeviceHealth())

    def is_due(self, device: str) -> bool:
        """False while a lost device is backing off: callers skip it this round."""
        health = self.health(device)
        return health.state is not Health.LOST or self._health_clock() >= health.retry_at

    def _succeeded(self, device: str) -> None:
        health = self.health(device)
        if health.state is not Health.OK:
            _log.info("device recovered", extra={"bus": self.name, "device": device})
        health.state = Health.OK
        health.consecutive_failures = 0
        health.backoff_s = LOST_BACKOFF_INITIAL_S
        health.last_ok_at = self._health_clock()
        self._bus_failures = 0
        self._reopen_backoff_s = REOPEN_BACKOFF_INITIAL_S

    def _failed(self, device: str, error: BridgeError) -> None:
        health = self.health(device)
        health.consecutive_failures += 1
        health.last_error = str(error)
        if health.consecutive_failures >= LOST_AFTER_FAILURES:
            if health.state is not Health.LOST:
                _log.warning("device lost", extra={"bus": self.name, "device": device, "error": str(error)})
            else:
                health.backoff_s = min(health.backoff_s * 2, LOST_BACKOFF_MAX_S)
            health.state = Health.LOST
            # Jitter keeps several dead devices from lining up on the same poll.
            health.retry_at = self._health_clock() + health.backoff_s * random.uniform(0.8, 1.2)
        else:
            health.state = Health.DEGRADED

    def _note_port_failure(self, error: BridgeError) -> None:
        self._reopen_at = self._health_clock() + self._reopen_backoff_s
        self._reopen_backoff_s = min(self._reopen_backoff_s * 2, REOPEN_BACKOFF_MAX_S)
        _log.warning("serial port failure", extra={"bus": self.name, "error": str(error)})

    async def _ensure_open(self) -> None:
        if self._link.is_open:
            return
        if self._health_clock() < self._reopen_at:
            wait_s = self._reopen_at - self._health_clock()
            raise _PortDown(f"bus {self.name}: port closed, next reopen in {wait_s:.1f} s")
        self.stats.reopens += 1
        await self._link.close()
        try:
            await self._link.open()
        except PortError as err:
            self._note_port_failure(err)
            raise _OpenFailed(str(err)) from err

    # --- transactions -----------------------------------------------------------------------------

    def reply_budget_s(self, exchange: Exchange) -> float:
        """Wire time of request and reply plus the configured response timeout."""
        wire = (len(exchange.request) + exchange.expected_reply_bytes) * self._char_s
        return wire + self.config.response_timeout_s

    async def transact(self, exchange: Exchange, *, attempts: int | None = None) -> Readings:
        """Run one exchange (with the bus's retries) and return what the device reported.

        A degraded or lost device gets a single attempt: retries are for one-off glitches, and a
        device that already failed its last transaction would only spend the other devices' time.
        DeviceException is returned at once: the device is
        alive and said no, and asking again will not change its mind.
        """
        health = self.health(exchange.device)
        if attempts is None:
            attempts = 1 if health.state is not Health.OK else 1 + self.config.retries
        async with self._lock:
            last: BridgeError = DeviceTimeout(f"{exchange.device}: no attempt made")
            for attempt in range(attempts):
                if attempt:
                    self.stats.retries += 1
                try:
                    readings = await self._attempt(exchange)
                except DeviceException:
                    self.stats.refused += 1
                    self._succeeded(exchange.device)  # it answered: the link and device are alive
                    raise
                except _PortDown:
                    raise  # still backing off: nothing new happened, so the back-off stays as it is
                except PortError as err:
                    self._failed(exchange.device, err)
                    if self._link.is_open or not isinstance(err, _OpenFailed):
                        self._note_port_failure(err)
                    await self._link.close()
                    raise
                except (DeviceTimeout, FrameError) as err:
                    last = err
                    self._bus_failures += 1
                    continue
                self.stats.ok += 1
                self._succeeded(exchange.device)
                return readings
            self._failed(exchange.device, last)
            if self._bus_failures >= REOPEN_AFTER_BUS_FAILURES:
                _log.warning("no device answers: reopening port", extra={"bus": self.name})
                self._bus_failures = 0
                await self._link.close()
            raise last

    async def _attempt(self, exchange: Exchange) -> Readings:
        await self._ensure_open()
        self.stats.transactions += 1
        wait_s = self._quiet_until - self._clock()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        self.stats.bytes_discarded += self._link.discard()
        await self._link.write(exchange.request)
        deadline = self._clock() + self.reply_budget_s(exchange)
        buffer = b""
        echo_pending = self.config.adapter_echo
        try:
            while True:
                remaining = deadline - self._clock()
                if remaining <= 0 or not await self._link.wait_for_data(remaining):
                    self.stats.timeouts += 1
                    raise DeviceTimeout(
                        f"{exchange.device}: no reply to {exchange.description} within "
                        f"{self.reply_budget_s(exchange) * 1000:.0f} ms ({len(buffer)} bytes received)"
                    )
                buffer += self._link.take()
                if echo_pending:
                    if len(buffer) < len(exchange.request) and exchange.request.startswith(buffer):
                        continue
                    if buffer.startswith(exchange.request):
                        buffer = buffer[len(exchange.request) :]
                    echo_pending = False
                consumed, reply, skipped = exchange.decode(buffer)
                if skipped:
                    self.stats.bad_frames += len(skipped)
                    _log.debug(
                        "skipped bytes on the bus",
                        extra={"bus": self.name, "device": exchange.device, "why": str(skipped[0])},
                    )
                if reply is None:
                    buffer = buffer[consumed:]
                    continue
                try:
                    return exchange.interpret(reply)
                except FrameError:
                    self.stats.bad_frames += 1
                    raise
        finally:
            self._quiet_until = self._clock() + self._silent_s
