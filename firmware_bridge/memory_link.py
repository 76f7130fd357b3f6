"""A port whose far end lives in this process: the bytes a simulated device answers with, no OS pty.

The bus on this side and the simulated firmware on the other exchange exactly the bytes they would over
a pty; only the pseudo-terminal's system calls (a write, a select, a read on each side per transaction)
are skipped. The far end answers inside `write`; the wait for the reply still yields to the event loop
once, so transactions on different buses interleave as they do over ptys. (Without that yield each bus
ran all of a tick's transactions before the next bus began: after a controller restart the grid meter
was first read after a PV inverter's communication watchdog had cut PV, and the tick discharged into an
88 kW export. Handing the bytes over on the next loop turn instead, as a pty does, cost as much as the
pty's system calls saved.) A reply the far end sends later (a late device) arrives by the event loop's
timer, as on a pty.
The port's own faults are the far end's to make: it vanishes (`vanish`, as an unplugged USB adapter: the
open link is lost, opening fails) and comes back (`reappear`).
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable, Generator

from firmware_bridge.errors import PortError
from firmware_bridge.transport import MAX_BUFFERED_BYTES

__all__ = ["MemoryLink"]


@types.coroutine
def _one_loop_turn() -> Generator[None, None, None]:
    """What `asyncio.sleep(0)` does (the task is run again on the next loop turn), without its two frames."""
    yield


def _resolve(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)


class MemoryLink:
    """A `Link` to an in-process far end: `write` hands the bytes to `receive`, the far end answers
    through `deliver`."""

    def __init__(self, port: str, receive: Callable[[bytes], None]) -> None:
        self._port = port
        self._receive = receive
        self._present = True  # the adapter is there (a vanished one cannot be opened)
        self._open = False
        self._lost: str | None = None
        self._buffer = bytearray()
        # Whoever waits for bytes (one transaction at a time: the bus holds its lock) waits on this.
        self._waiter: asyncio.Future[bool] | None = None

    @property
    def port(self) -> str:
        return self._port

    @property
    def is_open(self) -> bool:
        return self._open and self._lost is None

    async def open(self) -> None:
        if not self._present:
            raise PortError(f"cannot open {self._port}: no such device")
        self._open, self._lost = True, None
        self._buffer.clear()

    async def close(self) -> None:
        self._open, self._lost = False, None
        self._buffer.clear()
        self._wake(True)  # a waiting reader finds the link closed

    def _live(self) -> None:
        if not self._open:
            raise PortError(f"{self._port} is not open")
        if self._lost is not None:
            raise PortError(f"{self._port} lost: {self._lost}")

    async def write(self, data: bytes) -> None:
        self._live()
        self._receive(data)  # the far end may answer (`deliver`) before this returns

    def take(self) -> bytes:
        """Everything received so far, removed from the buffer."""
        self._live()
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def discard(self) -> int:
        """Drop stale input (late replies of a previous transaction); returns how many bytes."""
        self._live()
        dropped = len(self._buffer)
        self._buffer.clear()
        return dropped

    async def wait_for_data(self, timeout_s: float) -> bool:
        self._live()
        if self._buffer:
            # One loop turn, as a reply over a pty takes: the other buses' transactions go on meanwhile.
            await _one_loop_turn()
            self._live()
            return bool(self._buffer)
        # As SerialLink: a bare future resolved by a timer (False) or by `deliver` (True), so a
        # CancelledError here is always the caller's and propagates.
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        timer = loop.call_later(max(timeout_s, 0.0), _resolve, waiter, False)
        try:
            if not await waiter:
                return False
        finally:
            timer.cancel()
            if self._waiter is waiter:
                self._waiter = None
        self._live()
        return bool(self._buffer)

    # --- the far end ------------------------------------------------------------------------------

    def deliver(self, data: bytes) -> None:
        """Bytes from the far end. Nobody has the port open: they are lost, as on a wire."""
        if not self.is_open:
            return
        self._buffer.extend(data)
        if len(self._buffer) > MAX_BUFFERED_BYTES:
            del self._buffer[: len(self._buffer) - MAX_BUFFERED_BYTES]
        self._wake(True)

    def vanish(self) -> None:
        """The adapter is unplugged: an open link is lost, and the port cannot be opened until `reappear`."""
        self._present = False
        if self._open:
            self._lost = "device disconnected"
            self._buffer.clear()
            self._wake(True)  # a waiting reader finds the link lost

    def reappear(self) -> None:
        self._present = True

    def _wake(self, value: bool) -> None:
        if self._waiter is not None:
            _resolve(self._waiter, value)
