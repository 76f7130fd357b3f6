"""The bus over a pty against simulated firmware: retries, health, faults, echo, a vanishing port."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from config import BusProtocol, DeviceKind
from firmware_bridge.bus import Bus, Health
from firmware_bridge.errors import DeviceException, DeviceLost, DeviceTimeout, PortError
from firmware_bridge.maps import load_map
from firmware_bridge.scheduler import Measurement, Poller, WriteResult
from firmware_bridge.simulator import Fault, FaultMode, SimulatedBus, SimulatedDevice
from firmware_bridge.transport import SerialLink
from tests.bridge_fixtures import METER_VALUES, bus_config, device, rig

FIVE_METERS = [device(f"m{i}", "eastron_sdm630", i) for i in range(1, 6)]


async def read(r_bus: Bus, exchanges: list) -> dict[str, float]:  # type: ignore[type-arg]
    out: dict[str, float] = {}
    for exchange in exchanges:
        out.update(await r_bus.transact(exchange))
    return out


async def test_silent_device_times_out_then_is_lost_and_backs_off() -> None:
    config = bus_config(BusProtocol.MODBUS_RTU, FIVE_METERS[:2], retries=1)
    async with rig(config) as r:
        r.sim.set_fault("m1", Fault(FaultMode.SILENT))
        exchange = r.drivers["m1"].read_exchanges()[0]
        with pytest.raises(DeviceTimeout, match="no reply"):
            await r.bus.transact(exchange)
        assert r.bus.health("m1").state is Health.DEGRADED
        assert r.sim.device("m1").requests_seen == 2  # one retry
        for _ in range(2):
            with pytest.raises(DeviceTimeout):
                await r.bus.transact(exchange)
        assert r.bus.health("m1").state is Health.LOST
        assert not r.bus.is_due("m1")  # waiting for its next attempt: the scheduler skips it
        seen = r.sim.device("m1").requests_seen
        with pytest.raises(DeviceLost, match="not asked"):
            await r.bus.transact(exchange)  # a caller that does not check is_due is refused at once
        assert r.sim.device("m1").requests_seen == seen
        with pytest.raises(DeviceTimeout):
            await r.bus.transact(exchange, even_if_lost=True)
        assert r.sim.device("m1").requests_seen == seen + 1  # a lost device gets no retries
        # The other meter is unaffected, and m1 recovers as soon as it answers again.
        assert (await read(r.bus, r.drivers["m2"].read_exchanges()))["power_kw"] == pytest.approx(12.5)
        r.sim.set_fault("m1", Fault())
        await r.bus.transact(exchange, even_if_lost=True)  # its next attempt (tests/test_bridge_recovery.py)
        assert r.bus.health("m1").state is Health.OK
        await read(r.bus, r.drivers["m1"].read_exchanges())


async def test_cancelled_transaction_raises_cancelled_and_the_bus_still_works() -> None:
    """Shutdown cancels a tick mid-transaction: the cancellation must reach the caller (not turn into
    a timeout), and the next transaction on the bus must work."""
    config = bus_config(BusProtocol.MODBUS_RTU, FIVE_METERS[:1], response_timeout_s=5.0)
    async with rig(config) as r:
        r.sim.set_fault("m1", Fault(FaultMode.SILENT))
        exchange = r.drivers["m1"].read_exchanges()[0]
        task = asyncio.create_task(r.bus.transact(exchange))
        await asyncio.sleep(0.05)  # now waiting for a reply that will not come
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        r.sim.set_fault("m1", Fault())
        assert (await read(r.bus, r.drivers["m1"].read_exchanges()))["power_kw"] == pytest.approx(12.5)


async def test_silent_link_wait_ends_at_its_timeout() -> None:
    config = bus_config(BusProtocol.MODBUS_RTU, FIVE_METERS[:1])
    # The simulated device alone: the rig's own bus holds the port, and a port opens for one master only.
    sims = [SimulatedDevice(d.name, load_map(d.model), d.address, source=lambda: METER_VALUES) for d in config.devices]
    async with SimulatedBus(config, sims) as sim:
        link = SerialLink(config, sim.port, virtual=True)
        await link.open()
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await link.wait_for_data(0.1) is False
            assert 0.09 <= loop.time() - started < 1.0
        finally:
            await link.close()


async def test_corrupted_crc_is_retried_and_counted() -> None:
    config = bus_config(BusProtocol.MODBUS_RTU, FIVE_METERS[:1], retries=3)
    async with rig(config) as r:
        r.sim.set_fault("m1", Fault(FaultMode.BAD_CRC, probability=0.5))
        for _ in range(10):
            assert (await read(r.bus, r.drivers["m1"].read_exchanges()))["frequency_hz"] == pytest.approx(50.02)
        assert r.bus.stats.bad_frames > 0
        assert r.bus.stats.retries > 0


async def test_exception_reply_is_not_retried() -> None:
    config = bus_config(
        BusProtocol.MODBUS_RTU, [device("bat", "generic_battery_inverter", 10, DeviceKind.BATTERY_INVERTER)], retries=3
    )
    async with rig(config) as r:
        r.sim.set_fault("bat", Fault(FaultMode.EXCEPTION, exception_code=4))
        with pytest.raises(DeviceException, match="server device failure"):
            await r.bus.transact(r.drivers["bat"].write_exchange("power_setpoint_kw", 50.0))
        assert r.sim.device("bat").requests_seen == 1
        assert r.bus.health("bat").state is Health.OK  # it answered: alive


async def test_out_of_range_setpoint_is_refused_by_the_device() -> None:
    config = bus_config(BusProtocol.MODBUS_RTU, [device("pvi", "generic_pv_inverter", 20, DeviceKind.PV_INVERTER)])
    async with rig(config) as r:
        with pytest.raises(ValueError, match="outside 0"):
            r.drivers["pvi"].write_exchange("power_limit_pct", 120.0)


async def test_dlt645_error_reply_becomes_device_exception() -> None:
    config = bus_config(
        BusProtocol.DLT645, [device("grid", "dlt645_3phase", "000000001001", DeviceKind.GRID_METER)], parity="E"
    )
    async with rig(config, values={"power_kw": -3.5}) as r:
        exchanges = r.drivers["grid"].read_exchanges()
        assert (await r.bus.transact(exchanges[0]))["power_kw"] == pytest.approx(-3.5)
        with pytest.raises(DeviceException, match="no such data"):
            await r.bus.transact(exchanges[1])  # energy is not in this meter's values


async def test_garbage_on_the_line_does_not_stop_reads() -> None:
    config = bus_config(BusProtocol.MODBUS_RTU, FIVE_METERS[:1])
    async with rig(config) as r:
        for _ in range(5):
            r.sim.inject_noise(b"\x01\x03\xfa\x00\xff\x55" * 3)
            assert (await read(r.bus, r.drivers["m1"].read_exchanges()))["power_kw"] == pytest.approx(12.5)
        r.sim.set_fault("m1", Fault(FaultMode.GARBAGE, probability=1.0))
        with pytest.raises(DeviceTimeout):
            await r.bus.transact(r.drivers["m1"].read_exchanges()[0])


@pytest.mark.parametrize("protocol", [BusProtocol.MODBUS_RTU, BusProtocol.DLT645])
async def test_adapter_echo_is_stripped(protocol: BusProtocol) -> None:
    meter = (
        device("m", "eastron_sdm630", 1)
        if protocol is BusProtocol.MODBUS_RTU
        else device("m", "dlt645_3phase", "123456789012")
    )
    config = bus_config(protocol, [meter], adapter_echo=True)
    async with rig(config) as r:
        assert (await read(r.bus, r.drivers["m"].read_exchanges()))["power_kw"] == pytest.approx(12.5)
        assert r.bus.stats.bad_frames == 0


async def test_port_vanishes_and_returns() -> None:
    config = bus_config(BusProtocol.MODBUS_RTU, FIVE_METERS[:1])
    async with rig(config) as r:
        exchange = r.drivers["m1"].read_exchanges()[0]
        await r.bus.transact(exchange)
        r.sim.unplug()
        with pytest.raises((PortError, DeviceTimeout)):
            await r.bus.transact(exchange)
        with pytest.raises(PortError):
            await r.bus.transact(exchange)  # port gone: fails fast, reopen is backing off
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


async def test_missing_port_does_not_stop_the_bus_starting(tmp_path: Path) -> None:
    config = bus_config(BusProtocol.MODBUS_RTU, FIVE_METERS[:1])
    async with Bus(config, SerialLink(config, str(tmp_path / "nope"))) as bus:
        from firmware_bridge.device import DeviceDriver
        from firmware_bridge.maps import load_map

        with pytest.raises(PortError, match="reopen"):
            await bus.transact(DeviceDriver("m1", load_map("eastron_sdm630"), 1).read_exchanges()[0])


async def _poll_counts(r_dead: str | None, seconds: float) -> dict[str, int]:
    """Polls per device in `seconds` of steady state (after the dead meter, if any, is declared lost)."""
    config = bus_config(BusProtocol.MODBUS_RTU, FIVE_METERS, response_timeout_s=0.1)
    async with rig(config) as r:
        if r_dead:
            r.sim.set_fault(r_dead, Fault(FaultMode.SILENT))
        poller = Poller(r.bus, list(r.drivers.values()), dict.fromkeys(r.drivers, 0.0), lambda m: None)
        task = asyncio.create_task(poller.run(), name="poller")
        while r_dead and r.bus.health(r_dead).state is not Health.LOST:  # noqa: ASYNC110 - polls bus state, no event
            await asyncio.sleep(0.01)
        before = dict(poller.polls)
        await asyncio.sleep(seconds)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return {name: count - before[name] for name, count in poller.polls.items()}


async def test_one_dead_meter_does_not_starve_the_other_four() -> None:
    healthy = await _poll_counts(None, 1.5)
    degraded = await _poll_counts("m3", 1.5)
    assert degraded["m3"] == 0
    for name in ("m1", "m2", "m4", "m5"):
        # Without back-off the dead meter would eat ~100 ms per cycle and halve the others' rate.
        assert degraded[name] >= 0.75 * healthy[name], (name, degraded, healthy)


async def test_poller_serves_writes_before_polls_and_reports_them() -> None:
    config = bus_config(
        BusProtocol.MODBUS_RTU, [device("bat", "generic_battery_inverter", 10, DeviceKind.BATTERY_INVERTER)]
    )
    async with rig(config) as r:
        measurements: list[Measurement] = []
        writes: list[WriteResult] = []
        poller = Poller(r.bus, list(r.drivers.values()), {"bat": 0.05}, measurements.append, writes.append)
        task = asyncio.create_task(poller.run(), name="poller")
        poller.write("bat", "power_setpoint_kw", 10.0)
        poller.write("bat", "power_setpoint_kw", -25.0)  # latest wins: only this one is sent
        for _ in range(100):
            if writes and measurements:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert writes == [WriteResult("bat", "power_setpoint_kw", -25.0, ok=True)]
        assert r.sim.device("bat").setpoints["power_setpoint_kw"] == pytest.approx(-25.0)
        assert measurements[0].values["soc_pct"] == pytest.approx(55.0)
