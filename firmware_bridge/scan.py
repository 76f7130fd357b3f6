"""Who answers on an RS-485 bus, and as what (commissioning): probe each Modbus unit or DL/T 645 address,
try every register map on those that answer, and judge which map reads plausible values.

Bytes go through `Bus` only: one request at a time, the silent interval kept, a single attempt per
request (no retries), and the port never reopened because most addresses are silent. The judging
functions (`check_point`, `judge_map`, `identify`, `unit_presence`, `judge_broadcast`) are pure: they
take what was read and say what it means.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from config import BusProtocol, DeviceConfig, DeviceKind, Parity, SerialBusConfig, format_validation_error
from firmware_bridge import dlt645, modbus
from firmware_bridge.bus import Bus
from firmware_bridge.device import DeviceDriver, Exchange, Readings, words_to_raw
from firmware_bridge.errors import BridgeError, DeviceException, DeviceTimeout, FrameError, PortError
from firmware_bridge.maps import DeviceMap, Dlt645Point, ModbusPoint, all_maps
from firmware_bridge.ports import serial_ports
from firmware_bridge.transport import Link, SerialLink

__all__ = [
    "DLT645_REPLY_TIMEOUT_S",
    "MAINS_FREQUENCY_HZ",
    "MAINS_VOLTAGE_V",
    "MODBUS_REPLY_TIMEOUT_S",
    "Answer",
    "BroadcastVerdict",
    "Confidence",
    "Evidence",
    "Fit",
    "FoundDevice",
    "Identification",
    "MapFit",
    "PointCheck",
    "Presence",
    "ReadOutcome",
    "ScanError",
    "ScanResult",
    "ScanSettings",
    "WorstCase",
    "check_point",
    "check_port",
    "identify",
    "judge_broadcast",
    "judge_map",
    "parse_addresses",
    "parse_units",
    "reply_for_another",
    "scan",
    "unit_presence",
]

# How long a unit gets to answer, after the wire time of request and reply. Modbus meters answer in
# 20-100 ms and inverters and wallboxes mostly within 200 ms; the example sites poll with 0.3 s. Every
# silent unit costs this once, so 1..40 with five devices takes 12-13 s at 9600 baud
# (tests/scan_bench.py), inside the 30 s commissioning goal. `--timeout-s` gives a slow device (a
# gateway, an inverter at 0.5-1 s) more.
MODBUS_REPLY_TIMEOUT_S = 0.3
# DL/T 645-2007 lets a meter wait up to 500 ms before it replies (Td): less would miss compliant meters.
DLT645_REPLY_TIMEOUT_S = 0.5

# The Modbus presence probe: one holding register at 0, the smallest read. Any reply counts, an
# exception too: the device is there, it only lacks that register (or function 3).
PROBE_FUNCTION = 3
PROBE_REGISTER = 0
# Exceptions a Modbus gateway sends for a unit behind it that did not answer: nobody is there.
GATEWAY_EXCEPTIONS = frozenset({0x0A, 0x0B})
# The DL/T 645 presence read: forward active energy, total. Every DL/T 645-2007 meter has it (metering
# energy is what the meter is for), so an error reply to it is not a meter's answer.
PRESENCE_DI = 0x00010000

# What a meter on a live 220/230/240 V, 50 Hz grid reads, sags and swells included. A register map that
# puts a voltage or the frequency here is very likely the device's own; a random register rarely does.
MAINS_VOLTAGE_V = (180.0, 260.0)
MAINS_FREQUENCY_HZ = (45.0, 55.0)
_MAINS_QUANTITY = re.compile(r"^(voltage_l[1-3]_v|frequency_hz)$")

# Score of each kind of evidence a reading gives for its map (see `check_point`).
_MAINS_SCORE = 3
_PLAUSIBLE_SCORE = 1
_OFF_MAINS_SCORE = -2


class ScanError(BridgeError):
    """The scan cannot run: the port is missing or cannot be opened, or an argument is out of range
    (permanent: never retried)."""


# --- settings and arguments ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScanSettings:
    port: str
    protocol: BusProtocol
    baud_rate: int = 9600
    parity: Parity = Parity.NONE
    stop_bits: int = 1
    timeout_s: float = MODBUS_REPLY_TIMEOUT_S
    adapter_echo: bool = False

    def bus_config(self) -> SerialBusConfig:
        """The bus as the scan runs it: a single attempt per request, the scan's timeout."""
        # A SerialBusConfig lists at least one device; the scan's requests carry their own addresses,
        # so a placeholder stands in and is never asked.
        placeholder = DeviceConfig(
            name="scan",
            kind=DeviceKind.GRID_METER,
            model="scan",
            address=1 if self.protocol is BusProtocol.MODBUS_RTU else "000000000000",
        )
        return SerialBusConfig(
            name="scan",
            port=self.port,
            protocol=self.protocol,
            baud_rate=self.baud_rate,
            parity=self.parity,
            stop_bits=self.stop_bits,
            response_timeout_s=self.timeout_s,
            retries=0,
            adapter_echo=self.adapter_echo,
            devices=[placeholder],
        )


