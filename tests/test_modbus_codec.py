"""Modbus RTU codec: spec vectors, round trips, resynchronisation, and fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_bridge import modbus
from firmware_bridge.errors import FrameError

units = st.integers(1, 247)
words = st.integers(0, 0xFFFF)
read_requests = st.builds(
    modbus.ReadRequest, units, st.sampled_from([3, 4]), st.integers(0, 0xFF00), st.integers(1, 125)
)
read_replies = st.builds(
    modbus.ReadReply, units, st.sampled_from([3, 4]), st.lists(words, min_size=1, max_size=125).map(tuple)
)
write_single = st.builds(modbus.WriteSingleRequest, units, words, words)
write_multiple = st.builds(
    modbus.WriteMultipleRequest, units, st.integers(0, 0xFF00), st.lists(words, min_size=1, max_size=123).map(tuple)
)
replies = st.one_of(
    read_replies,
    st.builds(modbus.WriteSingleReply, units, words, words),
    st.builds(modbus.WriteMultipleReply, units, words, st.integers(1, 123)),
    st.builds(modbus.ExceptionReply, units, st.sampled_from([3, 4, 6, 16]), st.integers(1, 11)),
)


def test_crc_matches_the_spec_example() -> None:
    assert modbus.encode_request(modbus.ReadRequest(0x11, 3, 0x006B, 3)).hex(" ") == "11 03 00 6b 00 03 76 87"
    assert modbus.crc16(bytes.fromhex("1103006B0003")) == 0x8776


@given(st.one_of(read_requests, write_single, write_multiple))
def test_requests_round_trip(request: modbus.Request) -> None:
    assert modbus.parse_request(modbus.encode_request(request)) == request


@given(replies)
def test_replies_round_trip(reply: modbus.Reply) -> None:
    assert modbus.parse_reply(modbus.encode_reply(reply)) == reply


@given(replies, st.binary(max_size=40), st.integers(0, 300))
def test_reply_found_after_garbage_and_split_anywhere(reply: modbus.Reply, garbage: bytes, cut: int) -> None:
    wire = garbage + modbus.encode_reply(reply)
    cut = min(cut, len(wire))
    consumed, frame, _ = modbus.decode_reply(wire[:cut], unit=reply.unit)
    if frame is None:
        # Not enough yet: feed the rest to what was kept, as the bus does.
        consumed, frame, _ = modbus.decode_reply(wire[consumed:], unit=reply.unit)
    assert frame == reply


def test_bad_crc_is_skipped_and_reported_with_offset() -> None:
    good = modbus.encode_reply(modbus.ReadReply(1, 3, (7, 8)))
    bad = good[:-1] + bytes([good[-1] ^ 0xFF])
    consumed, frame, errors = modbus.decode_reply(bad + good, unit=1)
    assert frame == modbus.ReadReply(1, 3, (7, 8))
    assert consumed == len(bad) + len(good)
    assert any("CRC" in e.reason and e.offset == len(bad) - 2 for e in errors)


def test_exception_reply_names_its_meaning() -> None:
    reply = modbus.parse_reply(modbus.encode_reply(modbus.ExceptionReply(5, 3, 2)))
    assert isinstance(reply, modbus.ExceptionReply)
    assert reply.meaning == "illegal data address"


def test_out_of_range_requests_are_refused_before_the_wire() -> None:
    with pytest.raises(ValueError, match="126 registers"):
        modbus.encode_request(modbus.ReadRequest(1, 3, 0, 126))
    with pytest.raises(ValueError, match="unit id 0"):
        modbus.encode_request(modbus.ReadRequest(0, 3, 0, 1))


def test_parse_names_the_offset_of_trailing_bytes() -> None:
    with pytest.raises(FrameError) as info:
        modbus.parse_request(bytes.fromhex("1103006B0003768700"))
    assert info.value.offset == 8


@given(st.binary(max_size=600), st.one_of(st.none(), units))
def test_decoders_never_raise_on_any_input(data: bytes, unit: int | None) -> None:
    for decode in (modbus.decode_reply, modbus.decode_request):
        consumed, _frame, errors = decode(data, unit)
        assert 0 <= consumed <= len(data)
        # What is kept back waiting for more never exceeds one maximum frame.
        assert len(data) - consumed < modbus.MAX_FRAME_BYTES or _frame is not None
        assert all(isinstance(e, FrameError) for e in errors)


@given(st.binary(max_size=300))
def test_strict_parsers_raise_only_frame_error(data: bytes) -> None:
    for parse in (modbus.parse_reply, modbus.parse_request):
        try:
            parse(data)
        except FrameError as err:
            offset = err.offset
        else:
            continue
        assert 0 <= offset <= len(data)
