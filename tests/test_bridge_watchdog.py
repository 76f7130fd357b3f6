"""Device communication watchdogs: configured and kept alive through real bytes, and the simulated
firmware applying its fallbacks when the controller goes silent (a stepped device clock, no sleeps)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from config import BusProtocol, DeviceKind
from firmware_bridge.bus import Bus
from firmware_bridge.device import DeviceDriver
from firmware_bridge.maps import MapError, _parse, all_maps, load_map
from firmware_bridge.simulator import SimulatedBus, SimulatedDevice
from firmware_bridge.transport import SerialLink
from tests.bridge_fixtures import METER_VALUES, bus_config, device


@dataclass
class DeviceClock:
    now_s: float = 0.0

    def __call__(self) -> float:
        return self.now_s


@dataclass
class Rig:
    sim: SimulatedBus
    bus: Bus
    driver: DeviceDriver
    clock: DeviceClock
    plant_writes: list[tuple[str, float]] = field(default_factory=list)

    async def send(self, exchanges: list) -> None:  # type: ignore[type-arg]
        for exchange in exchanges:
            await self.bus.transact(exchange)

    def step_to(self, now_s: float) -> list[str]:
        """Advance the device's clock as a plant step would, and let its watchdog act."""
        self.clock.now_s = now_s
        return self.sim.check_watchdogs()


@asynccontextmanager
async def rig(model: str, kind: DeviceKind) -> AsyncIterator[Rig]:
    config = bus_config(BusProtocol.MODBUS_RTU, [device("dut", model, 7, kind)])
    clock = DeviceClock()
    writes: list[tuple[str, float]] = []
    sim_device = SimulatedDevice(
        "dut", load_map(model), 7, source=lambda: METER_VALUES, sink=lambda q, v: writes.append((q, v)), clock=clock
    )
    async with (
        SimulatedBus(config, [sim_device]) as sim,
        Bus(config, SerialLink(config, sim.port, virtual=True)) as bus,
    ):
        yield Rig(sim, bus, DeviceDriver("dut", load_map(model), 7), clock, writes)


async def test_battery_goes_idle_when_the_heartbeat_stops() -> None:
    async with rig("generic_battery_inverter", DeviceKind.BATTERY_INVERTER) as r:
        assert r.driver.watchdog_configurable() == {}  # the battery's fallback (0 kW) is fixed
        await r.send(r.driver.watchdog_setup(10.0, {}))
        await r.send([r.driver.write_exchange("power_setpoint_kw", -30.0)])
        for now_s in (3.0, 6.0, 9.0, 12.0, 15.0):  # kept alive every timeout / 3 with the setpoint unchanged
            assert r.step_to(now_s) == []
            keepalive = r.driver.keepalive_exchange()
            assert keepalive is not None
            await r.send([keepalive])
        assert r.step_to(24.9) == []
        assert r.sim.device("dut").setpoints["power_setpoint_kw"] == pytest.approx(-30.0)
        assert r.step_to(25.0) == ["dut"]  # 10 s after the last heartbeat: the controller is gone
        assert r.plant_writes[-1] == ("power_setpoint_kw", 0.0)
        # What the device reports over the wire says so too.
        assert (await r.bus.transact(r.driver.exchange_for("power_setpoint_kw")))["power_setpoint_kw"] == 0.0
        assert r.step_to(100.0) == []  # applied once; reads never re-arm it
        assert r.sim.device("dut").watchdog_trips == 1
        # The controller comes back: a setpoint write re-arms it and takes effect.
        await r.send([r.driver.write_exchange("power_setpoint_kw", 20.0)])
        assert r.step_to(109.9) == []
        assert r.step_to(110.0) == ["dut"]


async def test_charger_falls_back_to_its_configured_current_and_setpoint_writes_keep_it_alive() -> None:
    async with rig("generic_ev_charger", DeviceKind.EV_CHARGER) as r:
        assert r.driver.keepalive_exchange() is None  # no heartbeat register: setpoint writes keep it alive
        assert r.driver.watchdog_configurable() == {"current_limit_a": "fallback_current_a"}
        await r.send(r.driver.watchdog_setup(6.0, {"current_limit_a": 6.0}))
        for now_s in (2.0, 4.0, 6.0, 8.0):
            assert r.step_to(now_s) == []
            await r.send([r.driver.write_exchange("current_limit_a", 32.0)])
        assert r.step_to(14.0) == ["dut"]
        assert r.plant_writes[-1] == ("current_limit_a", 6.0)
        assert r.sim.device("dut").setpoints["current_limit_a"] == pytest.approx(6.0)