def check_port(port: str) -> None:
    """ScanError naming the port and the serial ports this machine has, when `port` does not exist."""
    if "://" in port or os.path.exists(port):  # a pyserial URL (socket://, rfc2217://) is not a path
        return
    present = serial_ports()
    have = ", ".join(present) if present else "none (is the USB adapter plugged in? see `dmesg | tail`)"
    raise ScanError(f"--port {port}: no such port. Serial ports here: {have}")


def parse_units(text: str) -> list[int]:
    """`1-40`, `5` or `1-5,10,20-22` as sorted unit ids; ScanError naming what is out of 1..247."""
    units: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise ScanError(f"--units {text!r}: {part.strip()!r} is not a unit id or a range like 1-247")
        low = int(match[1])
        high = int(match[2]) if match[2] is not None else low
        if low > high:
            raise ScanError(f"--units {text!r}: range {low}-{high} runs backwards")
        for unit in (low, high):
            if not 1 <= unit <= 247:
                raise ScanError(f"--units {text!r}: unit id {unit} is outside 1..247 (0 is broadcast, 248+ reserved)")
        units.update(range(low, high + 1))
    return sorted(units)


def parse_addresses(text: str) -> list[str]:
    """`123456789012,000000001234` as DL/T 645 addresses; ScanError naming one that is not 12 digits."""
    addresses: list[str] = []
    for part in text.split(","):
        address = part.strip()
        if not re.fullmatch(r"[0-9]{12}", address):
            raise ScanError(f"--addresses: {address!r} is not a 12-digit DL/T 645 address (as printed on the meter)")
        if address not in addresses:
            addresses.append(address)
    return addresses


# --- what one read brought back --------------------------------------------------------------------


class Answer(StrEnum):
    DATA = "data"  # a reply carrying values
    REFUSED = "refused"  # a Modbus exception or a DL/T 645 error reply
    SILENT = "silent"  # nothing at all within the timeout
    GARBLED = "garbled"  # bytes, but no valid reply: collision, wrong line settings, a duplicate address
    OTHER_REPLY = "other_reply"  # only a valid reply from another address (a slow device's, late)


@dataclass(frozen=True, slots=True)
class ReadOutcome:
    answer: Answer
    values: dict[str, float] = field(default_factory=dict)
    code: int | None = None  # exception / error code of a REFUSED read
    detail: str = ""
    elapsed_s: float = 0.0
    refusal: str = "exception"  # what a refusal is called: a Modbus "exception", a DL/T 645 "error reply"

    def describe(self) -> str:
        if self.answer is Answer.REFUSED and self.code is not None:
            code = f"{self.refusal} 0x{self.code:02X}"
            return f"{code}, {self.detail}" if self.detail else code
        return self.answer.value if not self.detail else f"{self.answer.value}, {self.detail}"


class Presence(StrEnum):
    PRESENT = "present"
    ABSENT = "absent"
    GARBLED = "garbled"
    UNCONFIRMED = "unconfirmed"  # DL/T 645: error replies only, never data


def unit_presence(protocol: BusProtocol, probe: ReadOutcome) -> tuple[Presence, str]:
    """Whether the probed address has a device on it, and why (pure)."""
    match probe.answer:
        case Answer.DATA:
            return Presence.PRESENT, "answered with data"
        case Answer.SILENT:
            return Presence.ABSENT, "no answer"
        case Answer.OTHER_REPLY:
            return Presence.ABSENT, f"no answer of its own: {probe.detail}"
        case Answer.GARBLED:
            return Presence.GARBLED, (
                f"bytes that are no valid reply ({probe.detail}): two devices with this address, or the wrong"
                " baud rate / parity"
            )
    if protocol is BusProtocol.MODBUS_RTU:
        if probe.code in GATEWAY_EXCEPTIONS:
            return Presence.ABSENT, f"a gateway answered for it ({probe.describe()}): no device behind it"
        return Presence.PRESENT, f"answered {probe.describe()}: the device is there, it lacks that register"
    # A meter stays silent to an address that is not its own, and answers the energy read of its own;
    # an error reply to it comes from something that answers for any address (a gateway, a simulator).
    return Presence.UNCONFIRMED, (
        f"error reply to the energy read ({probe.describe()}): not counted as a meter; a meter answers its own"
        " address with data and is silent to others"
    )


# --- judging a register map against what it read ---------------------------------------------------


class Evidence(StrEnum):
    MAINS = "mains"  # a voltage or the frequency where a live grid puts it: strong
    PLAUSIBLE = "plausible"  # inside the map's plausible range, not zero
    ZERO = "zero"  # zero: plausible, proves nothing (unused registers often read 0)
    OFF_MAINS = "off_mains"  # a voltage or frequency in range but not a grid's: wrong scale or layout
    IMPLAUSIBLE = "implausible"  # outside the map's plausible range, NaN or infinite: not this map


