"""The in-process link against the pty: the same bus, codecs and simulated firmware, the same faults.

Every test runs on both lines; what the HIL scenarios inject (a silent or late device, broken CRCs,
garbage on the line, an echoing adapter, a port that vanishes and returns) must look the same to the bus.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest

from config import BusProtocol, DeviceKind
from firmware_bridge.bus import Bus, Health
from firmware_bridge.device import Exchange, Readings
from firmware_bridge.errors import DeviceTimeout, PortError
from firmware_bridge.simulator import Fault, FaultMode, Line
from tests.bridge_fixtures import METER_VALUES, Rig, bus_config, device, rig

Source = Callable[[], Mapping[str, float]]
LINES = pytest.mark.parametrize("line", list(Line))
METER = device("m1", "eastron_sdm630", 1)
GRID = device("grid", "dlt645_3phase", "000000001001", DeviceKind.GRID_METER)


async def read(bus: Bus, exchanges: list[Exchange]) -> Readings:
    out: Readings = {}
    for exchange in exchanges:
        out.update(await bus.transact(exchange))
    return out


@LINES
@pytest.mark.parametrize("protocol", list(BusProtocol))
async def test_reads_and_writes_the_same_values(line: Line, protocol: BusProtocol) -> None:
    meter = METER if protocol is BusProtocol.MODBUS_RTU else GRID
    async with rig(bus_config(protocol, [meter]), line=line) as r:
        values = await read(r.bus, r.drivers[meter.name].read_exchanges())
        assert values["power_kw"] == pytest.approx(METER_VALUES["power_kw"])
        assert r.bus.stats.ok == r.sim.requests == len(r.drivers[meter.name].read_exchanges())


@LINES
async def test_a_silent_device_costs_its_response_timeout(line: Line) -> None:
    config = bus_config(BusProtocol.MODBUS_RTU, [METER], response_timeout_s=0.1, retries=0)
    async with rig(config, line=line) as r:
        r.sim.set_fault("m1", Fault(FaultMode.SILENT))
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(DeviceTimeout, match="no reply"):
            await r.bus.transact(r.drivers["m1"].exchange_for("power_kw"))
        assert loop.time() - started >= 0.1  # the timeout is wall time on either line
        assert r.bus.health("m1").state is Health.DEGRADED


@LINES
async def test_a_late_reply_is_discarded_by_the_next_transaction(line: Line) -> None:
    config = bus_config(BusProtocol.MODBUS_RTU, [METER], response_timeout_s=0.05, retries=0)
    async with rig(config, line=line) as r:
        exchange = r.drivers["m1"].exchange_for("power_kw")
        r.sim.set_fault("m1", Fault(FaultMode.LATE, late_s=0.3))
        with pytest.raises(DeviceTimeout):
            await r.bus.transact(exchange)
        await asyncio.sleep(0.3)  # the late reply arrives now, with nobody asking
        r.sim.set_fault("m1", Fault())
        assert (await r.bus.transact(exchange))["power_kw"] == pytest.approx(12.5)
        assert r.bus.stats.bytes_discarded > 0


@LINES
async def test_broken_crcs_are_retried(line: Line) -> None:
    config = bus_config(BusProtocol.MODBUS_RTU, [METER], retries=3)
    async with rig(config, line=line) as r:
        r.sim.set_fault("m1", Fault(FaultMode.BAD_CRC, probability=0.5))
        for _ in range(10):
            assert (await read(r.bus, r.drivers["m1"].read_exchanges()))["frequency_hz"] == pytest.approx(50.02)
        assert r.bus.stats.bad_frames > 0


@LINES
async def test_noise_between_transactions_is_discarded(line: Line) -> None:
    async with rig(bus_config(BusProtocol.MODBUS_RTU, [METER]), line=line) as r:
        r.sim.inject_noise(b"\x01\x03\xfa\x00\xff\x55" * 3)
        await asyncio.sleep(0.01)  # a pty hands the bytes over on a loop turn
        assert (await read(r.bus, r.drivers["m1"].read_exchanges()))["power_kw"] == pytest.approx(12.5)
        assert r.bus.stats.bytes_discarded == 18


@LINES
@pytest.mark.parametrize("protocol", list(BusProtocol))
async def test_an_echoing_adapter_is_stripped(line: Line, protocol: BusProtocol) -> None:
    meter = METER if protocol is BusProtocol.MODBUS_RTU else GRID
    async with rig(bus_config(protocol, [meter], adapter_echo=True), line=line) as r:
        assert (await read(r.bus, r.drivers[meter.name].read_exchanges()))["power_kw"] == pytest.approx(12.5)


@LINES
async def test_a_vanished_port_is_reopened_when_it_returns(line: Line) -> None:
    async with rig(bus_config(BusProtocol.MODBUS_RTU, [METER]), line=line) as r:
        exchange = r.drivers["m1"].exchange_for("power_kw")
        await r.bus.transact(exchange)
        r.sim.unplug()
        await asyncio.sleep(0.01)  # a pty's hang-up reaches the client on a loop turn
        for _ in range(2):
            with pytest.raises(PortError):
                await r.bus.transact(exchange)  # lost, then closed and backing off
        assert r.bus.health("m1").state is Health.OK  # the port's failure, not the meter's
        assert not r.bus.port_health().is_open
        r.sim.replug()
        for _ in range(60):  # the bus reopens by itself after its back-off (1-2 s)
            try:
                await r.bus.transact(exchange)
                break
            except PortError:
                await asyncio.sleep(0.05)
        else:
            pytest.fail("bus never reopened the port")
        assert r.bus.stats.reopens >= 1


async def test_a_cancelled_wait_on_the_memory_link_propagates() -> None:
    config = bus_config(BusProtocol.MODBUS_RTU, [METER], response_timeout_s=5.0)
    async with rig(config, line=Line.MEMORY) as r:
        r.sim.set_fault("m1", Fault(FaultMode.SILENT))
        task = asyncio.create_task(r.bus.transact(r.drivers["m1"].exchange_for("power_kw")))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        r.sim.set_fault("m1", Fault())
        assert (await r.bus.transact(r.drivers["m1"].exchange_for("power_kw")))["power_kw"] == pytest.approx(12.5)


async def test_transactions_on_two_memory_links_interleave_as_over_ptys() -> None:
    heard: list[str] = []  # which bus each request reached, in order
    configs = {name: bus_config(BusProtocol.MODBUS_RTU, [METER], name=name) for name in ("bus-a", "bus-b")}
    async with rig(configs["bus-a"], line=Line.MEMORY) as a, rig(configs["bus-b"], line=Line.MEMORY) as b:
        for name, r in (("bus-a", a), ("bus-b", b)):
            device = r.sim.device("m1")

            def source(name: str = name, values: Source = device.source) -> Mapping[str, float]:
                heard.append(name)
                return values()

            device.source = source

        async def three_reads(r: Rig) -> None:
            # As a simulated run's buses: no silent interval (its sleep would be a loop turn of its own).
            async with Bus(r.bus.config, r.sim.memory_link, line_timing=False) as bus:
                for _ in range(3):
                    await bus.transact(r.drivers["m1"].exchange_for("power_kw"))

        await asyncio.gather(three_reads(a), three_reads(b))
    # A bus that ran all its transactions before the other began would read the world in another order
    # than a controller over ptys (or on a site) does.
    assert heard == ["bus-a", "bus-b"] * 3
