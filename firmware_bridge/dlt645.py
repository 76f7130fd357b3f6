"""DL/T 645-2007 codec: pure functions between frames, data identifiers, BCD values and bytes."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from firmware_bridge.errors import FrameError

__all__ = [
    "BROADCAST_ADDRESS",
    "DATA_ITEMS",
    "MAX_DATA_BYTES",
    "WILDCARD_ADDRESS",
    "DataItem",
    "Dlt645Frame",
    "address_reply",
    "decode_bcd",
    "decode_frame",
    "decode_read_reply",
    "encode_bcd",
    "encode_frame",
    "error_meaning",
    "error_reply",
    "parse_frame",
    "read_address_request",
    "read_follow_up_request",
    "read_reply",
    "read_request",
]

START = 0x68
END = 0x16
PREAMBLE = 0xFE
# The standard caps L at 200 for read replies; refusing longer frames caps what a peer can make us buffer.
MAX_DATA_BYTES = 200
FRAME_OVERHEAD = 12  # 68 A0..A5 68 C L ... CS 16
BROADCAST_ADDRESS = "999999999999"
WILDCARD_ADDRESS = "AAAAAAAAAAAA"

CONTROL_FROM_METER = 0x80
CONTROL_ERROR = 0x40
CONTROL_FOLLOW_UP = 0x20
FUNCTION_READ = 0x11
FUNCTION_READ_FOLLOW_UP = 0x12
FUNCTION_READ_ADDRESS = 0x13

_ERROR_BITS = (
    "other error",
    "no such data (unknown DI)",
    "password wrong or unauthorised",
    "baud rate cannot be changed",
    "too many year time zones",
    "too many day time slots",
    "too many tariffs",
)


def error_meaning(code: int) -> str:
    reasons = [text for bit, text in enumerate(_ERROR_BITS) if code & (1 << bit)]
    return ", ".join(reasons) or "error with no reason bit set"


@dataclass(frozen=True, slots=True)
class DataItem:
    """How the value behind a data identifier is encoded."""

    name: str
    unit: str
    length: int  # bytes per value
    decimals: int
    signed: bool
    count: int = 1  # values in a block read (xxxxFFxx)

    @property
    def data_bytes(self) -> int:
        return self.length * self.count


def _phases(
    base: int, name: str, unit: str, *, length: int, decimals: int, signed: bool, total: bool
) -> dict[int, DataItem]:
    """Per-phase DIs put the phase (1..3) in DI1 and the block (FF) in DI2: 0201 01 00, 0201 FF 00."""
    items: dict[int, DataItem] = {}
    if total:
        items[base] = DataItem(f"{name}_total_{unit}", unit, length, decimals, signed)
    for phase, letter in enumerate("abc", start=1):
        items[base + (phase << 8)] = DataItem(f"{name}_{letter}_{unit}", unit, length, decimals, signed)
    count = 4 if total else 3
    items[base | 0xFF00] = DataItem(f"{name}_block_{unit}", unit, length, decimals, signed, count)
    return items


DATA_ITEMS: dict[int, DataItem] = {
    0x00000000: DataItem("combined_active_energy_kwh", "kwh", 4, 2, True),
    0x00010000: DataItem("forward_active_energy_kwh", "kwh", 4, 2, False),
    0x00020000: DataItem("reverse_active_energy_kwh", "kwh", 4, 2, False),
    # Total and tariffs T1..T4 (sharp, peak, flat, valley).
    0x0001FF00: DataItem("forward_active_energy_block_kwh", "kwh", 4, 2, False, 5),
    0x0002FF00: DataItem("reverse_active_energy_block_kwh", "kwh", 4, 2, False, 5),
    **_phases(0x02010000, "voltage", "v", length=2, decimals=1, signed=False, total=False),
    **_phases(0x02020000, "current", "a", length=3, decimals=3, signed=True, total=False),
    **_phases(0x02030000, "active_power", "kw", length=3, decimals=4, signed=True, total=True),
    **_phases(0x02040000, "reactive_power", "kvar", length=3, decimals=4, signed=True, total=True),
    **_phases(0x02050000, "apparent_power", "kva", length=3, decimals=4, signed=True, total=True),
    **_phases(0x02060000, "power_factor", "pf", length=2, decimals=3, signed=True, total=True),
    0x02800001: DataItem("neutral_current_a", "a", 3, 3, True),
    0x02800002: DataItem("frequency_hz", "hz", 2, 2, False),
    0x02800007: DataItem("meter_temperature_c", "c", 2, 1, True),
}


@dataclass(frozen=True, slots=True)
class Dlt645Frame:
    address: str  # 12 characters, most significant first as printed on the meter ("AA" wildcards allowed)
    control: int
    data: bytes  # with the +0x33 offset already removed

    @property
    def from_meter(self) -> bool:
        return bool(self.control & CONTROL_FROM_METER)

    @property
    def is_error(self) -> bool:
        return bool(self.control & CONTROL_ERROR)

    @property
    def has_follow_up(self) -> bool:
        return bool(self.control & CONTROL_FOLLOW_UP)

    @property
    def function(self) -> int:
        return self.control & 0x1F


@functools.lru_cache(maxsize=256)
def _address_bytes(address: str) -> bytes:
    # Cached: a bus asks the same few meters every second (a refused address raises, and is not cached).
    if len(address) != 12:
        raise ValueError(f"address {address!r} is not 12 characters")
    pairs = [address[i : i + 2] for i in range(0, 12, 2)]
    out = bytearray()
    for pair in reversed(pairs):  # A0 (last two digits) goes first on the wire
        if pair.upper() == "AA":
            out.append(0xAA)
        elif pair.isdigit():
            out.append(int(pair, 16))
        else:
            raise ValueError(f"address {address!r}: {pair!r} is neither BCD nor AA")
    return bytes(out)


# Bytes an address may hold: two BCD digits, or AA (a wildcard digit pair).
_ADDRESS_BYTES = bytes(b for b in range(256) if b == 0xAA or (b >> 4 <= 9 and b & 0x0F <= 9))
# The wire's +0x33 on every data byte, both ways, as translation tables.
_PLUS_33 = bytes((b + 0x33) & 0xFF for b in range(256))
_MINUS_33 = bytes((b - 0x33) & 0xFF for b in range(256))


def _address_text(raw: bytes, offset: int) -> str:
    if not raw.translate(None, _ADDRESS_BYTES):  # every byte is BCD or AA: its digits, A5 first
        return raw[::-1].hex().upper()
    text = []
    for index, byte in enumerate(raw):
        if byte != 0xAA and (byte >> 4 > 9 or byte & 0x0F > 9):
            raise FrameError(offset + index, f"address byte 0x{byte:02X} is not BCD")
        text.append(f"{byte:02X}")
    return "".join(reversed(text))


def encode_frame(frame: Dlt645Frame, *, preamble: int = 4) -> bytes:
    if not 0 <= preamble <= 4:
        raise ValueError("the wake-up preamble is 0 to 4 bytes of FE")
    if len(frame.data) > MAX_DATA_BYTES:
        raise ValueError(f"data is {len(frame.data)} bytes, more than {MAX_DATA_BYTES}")
    body = bytearray([START, *_address_bytes(frame.address), START, frame.control & 0xFF, len(frame.data)])
    body.extend(frame.data.translate(_PLUS_33))
    body.append(sum(body) & 0xFF)
    body.append(END)
    return bytes([PREAMBLE] * preamble) + bytes(body)


def _parse_at(buf: bytes, start: int) -> tuple[int, Dlt645Frame] | None:
    """(frame length, frame) for a frame beginning at buf[start] == 0x68; None if incomplete."""
    if len(buf) - start < 10:
        return None
    if buf[start + 7] != START:
        raise FrameError(start + 7, f"expected second 0x68, got 0x{buf[start + 7]:02X}")
    length = buf[start + 9]
    if length > MAX_DATA_BYTES:
        raise FrameError(start + 9, f"data length {length} exceeds {MAX_DATA_BYTES}")
    total = FRAME_OVERHEAD + length
    if len(buf) - start < total:
        return None
    frame = buf[start : start + total]
    checksum = sum(frame[:-2]) & 0xFF
    if frame[-2] != checksum:
        raise FrameError(start + total - 2, f"checksum 0x{frame[-2]:02X}, expected 0x{checksum:02X}")
    if frame[-1] != END:
        raise FrameError(start + total - 1, f"expected end 0x16, got 0x{frame[-1]:02X}")
    address = _address_text(frame[1:7], start + 1)
    data = bytes(frame[10:-2]).translate(_MINUS_33)
    return total, Dlt645Frame(address, frame[8], data)


def parse_frame(data: bytes) -> Dlt645Frame:
    """Exactly one frame (FE preamble allowed), or FrameError naming the byte offset."""
    start = 0
    while start < len(data) and data[start] == PREAMBLE:
        start += 1
    if start == len(data):
        raise FrameError(start, "no frame start 0x68")
    if data[start] != START:
        raise FrameError(start, f"expected frame start 0x68, got 0x{data[start]:02X}")
    parsed = _parse_at(data, start)
    if parsed is None:
        raise FrameError(len(data), f"frame ends after {len(data)} bytes, too short")
    length, frame = parsed
    if start + length != len(data):
        raise FrameError(start + length, f"{len(data) - start - length} bytes after the end of the frame")
    return frame


def decode_frame(buf: bytes) -> tuple[int, Dlt645Frame | None, list[FrameError]]:
    """Stream decoder: (bytes consumed, frame or None if more are needed, what was skipped and why).

    FE wake-up bytes are skipped silently; anything else that does not parse is skipped one byte
    at a time and reported with its offset.
    """
    errors: list[FrameError] = []
    start = 0
    while start < len(buf):
        byte = buf[start]
        if byte != START:
            if byte != PREAMBLE:
                errors.append(FrameError(start, f"garbage byte 0x{byte:02X} outside a frame"))
            start += 1
            continue
        try:
            parsed = _parse_at(buf, start)
        except FrameError as err:
            errors.append(err)
            start += 1
            continue
        if parsed is None:
            later = _complete_frame_after(buf, start)
            if later is None:
                return start, None, errors
            errors.append(FrameError(start, "skipped bytes that looked like the start of a frame"))
            return later[0], later[1], errors
        return start + parsed[0], parsed[1], errors
    return start, None, errors


def _complete_frame_after(buf: bytes, start: int) -> tuple[int, Dlt645Frame] | None:
    position = buf.find(START, start + 1)
    while position != -1:
        try:
            parsed = _parse_at(buf, position)
            if parsed is not None:
                return position + parsed[0], parsed[1]
        except FrameError:
            pass
        position = buf.find(START, position + 1)
    return None


# --- values -------------------------------------------------------------------------------------


def encode_bcd(value: float, length: int, decimals: int, signed: bool) -> bytes:
    """Little-endian BCD of round(value * 10^decimals); sign in the top bit of the last byte."""
    scaled = round(abs(value) * 10**decimals)
    limit = 10 ** (2 * length - 1) * (8 if signed else 10)
    if scaled >= limit or (value < 0 and not signed):
        raise ValueError(f"{value} does not fit {length} BCD bytes with {decimals} decimals")
    # The decimal digits read as hex are the BCD bytes, most significant first: the wire has them reversed.
    out = bytearray(bytes.fromhex(f"{scaled:0{2 * length}d}")[::-1])
    if signed and value < 0 and scaled:
        out[-1] |= 0x80
    return bytes(out)


def decode_bcd(raw: bytes, decimals: int, signed: bool, offset: int = 0) -> float:
    """Inverse of encode_bcd; FrameError (with the byte offset) on a nibble above 9."""
    ordered = bytearray(raw[::-1])  # most significant byte first
    negative = bool(signed and ordered and ordered[0] & 0x80)
    if negative:
        ordered[0] &= 0x7F
    text = ordered.hex()
    if text.isdigit():  # every nibble 0..9 (a nibble above 9 is a letter): the digits as they stand
        magnitude = int(text) / float(10**decimals)
        return -magnitude if negative else magnitude
    negative = False
    digits = []
    for index in range(len(raw) - 1, -1, -1):
        byte = raw[index]
        if signed and index == len(raw) - 1:
            negative = bool(byte & 0x80)
            byte &= 0x7F
        if byte >> 4 > 9 or byte & 0x0F > 9:
            raise FrameError(offset + index, f"0x{raw[index]:02X} is not BCD")
        digits.append(f"{byte:02X}")
    magnitude = int("".join(digits)) / float(10**decimals)
    return -magnitude if negative else magnitude


def _di_bytes(di: int) -> bytes:
    return di.to_bytes(4, "little")  # DI0 first on the wire


# --- requests and replies -----------------------------------------------------------------------


def read_request(address: str, di: int) -> Dlt645Frame:
    return Dlt645Frame(address, FUNCTION_READ, _di_bytes(di))


def read_follow_up_request(address: str, di: int, sequence: int) -> Dlt645Frame:
    return Dlt645Frame(address, FUNCTION_READ_FOLLOW_UP, _di_bytes(di) + bytes([sequence & 0xFF]))


def read_address_request() -> Dlt645Frame:
    """Works only with a single meter on the line: it answers with its own address."""
    return Dlt645Frame(WILDCARD_ADDRESS, FUNCTION_READ_ADDRESS, b"")


def read_reply(address: str, di: int, values: tuple[float, ...], *, follow_up: bool = False) -> Dlt645Frame:
    item = DATA_ITEMS[di]
    if len(values) != item.count:
        raise ValueError(f"DI {di:08X} carries {item.count} values, got {len(values)}")
    payload = b"".join(encode_bcd(v, item.length, item.decimals, item.signed) for v in values)
    control = CONTROL_FROM_METER | FUNCTION_READ | (CONTROL_FOLLOW_UP if follow_up else 0)
    return Dlt645Frame(address, control, _di_bytes(di) + payload)


def error_reply(address: str, function: int, code: int) -> Dlt645Frame:
    return Dlt645Frame(address, CONTROL_FROM_METER | CONTROL_ERROR | function, bytes([code]))


def address_reply(address: str) -> Dlt645Frame:
    return Dlt645Frame(address, CONTROL_FROM_METER | FUNCTION_READ_ADDRESS, _address_bytes(address))


@dataclass(frozen=True, slots=True)
class ReadResult:
    di: int
    item: DataItem | None  # None for a DI we do not know; raw holds its bytes
    values: tuple[float, ...]
    raw: bytes


def decode_read_reply(frame: Dlt645Frame) -> ReadResult:
    """Values of a read reply: 91/B1, or a follow-up reply 92/B2 (its last byte is the frame
    sequence number). FrameError with the offset inside DATA when malformed."""
    follow_up = frame.function == FUNCTION_READ_FOLLOW_UP
    if frame.function not in (FUNCTION_READ, FUNCTION_READ_FOLLOW_UP) or not frame.from_meter or frame.is_error:
        raise FrameError(8, f"control 0x{frame.control:02X} is not a read reply")
    if len(frame.data) < 4 + follow_up:
        raise FrameError(10, f"read reply carries {len(frame.data)} data bytes, less than a DI")
    di = int.from_bytes(frame.data[:4], "little")
    raw = frame.data[4:-1] if follow_up else frame.data[4:]
    item = DATA_ITEMS.get(di)
    if item is None:
        return ReadResult(di, None, (), raw)
    if len(raw) != item.data_bytes:
        raise FrameError(14, f"DI {di:08X} needs {item.data_bytes} value bytes, got {len(raw)}")
    values = tuple(
        decode_bcd(raw[i : i + item.length], item.decimals, item.signed, offset=14 + i)
        for i in range(0, len(raw), item.length)
    )
    return ReadResult(di, item, values, raw)
