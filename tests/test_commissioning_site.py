"""What commissioning asks of the site file and the run: a CT fitted backwards, several battery inverters,
shadow mode (--observe), clear start-up errors and questions about a valid but doubtful file."""

from __future__ import annotations

import contextlib
import os
import struct
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from config import BusProtocol, ConfigError, DeviceKind, SiteConfig, load_site
from controller.cli import main
from controller.clock import RealClock, SimClock
from controller.runtime import BATTERY_DEADBAND_KW, Runtime
from controller.safety import Setpoints
from controller.simulation import simulated_site
from firmware_bridge import modbus
from firmware_bridge.device import DeviceDriver
from firmware_bridge.maps import device_questions, load_map
from firmware_bridge.simulator import SimulatedBus
from firmware_bridge.transport import SerialLink
from tests.bridge_fixtures import METER_VALUES, bus_config, device, rig
from tests.nullmodem import NullModem

SITES = Path(__file__).parents[1] / "config" / "sites"
SCHOOL = SITES / "zhongshan_school.toml"
CENTRE = SITES / "community_centre_export.toml"


def _site_text(path: Path, **replace: str) -> str:
    text = path.read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return text


# --- invert_sign ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["eastron_sdm630", "chint_dtsu666", "dlt645_3phase"])
async def test_a_ct_fitted_backwards_reads_the_right_way_round_with_invert_sign(model: str) -> None:
    """The meter sees +12.5 kW and 1234.5 kWh imported through a CT fitted backwards: the site sees the
    flow -12.5 kW (its phases and currents too) and those kWh as exported; volts are volts."""
    address: int | str = "000000001234" if model.startswith("dlt645") else 7
    protocol = BusProtocol.DLT645 if model.startswith("dlt645") else BusProtocol.MODBUS_RTU
    config = bus_config(protocol, [device("m", model, address, DeviceKind.GRID_METER)], response_timeout_s=1.0)
    async with rig(config) as bench:
        normal = DeviceDriver("m", load_map(model), address)
        inverted = DeviceDriver("m", load_map(model), address, invert_sign=True)
        seen: list[dict[str, float]] = []
        for driver in (normal, inverted):
            values: dict[str, float] = {}
            for exchange in driver.read_exchanges():
                values.update(await bench.bus.transact(exchange))
            seen.append(values)
    plain, flipped = seen
    assert plain["power_kw"] == pytest.approx(METER_VALUES["power_kw"], abs=0.01)
    assert flipped["power_kw"] == pytest.approx(-plain["power_kw"])
    for name in ("power_l1_kw", "current_l1_a", "power_factor_pf"):
        if name in plain:
            assert flipped[name] == pytest.approx(-plain[name]), name
    assert flipped["export_energy_kwh"] == pytest.approx(plain["import_energy_kwh"])
    if "export_energy_kwh" in plain:
        assert flipped["import_energy_kwh"] == pytest.approx(plain["export_energy_kwh"])
    assert flipped["voltage_l1_v"] == pytest.approx(plain["voltage_l1_v"])
    assert inverted.exchange_for("export_energy_kwh") is not None  # the tick asks by the site's names


@pytest.mark.parametrize("invert_sign", [True, False])
async def test_the_loop_holds_zero_export_through_a_backwards_grid_ct_once_the_site_file_says_so(
    invert_sign: bool,
) -> None:
    """The school with its grid meter's CT fitted backwards (the simulated meter reports the negated flow):
    with `invert_sign = true` on it the loop holds zero export at noon; without, it is fooled."""
    text = SCHOOL.read_text()
    if invert_sign:
        text = _site_text(SCHOOL, **{'name = "grid-meter"': 'name = "grid-meter"\ninvert_sign = true'})
    site = SiteConfig.model_validate(tomllib.loads(text))
    start = datetime(2026, 7, 6, 11, 0, tzinfo=ZoneInfo(site.site.timezone))
    async with simulated_site(site, start, 1) as (plant, links, sims):
        meter = sims["rs485-2"].device("grid-meter")
        source = meter.source
        meter.source = lambda: {k: -v if k.startswith("power") else v for k, v in source().items()}

        runtime = Runtime(site, clock=SimClock(start, None), links=links, line_timing=False,
                          before_tick=plant.advance)  # fmt: skip
        await runtime.run(1200)
    assert runtime.stats.ticks > 1000
    if invert_sign:
        assert plant.grid_export_kwh < 0.5
        assert runtime.stats.export_breaches.ticks == 0
    else:
        assert plant.grid_export_kwh > 5.0  # the loop, fooled, exported


