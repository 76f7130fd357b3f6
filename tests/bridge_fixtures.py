"""Shared set-up for bus tests: a simulated bus of real register maps, and a client bus on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from config import BusProtocol, DeviceConfig, DeviceKind, SerialBusConfig
from firmware_bridge.bus import Bus
from firmware_bridge.device import DeviceDriver
from firmware_bridge.maps import load_map
from firmware_bridge.simulator import Line, SimulatedBus, SimulatedDevice
from firmware_bridge.transport import Link, SerialLink

METER_VALUES = {
    "power_kw": 12.5,
    "voltage_l1_v": 231.2,
    "voltage_l2_v": 230.4,
    "voltage_l3_v": 229.8,
    "current_l1_a": 18.25,
    "current_l2_a": 17.5,
    "current_l3_a": 16.75,
    "power_l1_kw": 4.2,
    "power_l2_kw": 4.1,
    "power_l3_kw": 4.2,
    "power_factor_pf": 0.97,
    "frequency_hz": 50.02,
    "import_energy_kwh": 1234.5,
    "export_energy_kwh": 12.25,
    "soc_pct": 55.0,
    "state_code": 2.0,
    "dc_voltage_v": 712.4,
    "energy_total_kwh": 4567.8,
    "session_energy_kwh": 3.25,
}


def bus_config(protocol: BusProtocol, devices: list[DeviceConfig], **extra: object) -> SerialBusConfig:
    return SerialBusConfig.model_validate(
        {
            "name": "test-bus",
            "port": "/dev/null",
            "simulated": True,
            "protocol": protocol,
            "baud_rate": 9600 if protocol is BusProtocol.MODBUS_RTU else 2400,
            "response_timeout_s": 0.15,
            "devices": [d.model_dump() for d in devices],
            **extra,
        }
    )


def device(name: str, model: str, address: int | str, kind: DeviceKind = DeviceKind.PV_METER) -> DeviceConfig:
    return DeviceConfig(name=name, kind=kind, model=model, address=address)


@dataclass
class Rig:
    sim: SimulatedBus
    bus: Bus
    drivers: dict[str, DeviceDriver]


@asynccontextmanager
async def rig(
    config: SerialBusConfig,
    *,
    wire_time: bool = False,
    values: dict[str, float] | None = None,
    line: Line = Line.PTY,
) -> AsyncIterator[Rig]:
    source = dict(METER_VALUES if values is None else values)
    sims = [SimulatedDevice(d.name, load_map(d.model), d.address, source=lambda: source) for d in config.devices]
    drivers = {d.name: DeviceDriver(d.name, load_map(d.model), d.address) for d in config.devices}
    async with SimulatedBus(config, sims, wire_time=wire_time, line=line) as sim:
        link: Link = sim.memory_link if line is Line.MEMORY else SerialLink(config, sim.port, virtual=True)
        async with Bus(config, link) as bus:
            yield Rig(sim, bus, drivers)
