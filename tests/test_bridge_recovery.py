"""Bus recovery with a stepped controller clock and real bytes on a pty: a lost meter is back within
3 s of answering again, a lost device is not asked until it is due, and port failures are the port's."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from config import BusProtocol, DeviceKind, SerialBusConfig
from firmware_bridge.bus import LOST_AFTER_FAILURES, LOST_RETRY_JITTER, LOST_RETRY_S, Bus, Health
from firmware_bridge.device import DeviceDriver
from firmware_bridge.errors import DeviceLost, DeviceTimeout, PortError
from firmware_bridge.maps import load_map
from firmware_bridge.simulator import Fault, FaultMode, SimulatedBus, SimulatedDevice
from firmware_bridge.transport import SerialLink
from tests.bridge_fixtures import METER_VALUES, bus_config, device

TICK_S = 1.0  # the controller's tick (control.tick_period_s default)
RECOVERY_GOAL_S = 3.0  # issue 16


class TickClock:
    """The controller's clock: stepped to each tick, then running with real time within the tick (a
    timeout inside a tick takes its real 0.1 s), as the runtime's clock does at real time."""

    def __init__(self) -> None:
        self.tick_s = 0.0
        self._real_start = time.monotonic()

    def step_to(self, tick_s: float) -> None:
        self.tick_s = tick_s
        self._real_start = time.monotonic()

    def __call__(self) -> float:
        return self.tick_s + (time.monotonic() - self._real_start)


@dataclass
class Site:
    sim: SimulatedBus
    bus: Bus
    drivers: dict[str, DeviceDriver]
    clock: TickClock


def _config() -> SerialBusConfig:
    devices = [
        device("grid", "eastron_sdm630", 1, DeviceKind.GRID_METER),
        device("bat", "generic_battery_inverter", 10, DeviceKind.BATTERY_INVERTER),
    ]
    return bus_config(BusProtocol.MODBUS_RTU, devices, response_timeout_s=0.1)


@asynccontextmanager
async def site(config: SerialBusConfig) -> AsyncIterator[Site]:
    clock = TickClock()
    values = dict(METER_VALUES)
    sims = [SimulatedDevice(d.name, load_map(d.model), d.address, source=lambda: values) for d in config.devices]
    drivers = {d.name: DeviceDriver(d.name, load_map(d.model), d.address) for d in config.devices}
    async with (
        SimulatedBus(config, sims) as sim,
        Bus(config, SerialLink(config, sim.port, virtual=True), health_clock=clock) as bus,
    ):
        yield Site(sim, bus, drivers, clock)


async def tick_read(s: Site, name: str) -> bool:
    """What the runtime does for a device each tick: skip it unless due, else read its power."""
    if not s.bus.is_due(name):
        return False
    try:
        return "power_kw" in await s.bus.transact(s.drivers[name].exchange_for("power_kw"))
    except DeviceTimeout:
        return False


