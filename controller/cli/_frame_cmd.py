"""`greensite frame decode|encode`: read captured RS-485 traffic, build read requests."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from controller.cli._command import EXIT_BAD_INPUT, EXIT_OK, Command
from firmware_bridge import dlt645, modbus
from firmware_bridge.device import words_to_raw
from firmware_bridge.errors import FrameError
from firmware_bridge.maps import MapError, ModbusPoint, load_map


def _int(text: str) -> int:
    return int(text, 0)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    decode = sub.add_parser("decode", help="decode one frame given as hex (spaces allowed)")
    decode.add_argument("--protocol", required=True, choices=["modbus", "dlt645"])
    decode.add_argument(
        "--direction",
        choices=["auto", "request", "reply"],
        default="auto",
        help="Modbus only: RTU frames do not say which way they go",
    )
    decode.add_argument("--map", help="Modbus reply: register map to name the values (e.g. eastron_sdm630)")
    decode.add_argument("--start", type=_int, help="Modbus reply: first register address of the request")
    decode.add_argument("hex", nargs="+", help="frame bytes in hex")
    encode = sub.add_parser("encode", help="build a read request and print it as hex")
    encode.add_argument("--protocol", required=True, choices=["modbus", "dlt645"])
    encode.add_argument("--unit", type=_int, help="Modbus unit id")
    encode.add_argument("--function", type=_int, choices=[3, 4], default=3)
    encode.add_argument("--register", type=_int, help="Modbus first register")
    encode.add_argument("--count", type=_int, default=1, help="Modbus register count")
    encode.add_argument("--address", help="DL/T 645 meter address (12 digits); omit to read the address")
    encode.add_argument("--di", help="DL/T 645 data identifier, e.g. 02030000")


def _hex_bytes(parts: list[str]) -> bytes:
    text = "".join(parts).replace(":", "").replace("0x", "").replace(",", "")
    text = "".join(text.split())
    if len(text) % 2:
        raise FrameError(len(text) // 2, "odd number of hex digits")
    try:
        return bytes.fromhex(text)
    except ValueError as err:
        raise FrameError(0, f"not hex: {err}") from None


def _modbus_json(data: bytes, args: argparse.Namespace) -> dict[str, Any]:
    frame: modbus.Request | modbus.Reply
    if args.direction == "request":
        frame = modbus.parse_request(data)
    elif args.direction == "reply":
        frame = modbus.parse_reply(data)
    else:
        try:
            frame = modbus.parse_reply(data)
        except FrameError as reply_error:
            try:
                frame = modbus.parse_request(data)
            except FrameError as request_error:
                # Report the reading that got further into the bytes: it is the likelier one.
                raise max(reply_error, request_error, key=lambda e: e.offset) from None
    body: dict[str, Any] = {"protocol": "modbus_rtu", "crc_ok": True, "type": type(frame).__name__}
    body.update({k: getattr(frame, k) for k in frame.__slots__})
    if isinstance(frame, modbus.ExceptionReply):
        body["meaning"] = frame.meaning
    if isinstance(frame, modbus.ReadReply):
        body["registers"] = list(frame.registers)
        if args.map and args.start is not None:
            body["values"] = _named_registers(args.map, frame, args.start)
    return body


def _named_registers(map_name: str, reply: modbus.ReadReply, start: int) -> dict[str, float]:
    device_map = load_map(map_name)
    values: dict[str, float] = {}
    for point in device_map.points:
        if not isinstance(point, ModbusPoint) or point.function != reply.function:
            continue
        offset = point.address - start
        if offset >= 0 and offset + point.type.words <= len(reply.registers):
            words = reply.registers[offset : offset + point.type.words]
            values[point.name] = words_to_raw(point.type, words, point.word_order) * point.scale * point.sign
    return values


def _dlt645_json(data: bytes) -> dict[str, Any]:
    frame = dlt645.parse_frame(data)
    body: dict[str, Any] = {
        "protocol": "dlt645",
        "checksum_ok": True,
        "address": frame.address,
        "control": f"{frame.control:02X}",
        "from_meter": frame.from_meter,
        "error": frame.is_error,
        "follow_up": frame.has_follow_up,
        "function": f"{frame.function:02X}",
        "data": frame.data.hex(),
    }
    if frame.is_error and frame.data:
        body["error_code"] = frame.data[0]
        body["meaning"] = dlt645.error_meaning(frame.data[0])
    elif frame.function in (dlt645.FUNCTION_READ, dlt645.FUNCTION_READ_FOLLOW_UP) and len(frame.data) >= 4:
        di = int.from_bytes(frame.data[:4], "little")
        body["di"] = f"{di:08X}"
        item = dlt645.DATA_ITEMS.get(di)
        if item is not None:
            body["name"] = item.name
        if frame.from_meter:
            result = dlt645.decode_read_reply(frame)
            if result.item is not None:
                body["values"] = list(result.values)
                body["unit"] = result.item.unit
    return body


def _decode(args: argparse.Namespace) -> int:
    try:
        data = _hex_bytes(args.hex)
        body = _modbus_json(data, args) if args.protocol == "modbus" else _dlt645_json(data)
    except (FrameError, MapError) as err:
        sys.stderr.write(f"bad frame: {err}\n")
        return EXIT_BAD_INPUT
    sys.stdout.write(json.dumps(body, indent=2) + "\n")
    return EXIT_OK


def _encode(args: argparse.Namespace) -> int:
    try:
        if args.protocol == "modbus":
            if args.unit is None or args.register is None:
                raise ValueError("modbus needs --unit and --register")
            data = modbus.encode_request(modbus.ReadRequest(args.unit, args.function, args.register, args.count))
        elif args.address is None:
            data = dlt645.encode_frame(dlt645.read_address_request())
        else:
            if args.di is None:
                raise ValueError("dlt645 needs --di with --address")
            data = dlt645.encode_frame(dlt645.read_request(args.address, int(args.di, 16)))
    except ValueError as err:
        sys.stderr.write(f"cannot encode: {err}\n")
        return EXIT_BAD_INPUT
    sys.stdout.write(data.hex(" ").upper() + "\n")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    return _decode(args) if args.action == "decode" else _encode(args)


COMMAND = Command("frame", "decode captured Modbus RTU / DL/T 645 frames, or build read requests", _add_arguments, _run)