# --- several battery inverters ------------------------------------------------------------------------


def _two_inverters(path: Path = SCHOOL) -> str:
    return _site_text(path, **{
        'name = "battery"\nkind = "battery_inverter"\nmodel = "generic_battery_inverter"\naddress = 10':
        'name = "battery"\nkind = "battery_inverter"\nmodel = "generic_battery_inverter"\naddress = 10\n'
        'rated_kw = 60.0\n\n[[buses.devices]]\nname = "battery-2"\nkind = "battery_inverter"\n'
        'model = "generic_battery_inverter"\naddress = 11\nrated_kw = 40.0',
    })  # fmt: skip


def test_several_battery_inverters_need_their_ratings() -> None:
    text = _two_inverters().replace("rated_kw = 40.0", "")
    with pytest.raises(ConfigError) as caught:
        load_site_text(text)
    assert any("rated_kw" in line and "battery inverters" in line for line in caught.value.errors)


def load_site_text(text: str) -> SiteConfig:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".toml") as handle:
        handle.write(text)
        handle.flush()
        return load_site(handle.name, environment=False)


async def test_two_battery_inverters_each_take_their_share_of_the_setpoint() -> None:
    """60 kW and 40 kW inverters: each is written 60 % and 40 % of the site's setpoint, and the site's
    battery power is the sum of both readings (the simulated plant gives each its share)."""
    site = load_site_text(_two_inverters())
    assert site.battery_shares() == {"battery": 0.6, "battery-2": 0.4}
    start = datetime(2026, 7, 6, 11, 0, tzinfo=ZoneInfo(site.site.timezone))
    written: dict[str, list[float]] = {"battery": [], "battery-2": []}
    pairs: list[tuple[float, float, float]] = []  # site setpoint, last written to each inverter
    async with simulated_site(site, start, 1) as (plant, links, sims):
        for name, log in written.items():
            inverter = sims["rs485-1"].device(name)
            sink = inverter.sink
            assert sink is not None

            def noting(quantity: str, value: float, log: list[float] = log, sink: Any = sink) -> None:
                if quantity == "power_setpoint_kw":
                    log.append(value)
                sink(quantity, value)

            inverter.sink = noting

        def on_tick(now_s: float, setpoints: Setpoints) -> None:
            if written["battery"] and written["battery-2"]:
                pairs.append((setpoints.battery_kw, written["battery"][-1], written["battery-2"][-1]))

        runtime = Runtime(site, clock=SimClock(start, None), links=links, line_timing=False,
                          before_tick=plant.advance, on_tick=on_tick)  # fmt: skip
        await runtime.run(900)
    moving = [p for p in pairs if abs(p[0]) > 10]
    assert len(moving) > 100, "the battery was hardly moved"
    for site_kw, first_kw, second_kw in moving:
        # Each inverter within its deadband (and the register's 0.1 kW) of its share.
        assert first_kw == pytest.approx(0.6 * site_kw, abs=BATTERY_DEADBAND_KW + 0.1)
        assert second_kw == pytest.approx(0.4 * site_kw, abs=BATTERY_DEADBAND_KW + 0.1)
    assert runtime.stats.export_breaches.ticks == 0
    assert plant.battery_setpoint_kw == pytest.approx(0.0)  # left safe: both inverters idle


# --- observe ------------------------------------------------------------------------------------------


def _count_writes(sims: dict[str, SimulatedBus]) -> list[int]:
    """Count the write frames each simulated bus receives (the devices' own view, not the controller's)."""
    count = [0]
    for sim in sims.values():
        dispatch = sim._dispatch

        def counting(request: Any, dispatch: Any = dispatch) -> None:
            if isinstance(request, modbus.WriteSingleRequest | modbus.WriteMultipleRequest):
                count[0] += 1
            dispatch(request)

        sim._dispatch = counting  # type: ignore[method-assign]
    return count