@dataclass(frozen=True, slots=True)
class PointCheck:
    quantity: str
    value: float
    evidence: Evidence
    note: str = ""


def check_point(point: ModbusPoint | Dlt645Point, value: float) -> PointCheck:
    """What one reading says about the map that decoded it (pure)."""
    name = point.name
    low, high = point.plausible_min, point.plausible_max
    if not math.isfinite(value):
        return PointCheck(name, value, Evidence.IMPLAUSIBLE, f"{name} = {value}")
    if low is not None and high is not None and not low <= value <= high:
        return PointCheck(name, value, Evidence.IMPLAUSIBLE, f"{name} = {value:g} outside {low:g}..{high:g}")
    if value == 0:
        return PointCheck(name, value, Evidence.ZERO)
    if _MAINS_QUANTITY.match(name):
        window = MAINS_FREQUENCY_HZ if name == "frequency_hz" else MAINS_VOLTAGE_V
        if window[0] <= value <= window[1]:
            return PointCheck(name, value, Evidence.MAINS)
        return PointCheck(
            name, value, Evidence.OFF_MAINS, f"{name} = {value:g}, not a 50 Hz grid's {window[0]:g}..{window[1]:g}"
        )
    return PointCheck(name, value, Evidence.PLAUSIBLE)


class Fit(StrEnum):
    FITS = "fits"  # every read answered, every value plausible, something not zero
    WEAK = "weak"  # plausible as far as it goes: some reads refused, all zero, or off-mains values
    NO = "no"  # nothing read, or a value no such device can report


_FIT_RANK = {Fit.FITS: 2, Fit.WEAK: 1, Fit.NO: 0}
_EVIDENCE_SCORE = {
    Evidence.MAINS: _MAINS_SCORE,
    Evidence.PLAUSIBLE: _PLAUSIBLE_SCORE,
    Evidence.ZERO: 0,
    Evidence.OFF_MAINS: _OFF_MAINS_SCORE,
    Evidence.IMPLAUSIBLE: 0,
}


@dataclass(frozen=True, slots=True)
class MapFit:
    map_name: str
    fit: Fit
    score: int
    reads: int
    reads_answered: int  # reads that came back with data
    checks: tuple[PointCheck, ...]
    why: str
    refusals: tuple[str, ...] = ()  # how the reads that brought no data ended

    @property
    def key(self) -> tuple[int, int, int]:
        """Order of preference between maps: fit, then evidence, then how much was read that is not zero."""
        nonzero = sum(c.evidence is not Evidence.ZERO for c in self.checks)
        return (_FIT_RANK[self.fit], self.score, nonzero)

    @property
    def values(self) -> dict[str, float]:
        return {c.quantity: c.value for c in self.checks}


def judge_map(device_map: DeviceMap, outcomes: Sequence[ReadOutcome]) -> MapFit:
    """How well `device_map` explains what its reads returned (pure)."""
    checks = tuple(
        check_point(device_map.point(name), value) for outcome in outcomes for name, value in outcome.values.items()
    )
    answered = sum(o.answer is Answer.DATA for o in outcomes)
    refusals = tuple(o.describe() for o in outcomes if o.answer is not Answer.DATA)
    score = sum(_EVIDENCE_SCORE[c.evidence] for c in checks)
    counts = {e: sum(c.evidence is e for c in checks) for e in Evidence}
    bad = [c.note for c in checks if c.evidence is Evidence.IMPLAUSIBLE]
    name = device_map.name
    if answered == 0:
        why = "no read answered with data" + (f" ({refusals[0]})" if refusals else "")
        return MapFit(name, Fit.NO, 0, len(outcomes), 0, checks, why, refusals)
    if bad:
        why = f"implausible: {'; '.join(bad[:2])}" + (f" and {len(bad) - 2} more" if len(bad) > 2 else "")
        return MapFit(name, Fit.NO, score, len(outcomes), answered, checks, why, refusals)
    parts: list[str] = []
    if counts[Evidence.MAINS]:
        parts.append(_mains_text(checks))
    parts.append(f"{len(checks) - counts[Evidence.ZERO]}/{len(checks)} values plausible and not zero")
    if answered < len(outcomes):
        parts.append(f"{len(outcomes) - answered} of {len(outcomes)} reads brought no data ({refusals[0]})")
    off = [c.note for c in checks if c.evidence is Evidence.OFF_MAINS]
    if off:
        parts.append("; ".join(off[:2]))
    if answered == len(outcomes) and not off and score > 0:
        fit = Fit.FITS
    else:
        fit = Fit.WEAK
        if score <= 0 and not off:
            parts.append("every value zero: proves nothing")
    return MapFit(name, fit, score, len(outcomes), answered, checks, ", ".join(parts), refusals)


