"""Simulated device firmware: serves register maps over a pty (or an in-process link) with the real
protocols.

The simulator answers from values supplied by the caller (a plant model), so a controller on the
other end of the line closes its loop through real bytes. Faults can be injected per device.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import struct
import tempfile
import termios
import time
import tty
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from config import BusProtocol, SerialBusConfig
from firmware_bridge import dlt645, modbus
from firmware_bridge.device import CT_SCALED_SUFFIXES, raw_to_words, words_to_raw
from firmware_bridge.maps import Access, DeviceMap, Dlt645Point, ModbusPoint, RegisterType
from firmware_bridge.memory_link import MemoryLink
from firmware_bridge.transport import bits_per_character

__all__ = ["Fault", "FaultMode", "Line", "SimulatedBus", "SimulatedDevice"]

_log = logging.getLogger(__name__)

# Time a real device takes to start answering: Modbus meters a few ms, DL/T 645 at least Td = 20 ms.
MODBUS_TURNAROUND_S = 0.005
DLT645_TURNAROUND_S = 0.020


class Line(StrEnum):
    """What carries a simulated bus's bytes to the controller."""

    PTY = "pty"  # an OS pseudo-terminal: the controller opens a serial port, as on a site
    MEMORY = "memory"  # an in-process link (`SimulatedBus.memory_link`): the same bytes, no system calls


class FaultMode(StrEnum):
    NONE = "none"
    SILENT = "silent"  # no reply at all
    LATE = "late"  # reply after `late_s`
    BAD_CRC = "bad_crc"  # reply with a corrupted CRC / checksum
    GARBAGE = "garbage"  # random bytes in place of the reply
    EXCEPTION = "exception"  # Modbus exception reply / DL/T 645 error reply


@dataclass(frozen=True, slots=True)
class Fault:
    mode: FaultMode = FaultMode.NONE
    probability: float = 1.0
    late_s: float = 1.0
    exception_code: int = 0x04  # Modbus: server device failure; DL/T 645 ERR bit0 "other"
    writes_only: bool = False  # a device that still answers reads but refuses its setpoints