@pytest.mark.parametrize("jitter", ["shortest", "longest"])
async def test_meter_is_read_within_3_s_of_answering_after_a_30_s_outage(
    jitter: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both ends of the retry draw, so the bound holds whatever the jitter gives.
    pick = (lambda a, b: a) if jitter == "shortest" else (lambda a, b: b)
    monkeypatch.setattr(random, "uniform", pick)
    async with site(_config()) as s:
        s.sim.set_fault("grid", Fault(FaultMode.SILENT))
        outage_ends_s = 30.0
        answered_at_s: float | None = None
        asked_during_outage = 0
        for k in range(60):
            s.clock.step_to(k * TICK_S)
            await tick_read(s, "bat")  # another device read first in the tick, as on a real bus
            seen = s.sim.device("grid").requests_seen
            ok = await tick_read(s, "grid")
            if answered_at_s is None:
                asked_during_outage += s.sim.device("grid").requests_seen - seen
                assert not ok
                if s.clock() >= outage_ends_s and s.sim.device("grid").requests_seen > seen:
                    # Worst case: the meter answers again just after an attempt found it silent.
                    s.sim.set_fault("grid", Fault())
                    answered_at_s = s.clock()
            elif ok:
                recovery_s = s.clock() - answered_at_s
                break
        else:
            pytest.fail("the meter was never read again")
    assert s.bus.health("grid").state is Health.OK
    assert recovery_s <= RECOVERY_GOAL_S, recovery_s
    # While dead, at most one attempt per (1 - jitter) x LOST_RETRY_S once lost, not one per tick.
    most = LOST_AFTER_FAILURES + 1 + answered_at_s / (LOST_RETRY_S * (1 - LOST_RETRY_JITTER))
    assert asked_during_outage <= most, asked_during_outage
    assert asked_during_outage >= answered_at_s / (LOST_RETRY_S + TICK_S)  # but it is asked


async def test_lost_device_is_not_written_until_due_and_the_caller_knows_at_once() -> None:
    async with site(_config()) as s:
        s.sim.set_fault("bat", Fault(FaultMode.SILENT))
        write = s.drivers["bat"].write_exchange("power_setpoint_kw", -20.0)
        for k in range(LOST_AFTER_FAILURES):
            s.clock.step_to(k * TICK_S)
            with pytest.raises(DeviceTimeout):
                await s.bus.transact(write)
        assert s.bus.health("bat").state is Health.LOST
        seen = s.sim.device("bat").requests_seen
        started = time.monotonic()
        with pytest.raises(DeviceLost, match=r"bat: lost after 3 failed transactions .*next attempt in"):
            await s.bus.transact(write)
        assert time.monotonic() - started < 0.05  # no response timeout (0.1 s) was spent
        assert s.sim.device("bat").requests_seen == seen
        assert s.bus.stats.skipped_lost == 1
        # Due again: one attempt (no retries), then refused again until the next is due.
        s.clock.step_to(s.bus.health("bat").retry_at)
        with pytest.raises(DeviceTimeout):
            await s.bus.transact(write)
        assert s.sim.device("bat").requests_seen == seen + 1
        with pytest.raises(DeviceLost):
            await s.bus.transact(write)
        # The other device on the bus never noticed.
        assert await tick_read(s, "grid")
        # It answers again: the next due write goes through and it is healthy at once.
        s.sim.set_fault("bat", Fault())
        s.clock.step_to(s.bus.health("bat").retry_at)
        assert s.bus.health("bat").recoveries == 0
        assert await s.bus.transact(write) == {"power_setpoint_kw": -20.0}
        assert s.bus.health("bat").state is Health.OK
        assert s.bus.health("bat").recoveries == 1  # the caller re-arms what a reboot may have reset
        assert s.sim.device("bat").setpoints["power_setpoint_kw"] == pytest.approx(-20.0)


async def test_port_failures_are_charged_to_the_port_not_the_device() -> None:
    async with site(_config()) as s:
        assert await tick_read(s, "grid")
        assert s.bus.port_health().is_open
        s.sim.unplug()
        for k in range(1, 12):  # the port is gone for 10 ticks: the reopen fails with back-off
            s.clock.step_to(k * TICK_S)
            for name in ("grid", "bat"):
                with pytest.raises((PortError, DeviceTimeout)):
                    await s.bus.transact(s.drivers[name].exchange_for("power_kw"))
        port = s.bus.port_health()
        assert not port.is_open
        assert port.consecutive_failures >= 3  # the vanished port and the failed reopens
        assert port.last_error
        assert s.bus.stats.port_failures == port.consecutive_failures
        for name in ("grid", "bat"):
            # At most the one transaction on which the port died timed out; no device lost for it.
            assert s.bus.health(name).consecutive_failures <= 1, name
            assert s.bus.health(name).state is not Health.LOST, name
        s.sim.replug()
        s.clock.step_to(port.retry_at)
        assert await tick_read(s, "grid")
        assert await tick_read(s, "bat")
        assert s.bus.port_health().consecutive_failures == 0
        assert s.bus.port_health().is_open