@pytest.mark.parametrize("observe", [True, False])
async def test_observe_sends_no_write_frame_in_ten_minutes(observe: bool) -> None:
    """Ten simulated minutes of a sunny school noon: observing, the devices receive no write frame (and
    the plant keeps its own state) while every setpoint is computed; not observing, the same run writes."""
    site = load_site(SCHOOL, environment=False)
    start = datetime(2026, 7, 6, 11, 0, tzinfo=ZoneInfo(site.site.timezone))
    async with simulated_site(site, start, 1) as (plant, links, sims):
        writes = _count_writes(sims)
        runtime = Runtime(site, clock=SimClock(start, None), links=links, line_timing=False,
                          before_tick=plant.advance, observe=observe)  # fmt: skip
        await runtime.run(600)
    assert runtime.stats.ticks >= 600
    if observe:
        assert writes[0] == 0
        assert plant.battery_setpoint_kw == 0.0
        assert plant.pv_limit_pct == 100.0
        assert runtime.stats.observed_writes > 0
        assert {q for _, q in runtime.would_write} >= {"power_setpoint_kw", "power_limit_pct", "current_limit_a"}
        assert runtime.summary_stats()["observed_writes"] == runtime.stats.observed_writes
    else:
        assert writes[0] > 0
        assert runtime.stats.observed_writes == 0


def _float_words(value: float) -> list[int]:
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return [hi, lo]


