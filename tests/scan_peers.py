"""Independent peers for the bus scan: a pymodbus RTU server playing the community centre's five devices
(config/sites/community_centre_export.toml), their registers encoded here with struct, not by our maps."""

from __future__ import annotations

import logging
import struct
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

# unit -> (holding registers, input registers), each {address: word}
Registers = dict[int, int]


def f32(value: float) -> list[int]:
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return [hi, lo]


def u16(value: int) -> list[int]:
    return [struct.unpack(">H", struct.pack(">H", value))[0]]


def i16(value: int) -> list[int]:
    return [struct.unpack(">H", struct.pack(">h", value))[0]]


def u32(value: int) -> list[int]:
    hi, lo = struct.unpack(">HH", struct.pack(">I", value))
    return [hi, lo]


def _image(start: int, end: int, words: Mapping[int, list[int]]) -> Registers:
    """Registers start..end-1, zero where nothing is given (a real device serves its whole block)."""
    image = dict.fromkeys(range(start, end), 0)
    for address, value in words.items():
        for offset, word in enumerate(value):
            image[address + offset] = word
    return image


def chint_dtsu666() -> tuple[Registers, Registers]:
    """Grid meter importing 35.2 kW. DTSU666 floats are scaled: 0.1 V, 0.001 A, 0.1 W, 0.001 pf, 0.01 Hz."""
    measurements = _image(0x2000, 0x2050, {
        0x2006: f32(2314.0), 0x2008: f32(2298.0), 0x200A: f32(2306.0),
        0x200C: f32(51_200.0), 0x200E: f32(50_400.0), 0x2010: f32(51_000.0),
        0x2012: f32(352_000.0), 0x2014: f32(118_000.0), 0x2016: f32(116_000.0), 0x2018: f32(118_000.0),
        0x202A: f32(980.0), 0x2044: f32(5001.0),
    })  # fmt: skip
    energy = _image(0x1000, 0x1040, {0x101E: f32(123_456.7), 0x1028: f32(2345.6)})
    return {**energy, **measurements}, {}


def eastron_sdm630() -> tuple[Registers, Registers]:
    """PV meter, 118.5 kW generated. SDM630 input registers are SI floats (V, A, W, Hz, kWh)."""
    inputs = _image(0x0000, 0x0050, {
        0x0000: f32(230.9), 0x0002: f32(231.2), 0x0004: f32(229.7),
        0x0006: f32(171.3), 0x0008: f32(170.8), 0x000A: f32(171.9),
        0x000C: f32(39_400.0), 0x000E: f32(39_600.0), 0x0010: f32(39_500.0),
        0x0034: f32(118_500.0), 0x003E: f32(0.99), 0x0046: f32(49.99),
        0x0048: f32(3.2), 0x004A: f32(98_765.4),
    })  # fmt: skip
    return {}, inputs


def battery_inverter() -> tuple[Registers, Registers]:
    """Discharging 12.5 kW at 55.0 % SoC: SoC x10, kW x10 signed (+ charges), DC bus V x10, state 1 running."""
    holding = _image(0x0100, 0x0122, {
        0x0100: u16(550), 0x0101: i16(-125), 0x0102: u16(7124), 0x0103: u16(1), 0x0110: i16(-125),
    })  # fmt: skip
    return holding, {}


def pv_inverter() -> tuple[Registers, Registers]:
    """Producing 118.2 kW (W as uint32), 45 678.9 kWh (x10), running, limit 100.0 % (x10)."""
    holding = _image(0x0200, 0x0223, {
        0x0200: u32(118_200), 0x0202: u32(456_789), 0x0204: u16(1), 0x0210: u16(1000),
    })  # fmt: skip
    return holding, {}


def ev_charger() -> tuple[Registers, Registers]:
    """Charging (state 2) at 11.04 kW (x100), 5.25 kWh this session (Wh as uint32), limit 16.0 A (x10)."""
    inputs = _image(0x0300, 0x0304, {0x0300: u16(1104), 0x0301: u16(2), 0x0302: u32(5250)})
    holding = _image(0x0310, 0x0322, {0x0310: u16(160)})
    return holding, inputs


# The devices of config/sites/community_centre_export.toml, by unit id, with the map each should be named.
COMMUNITY_CENTRE: dict[int, tuple[str, tuple[Registers, Registers]]] = {
    1: ("chint_dtsu666", chint_dtsu666()),
    2: ("eastron_sdm630", eastron_sdm630()),
    10: ("generic_battery_inverter", battery_inverter()),
    20: ("generic_pv_inverter", pv_inverter()),
    31: ("generic_ev_charger", ev_charger()),
}


def _blocks(registers: Registers) -> list[Any]:
    """SimData runs of consecutive registers; addresses between them are invalid (an exception)."""
    from pymodbus.simulator import DataType, SimData

    if not registers:
        return [SimData(0, datatype=DataType.INVALID)]
    blocks: list[Any] = []
    run: list[int] = []
    start = previous = -2
    for address in sorted(registers):
        if address != previous + 1 and run:
            blocks.append(SimData(start, values=run, datatype=DataType.REGISTERS))
            run = []
        if not run:
            start = address
        run.append(registers[address])
        previous = address
    blocks.append(SimData(start, values=run, datatype=DataType.REGISTERS))
    return blocks


def sim_device(unit: int, holding: Registers, inputs: Registers) -> Any:
    from pymodbus.simulator import DataType, SimData, SimDevice

    no_bits = [SimData(0, values=False, datatype=DataType.BITS)]
    return SimDevice(id=unit, simdata=(no_bits, list(no_bits), _blocks(holding), _blocks(inputs)))


@dataclass
class WireCount:
    """Bytes the peer received and sent: a pty moves them at once, a real line at the baud rate."""

    received: int = 0
    sent: int = 0
    functions: set[int] = field(default_factory=set)  # of the requests received

    def wire_s(self, baud_rate: int, bits_per_character: int = 10) -> float:
        return (self.received + self.sent) * bits_per_character / baud_rate


@asynccontextmanager
async def pymodbus_bus(
    port: str, devices: Mapping[int, tuple[Registers, Registers]], *, baud_rate: int = 9600
) -> AsyncIterator[WireCount]:
    """A pymodbus RTU server on `port` answering as `devices` (unit -> (holding, input) registers)."""
    from pymodbus.server import ModbusSerialServer

    units = frozenset(devices)
    count = WireCount()

    def only_present_units(sending: bool, packet: bytes) -> bytes:
        # pymodbus 3.16 answers a unit it does not serve with exception 0x04 (its device table raises
        # KeyError, logged as an error); an RTU device that is not on the bus is silent: not sent.
        if sending and packet and packet[0] not in units:
            return b""
        if sending:
            count.sent += len(packet)
        else:
            count.received += len(packet)
            count.functions.update(packet[1:2])
        return packet

    # The KeyError above is logged with its traceback for every silent unit: kept out of the test output.
    log = logging.getLogger("pymodbus")
    level = log.level
    log.setLevel(logging.CRITICAL)
    server: Any = ModbusSerialServer(
        [sim_device(unit, holding, inputs) for unit, (holding, inputs) in devices.items()],
        port=port,
        baudrate=baud_rate,
        trace_packet=only_present_units,
    )
    try:
        await server.serve_forever(background=True)
        yield count
    finally:
        await server.shutdown()
        log.setLevel(level)
