"""Device drivers: a register map and an address turned into exchanges and quantities. No I/O here
(beyond logging when a reading stops or starts being plausible)."""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from config import BusProtocol
from firmware_bridge import dlt645, modbus
from firmware_bridge.errors import DeviceException, FrameError
from firmware_bridge.maps import Access, DeviceMap, Dlt645Point, ModbusPoint, RegisterType, Watchdog

__all__ = ["DeviceDriver", "Exchange", "Readings"]

_log = logging.getLogger(__name__)

Readings = dict[str, float]
Decoder = Callable[[bytes], tuple[int, Any | None, list[FrameError]]]

# Quantities a current transformer scales: the meter sees secondary values, the site primary ones.
CT_SCALED_SUFFIXES = ("_kw", "_kwh", "_a")
# Behind a CT fitted backwards (`invert_sign`) the flows it measures read negated, and what it counts as
# imported was exported. Voltage, frequency and state are what they are.
DIRECTED_PREFIXES = ("power_", "current_", "reactive_power_")
SWAPPED_WHEN_INVERTED = {"import_energy_kwh": "export_energy_kwh", "export_energy_kwh": "import_energy_kwh"}

# A watchdog is kept alive this many times per timeout, so one lost or refused keepalive (a CRC error,
# a busy device) never lets it run out while the controller is alive.
KEEPALIVES_PER_TIMEOUT = 3

# Write exchanges kept for reuse per device (cleared when full): setpoints repeat, heartbeats do not.
WRITE_EXCHANGES_KEPT = 256