# How each register type packs in one struct of the whole block (big-endian words, high word first).
_BLOCK_CODES = {RegisterType.UINT16: "H", RegisterType.INT16: "h", RegisterType.UINT32: "I", RegisterType.INT32: "i",
                RegisterType.FLOAT32: "f"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Block:
    """A register block a controller reads, worked out once: whether the map covers any of it, and where
    each wholly covered point goes with what its value is divided by (CT ratio, scale, sign: in that order,
    as `registers_from_values` on the secondary values does). A block of big-endian points that do not
    overlap also packs whole in one struct (`pack`, unmapped registers as zero pad bytes), with the same
    words as packing point by point."""

    covered: bool
    count: int
    layout: tuple[tuple[str, float, float, float, RegisterType, str, int], ...]
    pack: Callable[..., bytes] | None = None
    unpack: Callable[[bytes], tuple[int, ...]] | None = None

    @classmethod
    def of(cls, covered: list[ModbusPoint], start: int, count: int, ct_ratio_for: Callable[[str], float]) -> _Block:
        layout = tuple(
            (p.name, ct_ratio_for(p.name), p.scale, p.sign, p.type, p.word_order, p.address - start)
            for p in covered
            if p.address >= start and p.address - start + p.type.words <= count
        )
        codes, at = [">"], 0
        for _, _, _, _, kind, word_order, offset in sorted(layout, key=lambda point: point[6]):
            if word_order != "big" or offset < at:
                return cls(bool(covered), count, layout)  # little-endian words or overlapping points
            codes.append(f"{2 * (offset - at)}x{_BLOCK_CODES[kind]}")
            at = offset + kind.words
        codes.append(f"{2 * (count - at)}x")
        if [point[6] for point in layout] != sorted(point[6] for point in layout):
            return cls(bool(covered), count, layout)  # packed in offset order: the layout must be in it too
        return cls(bool(covered), count, layout, struct.Struct("".join(codes)).pack,
                   struct.Struct(f">{count}H").unpack)  # fmt: skip

    def registers(self, source: Mapping[str, float], setpoints: Mapping[str, float]) -> tuple[int, ...]:
        """The block's image from the device's values (its source first, then setpoints); unmapped registers 0."""
        if self.pack is not None and self.unpack is not None:
            raws: list[float] = []
            try:
                for name, ct_ratio, scale, sign, kind, _, _ in self.layout:
                    value = source.get(name)
                    if value is None:
                        value = setpoints.get(name)
                        if value is None:
                            break  # its registers stay 0: point by point below
                    raw = value / ct_ratio / scale / sign
                    raws.append(raw if kind is RegisterType.FLOAT32 else round(raw))
                else:
                    return self.unpack(self.pack(*raws))
            except (ValueError, OverflowError, struct.error):
                pass  # a value the registers cannot hold: point by point below, which says which
        image = [0] * self.count
        for name, ct_ratio, scale, sign, kind, word_order, offset in self.layout:
            value = source.get(name)
            if value is None:
                value = setpoints.get(name)
                if value is None:
                    continue
            words = raw_to_words(kind, value / ct_ratio / scale / sign, word_order)
            image[offset : offset + len(words)] = words
        return tuple(image)


@dataclass
class SimulatedDevice:
    """One device's firmware: a register map, an address, and where its values come from."""

    name: str
    map: DeviceMap
    address: int | str
    source: Callable[[], Mapping[str, float]]
    sink: Callable[[str, float], None] | None = None
    fault: Fault = field(default_factory=Fault)
    setpoints: dict[str, float] = field(default_factory=dict)
    requests_seen: int = 0
    ct_ratio: float = 1.0  # the meter reports secondary values; the plant values are primary
    # The device's own time, for its communication watchdog (tests and accelerated runs inject theirs).
    clock: Callable[[], float] = time.monotonic
    watchdog_trips: int = 0  # how often the watchdog ran out and the fallbacks were applied
    _watchdog_deadline: float | None = field(init=False, repr=False, default=None)
    # The map's Modbus points, and the points each (function, address, count) block covers: a
    # controller asks for the same few blocks every second, so each is worked out once.
    _modbus_points: list[ModbusPoint] = field(init=False, repr=False)
    _blocks: dict[tuple[int, int, int], _Block] = field(init=False, repr=False, default_factory=dict)
    _writable: dict[int, ModbusPoint] = field(init=False, repr=False, default_factory=dict)
    _by_di: dict[int, Dlt645Point] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._modbus_points = [p for p in self.map.points if isinstance(p, ModbusPoint)]
        for point in self.map.points:  # the first point at an address or DI wins, as a device's lookup would
            if isinstance(point, ModbusPoint) and point.access is not Access.READ:
                self._writable.setdefault(point.address, point)
            elif isinstance(point, Dlt645Point):
                self._by_di.setdefault(int(point.di, 16), point)

    def values(self) -> dict[str, float]:
        merged = dict(self.setpoints)
        merged.update(self.source())
        return merged

    # --- Modbus -----------------------------------------------------------------------------------

    def answer_modbus(self, request: modbus.Request) -> modbus.Reply:
        points = self._modbus_points
        unit = request.unit
        if isinstance(request, modbus.ReadRequest):
            key = (request.function, request.address, request.count)
            block = self._blocks.get(key)
            if block is None:
                covered = [
                    p
                    for p in points
                    if p.function == request.function
                    and p.address < request.address + request.count
                    and p.address + p.type.words > request.address
                ]
                block = self._blocks[key] = _Block.of(covered, request.address, request.count, self.ct_ratio_for)
            if not block.covered:
                return modbus.ExceptionReply(unit, request.function, 0x02)
            return modbus.ReadReply(unit, request.function, block.registers(self.source(), self.setpoints))
        words = (request.value,) if isinstance(request, modbus.WriteSingleRequest) else request.values
        target = self._writable.get(request.address)
        if target is None or target.type.words != len(words):
            return modbus.ExceptionReply(unit, request.function, 0x02)
        value = words_to_raw(target.type, tuple(words), target.word_order) * target.scale * target.sign
        if (target.minimum is not None and value < target.minimum) or (
            target.maximum is not None and value > target.maximum
        ):
            return modbus.ExceptionReply(unit, request.function, 0x03)
        self.setpoints[target.name] = value
        if self.sink is not None:
            self.sink(target.name, value)
        self._alive()
        if isinstance(request, modbus.WriteSingleRequest):
            return modbus.WriteSingleReply(unit, request.address, request.value)
        return modbus.WriteMultipleReply(unit, request.address, len(words))

    # --- communication watchdog -------------------------------------------------------------------

    def _alive(self) -> None:
        """A valid write arrived: restart the watchdog (armed while its timeout register is above 0)."""
        watchdog = self.map.watchdog
        if watchdog is None:
            return
        timeout_s = self.setpoints.get(watchdog.timeout_point, 0.0)
        self._watchdog_deadline = self.clock() + timeout_s if timeout_s > 0 else None

    def check_watchdog(self) -> bool:
        """Apply the fallbacks if the watchdog ran out (once; the next valid write re-arms it). A real
        device checks on its own; the simulation calls this each plant step and before each request."""
        watchdog = self.map.watchdog
        if watchdog is None or self._watchdog_deadline is None or self.clock() < self._watchdog_deadline:
            return False
        self._watchdog_deadline = None
        self.watchdog_trips += 1
        applied: dict[str, float] = {}
        for setpoint, fallback in watchdog.fallback.items():
            configured = None if fallback.point is None else self.setpoints.get(fallback.point)
            value = configured if configured is not None else fallback.value
            if value is None:
                continue  # a fallback register never written and no firmware default: leave it be
            applied[setpoint] = self.setpoints[setpoint] = value
            if self.sink is not None:
                self.sink(setpoint, value)
        fields = {"device": self.name, "fallbacks": applied}
        _log.warning("simulated device watchdog ran out: fallbacks applied", extra=fields)
        return True

    # --- DL/T 645 ---------------------------------------------------------------------------------

    def answer_dlt645(self, frame: dlt645.Dlt645Frame) -> dlt645.Dlt645Frame | None:
        address = str(self.address)
        if frame.function == dlt645.FUNCTION_READ_ADDRESS:
            return dlt645.address_reply(address)
        if frame.function != dlt645.FUNCTION_READ or len(frame.data) < 4:
            return dlt645.error_reply(address, frame.function, 0x01)
        di = int.from_bytes(frame.data[:4], "little")
        point = self._by_di.get(di)
        source = self.source()  # once per request, as a meter samples once
        reading = None if point is None else source.get(point.name, self.setpoints.get(point.name))
        if point is None or reading is None:
            return dlt645.error_reply(address, dlt645.FUNCTION_READ, 0x02)
        item = dlt645.DATA_ITEMS[di]
        value = reading / point.scale / point.sign / self.ct_ratio_for(point.name)
        # A real meter saturates at the largest number its BCD format holds (signed: top bit is the sign).
        largest = ((8 if item.signed else 10) * 10 ** (2 * item.length - 1) - 1) / 10**item.decimals
        value = max(-largest if item.signed else 0.0, min(largest, value))
        return dlt645.read_reply(address, di, (value,))

    def ct_ratio_for(self, quantity: str) -> float:
        return self.ct_ratio if quantity.endswith(CT_SCALED_SUFFIXES) else 1.0


class SimulatedBus:
    """A pty pair: the client opens `port`; this side decodes requests and answers as the devices would.

    `port` is a symlink to the pty, so `unplug()`/`replug()` can make the port vanish and come back
    under the same name, as a USB adapter does. With `line=Line.MEMORY` there is no pty: the client
    uses `memory_link` (a `Link`), and unplugging makes that link lose its port and refuse to open.
    """

    def __init__(
        self,
        config: SerialBusConfig,
        devices: list[SimulatedDevice],
        *,
        wire_time: bool = False,
        seed: int = 0,
        link_dir: Path | None = None,
        line: Line = Line.PTY,
    ) -> None:
        self.config = config
        self.line = line
        self.devices = {str(d.address): d for d in devices}
        self.wire_time = wire_time
        self.echo = config.adapter_echo
        self._random = random.Random(seed)
        self._char_s = bits_per_character(config) / config.baud_rate
        self._turnaround_s = MODBUS_TURNAROUND_S if config.protocol is BusProtocol.MODBUS_RTU else DLT645_TURNAROUND_S
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._link_dir = link_dir
        self._master: int | None = None
        self._slave: int | None = None
        self._buffer = b""
        self._pending: set[asyncio.TimerHandle] = set()
        self.requests = 0
        self.frame_errors = 0
        self._memory = MemoryLink(f"memory:{config.name}", self._received) if line is Line.MEMORY else None

    @property
    def memory_link(self) -> MemoryLink:
        """The client's end of an in-process line (`line=Line.MEMORY` only)."""
        if self._memory is None:
            raise RuntimeError(f"bus {self.config.name} is served over a pty: open {self.port}")
        return self._memory

    @property
    def port(self) -> str:
        if self._memory is not None:
            return self._memory.port
        directory = self._link_dir or Path(self._tmp.name if self._tmp else ".")
        return str(directory / f"{self.config.name}.tty")

    def device(self, name: str) -> SimulatedDevice:
        for device in self.devices.values():
            if device.name == name:
                return device
        raise KeyError(name)

    def set_fault(self, name: str, fault: Fault) -> None:
        self.device(name).fault = fault

    def check_watchdogs(self) -> list[str]:
        """Let every device's watchdog act (call each plant step); the names of those that ran out."""
        return [d.name for d in self.devices.values() if d.check_watchdog()]

    async def __aenter__(self) -> SimulatedBus:
        if self._link_dir is None and self._memory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="greensite-sim-")
        self._plug()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._unplug()
        if self._tmp is not None:
            self._tmp.cleanup()

    def _plug(self) -> None:
        if self._memory is not None:
            self._memory.reappear()
            return
        master, slave = os.openpty()
        tty.setraw(slave, termios.TCSANOW)  # a pty starts cooked: 0x0D, 0x03 ... would be translated
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        link = Path(self.port)
        link.unlink(missing_ok=True)
        link.symlink_to(os.ttyname(slave))
        asyncio.get_running_loop().add_reader(master, self._readable)

    def _unplug(self) -> None:
        for handle in self._pending:
            handle.cancel()
        self._pending.clear()
        self._buffer = b""
        if self._memory is not None:
            self._memory.vanish()
            return
        if self._master is not None:
            asyncio.get_running_loop().remove_reader(self._master)
            os.close(self._master)
        if self._slave is not None:
            os.close(self._slave)
        self._master = self._slave = None
        Path(self.port).unlink(missing_ok=True)

    def unplug(self) -> None:
        """The adapter vanishes: the client's port errors and the device path disappears."""
        self._unplug()

    def replug(self) -> None:
        self._plug()

    def inject_noise(self, data: bytes) -> None:
        """Bytes on the line that nobody asked for (EMI, a misconfigured device)."""
        self._send(data)

    def _send(self, data: bytes) -> None:
        if self._memory is not None:
            self._memory.deliver(data)
            return
        if self._master is None:
            return
        try:
            os.write(self._master, data)
        except OSError:  # BlockingIOError included: a client that does not read loses bytes, as on a wire
            return

    def _readable(self) -> None:
        assert self._master is not None
        try:
            chunk = os.read(self._master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # no client has the slave open right now
        self._received(chunk)

    def _received(self, chunk: bytes) -> None:
        """Bytes from the client: decode every complete request and answer it."""
        self._buffer = (self._buffer + chunk)[-4096:]
        while self._buffer:
            request: modbus.Request | dlt645.Dlt645Frame | None
            if self.config.protocol is BusProtocol.MODBUS_RTU:
                consumed, request, errors = modbus.decode_request(self._buffer)
            else:
                consumed, request, errors = dlt645.decode_frame(self._buffer)
            self.frame_errors += len(errors)
            self._buffer = self._buffer[consumed:]
            if request is None:
                return
            self.requests += 1
            self._dispatch(request)

    def _dispatch(self, request: modbus.Request | dlt645.Dlt645Frame) -> None:
        # The request's bytes again: only an echoing adapter or the wire-time emulation needs them.
        again = self.echo or self.wire_time
        if isinstance(request, dlt645.Dlt645Frame):
            if request.from_meter:
                return
            if request.address == dlt645.WILDCARD_ADDRESS and len(self.devices) == 1:
                device: SimulatedDevice | None = next(iter(self.devices.values()))
            else:
                device = self.devices.get(request.address)
            request_bytes = dlt645.encode_frame(request) if again else b""
        else:
            device = self.devices.get(str(request.unit))
            request_bytes = modbus.encode_request(request) if again else b""
        if self.echo:
            self._send(request_bytes)
        if device is None:
            return  # another device's address, or broadcast: silence
        device.check_watchdog()  # it ran out before this request arrived, whoever else checks
        device.requests_seen += 1
        fault = device.fault
        active = fault.mode is not FaultMode.NONE and self._random.random() < fault.probability
        if fault.writes_only and not isinstance(request, modbus.WriteSingleRequest | modbus.WriteMultipleRequest):
            active = False
        mode = fault.mode if active else FaultMode.NONE
        if mode is FaultMode.SILENT:
            return
        reply = self._reply_bytes(device, request, mode, fault)
        delay = self._turnaround_s if self.wire_time else 0.0
        if self.wire_time:
            delay += (len(request_bytes) + len(reply)) * self._char_s
        if mode is FaultMode.LATE:
            delay += fault.late_s
        if delay <= 0:
            self._send(reply)
            return
        handle: asyncio.TimerHandle

        def deliver() -> None:
            self._pending.discard(handle)
            self._send(reply)

        handle = asyncio.get_running_loop().call_later(delay, deliver)
        self._pending.add(handle)

    def _reply_bytes(
        self,
        device: SimulatedDevice,
        request: modbus.Request | dlt645.Dlt645Frame,
        mode: FaultMode,
        fault: Fault,
    ) -> bytes:
        if isinstance(request, dlt645.Dlt645Frame):
            if mode is FaultMode.EXCEPTION:
                frame: dlt645.Dlt645Frame | None = dlt645.error_reply(str(device.address), request.function, 0x01)
            else:
                frame = device.answer_dlt645(request)
            reply = dlt645.encode_frame(frame) if frame is not None else b""
        else:
            if mode is FaultMode.EXCEPTION:
                answer: modbus.Reply = modbus.ExceptionReply(request.unit, request.function, fault.exception_code)
            else:
                answer = device.answer_modbus(request)
            reply = modbus.encode_reply(answer)
        if mode is FaultMode.BAD_CRC and reply:
            reply = reply[:-2] + bytes([reply[-2] ^ 0x5A]) + reply[-1:]
        elif mode is FaultMode.GARBAGE:
            reply = self._random.randbytes(max(len(reply), 8))
        return reply
