"""Modbus RTU codec: pure functions between PDUs and bytes (functions 03, 04, 06, 16 and exceptions)."""

from __future__ import annotations

import array
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from firmware_bridge.errors import FrameError

__all__ = [
    "EXCEPTION_MEANINGS",
    "MAX_FRAME_BYTES",
    "ExceptionReply",
    "ReadReply",
    "ReadRequest",
    "Reply",
    "Request",
    "WriteMultipleReply",
    "WriteMultipleRequest",
    "WriteSingleReply",
    "WriteSingleRequest",
    "crc16",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
    "parse_reply",
    "parse_request",
]

# The RTU ADU is at most 256 bytes: no peer can make us buffer more than that for one frame.
MAX_FRAME_BYTES = 256
MAX_READ_REGISTERS = 125
MAX_WRITE_REGISTERS = 123

EXCEPTION_MEANINGS = {
    0x01: "illegal function",
    0x02: "illegal data address",
    0x03: "illegal data value",
    0x04: "server device failure",
    0x05: "acknowledge (busy with a long command)",
    0x06: "server device busy",
    0x08: "memory parity error",
    0x0A: "gateway path unavailable",
    0x0B: "gateway target failed to respond",
}


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()
F = TypeVar("F")


# CRCs of frames seen lately: a controller sends the same requests every second and many replies repeat
# (states, setpoints read back), and a byte loop in Python costs a microsecond per 16 bytes. Bounded:
# cleared when full.
_CRC_MEMO: dict[bytes, int] = {}
_CRC_MEMO_MAX = 4096


def crc16(data: bytes | bytearray | memoryview) -> int:
    """CRC-16/MODBUS (init 0xFFFF, reflected 0xA001); sent low byte first."""
    if not isinstance(data, bytes):
        return _crc16(data)
    crc = _CRC_MEMO.get(data)
    if crc is None:
        if len(_CRC_MEMO) >= _CRC_MEMO_MAX:
            _CRC_MEMO.clear()
        crc = _CRC_MEMO[data] = _crc16(data)
    return crc


def _crc16(data: bytes | bytearray | memoryview) -> int:
    # Two bytes a step: the register is 16 bits wide, so after both bytes are XORed in (low byte first)
    # the next 16 shifts depend on the XOR alone (_CRC_PAIRS). An odd last byte goes the classic way.
    pairs = _crc_pairs()
    crc = 0xFFFF
    even = len(data) & ~1
    for word in _WORDS_LE(even // 2)(data[:even]):
        crc = pairs[crc ^ word]
    if even != len(data):
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ data[-1]) & 0xFF]
    return crc


def _crc_pairs() -> array.array[int]:
    global _CRC_PAIRS  # noqa: PLW0603 - built on first use (65536 entries), not at import
    if _CRC_PAIRS is None:
        table = _CRC_TABLE
        _CRC_PAIRS = array.array("H", [(table[w & 0xFF] >> 8) ^ table[((w >> 8) ^ table[w & 0xFF]) & 0xFF]
                                       for w in range(0x10000)])  # fmt: skip
    return _CRC_PAIRS


def _WORDS_LE(count: int) -> Callable[[bytes | bytearray | memoryview], tuple[int, ...]]:  # noqa: N802
    unpack = _LE_UNPACKERS.get(count)
    if unpack is None:
        unpack = _LE_UNPACKERS[count] = struct.Struct(f"<{count}H").unpack
    return unpack


_CRC_PAIRS: array.array[int] | None = None
_LE_UNPACKERS: dict[int, Callable[[bytes | bytearray | memoryview], tuple[int, ...]]] = {}


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<H", crc16(body))


@dataclass(frozen=True, slots=True)
class ReadRequest:
    unit: int
    function: int  # 3 holding, 4 input registers
    address: int
    count: int


@dataclass(frozen=True, slots=True)
class WriteSingleRequest:
    unit: int
    address: int
    value: int
    function: int = 6


@dataclass(frozen=True, slots=True)
class WriteMultipleRequest:
    unit: int
    address: int
    values: tuple[int, ...]
    function: int = 16


Request = ReadRequest | WriteSingleRequest | WriteMultipleRequest


@dataclass(frozen=True, slots=True)
class ReadReply:
    unit: int
    function: int
    registers: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class WriteSingleReply:
    unit: int
    address: int
    value: int
    function: int = 6


@dataclass(frozen=True, slots=True)
class WriteMultipleReply:
    unit: int
    address: int
    count: int
    function: int = 16


@dataclass(frozen=True, slots=True)
class ExceptionReply:
    unit: int
    function: int  # the function that was refused (without the 0x80 bit)
    code: int

    @property
    def meaning(self) -> str:
        return EXCEPTION_MEANINGS.get(self.code, "unknown exception")


Reply = ReadReply | WriteSingleReply | WriteMultipleReply | ExceptionReply