def _mains_text(checks: Sequence[PointCheck]) -> str:
    volts = [c for c in checks if c.evidence is Evidence.MAINS and c.quantity != "frequency_hz"]
    hertz = [c for c in checks if c.evidence is Evidence.MAINS and c.quantity == "frequency_hz"]
    parts = []
    if volts:
        low, high = MAINS_VOLTAGE_V
        parts.append(f"{len(volts)} voltage{'s' if len(volts) > 1 else ''} in {low:g}-{high:g} V")
    if hertz:
        parts.append(f"{hertz[0].value:g} Hz")
    return " and ".join(parts)


class Confidence(StrEnum):
    HIGH = "high"  # fits, a mains reading confirms it, clearly ahead of any other map
    MEDIUM = "medium"  # fits, but nothing as specific as a mains reading (inverters, chargers), or close runner-up
    LOW = "low"  # only a weak fit, or two maps the scan cannot tell apart


@dataclass(frozen=True, slots=True)
class Identification:
    best: str | None
    confidence: Confidence | None
    why: str
    also_fits: tuple[str, ...] = ()  # other maps that read plausible values too
    tied: tuple[str, ...] = ()  # maps exactly as good as `best`: the scan cannot choose between them


def identify(fits: Sequence[MapFit]) -> Identification:
    """The map that best explains a device, how sure that is, and which others fit too (pure)."""
    candidates = sorted((f for f in fits if f.fit is not Fit.NO), key=lambda f: (f.key, f.map_name), reverse=True)
    if not candidates:
        read = [f for f in fits if f.reads_answered]
        if not read:
            refusals = sorted({r for f in fits for r in f.refusals})
            heard = "; ".join(refusals[:2]) if refusals else "nothing"
            return Identification(None, None, f"no register map reads plausible values: every read brought {heard}")
        reasons = "; ".join(f"{f.map_name}: {f.why}" for f in read[:3])
        return Identification(None, None, f"no register map reads plausible values ({reasons})")
    top = candidates[0]
    tied = tuple(sorted(f.map_name for f in candidates if f.key == top.key))
    others = tuple(f.map_name for f in candidates[1:])
    if len(tied) > 1:
        best = tied[0]
        names = " and ".join(tied)
        why = f"{names} read the same plausible values ({top.why}): the scan cannot tell them apart, see the nameplate"
        return Identification(best, Confidence.LOW, why, tuple(n for n in others if n != best), tied)
    runner_up = candidates[1] if len(candidates) > 1 else None
    why = top.why
    if runner_up is not None:
        why += f"; also fits: {', '.join(others)} (less evidence: {runner_up.score} vs {top.score})"
    has_mains = any(c.evidence is Evidence.MAINS for c in top.checks)
    clear_lead = runner_up is None or runner_up.fit is not Fit.FITS or top.score - runner_up.score >= _MAINS_SCORE
    if top.fit is Fit.FITS and has_mains and clear_lead:
        confidence = Confidence.HIGH
    elif top.fit is Fit.FITS:
        confidence = Confidence.MEDIUM
    else:
        confidence = Confidence.LOW
    return Identification(top.map_name, confidence, why, others)


# --- the DL/T 645 broadcast ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BroadcastVerdict:
    address: str | None  # the one meter that answered, when one did
    single: bool  # True only for one clean reply and nothing else on the line
    why: str


def judge_broadcast(
    address: str | None, address_in_data: str | None, stray_bytes: int, problems: Sequence[str], late_bytes: int
) -> BroadcastVerdict:
    """What the reply to the broadcast read-address says (pure). Every meter on the line answers it at
    once, so more than one meter shows as bytes that are no valid frame, or as more than one reply."""
    if address is None:
        if stray_bytes or problems:
            why = (
                f"garbled reply ({stray_bytes} bytes, no valid frame): more than one meter answered at once (or"
                " the baud rate / parity is wrong). Read each meter's address off its nameplate and probe them"
                " with --addresses"
            )
            return BroadcastVerdict(None, single=False, why=why)
        why = "no meter answered the broadcast read-address (DL/T 645 meters ship at 2400 baud, 8E1)"
        return BroadcastVerdict(None, single=False, why=why)
    if address_in_data is not None and address_in_data != address:
        why = (
            f"a reply from {address} carries the address {address_in_data}: garbled by a second meter answering at"
            " once? Probe the nameplate addresses with --addresses"
        )
        return BroadcastVerdict(address, single=False, why=why)
    extra = stray_bytes + late_bytes
    if extra or problems:
        why = (
            f"{address} answered, with {extra} more bytes on the line: there may be more than one meter."
            " Probe the nameplate addresses with --addresses"
        )
        return BroadcastVerdict(address, single=False, why=why)
    return BroadcastVerdict(address, single=True, why=f"one meter answered: {address}")