class _TappedNullModem(NullModem):
    """The null-modem cable with a tap on the controller's side: every byte it sends to the peer."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = bytearray()

    def _relay(self, source: int, target: int) -> None:  # type: ignore[override]
        with contextlib.suppress(BlockingIOError, OSError):
            data = os.read(source, 4096)
            if source == self._fds[1][0]:  # the master of the controller's end (paths[1])
                self.sent += data
            os.write(target, data)

    def requests(self) -> list[modbus.Request]:
        frames: list[modbus.Request] = []
        buffer = bytes(self.sent)
        while buffer:
            consumed, frame, _ = modbus.decode_request(buffer)
            if frame is None:
                break
            frames.append(frame)
            buffer = buffer[consumed:]
        return frames


async def test_observe_against_an_independent_modbus_peer_sends_it_no_write() -> None:
    """The community centre's five devices served by pymodbus over a null-modem pair, 5 s of the real
    loop observing: the cable carries reads to the peer and not one write, though the loop computed
    setpoints (it would have charged the battery from the export)."""
    pymodbus_server = pytest.importorskip("pymodbus.server")
    from pymodbus.datastore import ModbusDeviceContext, ModbusSequentialDataBlock, ModbusServerContext

    holding = [0] * 0x2100
    holding[0x2012:0x2014] = _float_words(-200_000.0)  # grid meter (unit 1): 20 kW exported, 0.1 W units
    for offset in (0x2006, 0x2008, 0x200A):
        holding[offset : offset + 2] = _float_words(2300.0)  # 230.0 V
    holding[0x2044:0x2046] = _float_words(5000.0)  # 50.00 Hz
    holding[0x0100] = 500  # battery (unit 10): SoC 50.0 %
    holding[0x0103] = 1
    holding[0x0200:0x0202] = [0, 60_000]  # PV inverter (unit 20): 60 kW
    holding[0x0204] = 1
    holding[0x0210] = 1000  # its limit: 100.0 %
    inputs = [0] * 0x400
    inputs[0x0034:0x0036] = _float_words(60_000.0)  # PV meter (unit 2, SDM630): 60 kW in W
    inputs[0x0000:0x0002] = _float_words(230.0)

    def unit() -> Any:
        return ModbusDeviceContext(hr=ModbusSequentialDataBlock(1, list(holding)),  # type: ignore[no-untyped-call]
                                   ir=ModbusSequentialDataBlock(1, list(inputs)))  # type: ignore[no-untyped-call]

    context = ModbusServerContext(devices={number: unit() for number in (1, 2, 10, 20, 31)}, single=False)
    site = load_site(CENTRE, environment=False)
    battery_kw: list[float] = []
    cable = _TappedNullModem()
    async with cable:
        server = pymodbus_server.ModbusSerialServer(context, port=cable.paths[0], baudrate=9600)
        await server.serve_forever(background=True)
        try:
            bus = site.buses[0].model_copy(update={"port": cable.paths[1], "response_timeout_s": 0.3})
            site = site.model_copy(update={"buses": [bus]})
            clock = RealClock(datetime.now(ZoneInfo(site.site.timezone)))
            runtime = Runtime(site, clock=clock, links={bus.name: SerialLink(bus, cable.paths[1], virtual=True)},
                              observe=True, on_tick=lambda _, out: battery_kw.append(out.battery_kw))  # fmt: skip
            await runtime.run(5.0)
        finally:
            await server.shutdown()
    requests = cable.requests()
    assert len(requests) >= 5 * 4  # every device read every tick
    assert [r for r in requests if isinstance(r, modbus.WriteSingleRequest | modbus.WriteMultipleRequest)] == []
    assert runtime.stats.ticks >= 4
    assert runtime.last_measured is not None
    assert runtime.last_measured.grid_kw == pytest.approx(-20.0, abs=0.1)
    assert max(battery_kw) > 0  # it would have charged from the export
    # Worked out each tick from where the battery is, not chased from setpoints it never got: steady.
    assert len({round(kw, 1) for kw in battery_kw[1:]}) == 1, battery_kw
    assert runtime.stats.observed_writes > 0
    # Leaving, the safe state too is only noted: battery idle.
    assert runtime.would_write[("battery", "power_setpoint_kw")] == 0.0


# --- start-up errors and questions --------------------------------------------------------------------


def test_a_missing_port_is_named_with_the_ports_there_are_and_the_scan_to_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    path = tmp_path / "site.toml"
    text = _site_text(CENTRE, **{'port = "/dev/ttyUSB0"': 'port = "/dev/ttyUSB97"'})
    path.write_text(text.replace("simulated = true", "simulated = false"))
    assert main(["run", str(path), "--no-mqtt", "--duration", "1s", "--store", str(tmp_path / "s.sqlite3")]) == 2
    err = capsys.readouterr().err
    assert "/dev/ttyUSB97 does not exist" in err
    assert "buses.0.port" in err
    assert "greensite scan --port" in err
    assert "--protocol modbus_rtu --baud 9600 --parity N" in err


def test_validate_questions_a_revenue_meter_configured_as_the_pv_meter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = _site_text(SCHOOL, **{'name = "grid-meter"\nkind = "grid_meter"': 'name = "grid-meter"\nkind = "pv_meter"'})
    text = text.replace('name = "pv-meter"\nkind = "pv_meter"', 'name = "pv-meter"\nkind = "grid_meter"')
    path = tmp_path / "site.toml"
    path.write_text(text)
    assert main(["validate", "--no-env", str(path)]) == 0  # valid: asked, not refused
    out = capsys.readouterr().out
    assert "grid-meter is a DL/T 645 meter configured as the PV meter" in out
    assert device_questions(load_site(SCHOOL, environment=False)) == []  # the school is not asked anything


def test_two_pv_meters_are_questioned_as_summed() -> None:
    text = _site_text(CENTRE, **{
        'name = "pv-inverter"\nkind = "pv_inverter"': 'name = "pv-inverter"\nkind = "pv_inverter"',
    })  # fmt: skip
    text = text.replace('[[buses.devices]]\nname = "pv-inverter"',
                        '[[buses.devices]]\nname = "pv-meter-2"\nkind = "pv_meter"\nmodel = "eastron_sdm120"\n'
                        'address = 3\n\n[[buses.devices]]\nname = "pv-inverter"')  # fmt: skip
    questions = device_questions(load_site_text(text))
    assert any("summed" in q and "pv-meter-2" in q for q in questions)


def test_community_centre_serial_example_meters_its_pv_once() -> None:
    site = load_site(SITES / "community_centre_serial.toml", environment=False)
    assert [d.name for _, d in site.devices() if d.kind.value == "pv_meter"] == ["revenue-meter"]



def test_observing_without_a_terminal_prints_what_it_would_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["run", str(SCHOOL), "--simulate", "--observe", "--no-live", "--speed", "max", "--duration", "2m",
            "--no-mqtt", "--no-web", "--store", str(tmp_path / "s.sqlite3"), "--start", "2026-07-06T11:00"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "nothing is written to any device" in out
    assert "would write: battery" in out


def test_report_on_a_real_run_is_refused_with_where_the_series_are(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(CENTRE), "--report", str(tmp_path / "r"), "--no-mqtt"]) == 2
    assert "greensite export" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
