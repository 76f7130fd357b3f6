"""Every shipped register map loads, and every readable point survives a trip through the real protocol."""

from __future__ import annotations

import math

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
def test_every_read_point_has_a_plausible_range(name: str) -> None:
    device_map = all_maps()[name]
    assert device_map.readable
    for point in device_map.points:
        low, high = point.plausible_min, point.plausible_max
        if point.access is Access.WRITE:
            assert (low, high) == (None, None), point.name
            continue
        assert low is not None, point.name
        assert high is not None, point.name
        assert math.isfinite(low), point.name
        assert math.isfinite(high), point.name
        assert low < high, point.name
        # The ranges must let real readings through: each class's sane values sit inside.
        if point.name in METER_VALUES:
            assert low <= METER_VALUES[point.name] <= high, point.name
        if point.name == "soc_pct":
            assert (low, high) == (0, 100)
        if point.name == "frequency_hz":
            assert (low, high) == (45, 65)
        if point.name.endswith("_v") and point.name != "dc_voltage_v":
            assert (low, high) == (0, 500), point.name
        if point.name == "state_code":
            assert (low, high) == (0, 3), point.name


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
            # 12.3 at the register's resolution (a uint16 of seconds holds 12), negative where allowed.
            value = round(12.3 / point.scale) * point.scale
            value = value if point.minimum is None or point.minimum >= 0 else -value
            assert await r.bus.transact(r.drivers["dut"].write_exchange(point.name, value)) == {point.name: value}
            assert r.sim.device("dut").setpoints[point.name] == pytest.approx(value, abs=0.05)


def test_malformed_map_names_the_field() -> None:
    text = 'name = "x"\ndescription = "d"\nprotocol = "modbus_rtu"\nkinds = ["pv_meter"]\ndefault_baud_rate = 9600\n'
    text += 'points = [{ name = "power_kw", function = 5, address = 1, type = "float32" }]\n'
    with pytest.raises(MapError, match=r"points\.0"):
        _parse(text, "x.toml")


def test_map_missing_a_required_point_is_refused() -> None:
    text = 'name = "x"\ndescription = "d"\nprotocol = "modbus_rtu"\nkinds = ["battery_inverter"]\n'
    text += 'default_baud_rate = 9600\npoints = [{ name = "power_kw", function = 3, address = 1, type = "int16", '
    text += "plausible_min = -100, plausible_max = 100 }]\n"
    with pytest.raises(MapError, match="needs points"):
        _parse(text, "x.toml")


_HEAD = 'name = "x"\ndescription = "d"\nprotocol = "modbus_rtu"\nkinds = ["pv_meter"]\ndefault_baud_rate = 9600\n'


def test_readable_point_without_a_plausible_range_is_refused() -> None:
    text = _HEAD + 'points = [{ name = "power_kw", function = 3, address = 1, type = "int16", plausible_max = 5 }]\n'
    with pytest.raises(MapError, match=r"points\.0.*needs plausible_min and plausible_max"):
        _parse(text, "x.toml")


@pytest.mark.parametrize(("low", "high"), [(5, 5), (10, -10), ("nan", 1)])
def test_empty_or_nan_plausible_range_is_refused(low: object, high: object) -> None:
    text = _HEAD + 'points = [{ name = "power_kw", function = 3, address = 1, type = "int16", '
    text += f"plausible_min = {low}, plausible_max = {high} }}]\n"
    with pytest.raises(MapError, match="finite and increasing"):
        _parse(text, "x.toml")


def test_write_range_on_a_read_only_point_is_refused() -> None:
    text = _HEAD + 'points = [{ name = "power_kw", function = 3, address = 1, type = "int16", minimum = 0, '
    text += "maximum = 100, plausible_min = 0, plausible_max = 100 }]\n"
    with pytest.raises(MapError, match="minimum/maximum bound writes"):
        _parse(text, "x.toml")