# Unused registers read to join two blocks cost 2 bytes each; a new transaction costs ~12 bytes
# of framing plus the device's turnaround, so bridging small gaps is cheaper than splitting.
MAX_BRIDGED_GAP_REGISTERS = 16


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request and how to recognise and interpret its reply."""

    device: str
    request: bytes
    decode: Decoder
    interpret: Callable[[Any], Readings]
    expected_reply_bytes: int  # for wire-time budgeting
    description: str = field(default="")
    quantities: tuple[str, ...] = ()  # what a read returns (empty for writes)


def words_to_raw(kind: RegisterType, words: tuple[int, ...], word_order: str) -> float:
    if kind is RegisterType.UINT16:
        return float(words[0])
    if kind is RegisterType.INT16:
        return float(words[0] - 0x10000 if words[0] & 0x8000 else words[0])
    hi, lo = (words[0], words[1]) if word_order == "big" else (words[1], words[0])
    packed = _PACK_WORDS(hi, lo)
    if kind is RegisterType.UINT32:
        return float(_UNPACK_UINT32(packed)[0])
    if kind is RegisterType.INT32:
        return float(_UNPACK_INT32(packed)[0])
    return float(_UNPACK_FLOAT32(packed)[0])


_PACK_WORDS = struct.Struct(">HH").pack
_UNPACK_UINT32 = struct.Struct(">I").unpack
_UNPACK_INT32 = struct.Struct(">i").unpack
_UNPACK_FLOAT32 = struct.Struct(">f").unpack


_INTEGER_FORMATS = {
    RegisterType.UINT16: ">H",
    RegisterType.INT16: ">h",
    RegisterType.UINT32: ">I",
    RegisterType.INT32: ">i",
}
# Each type's packing, and the register words of 2 or 4 packed bytes (big-endian words).
_PACKERS = {kind: struct.Struct(fmt).pack for kind, fmt in (*_INTEGER_FORMATS.items(), (RegisterType.FLOAT32, ">f"))}
_ONE_WORD = struct.Struct(">H").unpack
_TWO_WORDS = struct.Struct(">HH").unpack


def raw_to_words(kind: RegisterType, raw: float, word_order: str) -> tuple[int, ...]:
    """The register words of a raw number (what a device holds before the map's scale), in word order."""
    if kind is RegisterType.FLOAT32:
        packed = _PACKERS[kind](raw)
    else:
        try:
            packed = _PACKERS[kind](round(raw))
        except struct.error as err:
            raise ValueError(f"{raw} does not fit {kind.value}") from err
    if len(packed) == 2:
        return _ONE_WORD(packed)
    hi, lo = _TWO_WORDS(packed)
    return (hi, lo) if word_order == "big" else (lo, hi)


_RAW_CODES = {RegisterType.UINT16: "H", RegisterType.INT16: "h", RegisterType.UINT32: "I", RegisterType.INT32: "i",
              RegisterType.FLOAT32: "f"}  # fmt: skip


def _whole_block(
    layout: Sequence[tuple[str, int, int, RegisterType, str, float]], count: int
) -> Callable[[tuple[int, ...]], tuple[float | int, ...]] | None:
    """The raw numbers of a block's points from its registers in two struct calls, or None where the points
    do not allow it (little-endian words, overlapping or out of order)."""
    codes, at = [">"], 0
    for _, first, end, kind, word_order, _ in layout:
        if word_order != "big" or first < at:
            return None
        codes.append(f"{2 * (first - at)}x{_RAW_CODES[kind]}")
        at = end
    codes.append(f"{2 * (count - at)}x")
    pack, unpack = struct.Struct(f">{count}H").pack, struct.Struct("".join(codes)).unpack

    def raws(registers: tuple[int, ...]) -> tuple[float | int, ...]:
        return unpack(pack(*registers))

    return raws


def registers_from_values(
    points: list[ModbusPoint], values: Mapping[str, float], function: int, start: int, count: int
) -> tuple[int, ...]:
    """Register image of a block (used by the simulated devices); unmapped registers read 0."""
    image = [0] * count
    for point in points:
        if point.function != function or point.name not in values:
            continue
        offset = point.address - start
        if offset < 0 or offset + point.type.words > count:
            continue
        words = raw_to_words(point.type, values[point.name] / point.scale / point.sign, point.word_order)
        image[offset : offset + len(words)] = words
    return tuple(image)


class DeviceDriver:
    """Reads and writes one device through its register map.

    Every reading is checked against its point's plausible range (in site units: the map's range times
    `ct_ratio` for the quantities a CT scales). An implausible one (outside, NaN, infinite) is left out
    of the returned Readings, so the controller sees the quantity as unknown, never as 0.0 or as the
    previous value. Rejections are counted per quantity, and logged once per episode: the first one
    with the value and the range, then one line when the quantity reads plausible again.
    """

    def __init__(
        self, name: str, device_map: DeviceMap, address: int | str, *, ct_ratio: float = 1.0, invert_sign: bool = False
    ) -> None:
        """`invert_sign`: the device's CT is fitted backwards; flows read negated, import and export swapped."""
        self.name = name
        self.map = device_map
        self.address = address
        self.ct_ratio = ct_ratio
        self.invert_sign = invert_sign
        self._plausible: dict[str, tuple[float, float]] = {}
        for point in device_map.readable:
            low, high = point.plausible_min, point.plausible_max
            if low is None or high is None:  # the map's validation refuses this; a hand-built map might not
                raise ValueError(f"{device_map.name}: {point.name} has no plausible range")
            ct = self._ct(point.name)
            low, high = sorted((low * ct * self._direction(point), high * ct * self._direction(point)))
            self._plausible[self._site_name(point.name)] = (low, high)
        self._implausible: dict[str, int] = {}
        self._episode: dict[str, int] = {}  # quantity -> rejections in the episode still going on
        self._heartbeat = 0
        self._reads = self._plan_reads()
        self._writes: dict[tuple[str, float, type, float], Exchange] = {}
        self._points = {p.name: p for p in reversed(device_map.points)}  # as map.point: the first of a name

    def _ct(self, quantity: str) -> float:
        return self.ct_ratio if quantity.endswith(CT_SCALED_SUFFIXES) else 1.0

    def _direction(self, point: ModbusPoint | Dlt645Point) -> float:
        """-1 for a flow measured through a CT fitted backwards (power, current, power factor), else 1. A
        setpoint read back (`power_setpoint_kw`, `current_limit_a`) is what was written, never negated: read
        negated, the step test put a battery back at -5 kW that had held +5."""
        measured = point.access is Access.READ
        return -1.0 if self.invert_sign and measured and point.name.startswith(DIRECTED_PREFIXES) else 1.0

    def _site_name(self, quantity: str) -> str:
        """The map's quantity as the site sees it: behind a backwards CT, import is export."""
        return SWAPPED_WHEN_INVERTED.get(quantity, quantity) if self.invert_sign else quantity

    # --- plausibility -----------------------------------------------------------------------------

    def plausible_range(self, quantity: str) -> tuple[float, float]:
        """The (lowest, highest) reading of `quantity` accepted, in site units (CT ratio applied)."""
        return self._plausible[quantity]

    def implausible_counts(self) -> dict[str, int]:
        """Readings dropped as implausible since start, per quantity (only quantities with any)."""
        return dict(self._implausible)

    def implausible_now(self) -> frozenset[str]:
        """Quantities whose latest reading was implausible: an episode is going on."""
        return frozenset(self._episode)

    def _accept(self, quantity: str, value: float, raw: float) -> bool:
        """True if `value` (site units) is plausible; counts and logs the episodes of those that are not."""
        low, high = self._plausible[quantity]
        if math.isfinite(value) and low <= value <= high:
            if quantity in self._episode:
                rejected = self._episode.pop(quantity)
                fields = {"device": self.name, "quantity": quantity, "value": value, "rejected_in_episode": rejected}
                _log.info("reading plausible again", extra=fields)
            return True
        self._implausible[quantity] = self._implausible.get(quantity, 0) + 1
        if quantity not in self._episode:
            self._episode[quantity] = 0
            fields = {
                "device": self.name,
                "quantity": quantity,
                # NaN and inf as text: JSON log lines stay valid JSON.
                "value": value if math.isfinite(value) else str(value),
                "raw": raw if math.isfinite(raw) else str(raw),
                "plausible_min": low,
                "plausible_max": high,
            }
            _log.warning("implausible reading dropped", extra=fields)
        self._episode[quantity] += 1
        return False

    @property
    def protocol(self) -> BusProtocol:
        return self.map.protocol

    def read_exchanges(self, cycle: int = 0) -> list[Exchange]:
        """The exchanges due on poll number `cycle`, as few as the map allows (slow points every Nth poll)."""
        return [exchange for every, exchange in self._reads if cycle % every == 0]

    def read_schedule(self) -> list[tuple[int, Exchange]]:
        """Every read exchange with its `every_n_polls` (1: each poll), for callers that pace them."""
        return list(self._reads)

    def exchange_for(self, quantity: str) -> Exchange:
        """The one read exchange that carries `quantity` (for the reads a control tick cannot miss)."""
        for _, exchange in self._reads:
            if quantity in exchange.quantities:
                return exchange
        raise KeyError(f"{self.name}: no readable {quantity!r}")

    def _plan_reads(self) -> list[tuple[int, Exchange]]:
        if self.protocol is BusProtocol.DLT645:
            return [(p.every_n_polls, self._dlt645_read(p)) for p in self.map.readable if isinstance(p, Dlt645Point)]
        exchanges: list[tuple[int, Exchange]] = []
        points = sorted(
            (p for p in self.map.readable if isinstance(p, ModbusPoint)), key=lambda p: (p.function, p.address)
        )
        block: list[ModbusPoint] = []
        for point in points:
            if block:
                first = block[0]
                end = max(p.address + p.type.words for p in block)
                fits = point.address + point.type.words - first.address <= self.map.max_registers_per_read
                if point.function == first.function and fits and point.address - end <= MAX_BRIDGED_GAP_REGISTERS:
                    block.append(point)
                    continue
                exchanges.append((1, self._modbus_read(block)))
            block = [point]
        if block:
            exchanges.append((1, self._modbus_read(block)))
        return exchanges

    def _modbus_read(self, block: list[ModbusPoint]) -> Exchange:
        assert isinstance(self.address, int)
        start = block[0].address
        count = max(p.address + p.type.words for p in block) - start
        request = modbus.ReadRequest(self.address, block[0].function, start, count)
        # Where each point sits in the reply and what its raw number is multiplied by, worked out once:
        # this exchange runs every second for the life of the controller.
        layout = [
            (self._site_name(p.name), p.address - start, p.address - start + p.type.words, p.type, p.word_order,
             p.scale * p.sign * self._ct(p.name) * self._direction(p))
            for p in block
        ]  # fmt: skip

        # The whole block's raw numbers in one struct where the points allow it (big-endian words, in order,
        # none overlapping): the same numbers as point by point, without a call per point.
        whole = _whole_block(layout, count)
        named = [(name, factor) for name, _, _, _, _, factor in layout]
        plausible, episode = self._plausible, self._episode

        def interpret(reply: modbus.Reply) -> Readings:
            registers = self._modbus_registers(reply, request.function)
            if len(registers) != count:
                raise FrameError(2, f"asked for {count} registers, got {len(registers)}")
            readings: Readings = {}
            if whole is not None:
                try:
                    raws = whole(registers)
                except struct.error:
                    raws = None  # a register out of range (a hand-made reply): point by point below
                if raws is not None:
                    for (name, factor), raw_number in zip(named, raws, strict=True):
                        raw = float(raw_number)
                        value = raw * factor
                        low, high = plausible[name]
                        # Plausible and no episode to end: what _accept would say, without the call.
                        if (math.isfinite(value) and low <= value <= high and name not in episode) or self._accept(
                            name, value, raw
                        ):
                            readings[name] = value
                    return readings
            for name, first, end, kind, word_order, factor in layout:
                raw = words_to_raw(kind, registers[first:end], word_order)
                value = raw * factor
                if self._accept(name, value, raw):  # a meter in a bad state returns NaN or 0xFFFF: unknown
                    readings[name] = value
            return readings

        return Exchange(
            device=self.name,
            request=modbus.encode_request(request),
            decode=partial(modbus.decode_reply, unit=self.address),
            interpret=interpret,
            expected_reply_bytes=5 + 2 * count,
            description=f"read {count} registers at 0x{start:04X} (function {block[0].function})",
            quantities=tuple(self._site_name(p.name) for p in block),
        )

    def _modbus_registers(self, reply: modbus.Reply, function: int) -> tuple[int, ...]:
        if isinstance(reply, modbus.ExceptionReply):
            raise DeviceException(self.name, reply.code, reply.meaning)
        if not isinstance(reply, modbus.ReadReply) or reply.function != function:
            raise FrameError(1, f"reply function {reply.function} does not answer function {function}")
        return reply.registers

    def _dlt645_decoder(self) -> Decoder:
        address = str(self.address)

        def decode(buf: bytes) -> tuple[int, dlt645.Dlt645Frame | None, list[FrameError]]:
            # Skip our own request (adapter echo, or another master) and frames from other meters.
            consumed_total = 0
            errors: list[FrameError] = []
            while True:
                consumed, frame, skipped = dlt645.decode_frame(buf[consumed_total:])
                errors.extend(FrameError(e.offset + consumed_total, e.reason) for e in skipped)
                consumed_total += consumed
                if frame is None or (frame.from_meter and frame.address == address):
                    return consumed_total, frame, errors
                errors.append(FrameError(consumed_total, f"skipped a frame from/to {frame.address}"))

        return decode

    def _dlt645_read(self, point: Dlt645Point) -> Exchange:
        di = int(point.di, 16)
        item = dlt645.DATA_ITEMS.get(di)
        if item is None:
            raise ValueError(f"{self.map.name}: DI {point.di} is not in the DL/T 645 table")
        request = dlt645.read_request(str(self.address), di)
        name = self._site_name(point.name)

        def interpret(frame: dlt645.Dlt645Frame) -> Readings:
            if frame.is_error:
                code = frame.data[0] if frame.data else 0
                raise DeviceException(self.name, code, dlt645.error_meaning(code))
            result = dlt645.decode_read_reply(frame)
            if result.di != di:
                raise FrameError(10, f"reply carries DI {result.di:08X}, asked for {di:08X}")
            raw = result.values[0]
            value = raw * point.scale * point.sign * self._ct(point.name) * self._direction(point)
            return {name: value} if self._accept(name, value, raw) else {}

        return Exchange(
            device=self.name,
            request=dlt645.encode_frame(request),
            decode=self._dlt645_decoder(),
            interpret=interpret,
            expected_reply_bytes=dlt645.FRAME_OVERHEAD + 4 + item.data_bytes + 4,
            description=f"read DI {point.di}",
            quantities=(name,),
        )

    def write_exchange(self, quantity: str, value: float) -> Exchange:
        """An exchange that writes one setpoint; ValueError if the map has no such writable point or range."""
        # -0.0 equals 0.0 but is other bytes in a float register, and 50 equals 50.0: both tell apart.
        key = (quantity, value, type(value), math.copysign(1.0, value))
        exchange = self._writes.get(key)
        if exchange is None:
            # An exchange is immutable: the same setpoint again (a keepalive, a limit held) reuses its bytes.
            if len(self._writes) >= WRITE_EXCHANGES_KEPT:
                self._writes.clear()
            exchange = self._writes[key] = self._write_exchange(quantity, value)
        return exchange

    def _write_exchange(self, quantity: str, value: float) -> Exchange:
        point = self._points.get(quantity) or self.map.point(quantity)  # the map's KeyError for an unknown one
        if point.access is Access.READ or not isinstance(point, ModbusPoint):
            raise ValueError(f"{self.name}: {quantity} is not writable")
        if not math.isfinite(value):
            raise ValueError(f"{self.name}: {quantity} = {value} is not a number")
        if (point.minimum is not None and value < point.minimum) or (
            point.maximum is not None and value > point.maximum
        ):
            raise ValueError(f"{self.name}: {quantity} = {value} outside {point.minimum}..{point.maximum}")
        assert isinstance(self.address, int)
        words = raw_to_words(point.type, value / point.scale / point.sign, point.word_order)
        request: modbus.Request
        if len(words) == 1:
            request = modbus.WriteSingleRequest(self.address, point.address, words[0])
        else:
            request = modbus.WriteMultipleRequest(self.address, point.address, words)

        def interpret(reply: modbus.Reply) -> Readings:
            if isinstance(reply, modbus.ExceptionReply):
                raise DeviceException(self.name, reply.code, reply.meaning)
            if reply.function != request.function:
                raise FrameError(1, f"reply function {reply.function} does not answer {request.function}")
            return {quantity: value}

        return Exchange(
            device=self.name,
            request=modbus.encode_request(request),
            decode=partial(modbus.decode_reply, unit=self.address),
            interpret=interpret,
            expected_reply_bytes=8,
            description=f"write {quantity}={value}",
        )

    # --- communication watchdog -------------------------------------------------------------------

    @property
    def watchdog(self) -> Watchdog | None:
        """The device's own communication watchdog, if its map declares one."""
        return self.map.watchdog

    def watchdog_setup(self, timeout_s: float, fallbacks: Mapping[str, float]) -> list[Exchange]:
        """The writes that arm the watchdog, in order: each configurable fallback, then the timeout (the
        timeout last, so the device never runs armed with a stale fallback). `fallbacks` gives a value for
        every setpoint whose fallback lives in a register (`watchdog_configurable()`); a fixed one cannot
        be changed. Send them at start and again whenever the device recovers (it may have rebooted with
        its watchdog off). ValueError for a map without watchdog, a missing or fixed fallback, or a value
        the registers cannot hold. A timeout of 0 turns the watchdog off."""
        watchdog = self._watchdog()
        configurable = self.watchdog_configurable()
        missing = sorted(set(configurable) - set(fallbacks))
        if missing:
            raise ValueError(f"{self.name}: the watchdog needs fallback values for {missing}")
        unknown = sorted(set(fallbacks) - set(configurable))
        if unknown:
            fixed = {s: f.value for s, f in watchdog.fallback.items() if f.point is None}
            raise ValueError(f"{self.name}: no configurable fallback for {unknown} (fixed in the device: {fixed})")
        exchanges = [self.write_exchange(configurable[setpoint], value) for setpoint, value in fallbacks.items()]
        exchanges.append(self.write_exchange(watchdog.timeout_point, timeout_s))
        return exchanges

    def watchdog_configurable(self) -> dict[str, str]:
        """Setpoint -> the point that holds its fallback, for the fallbacks the controller sets."""
        return {s: f.point for s, f in self._watchdog().fallback.items() if f.point is not None}

    def keepalive_exchange(self) -> Exchange | None:
        """A heartbeat write (a new value each time, as devices that watch for change want). None when the
        device has no heartbeat register: then a setpoint write is the keepalive, and the controller
        must write one (the current value again is fine) at least every `keepalive_period_s`."""
        watchdog = self._watchdog()
        if watchdog.heartbeat_point is None:
            return None
        self._heartbeat = (self._heartbeat + 1) % 0x10000
        return self.write_exchange(watchdog.heartbeat_point, float(self._heartbeat))

    @staticmethod
    def keepalive_period_s(timeout_s: float) -> float:
        """How often to keep a watchdog of `timeout_s` alive."""
        return timeout_s / KEEPALIVES_PER_TIMEOUT

    def _watchdog(self) -> Watchdog:
        if self.map.watchdog is None:
            raise ValueError(f"{self.name}: {self.map.name} declares no communication watchdog")
        return self.map.watchdog
