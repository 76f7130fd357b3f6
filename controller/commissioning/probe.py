"""Talking to a site's devices for commissioning: its buses opened, every point read once with the registers
it came from, setpoints read and written one at a time. No judging here (readings.py does that)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol

from config import BusProtocol, DeviceConfig, DeviceKind, SerialBusConfig, SiteConfig
from controller.commissioning.readings import (
    BatteryTrend,
    DeviceStatus,
    RawDeviceRead,
    RawPoint,
    battery_moving_kw,
    unit_of,
)
from firmware_bridge import dlt645, modbus
from firmware_bridge.bus import Bus
from firmware_bridge.device import DeviceDriver, Exchange, Readings, words_to_raw
from firmware_bridge.errors import BridgeError, DeviceException, DeviceLost, DeviceTimeout, FrameError, PortError
from firmware_bridge.maps import Dlt645Point, ModbusPoint, load_map
from firmware_bridge.transport import Link

__all__ = ["DeviceIO", "SiteDevices", "battery_trend", "read_device"]

# The SoC of a moving battery is read again for this long at most (a 60 kWh battery at 10 kW moves its
# 0.1 % register step in 2 s; at 1 kW in 22 s, and then the trend is left unchecked rather than waited for).
SOC_TREND_MAX_S = 10.0
SOC_TREND_POLL_S = 1.0


class DeviceIO(Protocol):
    """What the step test needs of a site: read some quantities of a device, write one setpoint."""

    async def read(self, device: str, quantities: Sequence[str]) -> Readings: ...
    async def write(self, device: str, quantity: str, value: float) -> None: ...


class SiteDevices:
    """A site's buses on their links (real ports, or a test's pty) and a driver for every device."""

    def __init__(self, site: SiteConfig, links: Mapping[str, Link], *, line_timing: bool = True) -> None:
        self.site = site
        self.buses = {bus.name: Bus(bus, links[bus.name], line_timing=line_timing) for bus in site.buses}
        self.configs: dict[str, tuple[SerialBusConfig, DeviceConfig]] = {d.name: (b, d) for b, d in site.devices()}
        self.drivers = {
            device.name: DeviceDriver(
                device.name, load_map(device.model), device.address, ct_ratio=device.ct_ratio,
                invert_sign=device.invert_sign,
            )
            for _, device in site.devices()
        }  # fmt: skip
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> SiteDevices:
        # A port that cannot be opened does not stop the others: its devices report the port's error.
        for bus in self.buses.values():
            await self._stack.enter_async_context(bus)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    def bus_of(self, device: str) -> Bus:
        return self.buses[self.configs[device][0].name]

    def kind_of(self, device: str) -> DeviceKind:
        return self.configs[device][1].kind

    def named(self, kind: DeviceKind) -> list[str]:
        return [name for name, (_, device) in self.configs.items() if device.kind is kind]

    async def read(self, device: str, quantities: Sequence[str]) -> Readings:
        """The exchanges that carry `quantities` (each once); a value dropped as implausible is absent.
        Asks a device its bus counts as lost too: commissioning wants an answer, not a back-off."""
        driver = self.drivers[device]
        exchanges = {id(e): e for e in (driver.exchange_for(q) for q in quantities)}
        values: Readings = {}
        for exchange in exchanges.values():
            values.update(await self.bus_of(device).transact(exchange, even_if_lost=True))
        return values

    async def write(self, device: str, quantity: str, value: float) -> None:
        exchange = self.drivers[device].write_exchange(quantity, value)
        await self.bus_of(device).transact(exchange, even_if_lost=True)


# --- every point once, with where it came from -----------------------------------------------------------


def _modbus_points(driver: DeviceDriver, exchange: Exchange) -> list[tuple[str, ModbusPoint]]:
    """The map points a read covers, with their names as the site sees them (the exchange lists them in
    register order, as the driver built it)."""
    _, request, _ = modbus.decode_request(exchange.request)
    assert isinstance(request, modbus.ReadRequest)  # our own request: a read, well formed
    points = sorted(
        (p for p in driver.map.readable if isinstance(p, ModbusPoint) and p.function == request.function
         and request.address <= p.address and p.address + p.type.words <= request.address + request.count),
        key=lambda p: p.address,
    )  # fmt: skip
    return list(zip(exchange.quantities, points, strict=True))


def _register_where(point: ModbusPoint) -> str:
    table = "input" if point.function == 4 else "holding"
    last = point.address + point.type.words - 1
    span = f"0x{point.address:04X}" if last == point.address else f"0x{point.address:04X}-0x{last:04X}"
    return f"{table} register {span}"


def _dropped(driver: DeviceDriver, quantity: str, where: str, raw: str, at_device: float) -> str:
    low, high = driver.plausible_range(quantity)
    unit = unit_of(quantity)
    return (
        f"{where} holds {raw} = {at_device:g} {unit} at the device, outside the plausible {low:g}..{high:g} {unit}:"
        " a register or scale other than the map's, or the device in a bad state"
    ).replace("  ", " ")


def _modbus_raw_points(
    driver: DeviceDriver, exchange: Exchange, reply: modbus.Reply | None, values: Readings | None
) -> list[RawPoint]:
    result: list[RawPoint] = []
    request = modbus.decode_request(exchange.request)[1]
    assert isinstance(request, modbus.ReadRequest)
    for quantity, point in _modbus_points(driver, exchange):
        where = _register_where(point)
        if values is None or not isinstance(reply, modbus.ReadReply):
            result.append(RawPoint(quantity, None, where))
            continue
        offset = point.address - request.address
        words = reply.registers[offset : offset + point.type.words]
        raw = " ".join(f"{w:04X}" for w in words)
        value = values.get(quantity)
        dropped = ""
        if value is None:
            at_device = words_to_raw(point.type, words, point.word_order) * point.scale * point.sign
            dropped = _dropped(driver, quantity, where, raw, at_device)
        result.append(RawPoint(quantity, value, where, raw, dropped))
    return result


def _dlt645_raw_points(
    driver: DeviceDriver, exchange: Exchange, point: Dlt645Point, reply: dlt645.Dlt645Frame | None,
    values: Readings | None,
) -> list[RawPoint]:  # fmt: skip
    quantity = exchange.quantities[0]
    where = f"DI {point.di}"
    if values is None or reply is None:
        return [RawPoint(quantity, None, where)]
    result = dlt645.decode_read_reply(reply)  # it decoded once already, in the driver
    raw = result.raw.hex(" ").upper()
    value = values.get(quantity)
    dropped = ""
    if value is None:
        at_device = (result.values[0] if result.values else float("nan")) * point.scale * point.sign
        dropped = _dropped(driver, quantity, where, raw, at_device)
    return [RawPoint(quantity, value, where, raw, dropped)]


def _capturing(exchange: Exchange, replies: list[Any], skipped: list[FrameError]) -> Exchange:
    """The exchange with its reply kept (to show the registers) and the first fault of any garbage before it."""

    def decode(buf: bytes) -> tuple[int, Any | None, list[FrameError]]:
        consumed, frame, errors = exchange.decode(buf)
        skipped.extend(errors[:1] if not skipped else ())
        return consumed, frame, errors

    def interpret(reply: Any) -> Readings:
        replies.append(reply)
        return exchange.interpret(reply)

    return dataclasses.replace(exchange, decode=decode, interpret=interpret)


async def read_device(devices: SiteDevices, name: str) -> RawDeviceRead:
    """Every point of a device once (slow points too). A device that does not answer its first read is
    silent and not asked the rest (each would cost its timeout again); a refusal, garbage or a missed read
    is written down by the register or byte it concerns and the next read goes on."""
    bus_config, device = devices.configs[name]
    driver = devices.drivers[name]
    bus = devices.bus_of(name)
    dlt_points = [p for p in driver.map.readable if isinstance(p, Dlt645Point)]
    points: list[RawPoint] = []
    errors: list[str] = []
    answered = asked = timeouts = 0
    port_error = False
    for index, (_, exchange) in enumerate(driver.read_schedule()):
        replies: list[Any] = []
        skipped: list[FrameError] = []
        values: Readings | None = None
        if not port_error and not (timeouts and not answered):
            asked += 1
            try:
                values = await bus.transact(_capturing(exchange, replies, skipped), even_if_lost=True)
                answered += 1
            except (DeviceTimeout, DeviceLost) as err:
                timeouts += 1
                garbage = f"; first fault in what came back: {skipped[0]}" if skipped else ""
                errors.append(f"{err}{garbage}")
            except DeviceException as err:
                answered += 1  # it is there, and said no
                errors.append(f"refused {exchange.description}: {err.meaning} (exception code 0x{err.code:02X})")
            except FrameError as err:
                answered += 1
                errors.append(f"reply to {exchange.description} is malformed at {err}")
            except PortError as err:
                port_error = True
                errors.append(f"port {bus_config.port}: {bus.port_health().last_error or err}")
        reply = replies[-1] if replies else None
        if bus_config.protocol is BusProtocol.DLT645:
            points += _dlt645_raw_points(driver, exchange, dlt_points[index], reply, values)
        else:
            points += _modbus_raw_points(driver, exchange, reply, values)
    if answered == 0 and timeouts and not port_error:
        return RawDeviceRead(device, bus_config.name, bus_config.protocol, DeviceStatus.SILENT, (), tuple(errors))
    status = DeviceStatus.ERRORS if errors else DeviceStatus.ANSWERED
    return RawDeviceRead(device, bus_config.name, bus_config.protocol, status, tuple(points), tuple(errors))


async def battery_trend(
    devices: DeviceIO,
    name: str,
    site: SiteConfig,
    *,
    max_s: float = SOC_TREND_MAX_S,
    poll_s: float = SOC_TREND_POLL_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> BatteryTrend | None:
    """A battery's SoC read until it moves (at most `max_s`), its power read each time; None when either
    cannot be read. An idle battery is read once: it has no trend to show."""
    try:
        first = await devices.read(name, ("soc_pct", "power_kw"))
    except BridgeError:
        return None
    if "soc_pct" not in first or "power_kw" not in first:
        return None
    soc_start = soc_end = first["soc_pct"]
    powers = [first["power_kw"]]
    started = clock()
    if abs(powers[0]) >= battery_moving_kw(site):
        while soc_end == soc_start and clock() - started < max_s:
            await sleep(poll_s)
            try:
                again = await devices.read(name, ("soc_pct", "power_kw"))
            except BridgeError:
                break
            if "soc_pct" not in again or "power_kw" not in again:
                break
            soc_end = again["soc_pct"]
            powers.append(again["power_kw"])
    return BatteryTrend(name, soc_start, soc_end, sum(powers) / len(powers), clock() - started)