def _check_unit(unit: int, broadcast_ok: bool) -> None:
    if not (0 if broadcast_ok else 1) <= unit <= 247:
        raise ValueError(f"unit id {unit} outside 1..247")


def _check_word(value: int) -> None:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"register value {value} outside 0..65535")


def encode_request(request: Request) -> bytes:
    """Bytes of a request ADU including CRC; raises ValueError on out-of-range fields."""
    match request:
        case ReadRequest(unit, function, address, count):
            _check_unit(unit, broadcast_ok=False)
            if function not in (3, 4):
                raise ValueError(f"read function {function} is not 3 or 4")
            if not 1 <= count <= MAX_READ_REGISTERS or not 0 <= address <= 0xFFFF - count + 1:
                raise ValueError(f"cannot read {count} registers at {address}")
            return _with_crc(struct.pack(">BBHH", unit, function, address, count))
        case WriteSingleRequest(unit, address, value):
            _check_unit(unit, broadcast_ok=True)
            _check_word(address)
            _check_word(value)
            return _with_crc(struct.pack(">BBHH", unit, 6, address, value))
        case WriteMultipleRequest(unit, address, values):
            _check_unit(unit, broadcast_ok=True)
            if not 1 <= len(values) <= MAX_WRITE_REGISTERS or not 0 <= address <= 0xFFFF - len(values) + 1:
                raise ValueError(f"cannot write {len(values)} registers at {address}")
            for value in values:
                _check_word(value)
            head = struct.pack(">BBHHB", unit, 16, address, len(values), 2 * len(values))
            return _with_crc(head + struct.pack(f">{len(values)}H", *values))
    raise TypeError(f"not a Modbus request: {request!r}")


def _words(count: int) -> Callable[..., bytes]:
    packer = _WORDS.get(count)
    if packer is None:
        packer = _WORDS[count] = struct.Struct(f">{count}H").pack
    return packer


_WORDS: dict[int, Callable[..., bytes]] = {}
_HEAD = struct.Struct(">BBB").pack


def encode_reply(reply: Reply) -> bytes:
    """Bytes of a reply ADU (used by the simulated devices)."""
    if type(reply) is ReadReply:  # the reply of nearly every exchange: no pattern matching
        data = _words(len(reply.registers))(*reply.registers)
        return _with_crc(_HEAD(reply.unit, reply.function, len(data)) + data)
    match reply:
        case ReadReply(unit, function, registers):
            data = struct.pack(f">{len(registers)}H", *registers)
            return _with_crc(struct.pack(">BBB", unit, function, len(data)) + data)
        case WriteSingleReply(unit, address, value):
            return _with_crc(struct.pack(">BBHH", unit, 6, address, value))
        case WriteMultipleReply(unit, address, count):
            return _with_crc(struct.pack(">BBHH", unit, 16, address, count))
        case ExceptionReply(unit, function, code):
            return _with_crc(struct.pack(">BBB", unit, function | 0x80, code))
    raise TypeError(f"not a Modbus reply: {reply!r}")


def _reply_length(buf: bytes, start: int) -> int | None:
    """Length of the reply frame starting at `start`, None if more bytes are needed to know."""
    if len(buf) - start < 3:
        return None
    function = buf[start + 1]
    if function & 0x80:
        return 5
    if function in (3, 4):
        return 5 + buf[start + 2]
    if function in (6, 16):
        return 8
    raise FrameError(start + 1, f"function 0x{function:02X} is not one we speak")


def _request_length(buf: bytes, start: int) -> int | None:
    if len(buf) - start < 2:
        return None
    function = buf[start + 1]
    if function in (3, 4, 6):
        return 8
    if function == 16:
        return None if len(buf) - start < 7 else 9 + buf[start + 6]
    raise FrameError(start + 1, f"function 0x{function:02X} is not one we speak")


def _check_crc(frame: bytes, offset: int) -> None:
    got = int.from_bytes(frame[-2:], "little")
    want = crc16(frame[:-2])
    if got != want:
        raise FrameError(offset + len(frame) - 2, f"CRC 0x{got:04X}, expected 0x{want:04X}")


def _parse_reply_at(buf: bytes, start: int, length: int) -> Reply:
    frame = buf[start : start + length]
    _check_crc(frame, start)
    unit, function = frame[0], frame[1]
    if function & 0x80:
        return ExceptionReply(unit, function & 0x7F, frame[2])
    if function in (3, 4):
        count = frame[2]
        if count % 2:
            raise FrameError(start + 2, f"odd byte count {count} for registers")
        return ReadReply(unit, function, struct.unpack(f">{count // 2}H", frame[3 : 3 + count]))
    address, value = struct.unpack(">HH", frame[2:6])
    if function == 6:
        return WriteSingleReply(unit, address, value)
    return WriteMultipleReply(unit, address, value)


