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
from firmware_bridge.errors import BridgeError, DeviceException, DeviceLost, DeviceTimeout, FrameError, PortError
from firmware_bridge.transport import Link, bits_per_character

__all__ = ["Bus", "BusStats", "DeviceHealth", "Health", "PortHealth"]

_log = logging.getLogger(__name__)

# A device is degraded after one failed transaction and lost after this many in a row.
LOST_AFTER_FAILURES = 3
# A lost device is asked again this long after its last attempt began, no longer (no doubling): a meter
# that answers again is then read within LOST_RETRY_S plus one tick, <= 3 s with 1 s ticks (a 30 s
# outage used to end ~10 s late at a 60 s cap, the site in safe state meanwhile). The price is one
# timeout per dead device every 1.6-2 s, not one per poll: at 9600 baud and a 0.3 s timeout an SDM630
# power read costs 0.36 s of bus time per attempt (~20 %), a DL/T 645 power read at 2400 baud and
# 0.6 s about 0.76 s (~40 %); `python -m firmware_bridge.bench` prints both from the real exchanges.
LOST_RETRY_S = 2.0
# Each retry is drawn from (1 - jitter .. 1) x LOST_RETRY_S, never above it: several dead devices do not
# line up on the same tick, and the recovery bound above still holds.
LOST_RETRY_JITTER = 0.2
# The longest a lost device waits between attempts (the HIL harness bounds recovery with it).
LOST_BACKOFF_MAX_S = LOST_RETRY_S
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
    last_error: str = ""
    # Times it answered again after failing (degraded or lost -> ok). A device that was away may have
    # rebooted with its defaults: a caller that configured it (a watchdog) does so again when this moves.
    recoveries: int = 0


