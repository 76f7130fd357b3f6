"""Implausible readings, fed as real bytes by the simulated firmware, are dropped, counted and logged once."""

from __future__ import annotations

import json
import logging
import math

import pytest

from config import BusProtocol, DeviceKind
from firmware_bridge.bus import Bus
from firmware_bridge.device import DeviceDriver
from firmware_bridge.maps import load_map
from firmware_bridge.simulator import SimulatedBus, SimulatedDevice
from firmware_bridge.transport import SerialLink
from tests.bridge_fixtures import METER_VALUES, bus_config, device, rig


async def read_all(bus: Bus, driver: DeviceDriver) -> dict[str, float]:
    out: dict[str, float] = {}
    for exchange in driver.read_exchanges():
        out.update(await bus.transact(exchange))
    return out


async def test_raw_0xffff_soc_is_missing_counted_and_logged_once_per_episode(caplog: pytest.LogCaptureFixture) -> None:
    config = bus_config(
        BusProtocol.MODBUS_RTU, [device("bat", "generic_battery_inverter", 10, DeviceKind.BATTERY_INVERTER)]
    )
    values = dict(METER_VALUES, soc_pct=6553.5)  # encodes as the raw register 0xFFFF
    async with rig(config) as r:
        r.sim.device("bat").source = lambda: values
        driver = r.drivers["bat"]
        with caplog.at_level(logging.INFO, logger="firmware_bridge.device"):
            for _ in range(3):
                readings = await read_all(r.bus, driver)
                assert "soc_pct" not in readings  # unknown: not 0.0, not the last value
                assert readings["power_kw"] == pytest.approx(12.5)  # the rest of the block is fine
            assert driver.implausible_counts() == {"soc_pct": 3}
            assert driver.implausible_now() == {"soc_pct"}
            values["soc_pct"] = 55.0
            assert (await read_all(r.bus, driver))["soc_pct"] == pytest.approx(55.0)
            assert driver.implausible_now() == frozenset()
            assert driver.implausible_counts() == {"soc_pct": 3}
    dropped = [rec for rec in caplog.records if rec.getMessage() == "implausible reading dropped"]
    again = [rec for rec in caplog.records if rec.getMessage() == "reading plausible again"]
    assert len(dropped) == 1
    assert len(again) == 1
    first = dropped[0].__dict__
    assert (first["device"], first["quantity"], first["raw"]) == ("bat", "soc_pct", 0xFFFF)
    assert first["value"] == pytest.approx(6553.5)
    assert (first["plausible_min"], first["plausible_max"]) == (0, 100)
    assert again[0].__dict__["rejected_in_episode"] == 3


@pytest.mark.parametrize("bad_kw", [math.nan, math.inf, 1e9, -1e9])
async def test_nan_or_absurd_float32_power_is_missing_and_voltages_still_read(
    bad_kw: float, caplog: pytest.LogCaptureFixture
) -> None:
    config = bus_config(BusProtocol.MODBUS_RTU, [device("m", "eastron_sdm630", 1, DeviceKind.GRID_METER)])
    async with rig(config, values=dict(METER_VALUES, power_kw=bad_kw)) as r:
        with caplog.at_level(logging.WARNING, logger="firmware_bridge.device"):
            readings = await read_all(r.bus, r.drivers["m"])
    (record,) = caplog.records
    json.dumps(record.__dict__["value"], allow_nan=False)  # the log line stays valid JSON
    assert "power_kw" not in readings
    assert readings["voltage_l1_v"] == pytest.approx(231.2)
    assert r.drivers["m"].implausible_counts() == {"power_kw": 1}


async def test_state_code_outside_its_enumeration_is_missing() -> None:
    config = bus_config(BusProtocol.MODBUS_RTU, [device("ev", "generic_ev_charger", 31, DeviceKind.EV_CHARGER)])
    async with rig(config, values=dict(METER_VALUES, state_code=7.0, power_kw=655.35)) as r:
        readings = await read_all(r.bus, r.drivers["ev"])
    assert "state_code" not in readings
    assert "power_kw" not in readings
    assert readings["session_energy_kwh"] == pytest.approx(3.25)
    assert r.drivers["ev"].implausible_counts() == {"state_code": 1, "power_kw": 1}


async def test_ct_ratio_scales_the_range_of_what_it_scales() -> None:
    """Behind a 10:1 CT a DL/T 645 meter reads up to 800 kW: 700 kW is plausible, and would not be
    without the ratio (the map's +-80 kW is what the meter reports at its own terminals)."""
    meter = device("grid", "dlt645_3phase", "000000001001", DeviceKind.GRID_METER)
    config = bus_config(BusProtocol.DLT645, [meter], parity="E")
    plant = {"power_kw": 700.0, "voltage_l1_v": 231.2}
    sim_device = SimulatedDevice("grid", load_map("dlt645_3phase"), meter.address, lambda: plant, ct_ratio=10.0)
    with_ct = DeviceDriver("grid", load_map("dlt645_3phase"), meter.address, ct_ratio=10.0)
    without_ct = DeviceDriver("grid", load_map("dlt645_3phase"), meter.address)
    assert with_ct.plausible_range("power_kw") == (-800.0, 800.0)
    assert with_ct.plausible_range("voltage_l1_v") == (0.0, 500.0)  # a CT does not scale volts
    async with (
        SimulatedBus(config, [sim_device]) as sim,
        Bus(config, SerialLink(config, sim.port, virtual=True)) as bus,
    ):
        power = with_ct.exchange_for("power_kw")
        assert (await bus.transact(power))["power_kw"] == pytest.approx(700.0)
        assert (await bus.transact(with_ct.exchange_for("voltage_l1_v")))["voltage_l1_v"] == pytest.approx(231.2)
        # The same bytes read by a driver that does not know the CT: 70 kW, plausible at the terminals.
        assert (await bus.transact(without_ct.exchange_for("power_kw")))["power_kw"] == pytest.approx(70.0)
        plant["power_kw"] = 10_000.0  # beyond the BCD format: the meter saturates at 79.9999 x 10
        assert (await bus.transact(power))["power_kw"] == pytest.approx(799.999)
        assert with_ct.implausible_counts() == {}
        plant["voltage_l1_v"] = 600.0  # a DL/T 645 reply outside the range is dropped as well
        assert await bus.transact(with_ct.exchange_for("voltage_l1_v")) == {}
    assert with_ct.implausible_counts() == {"voltage_l1_v": 1}
