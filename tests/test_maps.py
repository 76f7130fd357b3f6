"""Every shipped register map loads, and every readable point survives a trip through the real protocol."""

from __future__ import annotations

import pytest

from config import BusProtocol
from firmware_bridge.maps import Access, MapError, ModbusPoint, _parse, all_maps
from tests.bridge_fixtures import METER_VALUES, bus_config, device, rig

ADDRESSES: dict[BusProtocol, int | str] = {BusProtocol.MODBUS_RTU: 7, BusProtocol.DLT645: "000000001001"}


def test_all_maps_load_and_cover_the_brief() -> None:
    assert {
        "eastron_sdm630",
        "eastron_sdm120",
        "chint_dtsu666",
        "dlt645_3phase",
        "generic_battery_inverter",
        "generic_pv_inverter",
        "generic_ev_charger",
    } <= set(all_maps())


@pytest.mark.parametrize("name", sorted(all_maps()))
async def test_every_point_reads_back_through_the_wire(name: str) -> None:
    device_map = all_maps()[name]
    config = bus_config(device_map.protocol, [device("dut", name, ADDRESSES[device_map.protocol])])
    async with rig(config) as r:
        readings: dict[str, float] = {}
        for exchange in r.drivers["dut"].read_exchanges():
            readings.update(await r.bus.transact(exchange))
    expected = {p.name for p in device_map.readable if p.name in METER_VALUES}
    assert expected <= set(readings)
    for quantity in expected:
        assert readings[quantity] == pytest.approx(METER_VALUES[quantity], rel=1e-3, abs=0.011), quantity


@pytest.mark.parametrize("name", sorted(n for n, m in all_maps().items() if m.protocol is BusProtocol.MODBUS_RTU))
async def test_every_writable_point_reaches_the_device(name: str) -> None:
    device_map = all_maps()[name]
    writable = [p for p in device_map.points if isinstance(p, ModbusPoint) and p.access is not Access.READ]
    config = bus_config(BusProtocol.MODBUS_RTU, [device("dut", name, 7)])
    async with rig(config) as r:
        for point in writable:
            value = 12.3 if point.minimum is None or point.minimum >= 0 else -12.3
            assert await r.bus.transact(r.drivers["dut"].write_exchange(point.name, value)) == {point.name: value}
            assert r.sim.device("dut").setpoints[point.name] == pytest.approx(value, abs=0.05)


def test_malformed_map_names_the_field() -> None:
    text = 'name = "x"\ndescription = "d"\nprotocol = "modbus_rtu"\nkinds = ["pv_meter"]\ndefault_baud_rate = 9600\n'
    text += 'points = [{ name = "power_kw", function = 5, address = 1, type = "float32" }]\n'
    with pytest.raises(MapError, match=r"points\.0"):
        _parse(text, "x.toml")


def test_map_missing_a_required_point_is_refused() -> None:
    text = 'name = "x"\ndescription = "d"\nprotocol = "modbus_rtu"\nkinds = ["battery_inverter"]\n'
    text += 'default_baud_rate = 9600\npoints = [{ name = "power_kw", function = 3, address = 1, type = "int16" }]\n'
    with pytest.raises(MapError, match="needs points"):
        _parse(text, "x.toml")
