"""DL/T 645-2007 codec: the public vector, BCD with sign, preamble, resynchronisation, fuzzing."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_bridge import dlt645
from firmware_bridge.errors import FrameError

REQUEST = bytes.fromhex("68 12 90 78 56 34 12 68 11 04 33 33 34 33 68 16")
REPLY = bytes.fromhex("68 12 90 78 56 34 12 68 91 08 33 33 34 33 AB 89 67 45 CC 16")
addresses = st.text("0123456789", min_size=12, max_size=12)
frames = st.builds(dlt645.Dlt645Frame, addresses, st.integers(0, 255), st.binary(max_size=dlt645.MAX_DATA_BYTES))


def test_public_vector_request() -> None:
    assert dlt645.encode_frame(dlt645.read_request("123456789012", 0x00010000), preamble=0) == REQUEST


def test_public_vector_reply_reads_123456_78_kwh() -> None:
    frame = dlt645.parse_frame(REPLY)
    assert frame.address == "123456789012"
    result = dlt645.decode_read_reply(frame)
    assert result.item is not None
    assert result.item.name == "forward_active_energy_kwh"
    assert result.values == (123456.78,)


def test_preamble_is_accepted_and_emitted() -> None:
    wire = dlt645.encode_frame(dlt645.read_request("123456789012", 0x00010000))
    assert wire.startswith(b"\xfe\xfe\xfe\xfe")
    assert dlt645.parse_frame(wire) == dlt645.parse_frame(REQUEST)


@given(frames, st.integers(0, 4))
def test_frames_round_trip(frame: dlt645.Dlt645Frame, preamble: int) -> None:
    assert dlt645.parse_frame(dlt645.encode_frame(frame, preamble=preamble)) == frame


@given(st.integers(-7_999_999, 7_999_999))
def test_signed_bcd_round_trip(scaled: int) -> None:
    value = scaled / 10_000
    raw = dlt645.encode_bcd(value, 4, 4, signed=True)
    assert dlt645.decode_bcd(raw, 4, signed=True) == pytest.approx(value)


def test_negative_power_sets_the_sign_bit_of_the_last_byte() -> None:
    # -1.2345 kW, XX.XXXX in 3 bytes: 01 23 45 -> 45 23 01 on the wire, sign in the last byte.
    assert dlt645.encode_bcd(-1.2345, 3, 4, signed=True) == bytes([0x45, 0x23, 0x81])


def test_value_too_large_for_its_format_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        dlt645.encode_bcd(80.0, 3, 4, signed=True)


def test_non_bcd_value_names_the_offset() -> None:
    frame = dlt645.Dlt645Frame("123456789012", 0x91, bytes.fromhex("00000100") + bytes([0x12, 0x3A, 0, 0]))
    with pytest.raises(FrameError) as info:
        dlt645.decode_read_reply(frame)
    assert info.value.offset == 15
    assert "not BCD" in info.value.reason


def test_error_reply_meaning() -> None:
    frame = dlt645.parse_frame(dlt645.encode_frame(dlt645.error_reply("123456789012", 0x11, 0x02)))
    assert frame.is_error
    assert dlt645.error_meaning(frame.data[0]) == "no such data (unknown DI)"


def test_block_read_carries_three_voltages() -> None:
    frame = dlt645.read_reply("000000001001", 0x0201FF00, (230.1, 229.9, 231.0))
    assert dlt645.decode_read_reply(dlt645.parse_frame(dlt645.encode_frame(frame))).values == (230.1, 229.9, 231.0)


def test_bad_checksum_resyncs_to_the_next_frame() -> None:
    bad = REPLY[:-2] + bytes([REPLY[-2] ^ 1]) + REPLY[-1:]
    consumed, frame, errors = dlt645.decode_frame(b"\x00\x13" + bad + REPLY)
    assert frame == dlt645.parse_frame(REPLY)
    assert consumed == 2 + len(bad) + len(REPLY)
    assert any("checksum" in e.reason and e.offset == 2 + len(REPLY) - 2 for e in errors)


@given(st.binary(max_size=60), st.integers(0, 40))
def test_reply_survives_garbage_and_any_split(garbage: bytes, cut: int) -> None:
    wire = garbage + REPLY
    cut = min(cut + len(garbage), len(wire))
    consumed, frame, _ = dlt645.decode_frame(wire[:cut])
    if frame is None:
        _, frame, _ = dlt645.decode_frame(wire[consumed:])
    assert frame == dlt645.parse_frame(REPLY)


def test_oversized_length_is_refused() -> None:
    wire = bytes.fromhex("68 12 90 78 56 34 12 68 91") + bytes([201])
    with pytest.raises(FrameError) as info:
        dlt645.parse_frame(wire + bytes(220))
    assert info.value.offset == 9


@given(st.binary(max_size=600))
def test_decoder_never_raises_on_any_input(data: bytes) -> None:
    consumed, _frame, errors = dlt645.decode_frame(data)
    assert 0 <= consumed <= len(data)
    assert len(data) - consumed <= dlt645.FRAME_OVERHEAD + dlt645.MAX_DATA_BYTES or _frame is not None
    assert all(isinstance(e, FrameError) for e in errors)


@given(st.binary(max_size=300))
def test_strict_parser_and_reply_decoder_raise_only_frame_error(data: bytes) -> None:
    try:
        frame = dlt645.parse_frame(data)
    except FrameError:
        return
    with contextlib.suppress(FrameError):
        dlt645.decode_read_reply(frame)


def test_follow_up_reply_drops_its_sequence_byte() -> None:
    # A follow-up reply (92) carries DI, data, then the frame sequence number.
    payload = dlt645.encode_bcd(1234.5, 4, 2, signed=False)
    frame = dlt645.Dlt645Frame("123456789012", 0x92, bytes.fromhex("00000100") + payload + bytes([1]))
    result = dlt645.decode_read_reply(dlt645.parse_frame(dlt645.encode_frame(frame)))
    assert result.values == (1234.5,)
    request = dlt645.parse_frame(dlt645.encode_frame(dlt645.read_follow_up_request("123456789012", 0x00010000, 1)))
    assert request.function == 0x12
    assert request.data[-1] == 1