# --- results ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FoundDevice:
    address: int | str
    presence: Presence
    probe: ReadOutcome
    why: str
    fits: tuple[MapFit, ...] = ()
    identification: Identification | None = None

    @property
    def best_fit(self) -> MapFit | None:
        if self.identification is None or self.identification.best is None:
            return None
        return next(f for f in self.fits if f.map_name == self.identification.best)


@dataclass(frozen=True, slots=True)
class WorstCase:
    """Upper bounds on the scan's time from the wire budgets of its requests."""

    if_none_answers_s: float
    per_answering_s: float  # added by each address that answers (every map tried, every read timing out)
    if_all_answer_s: float
    addresses: int
    maps: int
    reads_per_answering: int


@dataclass(frozen=True, slots=True)
class ScanResult:
    settings: ScanSettings
    addresses: tuple[int | str, ...]  # what was probed (Modbus units; DL/T 645 addresses, empty for broadcast)
    found: tuple[FoundDevice, ...]  # every address that answered anything
    silent: tuple[int | str, ...]
    worst_case: WorstCase
    elapsed_s: float
    broadcast: BroadcastVerdict | None = None

    @property
    def present(self) -> tuple[FoundDevice, ...]:
        return tuple(d for d in self.found if d.presence is Presence.PRESENT)


# --- reading through the bus -----------------------------------------------------------------------


# Of the bytes around a reply that were not it, this many are kept to say what they were (the longest
# Modbus frame); the rest are only counted, so a babbling line cannot grow the scan's memory.
MAX_KEPT_STRAY_BYTES = modbus.MAX_FRAME_BYTES


@dataclass(slots=True)
class _Heard:
    """What came back around a reply, beyond the reply itself (the decoders skip it; a scan reports it)."""

    stray_bytes: int = 0  # taken off the line without yielding the reply
    kept: bytearray = field(default_factory=bytearray)  # the first of them
    pending: bytes = b""  # an incomplete frame when the wait ended
    trailing_bytes: int = 0  # after the reply in the same read
    problems: list[str] = field(default_factory=list)

    @property
    def received_bytes(self) -> int:
        return self.stray_bytes + len(self.pending)

    @property
    def noisy(self) -> bool:
        return bool(self.received_bytes or self.problems)

    def junk(self) -> bytes:
        return bytes(self.kept) + self.pending[: MAX_KEPT_STRAY_BYTES - len(self.kept)]


def _listening(exchange: Exchange) -> tuple[Exchange, _Heard]:
    heard = _Heard()

    def decode(buf: bytes) -> tuple[int, Any | None, list[FrameError]]:
        consumed, frame, skipped = exchange.decode(buf)
        heard.problems.extend(str(error) for error in skipped)
        if frame is None:
            heard.stray_bytes += consumed
            heard.kept += buf[: min(consumed, MAX_KEPT_STRAY_BYTES - len(heard.kept))]
            heard.pending = buf[consumed:]
        else:
            heard.pending = b""
            heard.trailing_bytes = len(buf) - consumed
        return consumed, frame, skipped

    return replace(exchange, decode=decode), heard


def reply_for_another(protocol: BusProtocol, junk: bytes, asked: int | str) -> int | str | None:
    """The address a valid reply among `junk` came from, when it is not `asked` (pure): the late reply of
    a slow device to an earlier request, or another master's traffic."""
    if protocol is BusProtocol.MODBUS_RTU:
        _, reply, _ = modbus.decode_reply(junk)
        return reply.unit if reply is not None and reply.unit != asked else None
    start = 0
    while start < len(junk):
        consumed, frame, _ = dlt645.decode_frame(junk[start:])
        if frame is None:
            return None
        if frame.from_meter and frame.address != asked:
            return frame.address
        start += consumed
    return None


async def _read_heard(
    bus: Bus, exchange: Exchange, asked: int | str, clock: Callable[[], float]
) -> tuple[ReadOutcome, _Heard]:
    """One attempt at `asked`, whatever its health, and what else was on the line; a PortError (the
    port itself failed) propagates."""
    listened, heard = _listening(exchange)
    started = clock()
    try:
        values = await bus.transact(listened, attempts=1, even_if_lost=True)
    except DeviceException as err:
        refusal = "exception" if bus.config.protocol is BusProtocol.MODBUS_RTU else "error reply"
        outcome = ReadOutcome(Answer.REFUSED, code=err.code, detail=err.meaning, elapsed_s=clock() - started,
                              refusal=refusal)  # fmt: skip
    except FrameError as err:
        detail = f"reply does not fit the request: {err}"
        outcome = ReadOutcome(Answer.GARBLED, detail=detail, elapsed_s=clock() - started)
    except DeviceTimeout:
        elapsed = clock() - started
        other = reply_for_another(bus.config.protocol, heard.junk(), asked) if heard.noisy else None
        if other is not None:
            detail = f"only a reply from {other} was heard (late for its own request? raise --timeout-s)"
            outcome = ReadOutcome(Answer.OTHER_REPLY, detail=detail, elapsed_s=elapsed)
        elif heard.noisy:
            detail = f"{heard.received_bytes} bytes, no valid frame"
            outcome = ReadOutcome(Answer.GARBLED, detail=detail, elapsed_s=elapsed)
        else:
            outcome = ReadOutcome(Answer.SILENT, elapsed_s=elapsed)
    else:
        outcome = ReadOutcome(Answer.DATA, values=values, elapsed_s=clock() - started)
    return outcome, heard