async def test_pv_inverter_limits_itself_to_its_fallback() -> None:
    async with rig("generic_pv_inverter", DeviceKind.PV_INVERTER) as r:
        await r.send(r.driver.watchdog_setup(5.0, {"power_limit_pct": 40.0}))
        await r.send([r.driver.write_exchange("power_limit_pct", 100.0)])
        assert r.step_to(5.0) == ["dut"]
        assert r.plant_writes[-1] == ("power_limit_pct", 40.0)


async def test_a_request_after_the_timeout_finds_the_fallback_already_applied() -> None:
    """Nobody stepped the plant: the device still acts before it answers (as real firmware would have)."""
    async with rig("generic_battery_inverter", DeviceKind.BATTERY_INVERTER) as r:
        await r.send(r.driver.watchdog_setup(10.0, {}))
        await r.send([r.driver.write_exchange("power_setpoint_kw", 50.0)])
        r.clock.now_s = 60.0
        assert (await r.bus.transact(r.driver.exchange_for("power_setpoint_kw")))["power_setpoint_kw"] == 0.0


async def test_watchdog_off_until_configured_and_off_again_at_zero() -> None:
    async with rig("generic_battery_inverter", DeviceKind.BATTERY_INVERTER) as r:
        await r.send([r.driver.write_exchange("power_setpoint_kw", -30.0)])
        assert r.step_to(3600.0) == []  # as shipped: no watchdog
        await r.send(r.driver.watchdog_setup(10.0, {}))
        await r.send(r.driver.watchdog_setup(0.0, {}))
        assert r.step_to(7200.0) == []
        assert r.sim.device("dut").setpoints["power_setpoint_kw"] == pytest.approx(-30.0)


def test_setup_refuses_what_the_device_cannot_do() -> None:
    charger = DeviceDriver("c", load_map("generic_ev_charger"), 7)
    with pytest.raises(ValueError, match=r"needs fallback values for \['current_limit_a'\]"):
        charger.watchdog_setup(10.0, {})
    with pytest.raises(ValueError, match="outside 0"):
        charger.watchdog_setup(10_000.0, {"current_limit_a": 6.0})  # beyond the register's 3600 s
    battery = DeviceDriver("b", load_map("generic_battery_inverter"), 7)
    with pytest.raises(ValueError, match=r"fixed in the device: \{'power_setpoint_kw': 0.0\}"):
        battery.watchdog_setup(10.0, {"power_setpoint_kw": -5.0})
    meter = DeviceDriver("m", load_map("eastron_sdm630"), 7)
    assert meter.watchdog is None
    with pytest.raises(ValueError, match="no communication watchdog"):
        meter.watchdog_setup(10.0, {})
    assert DeviceDriver.keepalive_period_s(30.0) == pytest.approx(10.0)


def test_the_controlled_devices_declare_a_watchdog_for_each_setpoint() -> None:
    for name, device_map in all_maps().items():
        setpoints = {p.name for p in device_map.readable if p.access.value == "read_write"}
        if setpoints:
            assert device_map.watchdog is not None, name
            assert set(device_map.watchdog.fallback) == setpoints, name


def test_watchdog_naming_a_point_that_cannot_be_written_is_refused() -> None:
    text = 'name = "x"\ndescription = "d"\nprotocol = "modbus_rtu"\nkinds = ["pv_meter"]\ndefault_baud_rate = 9600\n'
    text += 'points = [{ name = "power_kw", function = 3, address = 1, type = "int16", plausible_min = 0, '
    text += "plausible_max = 10 }]\n"
    text += '[watchdog]\ntimeout_point = "power_kw"\nfallback = { power_kw = { value = 0.0 } }\n'
    with pytest.raises(MapError, match=r"watchdog\.timeout_point: 'power_kw' is not a writable Modbus point"):
        _parse(text, "x.toml")
