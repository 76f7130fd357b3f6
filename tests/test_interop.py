"""Our client reads what independent implementations serve: a pymodbus RTU server and the dlt645 meter."""

from __future__ import annotations

import asyncio
import struct

import pytest

from config import BusProtocol, DeviceKind
from firmware_bridge.bus import Bus
from firmware_bridge.device import DeviceDriver
from firmware_bridge.maps import load_map
from firmware_bridge.transport import SerialLink
from tests.bridge_fixtures import bus_config, device
from tests.nullmodem import NullModem


def _float_registers(value: float) -> list[int]:
    # Encoded here with struct, independently of our device layer.
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return [hi, lo]


async def test_reads_an_sdm630_served_by_pymodbus() -> None:
    pymodbus_server = pytest.importorskip("pymodbus.server")
    from pymodbus.datastore import ModbusDeviceContext, ModbusSequentialDataBlock, ModbusServerContext

    image = [0] * 0x60
    for address, value in {0x0000: 231.5, 0x0034: 12_345.0, 0x0046: 49.98, 0x0048: 9876.5}.items():
        image[address : address + 2] = _float_registers(value)
    # pymodbus blocks are 1-based internally: a block at 1 answers protocol address 0.
    store = ModbusDeviceContext(ir=ModbusSequentialDataBlock(1, image))  # type: ignore[no-untyped-call]
    context = ModbusServerContext(devices={3: store}, single=False)
    async with NullModem() as cable:
        server = pymodbus_server.ModbusSerialServer(context, port=cable.paths[0], baudrate=9600)
        await server.serve_forever(background=True)
        try:
            config = bus_config(BusProtocol.MODBUS_RTU, [device("sdm", "eastron_sdm630", 3)], response_timeout_s=1.0)
            driver = DeviceDriver("sdm", load_map("eastron_sdm630"), 3)
            async with Bus(config, SerialLink(config, cable.paths[1], virtual=True)) as bus:
                readings: dict[str, float] = {}
                for exchange in driver.read_exchanges():
                    readings.update(await bus.transact(exchange))
        finally:
            await server.shutdown()
    assert readings["voltage_l1_v"] == pytest.approx(231.5)
    assert readings["power_kw"] == pytest.approx(12.345)
    assert readings["frequency_hz"] == pytest.approx(49.98, abs=1e-4)
    assert readings["import_energy_kwh"] == pytest.approx(9876.5)


async def test_reads_a_meter_served_by_the_dlt645_package() -> None:
    serversvc = pytest.importorskip("dlt645.service.serversvc.server_service")
    address = "123456789012"
    async with NullModem() as cable:
        meter = serversvc.MeterServerService.new_rtu_server(cable.paths[0], 8, 1, 2400, "N", 1.0)
        # The package takes the address in wire order (A0 first): 123456789012 is 12 90 78 56 34 12,
        # as in the public test vector.
        meter.set_address(bytes.fromhex("129078563412"))
        meter.set_00(0x00010000, 123456.78)
        meter.set_02(0x02030000, -12.3456)
        meter.set_02(0x02010100, 229.7)
        await asyncio.to_thread(meter.start)
        try:
            config = bus_config(
                BusProtocol.DLT645,
                [device("m", "dlt645_3phase", address, DeviceKind.GRID_METER)],
                response_timeout_s=1.0,
            )
            driver = DeviceDriver("m", load_map("dlt645_3phase"), address)
            async with Bus(config, SerialLink(config, cable.paths[1], virtual=True)) as bus:
                wanted = {"power_kw", "import_energy_kwh", "voltage_l1_v"}
                readings: dict[str, float] = {}
                for exchange in driver.read_exchanges():
                    if any(name in exchange.description for name in ("02030000", "00010000", "02010100")):
                        readings.update(await bus.transact(exchange))
        finally:
            await asyncio.to_thread(meter.stop)
    assert set(readings) == wanted
    assert readings["import_energy_kwh"] == pytest.approx(123456.78)
    assert readings["power_kw"] == pytest.approx(-12.3456)
    assert readings["voltage_l1_v"] == pytest.approx(229.7)