async def _read(bus: Bus, exchange: Exchange, asked: int | str, clock: Callable[[], float]) -> ReadOutcome:
    return (await _read_heard(bus, exchange, asked, clock))[0]


def _modbus_probe(unit: int) -> Exchange:
    request = modbus.ReadRequest(unit, PROBE_FUNCTION, PROBE_REGISTER, 1)

    def interpret(reply: modbus.Reply) -> Readings:
        if isinstance(reply, modbus.ExceptionReply):
            raise DeviceException(f"unit {unit}", reply.code, reply.meaning)
        if not isinstance(reply, modbus.ReadReply) or reply.function != PROBE_FUNCTION:
            raise FrameError(1, f"reply function {reply.function} does not answer function {PROBE_FUNCTION}")
        return {}

    return Exchange(
        device=f"unit {unit}",
        request=modbus.encode_request(request),
        decode=lambda buf: modbus.decode_reply(buf, unit=unit),
        interpret=interpret,
        expected_reply_bytes=7,
        description=f"probe: read 1 register at {PROBE_REGISTER} (function {PROBE_FUNCTION})",
    )


def _raw_modbus(exchange: Exchange, device_map: DeviceMap) -> Exchange:
    """The driver's read with every value kept: the driver drops implausible readings, the scan judges them."""
    request = modbus.parse_request(exchange.request)
    assert isinstance(request, modbus.ReadRequest)
    points = [p for p in (device_map.point(q) for q in exchange.quantities) if isinstance(p, ModbusPoint)]

    def interpret(reply: modbus.Reply) -> Readings:
        if isinstance(reply, modbus.ExceptionReply):
            raise DeviceException(exchange.device, reply.code, reply.meaning)
        if not isinstance(reply, modbus.ReadReply) or reply.function != request.function:
            raise FrameError(1, f"reply function {reply.function} does not answer function {request.function}")
        if len(reply.registers) != request.count:
            raise FrameError(2, f"asked for {request.count} registers, got {len(reply.registers)}")
        values: Readings = {}
        for point in points:
            offset = point.address - request.address
            words = reply.registers[offset : offset + point.type.words]
            values[point.name] = words_to_raw(point.type, words, point.word_order) * point.scale * point.sign
        return values

    return replace(exchange, interpret=interpret)


def _raw_dlt645(exchange: Exchange, device_map: DeviceMap) -> Exchange:
    point = device_map.point(exchange.quantities[0])
    assert isinstance(point, Dlt645Point)
    di = int(point.di, 16)

    def interpret(frame: dlt645.Dlt645Frame) -> Readings:
        if frame.is_error:
            code = frame.data[0] if frame.data else 0
            raise DeviceException(exchange.device, code, dlt645.error_meaning(code))
        result = dlt645.decode_read_reply(frame)
        if result.di != di or not result.values:
            raise FrameError(10, f"reply carries DI {result.di:08X}, asked for {di:08X}")
        return {point.name: result.values[0] * point.scale * point.sign}

    return replace(exchange, interpret=interpret)


def _map_reads(device_map: DeviceMap, address: int | str) -> list[Exchange]:
    """Every read of the map, as the controller would issue them (one per register block or DI)."""
    driver = DeviceDriver(f"{address} as {device_map.name}", device_map, address)
    raw = _raw_modbus if device_map.protocol is BusProtocol.MODBUS_RTU else _raw_dlt645
    return [raw(exchange, device_map) for _, exchange in driver.read_schedule()]


def _dlt645_decoder(address: str | None, function: int) -> Callable[[bytes], tuple[int, Any | None, list[FrameError]]]:
    """Frames from a meter with this function (and address, when given); our own request (an adapter's
    echo) and frames for others are skipped and said so."""

    def decode(buf: bytes) -> tuple[int, dlt645.Dlt645Frame | None, list[FrameError]]:
        consumed_total = 0
        errors: list[FrameError] = []
        while True:
            consumed, frame, skipped = dlt645.decode_frame(buf[consumed_total:])
            errors.extend(FrameError(e.offset + consumed_total, e.reason) for e in skipped)
            consumed_total += consumed
            if frame is None:
                return consumed_total, None, errors
            if frame.from_meter and frame.function == function and address in (None, frame.address):
                return consumed_total, frame, errors
            if frame.from_meter:
                errors.append(FrameError(consumed_total, f"a reply from {frame.address} (control {frame.control:02X})"))

    return decode


