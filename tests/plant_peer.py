"""An independent peer for commissioning tests: a pymodbus RTU server (its own thread, its own event loop) on
a pty null-modem cable, serving the five devices of community_centre_export.toml from a tiny plant.

Nothing of ours encodes a register here: the layouts are copied from the map files by hand and the values
packed with struct. A write to the battery setpoint moves the battery's power and the grid meter; the PV
limit clamps what the PV inverter (and its meter) makes; a charger's current moves the car's draw. How the
two meters are wired is the peer's business: as configured, the grid CT reversed, or the two swapped.
"""

from __future__ import annotations

import asyncio
import shutil
import struct
import threading
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from types import TracebackType
from typing import Any

from tests import nullmodem

GRID_UNIT, PV_METER_UNIT, BATTERY_UNIT, PV_INVERTER_UNIT, CHARGER_UNIT = 1, 2, 10, 20, 31


def _cable() -> Any:
    """socat's cable (an independent relay, as on a bench) where there is one, else our pty relay."""
    socat_cable = getattr(nullmodem, "SocatNullModem", None)
    if socat_cable is not None and shutil.which("socat"):
        return socat_cable()
    return nullmodem.NullModem()


class Wiring(StrEnum):
    CORRECT = "correct"
    GRID_REVERSED = "grid_reversed"  # the grid meter's CT fitted backwards: it reads the flow negated
    SWAPPED = "swapped"  # the meter at unit 1 measures PV, the one at unit 2 the grid


def _float(value: float) -> list[int]:
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return [hi, lo]


def _uint32(value: int) -> list[int]:
    hi, lo = struct.unpack(">HH", struct.pack(">I", value))
    return [hi, lo]


def _int16(value: int) -> int:
    return int(struct.unpack(">H", struct.pack(">h", value))[0])


@dataclass
class Plant:
    """A building's flows (kW, + import, + PV generates, + battery charges, + car charges)."""

    wiring: Wiring = Wiring.CORRECT
    load_kw: float = 40.0
    pv_available_kw: float = 60.0
    pv_peak_kw: float = 300.0
    battery_setpoint_kw: float = 0.0
    battery_follows: bool = True
    soc_pct: float = 42.0
    pv_limit_pct: float = 100.0
    car_connected: bool = False
    charger_limit_a: float = 16.0
    # Registers answered with garbage regardless of the plant: (unit, address) -> raw word.
    garbage: dict[tuple[int, int], int] = field(default_factory=dict)
    writes: list[tuple[int, int, list[int]]] = field(default_factory=list)
    battery_stepped: threading.Event = field(default_factory=threading.Event)  # a non-zero setpoint arrived

    @property
    def pv_kw(self) -> float:
        return min(self.pv_available_kw, self.pv_limit_pct / 100 * self.pv_peak_kw)

    @property
    def battery_kw(self) -> float:
        return self.battery_setpoint_kw if self.battery_follows else 0.0

    @property
    def ev_kw(self) -> float:
        amps = self.charger_limit_a if self.car_connected and self.charger_limit_a >= 6 else 0.0
        return 3 * 230 * amps / 1000

    @property
    def grid_kw(self) -> float:
        return self.load_kw - self.pv_kw + self.battery_kw + self.ev_kw

    def meter_kw(self, unit: int) -> float:
        """What the meter at `unit` sees, as it is wired."""
        if self.wiring is Wiring.SWAPPED:
            return self.pv_kw if unit == GRID_UNIT else self.grid_kw
        if unit == GRID_UNIT:
            return -self.grid_kw if self.wiring is Wiring.GRID_REVERSED else self.grid_kw
        return self.pv_kw

    # --- register images, from the map files (address: words) ----------------------------------------

    def registers(self, unit: int) -> dict[int, list[int]]:
        if unit == GRID_UNIT:  # chint_dtsu666: holding, float32, scales 0.1 V, 0.001 A, 0.0001 kW, 0.01 Hz
            kw = self.meter_kw(unit)
            image = {0x2006: _float(2302), 0x2008: _float(2311), 0x200A: _float(2298)}
            image |= {0x200C + 2 * i: _float(kw / 3 / 0.23 * 1000) for i in range(3)}
            image |= {0x2012: _float(kw * 10_000)} | {0x2014 + 2 * i: _float(kw / 3 * 10_000) for i in range(3)}
            imported, exported = 81234.5, 1234.5
            if self.wiring is Wiring.GRID_REVERSED:  # backwards, the meter counts the imports as exports
                imported, exported = exported, imported
            pf = -980 if self.wiring is Wiring.GRID_REVERSED else 980
            image |= {0x202A: _float(pf), 0x2044: _float(5001), 0x101E: _float(imported), 0x1028: _float(exported)}
            return image
        if unit == PV_METER_UNIT:  # eastron_sdm630: input, float32, SI units (power in W)
            kw = self.meter_kw(unit)
            image = {0x0000: _float(229.8), 0x0002: _float(230.6), 0x0004: _float(231.0)}
            image |= {0x0006 + 2 * i: _float(kw / 3 / 0.23) for i in range(3)}
            image |= {0x000C + 2 * i: _float(kw / 3 * 1000) for i in range(3)}
            image |= {0x0034: _float(kw * 1000), 0x003E: _float(0.99), 0x0046: _float(50.01)}
            return image | {0x0048: _float(15.5), 0x004A: _float(45678.9)}
        if unit == BATTERY_UNIT:  # generic_battery_inverter: holding; 0.1 %, 0.1 kW signed, 0.1 V
            return {
                0x0100: [round(self.soc_pct * 10)],
                0x0101: [_int16(round(self.battery_kw * 10))],
                0x0102: [7124],
                0x0103: [1],
                0x0110: [_int16(round(self.battery_setpoint_kw * 10))],
            }
        if unit == PV_INVERTER_UNIT:  # generic_pv_inverter: holding; uint32 W, uint32 0.1 kWh, 0.1 %
            return {
                0x0200: _uint32(round(self.pv_kw * 1000)),
                0x0202: _uint32(456_789),
                0x0204: [1],
                0x0210: [round(self.pv_limit_pct * 10)],
            }
        if unit == CHARGER_UNIT:  # generic_ev_charger: input 0.01 kW, state, uint32 Wh; holding 0.1 A
            state = (2 if self.ev_kw > 0 else 1) if self.car_connected else 0
            return {
                0x0300: [round(self.ev_kw * 100)],
                0x0301: [state],
                0x0302: _uint32(3250),
                0x0310: [round(self.charger_limit_a * 10)],
            }
        raise KeyError(unit)

    def written(self, unit: int, address: int, words: list[int]) -> None:
        """A setpoint arrived: the plant follows it (the watchdog and heartbeat registers are only stored)."""
        self.writes.append((unit, address, list(words)))
        if unit == BATTERY_UNIT and address == 0x0110:
            self.battery_setpoint_kw = struct.unpack(">h", struct.pack(">H", words[0]))[0] / 10
            if self.battery_setpoint_kw:
                self.battery_stepped.set()
        elif unit == PV_INVERTER_UNIT and address == 0x0210:
            self.pv_limit_pct = words[0] / 10
        elif unit == CHARGER_UNIT and address == 0x0310:
            self.charger_limit_a = words[0] / 10