@dataclass(slots=True)
class PortHealth:
    """The serial port itself: its failures are its own, never charged to the device being polled."""

    is_open: bool = False
    consecutive_failures: int = 0  # open/write failures since the last transaction a device answered
    retry_at: float = 0.0  # while closed: when the next reopen is allowed
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
    port_failures: int = 0  # the port could not be opened, vanished or failed a write
    skipped_lost: int = 0  # transactions refused at once because their device is lost and not yet due


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
        reopen_after_failures: int | None = REOPEN_AFTER_BUS_FAILURES,
    ) -> None:
        """`clock` times transactions (bytes on a wire: real time). `health_clock` times the back-off of
        lost devices and of the port (the controller's time, simulated or real; default `clock`).
        `line_timing=False`: a simulated line with no wire time, where Modbus silent intervals mean nothing.
        `reopen_after_failures=None`: never reopen the port because nobody answers (a bus scan, where
        most addresses are silent by design)."""
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
        self._port_failures = 0
        self._port_error = ""
        self._quiet_until = 0.0
        self._reopen_after_failures = reopen_after_failures
        self.stats = BusStats()
        char_s = bits_per_character(config) / config.baud_rate
        self._char_s = char_s
        self._silent_s = T35_FIXED_S if config.baud_rate > 19200 else 3.5 * char_s
        if config.protocol is BusProtocol.DLT645 or not line_timing:
            self._silent_s = 0.0  # DL/T 645 frames are delimited; a pty without wire time has no gaps

    @property
    def silent_interval_s(self) -> float:
        """The quiet time kept on the line after each transaction (Modbus t3.5; 0 for DL/T 645)."""
        return self._silent_s

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
        health = self._health.get(device)
        if health is None:  # not setdefault: that builds a DeviceHealth on every call, a few per device a tick
            health = self._health[device] = DeviceHealth()
        return health

    def port_health(self) -> PortHealth:
        return PortHealth(
            is_open=self._link.is_open,
            consecutive_failures=self._port_failures,
            retry_at=self._reopen_at,
            last_error=self._port_error,
        )

    def is_due(self, device: str) -> bool:
        """False while a lost device waits for its next attempt: callers skip it this round."""
        health = self.health(device)
        return health.state is not Health.LOST or self._health_clock() >= health.retry_at

    def _succeeded(self, device: str, health: DeviceHealth) -> None:
        if health.state is not Health.OK:
            health.recoveries += 1
            _log.info("device recovered", extra={"bus": self.name, "device": device})
        health.state = Health.OK
        health.consecutive_failures = 0
        health.last_ok_at = self._health_clock()
        self._bus_failures = 0
        self._port_failures = 0
        self._reopen_backoff_s = REOPEN_BACKOFF_INITIAL_S

    def _failed(self, device: str, error: BridgeError, attempt_started_at: float) -> None:
        health = self.health(device)
        health.consecutive_failures += 1
        health.last_error = str(error)
        if health.consecutive_failures >= LOST_AFTER_FAILURES:
            if health.state is not Health.LOST:
                _log.warning("device lost", extra={"bus": self.name, "device": device, "error": str(error)})
            health.state = Health.LOST
            # From the start of the attempt, so the time a timeout took does not push the next one out.
            jitter = random.uniform(1.0 - LOST_RETRY_JITTER, 1.0)
            health.retry_at = attempt_started_at + LOST_RETRY_S * jitter
        else:
            health.state = Health.DEGRADED

    def _note_port_failure(self, error: BridgeError) -> None:
        self._reopen_at = self._health_clock() + self._reopen_backoff_s
        self._reopen_backoff_s = min(self._reopen_backoff_s * 2, REOPEN_BACKOFF_MAX_S)
        self._port_failures += 1
        self._port_error = str(error)
        self.stats.port_failures += 1
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

    async def transact(
        self, exchange: Exchange, *, attempts: int | None = None, even_if_lost: bool = False
    ) -> Readings:
        """Run one exchange (with the bus's retries) and return what the device reported.

        A degraded or lost device gets a single attempt: retries are for one-off glitches, and a
        device that already failed its last transaction would only spend the other devices' time.
        A lost device that is not due (`is_due`) is not asked at all: DeviceLost at once, reads and
        writes alike, so a dead device costs one timeout per LOST_RETRY_S whoever calls
        (`even_if_lost=True` asks anyway, e.g. for the last writes on the way out).
        DeviceException is returned at once: the device is alive and said no, and asking again
        will not change its mind. A PortError is the port's: the device's health is left alone.
        """
        health = self.health(exchange.device)
        async with self._lock:
            # Checked under the lock: a caller that queued behind the attempt that found the device
            # dead is refused instead of spending another timeout on it.
            if not even_if_lost and health.state is Health.LOST and self._health_clock() < health.retry_at:
                self.stats.skipped_lost += 1
                wait_s = max(0.0, health.retry_at - self._health_clock())
                raise DeviceLost(
                    f"{exchange.device}: lost after {health.consecutive_failures} failed transactions "
                    f"({health.last_error}); not asked, next attempt in {wait_s:.1f} s"
                )
            if attempts is None:
                attempts = 1 if health.state is not Health.OK else 1 + self.config.retries
            started_at = self._health_clock()
            last: BridgeError | None = None  # made when needed: an exception and its text every transaction cost
            for attempt in range(attempts):
                if attempt:
                    self.stats.retries += 1
                try:
                    readings = await self._attempt(exchange)
                except DeviceException:
                    self.stats.refused += 1
                    self._succeeded(exchange.device, health)  # it answered: the link and device are alive
                    raise
                except _PortDown:
                    raise  # still backing off: nothing new happened, so the back-off stays as it is
                except PortError as err:
                    # The port, not the device: the device's health stays as it was.
                    if not isinstance(err, _OpenFailed):  # a failed reopen was counted where it happened
                        self._note_port_failure(err)
                    await self._link.close()
                    raise
                except (DeviceTimeout, FrameError) as err:
                    last = err
                    self._bus_failures += 1
                    continue
                self.stats.ok += 1
                self._succeeded(exchange.device, health)
                return readings
            if last is None:
                last = DeviceTimeout(f"{exchange.device}: no attempt made")
            self._failed(exchange.device, last, started_at)
            if self._reopen_after_failures is not None and self._bus_failures >= self._reopen_after_failures:
                _log.warning("no device answers: reopening port", extra={"bus": self.name})
                self._bus_failures = 0
                await self._link.close()
            raise last

    async def _attempt(self, exchange: Exchange) -> Readings:
        link = self._link
        if not link.is_open:
            await self._ensure_open()
        self.stats.transactions += 1
        if self._silent_s:
            wait_s = self._quiet_until - self._clock()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
        self.stats.bytes_discarded += link.discard()
        await link.write(exchange.request)
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