def _dlt645_presence(address: str) -> Exchange:
    def interpret(frame: dlt645.Dlt645Frame) -> Readings:
        if frame.is_error:
            code = frame.data[0] if frame.data else 0
            raise DeviceException(address, code, dlt645.error_meaning(code))
        result = dlt645.decode_read_reply(frame)
        return {"import_energy_kwh": result.values[0]} if result.values else {}

    item = dlt645.DATA_ITEMS[PRESENCE_DI]
    return Exchange(
        device=address,
        request=dlt645.encode_frame(dlt645.read_request(address, PRESENCE_DI)),
        decode=_dlt645_decoder(address, dlt645.FUNCTION_READ),
        interpret=interpret,
        expected_reply_bytes=dlt645.FRAME_OVERHEAD + 4 + item.data_bytes + 4,
        description=f"probe: read DI {PRESENCE_DI:08X}",
    )


@dataclass(slots=True)
class _AddressReply:
    address: str | None = None
    address_in_data: str | None = None


def _dlt645_broadcast() -> tuple[Exchange, _AddressReply]:
    reply = _AddressReply()

    def interpret(frame: dlt645.Dlt645Frame) -> Readings:
        if frame.is_error:
            code = frame.data[0] if frame.data else 0
            raise DeviceException(frame.address, code, dlt645.error_meaning(code))
        reply.address = frame.address
        if len(frame.data) == 6 and all(b >> 4 <= 9 and b & 0x0F <= 9 for b in frame.data):
            reply.address_in_data = "".join(f"{b:02X}" for b in reversed(frame.data))
        return {}

    exchange = Exchange(
        device="broadcast",
        request=dlt645.encode_frame(dlt645.read_address_request()),
        decode=_dlt645_decoder(None, dlt645.FUNCTION_READ_ADDRESS),
        interpret=interpret,
        expected_reply_bytes=4 + dlt645.FRAME_OVERHEAD + 6,
        description="broadcast read-address",
    )
    return exchange, reply


def _worst_case(bus: Bus, probe: Exchange, per_answering: Sequence[Exchange], addresses: int, maps: int) -> WorstCase:
    def cost(exchange: Exchange) -> float:
        return bus.reply_budget_s(exchange) + bus.silent_interval_s

    none_s = addresses * cost(probe)
    per_s = sum(cost(e) for e in per_answering)
    return WorstCase(none_s, per_s, none_s + addresses * per_s, addresses, maps, len(per_answering))


async def _open(link: Link, settings: ScanSettings) -> None:
    try:
        await link.open()
    except PortError as err:
        hint = ""
        if "ermission" in str(err):
            hint = " (is your user in the dialout group?)"
        elif "Invalid argument" in str(err) and settings.parity is not Parity.NONE:
            hint = f" (the port refuses parity {settings.parity.value}: a pty or some adapters do)"
        raise ScanError(f"{err}{hint}") from None


async def _try_maps(run: _Run, address: int | str) -> tuple[tuple[MapFit, ...], Identification]:
    fits: list[MapFit] = []
    for device_map in run.maps:
        reads = _map_reads(device_map, address)
        outcomes = [await _read(run.bus, exchange, address, run.clock) for exchange in reads]
        fits.append(judge_map(device_map, outcomes))
    return tuple(fits), identify(fits)


Progress = Callable[[str], None]


def _ignore(_: str) -> None:
    return None


@dataclass(frozen=True, slots=True)
class _Run:
    bus: Bus
    settings: ScanSettings
    maps: tuple[DeviceMap, ...]
    progress: Progress
    announce: Callable[[WorstCase], None]
    clock: Callable[[], float]
    started: float

    def result(self, addresses: Sequence[int | str], found: Sequence[FoundDevice], silent: Sequence[int | str],
               worst: WorstCase, broadcast: BroadcastVerdict | None = None) -> ScanResult:  # fmt: skip
        elapsed_s = self.clock() - self.started
        return ScanResult(self.settings, tuple(addresses), tuple(found), tuple(silent), worst, elapsed_s, broadcast)


