"""A serial port as a byte pipe: write bytes, wait for bytes. It does not care about content."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import termios
from typing import Any, Protocol

import serial
import serial_asyncio_fast

from config import Parity, SerialBusConfig
from firmware_bridge.errors import PortError

__all__ = ["MAX_BUFFERED_BYTES", "Link", "SerialLink", "bits_per_character"]

_log = logging.getLogger(__name__)

# Bytes arriving with no transaction to claim them are noise; past this much we keep only the newest,
# so a babbling device cannot grow our memory.
MAX_BUFFERED_BYTES = 4096


def bits_per_character(config: SerialBusConfig) -> int:
    return 1 + 8 + (0 if config.parity is Parity.NONE else 1) + config.stop_bits


class Link(Protocol):
    """What the bus needs from a port; tests may supply their own."""

    @property
    def is_open(self) -> bool: ...
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def write(self, data: bytes) -> None: ...
    def take(self) -> bytes: ...
    def discard(self) -> int: ...
    async def wait_for_data(self, timeout_s: float) -> bool: ...


class _EventLoopSerial(serial.Serial):  # type: ignore[misc]  # pyserial ships no types
    """pyserial's POSIX port, read the way an event loop reads it: the transport calls `read` only once
    the fd is readable, so pyserial's own select() before each read (one more system call on every
    reply) tells nothing new. What it reports is kept: a read error, or a readable port that returns
    nothing (the device went away), is a SerialException."""

    def read(self, size: int = 1) -> bytes:
        try:
            data = os.read(self.fd, size)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError as err:
            raise serial.SerialException(f"read failed: {err}") from err
        if not data:
            raise serial.SerialException("device reports readiness to read but returned no data (device disconnected?)")
        return data


async def _open_serial(
    loop: asyncio.AbstractEventLoop, pipe: _Pipe, port: str, **settings: Any
) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
    if "://" in port:  # a pyserial URL (rfc2217://, socket://, ...): its own class, as pyserial picks it
        return await serial_asyncio_fast.create_serial_connection(loop, lambda: pipe, port, **settings)
    # Opening a tty can block (a USB adapter's driver, modem lines): not on the event loop. Exclusively: a
    # second master on the bus (`greensite check` while the service runs) would interleave its frames
    # with ours and overwrite the other's setpoints.
    device = await loop.run_in_executor(None, functools.partial(_EventLoopSerial, port, exclusive=True, **settings))
    return await serial_asyncio_fast.connection_for_serial(loop, lambda: pipe, device)


def _resolve(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)


class _Pipe(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        # Whoever waits for bytes (one transaction at a time: the bus holds its lock) waits on this.
        self.waiter: asyncio.Future[bool] | None = None
        self.lost: Exception | None = None
        self.closed = asyncio.Event()

    def _wake(self) -> None:
        if self.waiter is not None:
            _resolve(self.waiter, True)

    def data_received(self, data: bytes) -> None:
        self.buffer.extend(data)
        if len(self.buffer) > MAX_BUFFERED_BYTES:
            del self.buffer[: len(self.buffer) - MAX_BUFFERED_BYTES]
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or PortError("serial port closed")
        self._wake()
        self.closed.set()


class SerialLink:
    """One RS-485 port through pyserial (any pyserial URL or device path, ptys included)."""

    def __init__(self, config: SerialBusConfig, port: str | None = None, *, virtual: bool = False) -> None:
        """`virtual`: the port is a pty, which refuses parity settings; the simulator emulates the line."""
        self._config = config
        self._port = port or config.port
        self._virtual = virtual
        self._transport: asyncio.Transport | None = None
        self._pipe: _Pipe | None = None

    @property
    def port(self) -> str:
        return self._port

    @property
    def is_open(self) -> bool:
        return self._pipe is not None and self._pipe.lost is None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        pipe = _Pipe()
        try:
            transport, _ = await _open_serial(
                loop,
                pipe,
                self._port,
                baudrate=self._config.baud_rate,
                parity=Parity.NONE.value if self._virtual else self._config.parity.value,
                stopbits=self._config.stop_bits,
                bytesize=8,
            )
        except (serial.SerialException, OSError, ValueError, termios.error) as err:
            held = " (is greensite run, the service, or another program using it?)" if "lock" in str(err) else ""
            raise PortError(f"cannot open {self._port}: {err}{held}") from err
        self._transport, self._pipe = transport, pipe
        _log.info("serial port open", extra={"port": self._port, "baud": self._config.baud_rate})

    async def close(self) -> None:
        transport, pipe = self._transport, self._pipe
        self._transport = self._pipe = None
        if transport is not None and pipe is not None:
            transport.close()
            try:
                # The transport needs a loop turn to release the fd; do not hang on a wedged driver.
                await asyncio.wait_for(pipe.closed.wait(), timeout=1.0)
            except TimeoutError:
                _log.warning("serial port did not close in 1 s", extra={"port": self._port})

    def _live(self) -> _Pipe:
        if self._pipe is None:
            raise PortError(f"{self._port} is not open")
        if self._pipe.lost is not None:
            raise PortError(f"{self._port} lost: {self._pipe.lost}")
        return self._pipe

    async def write(self, data: bytes) -> None:
        self._live()
        assert self._transport is not None
        try:
            self._transport.write(data)
        except (serial.SerialException, OSError) as err:
            raise PortError(f"write to {self._port} failed: {err}") from err

    def take(self) -> bytes:
        """Everything received so far, removed from the buffer."""
        pipe = self._live()
        data = bytes(pipe.buffer)
        pipe.buffer.clear()
        return data

    def discard(self) -> int:
        """Drop stale input (late replies of a previous transaction); returns how many bytes."""
        return len(self.take())

    async def wait_for_data(self, timeout_s: float) -> bool:
        pipe = self._live()
        if pipe.buffer:
            return True
        # A bare future and a timer, not asyncio.wait_for: that wraps the wait in a Task, one more
        # object and one more loop turn on every transaction of a bus polled many times a second.
        # The timer resolves the future (False) rather than cancelling it, so a CancelledError here
        # is always the caller's and propagates.
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        pipe.waiter = waiter
        timer = loop.call_later(max(timeout_s, 0.0), _resolve, waiter, False)
        try:
            if not await waiter:
                return False
        finally:
            timer.cancel()
            if pipe.waiter is waiter:
                pipe.waiter = None
        self._live()
        return bool(pipe.buffer)