def _parse_request_at(buf: bytes, start: int, length: int) -> Request:
    frame = buf[start : start + length]
    _check_crc(frame, start)
    unit, function = frame[0], frame[1]
    address, value = struct.unpack(">HH", frame[2:6])
    if function in (3, 4):
        return ReadRequest(unit, function, address, value)
    if function == 6:
        return WriteSingleRequest(unit, address, value)
    if frame[6] != 2 * value:
        raise FrameError(start + 6, f"byte count {frame[6]} does not match {value} registers")
    return WriteMultipleRequest(unit, address, struct.unpack(f">{value}H", frame[7 : 7 + 2 * value]))


def parse_reply(data: bytes) -> Reply:
    """Exactly one reply frame, or FrameError naming the byte offset."""
    length = _reply_length(data, 0)
    if length is None or len(data) < length:
        raise FrameError(len(data), f"frame ends after {len(data)} bytes, too short")
    if len(data) > length:
        raise FrameError(length, f"{len(data) - length} bytes after the end of the frame")
    return _parse_reply_at(data, 0, length)


def parse_request(data: bytes) -> Request:
    """Exactly one request frame, or FrameError naming the byte offset."""
    length = _request_length(data, 0)
    if length is None or len(data) < length:
        raise FrameError(len(data), f"frame ends after {len(data)} bytes, too short")
    if len(data) > length:
        raise FrameError(length, f"{len(data) - length} bytes after the end of the frame")
    return _parse_request_at(data, 0, length)


def decode_reply(buf: bytes, unit: int | None = None) -> tuple[int, Reply | None, list[FrameError]]:
    """Stream decoder: (bytes consumed, frame or None if more bytes are needed, what was skipped and why).

    Resynchronises by sliding one byte at a time past anything that does not parse, so garbage
    before a frame, a frame split across reads and a frame with a bad CRC all end well.
    Only frames from `unit` are accepted when it is given.
    """
    # The usual case first: a whole frame from `unit` at the start (what the loop below finds first too).
    if buf and (unit is None or buf[0] == unit) and buf[0] <= 247:
        try:
            length = _reply_length(buf, 0)
            if length is not None and len(buf) >= length:
                return length, _parse_reply_at(buf, 0, length), []
        except FrameError:
            pass  # not a frame here after all: the loop below slides past it and says why
    return _decode(buf, unit, _reply_length, _parse_reply_at)


def decode_request(buf: bytes, unit: int | None = None) -> tuple[int, Request | None, list[FrameError]]:
    """Stream decoder for the server side (simulated devices); same contract as decode_reply."""
    # A master asks the same few requests over and over: a buffer that was exactly one request is that
    # request again (requests are immutable).
    cacheable = unit is None and isinstance(buf, bytes)
    if cacheable:
        known = _REQUESTS.get(buf)
        if known is not None:
            return len(buf), known, []
    consumed, request, errors = _decode(buf, unit, _request_length, _parse_request_at)
    if cacheable and request is not None and consumed == len(buf) and not errors:
        if len(_REQUESTS) >= _REQUESTS_MAX:
            _REQUESTS.clear()
        _REQUESTS[buf] = request
    return consumed, request, errors


# Buffers that held exactly one request, and the request (bounded: cleared when full).
_REQUESTS: dict[bytes, Request] = {}
_REQUESTS_MAX = 1024


def _decode(
    buf: bytes,
    unit: int | None,
    length_of: Callable[[bytes, int], int | None],
    parse_at: Callable[[bytes, int, int], F],
) -> tuple[int, F | None, list[FrameError]]:
    errors: list[FrameError] = []
    start = 0
    while start < len(buf):
        if (unit is not None and buf[start] != unit) or buf[start] > 247:
            start += 1
            continue
        try:
            length = length_of(buf, start)
            if length is None or len(buf) - start < length:
                if len(buf) - start >= MAX_FRAME_BYTES:
                    raise FrameError(start, "no frame within 256 bytes")
                # A garbage byte can look like the head of a long frame; a complete frame behind it wins.
                later = _complete_frame_after(buf, start, unit, length_of, parse_at)
                if later is None:
                    return start, None, errors
                end, frame = later
                errors.append(FrameError(start, "skipped bytes that looked like the start of a frame"))
                return end, frame, errors
            return start + length, parse_at(buf, start, length), errors
        except FrameError as err:
            errors.append(err)
            start += 1
    return start, None, errors


def _complete_frame_after(
    buf: bytes,
    start: int,
    unit: int | None,
    length_of: Callable[[bytes, int], int | None],
    parse_at: Callable[[bytes, int, int], F],
) -> tuple[int, F] | None:
    for later in range(start + 1, len(buf)):
        if (unit is not None and buf[later] != unit) or buf[later] > 247:
            continue
        try:
            length = length_of(buf, later)
            if length is not None and len(buf) - later >= length:
                return later + length, parse_at(buf, later, length)
        except FrameError:
            continue
    return None