async def scan(
    settings: ScanSettings,
    *,
    units: Sequence[int] = (),
    addresses: Sequence[str] = (),
    progress: Progress = _ignore,
    announce: Callable[[WorstCase], None] = lambda _: None,
    link: Link | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> ScanResult:
    """Probe the bus and judge what answers. Modbus: each of `units`. DL/T 645: each of `addresses`, or
    the broadcast read-address when none are given. `announce` gets the worst-case time before the first
    byte is sent; `progress` a line per address. `link` defaults to the settings' serial port."""
    if settings.protocol is BusProtocol.MODBUS_RTU and not units:
        raise ScanError("no unit ids to scan")
    try:
        config = settings.bus_config()
    except ValidationError as err:
        raise ScanError("; ".join(format_validation_error(err))) from None
    link = link or SerialLink(config, settings.port)
    bus = Bus(config, link, clock=clock, reopen_after_failures=None)
    maps = tuple(m for m in all_maps().values() if m.protocol is settings.protocol)
    await _open(link, settings)
    try:
        run = _Run(bus, settings, maps, progress, announce, clock, clock())
        if settings.protocol is BusProtocol.MODBUS_RTU:
            return await _scan_modbus(run, units)
        if not addresses:
            return await _scan_broadcast(run)
        return await _scan_addresses(run, addresses)
    finally:
        await link.close()


def _trial_reads(maps: Sequence[DeviceMap], address: int | str) -> list[Exchange]:
    return [exchange for device_map in maps for exchange in _map_reads(device_map, address)]


async def _scan_modbus(run: _Run, units: Sequence[int]) -> ScanResult:
    worst = _worst_case(run.bus, _modbus_probe(units[0]), _trial_reads(run.maps, units[0]), len(units), len(run.maps))
    run.announce(worst)
    found: list[FoundDevice] = []
    silent: list[int | str] = []
    for index, unit in enumerate(units, start=1):
        probe = await _read(run.bus, _modbus_probe(unit), unit, run.clock)
        presence, why = unit_presence(BusProtocol.MODBUS_RTU, probe)
        head = f"[{index}/{len(units)}] unit {unit}:"
        if probe.answer is Answer.SILENT:
            silent.append(unit)
            run.progress(f"{head} no answer")
        elif presence is not Presence.PRESENT:
            found.append(FoundDevice(unit, presence, probe, why))
            run.progress(f"{head} {why}")
        else:
            fits, identification = await _try_maps(run, unit)
            found.append(FoundDevice(unit, presence, probe, why, fits, identification))
            run.progress(f"{head} answered ({probe.describe()}); {_verdict_line(identification)}")
    return run.result(units, found, silent, worst)


async def _scan_addresses(run: _Run, addresses: Sequence[str]) -> ScanResult:
    probe_read = _dlt645_presence(addresses[0])
    worst = _worst_case(run.bus, probe_read, _trial_reads(run.maps, addresses[0]), len(addresses), len(run.maps))
    run.announce(worst)
    found: list[FoundDevice] = []
    silent: list[int | str] = []
    for index, address in enumerate(addresses, start=1):
        probe = await _read(run.bus, _dlt645_presence(address), address, run.clock)
        presence, why = unit_presence(BusProtocol.DLT645, probe)
        head = f"[{index}/{len(addresses)}] {address}:"
        if probe.answer is Answer.SILENT:
            silent.append(address)
            run.progress(f"{head} no answer")
        elif presence is not Presence.PRESENT:
            found.append(FoundDevice(address, presence, probe, why))
            run.progress(f"{head} {why}")
        else:
            fits, identification = await _try_maps(run, address)
            found.append(FoundDevice(address, presence, probe, why, fits, identification))
            run.progress(f"{head} answered; {_verdict_line(identification)}")
    return run.result(addresses, found, silent, worst)


async def _scan_broadcast(run: _Run) -> ScanResult:
    broadcast, reply = _dlt645_broadcast()
    worst = _worst_case(run.bus, broadcast, _trial_reads(run.maps, "000000000000"), 1, len(run.maps))
    run.announce(worst)
    outcome, heard = await _read_heard(run.bus, broadcast, dlt645.WILDCARD_ADDRESS, run.clock)
    if outcome.answer is Answer.REFUSED:
        verdict = BroadcastVerdict(None, single=False, why=f"the broadcast was refused ({outcome.describe()})")
    else:
        address = reply.address if outcome.answer is Answer.DATA else None
        stray = heard.received_bytes
        verdict = judge_broadcast(address, reply.address_in_data, stray, heard.problems, heard.trailing_bytes)
    if verdict.address is None:
        run.progress(f"broadcast: {verdict.why}")
        return run.result((), [], [], worst, verdict)
    address = verdict.address
    discarded = run.bus.stats.bytes_discarded
    fits, identification = await _try_maps(run, address)
    late_bytes = run.bus.stats.bytes_discarded - discarded
    if late_bytes and verdict.single:  # more replies to the broadcast came after the first one
        verdict = judge_broadcast(address, reply.address_in_data, 0, [], late_bytes)
    if any(f.reads_answered for f in fits):
        presence, why = Presence.PRESENT, "answered the broadcast read-address and reads at its address"
    else:
        presence, why = Presence.UNCONFIRMED, "answered the broadcast read-address, but no read at its address"
    run.progress(f"broadcast: {verdict.why}; {_verdict_line(identification)}")
    device = FoundDevice(address, presence, outcome, why, fits, identification)
    return run.result((), [device], [], worst, verdict)


def _verdict_line(identification: Identification) -> str:
    if identification.best is None:
        return "no map fits"
    others = [t for t in identification.tied if t != identification.best]
    tied = f" (or {', '.join(others)})" if others else ""
    return f"{identification.best}{tied}, confidence {identification.confidence}"