# Each device's register space (start, end exclusive), covering every block our client reads at once.
SPACES = {
    GRID_UNIT: ((0x101E, 0x102A), (0x2006, 0x2046)),
    PV_METER_UNIT: ((0x0000, 0x004C),),
    BATTERY_UNIT: ((0x0100, 0x0122),),
    PV_INVERTER_UNIT: ((0x0200, 0x0223),),
    CHARGER_UNIT: ((0x0300, 0x0322),),
}


async def _serve(  # noqa: PLR0917 - pymodbus calls its action with six positional arguments
    plant: Plant,
    unit: int,
    function: int,
    start: int,
    address: int,
    count: int,
    registers: list[int],
    values: list[int] | list[bool] | None,
) -> None:
    """pymodbus's hook on every access: a write moves the plant, a read is answered from it."""
    if values is not None:
        plant.written(unit, address, [int(v) for v in values])
        return
    for first, words in plant.registers(unit).items():
        registers[first - start : first - start + len(words)] = words
    for (garbage_unit, garbage_address), word in plant.garbage.items():
        if garbage_unit == unit:
            registers[garbage_address - start] = word


def _only_units(units: set[int], sending: bool, pdu: Any) -> Any:
    """A request for a unit the peer does not serve is dropped unanswered, as on a real bus (pymodbus's
    SimDevice server would answer it with an exception and log a traceback)."""
    return pdu if sending or pdu.dev_id in units else None


class PlantPeer:
    """The peer running in a thread of its own; `port` is the client's end of the cable. Units left out of
    `units` are silent (no reply at all, as a device with another address)."""

    def __init__(self, plant: Plant, units: tuple[int, ...] = tuple(SPACES)) -> None:
        self.plant = plant
        self.units = units
        self.port = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="plant-peer", daemon=True)
        self._error: BaseException | None = None

    def __enter__(self) -> PlantPeer:
        self._thread.start()
        if not self._ready.wait(10.0) or self._error is not None:
            raise RuntimeError(f"the peer did not start: {self._error!r}")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10.0)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as err:  # handed to the test thread, which raises it
            self._error = err
            self._ready.set()

    async def _run(self) -> None:
        from pymodbus.server import ModbusSerialServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        devices: list[Any] = []
        for unit in self.units:
            blocks = [SimData(s, values=[0] * (e - s), datatype=DataType.REGISTERS) for s, e in SPACES[unit]]
            devices.append(SimDevice(unit, simdata=blocks, action=partial(_serve, self.plant, unit)))
        async with _cable() as cable:
            server = ModbusSerialServer(
                devices, port=cable.paths[0], baudrate=9600, trace_pdu=partial(_only_units, set(self.units))
            )
            await server.serve_forever(background=True)
            self.port = cable.paths[1]
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await server.shutdown()  # type: ignore[no-untyped-call]
