"""Benchmark of the serial stack: `python -m firmware_bridge.bench [--seconds S]`.

Prints, from one run:
- per-transaction overhead of our stack beyond the emulated wire time (simulated meters on ptys
  emulate request + reply wire time and the device turnaround; what is left is our stack plus the
  simulator and the pty, an upper bound on our own overhead);
- polls/s per bus against the physical limit of the line (PROTOCOLS.md arithmetic);
- the poll rate the four healthy meters keep when a fifth on the bus is dead;
- what a lost device costs the bus, and how soon after a 30 s outage it is read again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import statistics
import sys
import time
from collections.abc import Mapping

from config import BusProtocol, DeviceConfig, DeviceKind, Parity, SerialBusConfig
from firmware_bridge.bus import LOST_RETRY_JITTER, LOST_RETRY_S, Bus, Health
from firmware_bridge.device import DeviceDriver, Exchange
from firmware_bridge.errors import DeviceTimeout
from firmware_bridge.maps import load_map
from firmware_bridge.scheduler import Poller
from firmware_bridge.simulator import (
    DLT645_TURNAROUND_S,
    MODBUS_TURNAROUND_S,
    Fault,
    FaultMode,
    SimulatedBus,
    SimulatedDevice,
)
from firmware_bridge.transport import SerialLink, bits_per_character

VALUES: Mapping[str, float] = {"power_kw": 42.0, "voltage_l1_v": 230.0, "import_energy_kwh": 10.0}


def _bus(protocol: BusProtocol, devices: list[DeviceConfig], timeout_s: float) -> SerialBusConfig:
    modbus = protocol is BusProtocol.MODBUS_RTU
    return SerialBusConfig(
        name="bench",
        port="/dev/null",
        simulated=True,
        protocol=protocol,
        baud_rate=9600 if modbus else 2400,
        parity=Parity.NONE if modbus else Parity.EVEN,
        response_timeout_s=timeout_s,
        devices=devices,
    )


def _sim_devices(config: SerialBusConfig) -> list[SimulatedDevice]:
    return [SimulatedDevice(d.name, load_map(d.model), d.address, source=lambda: VALUES) for d in config.devices]


def _wire_s(config: SerialBusConfig, exchange: Exchange, reply_bytes: int) -> float:
    return (len(exchange.request) + reply_bytes) * bits_per_character(config) / config.baud_rate


async def _transactions(config: SerialBusConfig, exchange: Exchange, count: int, wire_time: bool) -> list[float]:
    async with (
        SimulatedBus(config, _sim_devices(config), wire_time=wire_time) as sim,
        Bus(config, SerialLink(config, sim.port, virtual=True)) as bus,
    ):
        await bus.transact(exchange)  # warm up
        times = []
        for _ in range(count):
            start = time.perf_counter()
            await bus.transact(exchange)
            times.append(time.perf_counter() - start)
        return times


async def overhead(count: int) -> None:
    print("== per-transaction overhead beyond wire time ==")
    cases = [
        (
            BusProtocol.MODBUS_RTU,
            DeviceConfig(name="m", kind=DeviceKind.GRID_METER, model="eastron_sdm630", address=1),
            10,
            MODBUS_TURNAROUND_S,
        ),
        (
            BusProtocol.DLT645,
            DeviceConfig(name="m", kind=DeviceKind.GRID_METER, model="dlt645_3phase", address="000000001001"),
            1,
            DLT645_TURNAROUND_S,
        ),
    ]
    for protocol, device, n, turnaround_s in cases:
        config = _bus(protocol, [device], 1.0)
        driver = DeviceDriver("m", load_map(device.model), device.address)
        if protocol is BusProtocol.MODBUS_RTU:
            from firmware_bridge import modbus

            start = 0x0000
            request = modbus.ReadRequest(1, 4, start, n)
            exchange = Exchange(
                "m",
                modbus.encode_request(request),
                driver.read_exchanges()[0].decode,
                lambda r: {},
                5 + 2 * n,
                "read 10",
            )
            reply_bytes = 5 + 2 * n
        else:
            exchange = driver.read_exchanges()[0]
            reply_bytes = exchange.expected_reply_bytes
        bare = await _transactions(config, exchange, count, wire_time=False)
        timed = await _transactions(config, exchange, count, wire_time=True)
        char_s = bits_per_character(config) / config.baud_rate
        silent_s = 3.5 * char_s if protocol is BusProtocol.MODBUS_RTU else 0.0
        # Without wire emulation a transaction is our stack + simulator + pty + the silent interval we wait on purpose.
        stack = [t - silent_s for t in bare]
        wire = _wire_s(config, exchange, reply_bytes) + turnaround_s + silent_s
        residual = [t - wire for t in timed]
        median_stack = statistics.median(stack)
        print(
            f"{protocol.value:10s} {exchange.description:18s} stack round trip (no wire emulation, silent interval"
            f" {silent_s * 1e3:.2f} ms removed): median {median_stack * 1e3:.3f} ms,"
            f" p95 {sorted(stack)[int(0.95 * len(stack))] * 1e3:.3f} ms -> goal < 1 ms: {'met' if median_stack < 1e-3 else 'NOT met'}"
        )
        print(
            f"{'':10s} {'':18s} with wire emulation: median {statistics.median(timed) * 1e3:.2f} ms vs line time"
            f" {wire * 1e3:.2f} ms (wire + turnaround + silent interval): residual {statistics.median(residual) * 1e3:.3f} ms"
            f" = ratio {statistics.median(timed) / wire:.3f} (residual includes the simulator's own ms timer granularity)"
        )


async def poll_rate(seconds: float) -> None:
    print("== polls/s per bus against the physical limit ==")
    # Modbus: 5 meters, 10 registers each; DL/T 645: one meter, one DI per poll.
    modbus_devices = [
        DeviceConfig(name=f"m{i}", kind=DeviceKind.GRID_METER, model="generic_pv_inverter", address=i)
        for i in range(1, 6)
    ]
    dlt_devices = [DeviceConfig(name="g", kind=DeviceKind.GRID_METER, model="dlt645_3phase", address="000000001001")]
    for protocol, devices in ((BusProtocol.MODBUS_RTU, modbus_devices), (BusProtocol.DLT645, dlt_devices)):
        config = _bus(protocol, devices, 1.0)
        async with (
            SimulatedBus(config, _sim_devices(config), wire_time=True) as sim,
            Bus(config, SerialLink(config, sim.port, virtual=True)) as bus,
        ):
            drivers = [DeviceDriver(d.name, load_map(d.model), d.address) for d in devices]
            exchanges = [(drv, drv.read_exchanges()[0]) for drv in drivers]
            done = 0
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                for _, exchange in exchanges:
                    await bus.transact(exchange)
                    done += 1
            elapsed = time.perf_counter() - start
        char_s = bits_per_character(config) / config.baud_rate
        exchange = exchanges[0][1]
        silent_s = 3.5 * char_s if protocol is BusProtocol.MODBUS_RTU else 0.0
        turnaround_s = MODBUS_TURNAROUND_S if protocol is BusProtocol.MODBUS_RTU else DLT645_TURNAROUND_S
        line_s = (len(exchange.request) + exchange.expected_reply_bytes) * char_s + silent_s
        rate = done / elapsed
        print(
            f"{protocol.value:10s} {exchange.description:32s} {rate:6.2f} polls/s; physical limit {1 / line_s:6.2f}/s"
            f" (wire + silent interval), {1 / (line_s + turnaround_s):6.2f}/s with the device turnaround;"
            f" ratio {rate * (line_s + turnaround_s):.3f} of the achievable"
        )


async def dead_meter(seconds: float) -> None:
    print("== one dead meter on a bus of five ==")
    devices = [
        DeviceConfig(name=f"m{i}", kind=DeviceKind.GRID_METER, model="eastron_sdm630", address=i) for i in range(1, 6)
    ]
    config = _bus(BusProtocol.MODBUS_RTU, devices, 0.2)
    rates: dict[str, dict[str, float]] = {}
    for label, dead in (("healthy", None), ("m3 dead", "m3")):
        async with SimulatedBus(config, _sim_devices(config), wire_time=True) as sim:
            if dead:
                sim.set_fault(dead, Fault(FaultMode.SILENT))
            async with Bus(config, SerialLink(config, sim.port, virtual=True)) as bus:
                drivers = [DeviceDriver(d.name, load_map(d.model), d.address) for d in devices]
                poller = Poller(bus, drivers, dict.fromkeys((d.name for d in devices), 0.0), lambda m: None)
                task = asyncio.create_task(poller.run(), name="bench-poller")
                while dead and bus.health(dead).state is not Health.LOST:  # noqa: ASYNC110 - polls bus state
                    await asyncio.sleep(0.01)
                before = dict(poller.polls)
                await asyncio.sleep(seconds)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                rates[label] = {n: (c - before[n]) / seconds for n, c in poller.polls.items()}
    worst = min(rates["m3 dead"][n] / rates["healthy"][n] for n in ("m1", "m2", "m4", "m5"))
    for label, per in rates.items():
        print(f"{label:8s} " + "  ".join(f"{n} {r:5.2f}/s" for n, r in per.items()))
    print(
        f"healthy meters keep >= {worst:.1%} of their poll rate with m3 dead (goal >= 90%: {'met' if worst >= 0.9 else 'NOT met'})"
    )


class _TickClock:
    """A controller clock stepped tick by tick that runs in real time within a tick (timeouts are real)."""

    def __init__(self) -> None:
        self.tick_s = 0.0
        self._real_start = time.perf_counter()

    def step_to(self, tick_s: float) -> None:
        self.tick_s, self._real_start = tick_s, time.perf_counter()

    def __call__(self) -> float:
        return self.tick_s + time.perf_counter() - self._real_start


async def lost_device() -> None:
    print("== a lost device: bus time it costs, and recovery after a 30 s outage (1 s ticks) ==")
    cases = [
        (DeviceConfig(name="m", kind=DeviceKind.GRID_METER, model="eastron_sdm630", address=1), 9600, 0.3),
        (DeviceConfig(name="m", kind=DeviceKind.GRID_METER, model="eastron_sdm630", address=1), 2400, 0.3),
        (DeviceConfig(name="m", kind=DeviceKind.GRID_METER, model="dlt645_3phase", address="000000001001"), 2400, 0.6),
    ]
    outage_s, tick_s = 30.0, 1.0
    for device, baud, timeout_s in cases:
        load = load_map(device.model)
        config = _bus(load.protocol, [device], timeout_s).model_copy(update={"baud_rate": baud})
        driver = DeviceDriver("m", load, device.address)
        power = driver.exchange_for("power_kw")
        clock = _TickClock()
        async with (
            SimulatedBus(config, _sim_devices(config), wire_time=True) as sim,
            Bus(config, SerialLink(config, sim.port, virtual=True), health_clock=clock) as bus,
        ):
            sim.set_fault("m", Fault(FaultMode.SILENT))
            attempts: list[float] = []
            answered_at: float | None = None
            recovery_s = float("nan")
            for k in range(int(outage_s / tick_s) + 10):
                clock.step_to(k * tick_s)
                if not bus.is_due("m"):
                    continue
                start = time.perf_counter()
                try:
                    await bus.transact(power)
                except DeviceTimeout:
                    attempts.append(time.perf_counter() - start)
                    if clock() >= outage_s and answered_at is None:
                        sim.set_fault("m", Fault())  # worst case: it answers just after an attempt failed
                        answered_at = clock()
                    continue
                assert answered_at is not None
                recovery_s = clock() - answered_at
                break
        cost_s = statistics.median(attempts)
        low, high = cost_s / LOST_RETRY_S, cost_s / (LOST_RETRY_S * (1 - LOST_RETRY_JITTER))
        print(
            f"{load.protocol.value:10s} {device.model:15s} {baud:5d} baud, timeout {timeout_s:.1f} s:"
            f" a timed-out {power.description} costs {cost_s * 1e3:.0f} ms of bus time (budget"
            f" {bus.reply_budget_s(power) * 1e3:.0f} ms); one attempt per {LOST_RETRY_S * (1 - LOST_RETRY_JITTER):.1f}-"
            f"{LOST_RETRY_S:.1f} s = {low:.0%}-{high:.0%} of the bus; {len(attempts)} attempts in the outage;"
            f" read again {recovery_s:.2f} s after it answered (worst case, goal <= 3 s:"
            f" {'met' if recovery_s <= 3.0 else 'NOT met'})"
        )


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m firmware_bridge.bench")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each rate measurement")
    parser.add_argument("--count", type=int, default=100, help="transactions per overhead measurement")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # "device lost" for the dead meter is expected here
    await overhead(args.count)
    await poll_rate(args.seconds)
    await dead_meter(args.seconds)
    await lost_device()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
