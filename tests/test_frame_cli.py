"""`greensite frame`: what a site engineer sees when decoding captured traffic."""

from __future__ import annotations

import json

import pytest

from controller.cli import main
from firmware_bridge import modbus


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_decode_dlt645_reply_gives_value_and_unit(capsys: pytest.CaptureFixture[str]) -> None:
    hex_args = [
        "FE",
        "FE",
        "68",
        "12",
        "90",
        "78",
        "56",
        "34",
        "12",
        "68",
        "91",
        "08",
        "33",
        "33",
        "34",
        "33",
        "AB",
        "89",
        "67",
        "45",
        "CC",
        "16",
    ]
    code, out, _ = run(["frame", "decode", "--protocol", "dlt645", *hex_args], capsys)
    body = json.loads(out)
    assert code == 0
    assert body["address"] == "123456789012"
    assert body["di"] == "00010000"
    assert body["values"] == [123456.78]
    assert body["unit"] == "kwh"
    assert body["checksum_ok"] is True


def test_decode_modbus_reply_with_map_names_values(capsys: pytest.CaptureFixture[str]) -> None:
    import struct

    regs = struct.unpack(">HH", struct.pack(">f", 4321.0))
    wire = modbus.encode_reply(modbus.ReadReply(1, 4, regs)).hex()
    code, out, _ = run(
        [
            "frame",
            "decode",
            "--protocol",
            "modbus",
            "--direction",
            "reply",
            "--map",
            "eastron_sdm630",
            "--start",
            "0x34",
            wire,
        ],
        capsys,
    )
    assert code == 0
    assert json.loads(out)["values"] == {"power_kw": pytest.approx(4.321)}


def test_bad_checksum_exits_nonzero_naming_the_offset(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["frame", "decode", "--protocol", "modbus", "11 03 00 6B 00 03 76 88"], capsys)
    assert code == 2
    assert out == ""
    assert "byte 6: CRC" in err


def test_not_hex_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["frame", "decode", "--protocol", "dlt645", "68zz"], capsys)
    assert code == 2
    assert "not hex" in err


def test_encode_requests(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        ["frame", "encode", "--protocol", "modbus", "--unit", "17", "--register", "0x6B", "--count", "3"], capsys
    )
    assert (code, out.strip()) == (0, "11 03 00 6B 00 03 76 87")
    code, out, _ = run(
        ["frame", "encode", "--protocol", "dlt645", "--address", "123456789012", "--di", "00010000"], capsys
    )
    assert out.strip() == "FE FE FE FE 68 12 90 78 56 34 12 68 11 04 33 33 34 33 68 16"
    code, _, err = run(["frame", "encode", "--protocol", "modbus", "--unit", "300", "--register", "0"], capsys)
    assert code == 2
    assert "unit id 300" in err
