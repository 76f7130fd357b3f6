"""`greensite scan` against independent peers over socat pty pairs: a pymodbus RTU server playing the
community centre's devices, the `dlt645` package's meter; and the judging functions on their own."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import serial

from config import BusProtocol, DeviceKind, load_site
from controller.cli import main as cli
from firmware_bridge import dlt645, modbus
from firmware_bridge import scan as scan_module
from firmware_bridge.maps import check_site_devices, load_map
from firmware_bridge.scan import (
    Answer,
    Confidence,
    Evidence,
    Fit,
    MapFit,
    Presence,
    ReadOutcome,
    ScanError,
    check_point,
    identify,
    judge_broadcast,
    judge_map,
    parse_addresses,
    parse_units,
    reply_for_another,
    unit_presence,
)
from tests.nullmodem import SocatNullModem
from tests.scan_peers import COMMUNITY_CENTRE, Registers, pymodbus_bus

SITE = Path(__file__).resolve().parents[1] / "config" / "sites" / "community_centre_export.toml"
# The peers answer in milliseconds and a pty has no wire time: a short timeout keeps 40 units in seconds.
# (The default's wall time is measured by `python -m tests.scan_bench`.)
FAST_TIMEOUT = "0.1"
METER_ADDRESS = "123456789012"


async def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    # The command runs its own event loop (asyncio.run): in a thread, while the peer runs on this one.
    code = await asyncio.to_thread(cli, ["scan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _peer_devices() -> dict[int, tuple[Registers, Registers]]:
    return {unit: registers for unit, (_, registers) in COMMUNITY_CENTRE.items()}


# --- Modbus against pymodbus ------------------------------------------------------------------------


async def test_scan_finds_the_community_centre_devices_names_their_maps_and_the_snippet_loads(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("pymodbus.server")
    async with SocatNullModem() as cable, pymodbus_bus(cable.paths[0], _peer_devices()) as wire:
        code, out, err = await _cli(
            capsys, "--port", cable.paths[1], "--protocol", "modbus_rtu", "--baud", "9600", "--parity", "N",
            "--units", "1-40", "--timeout-s", FAST_TIMEOUT, "--json",
        )  # fmt: skip
    assert code == 0, err
    assert wire.functions == {3, 4}  # reads only: a scan never writes
    report = json.loads(out)  # progress went to stderr: stdout is one JSON document
    found = {d["address"]: d for d in report["devices"]}
    assert set(found) == set(COMMUNITY_CENTRE)
    assert all(d["presence"] == "present" for d in found.values())
    assert {unit: d["best_map"] for unit, d in found.items()} == {u: m for u, (m, _) in COMMUNITY_CENTRE.items()}
    assert sorted(report["silent"]) == sorted(set(range(1, 41)) - set(COMMUNITY_CENTRE))
    # The meters are confirmed by their mains readings; the SDM120 map reads a subset of the SDM630 layout.
    assert found[1]["confidence"] == found[2]["confidence"] == "high"
    assert found[2]["also_fits"] == ["eastron_sdm120"]
    assert "also fits: eastron_sdm120" in found[2]["why_map"]
    assert found[1]["values"]["power_kw"] == pytest.approx(35.2)
    assert found[10]["values"]["soc_pct"] == pytest.approx(55.0)
    assert found[31]["values"]["current_limit_a"] == pytest.approx(16.0)
    assert re.search(r"worst case [\d.]+ s if nothing answers", err)
    assert err.count("\n[") >= 39  # a progress line per unit

    # Pasted in place of the site's buses, the snippet is a valid site (the charger's device renamed).
    site_text = SITE.read_text("utf-8")
    start, end = site_text.index("[[buses]]"), site_text.index("\n[battery]")
    pasted = site_text[:start] + report["snippet"] + site_text[end:]
    pasted = pasted.replace('device = "charger-1"', 'device = "ev-charger-31"')
    (tmp_path / "site.toml").write_text(pasted, "utf-8")
    site = load_site(tmp_path / "site.toml", environment=False)
    assert check_site_devices(site) == []
    (bus,) = site.buses
    line = (bus.port, bus.protocol, bus.baud_rate, bus.parity.value)
    assert line == (cable.paths[1], BusProtocol.MODBUS_RTU, 9600, "N")
    assert {(d.address, d.model, d.kind) for d in bus.devices} == {
        (1, "chint_dtsu666", DeviceKind.GRID_METER),
        (2, "eastron_sdm630", DeviceKind.PV_METER),
        (10, "generic_battery_inverter", DeviceKind.BATTERY_INVERTER),
        (20, "generic_pv_inverter", DeviceKind.PV_INVERTER),
        (31, "generic_ev_charger", DeviceKind.EV_CHARGER),
    }


async def test_the_table_says_when_two_maps_fit(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("pymodbus.server")
    async with SocatNullModem() as cable, pymodbus_bus(cable.paths[0], _peer_devices()):
        code, out, err = await _cli(
            capsys, "--port", cable.paths[1], "--protocol", "modbus_rtu", "--units", "2-3", "--timeout-s", FAST_TIMEOUT
        )
    assert code == 0
    row = next(line for line in out.splitlines() if line.lstrip().startswith("2 "))
    assert "eastron_sdm630" in row
    assert "high" in row
    assert "230.9 V" in row
    assert "also fits: eastron_sdm120" in out
    assert "2 units scanned" in out
    assert "1 found" in out
    assert "1 silent" in out
    assert "[[buses.devices]]" in out
    assert "[1/2] unit 2:" in err
    assert "[1/2]" not in out


async def test_a_unit_answering_only_with_exceptions_is_listed_present(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("pymodbus.server")
    # A device whose only register is one no map knows: every read, the probe's included, is refused.
    odd: tuple[Registers, Registers] = ({0x9000: 1}, {})
    async with SocatNullModem() as cable, pymodbus_bus(cable.paths[0], {7: odd}):
        code, out, err = await _cli(
            capsys, "--port", cable.paths[1], "--protocol", "modbus_rtu", "--units", "6-8",
            "--timeout-s", FAST_TIMEOUT, "--json",
        )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    (device,) = report["devices"]
    assert (device["address"], device["presence"], device["answer"], device["code"]) == (7, "present", "refused", 2)
    assert device["best_map"] is None
    assert "every read brought exception 0x02, illegal data address" in device["why_map"]
    assert report["silent"] == [6, 8]
    assert "# 7 answered, but no register map fits" in report["snippet"]


async def test_a_slow_devices_late_reply_is_named_not_taken_for_the_next_unit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    late_s = 0.25  # the device's turnaround, past the scan's timeout

    def slow_unit_5(port: str) -> None:
        with serial.Serial(port, 9600, timeout=3) as line:
            for _ in range(2):
                request = modbus.parse_request(line.read(8))
                if request.unit == 5:
                    time.sleep(late_s)
                    line.write(modbus.encode_reply(modbus.ExceptionReply(5, request.function, 2)))
                    line.flush()

    async with SocatNullModem() as cable:
        device = asyncio.create_task(asyncio.to_thread(slow_unit_5, cable.paths[0]))
        code, out, _ = await _cli(
            capsys, "--port", cable.paths[1], "--protocol", "modbus_rtu", "--units", "5-6", "--timeout-s", "0.15",
            "--json",
        )  # fmt: skip
        await device
    assert code == 1  # nothing counted
    report = json.loads(out)
    assert report["silent"] == [5]
    (heard,) = report["devices"]
    assert (heard["address"], heard["presence"], heard["answer"]) == (6, "absent", "other_reply")
    assert "only a reply from 5 was heard" in heard["why"]


# --- DL/T 645 against the dlt645 package ------------------------------------------------------------


async def _with_meter(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    serversvc = pytest.importorskip("dlt645.service.serversvc.server_service")
    async with SocatNullModem() as cable:
        meter = serversvc.MeterServerService.new_rtu_server(cable.paths[0], 8, 1, 2400, "N", 1.0)
        meter.set_address(bytes.fromhex("129078563412"))  # 123456789012, A0 first as on the wire
        meter.set_00(0x00010000, 123456.78)
        meter.set_02(0x02030000, -12.3456)
        meter.set_02(0x02010100, 229.7)
        meter.set_02(0x02800002, 50.02)
        await asyncio.to_thread(meter.start)
        try:
            return await _cli(capsys, "--port", cable.paths[1], "--protocol", "dlt645", "--parity", "N", *argv)
        finally:
            await asyncio.to_thread(meter.stop)


async def test_the_broadcast_read_address_finds_the_meter(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await _with_meter(capsys, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["broadcast"] == {
        "address": METER_ADDRESS, "single": True, "why": f"one meter answered: {METER_ADDRESS}",
    }  # fmt: skip
    (device,) = report["devices"]
    assert (device["address"], device["presence"], device["best_map"]) == (METER_ADDRESS, "present", "dlt645_3phase")
    assert device["values"]["voltage_l1_v"] == pytest.approx(229.7)
    assert device["values"]["power_kw"] == pytest.approx(-12.3456)
    assert f'address = "{METER_ADDRESS}"' in report["snippet"]


async def test_probing_addresses_finds_the_meter_and_invents_no_other(capsys: pytest.CaptureFixture[str]) -> None:
    # The package's meter answers an address that is not its own with an error reply for that address (a
    # real meter stays silent): such an answer must not count as a meter.
    code, out, _ = await _with_meter(
        capsys, "--addresses", f"{METER_ADDRESS},111111111111", "--timeout-s", FAST_TIMEOUT, "--json"
    )
    assert code == 0
    report = json.loads(out)
    presence = {d["address"]: d["presence"] for d in report["devices"]}
    assert presence == {METER_ADDRESS: "present", "111111111111": "unconfirmed"}
    assert report["snippet"].count("[[buses.devices]]") == 1
    assert "111111111111" not in report["snippet"]


def _address_frame(address: str) -> bytes:
    return dlt645.encode_frame(dlt645.address_reply(address))


@pytest.mark.parametrize(
    ("reply", "says"),
    [
        # Two meters answer at the same instant: on the pair the bits mix (here: a driven 0 wins).
        (bytes(a & b for a, b in zip(_address_frame(METER_ADDRESS), _address_frame("000000004321"), strict=True)),
         "garbled reply"),
        # Two meters answer one after the other.
        (_address_frame(METER_ADDRESS) + _address_frame("000000004321"), "there may be more than one meter"),
    ],
    ids=["collided", "one-after-the-other"],
)  # fmt: skip
async def test_an_ambiguous_broadcast_is_said_to_be(
    capsys: pytest.CaptureFixture[str], reply: bytes, says: str
) -> None:
    request = dlt645.encode_frame(dlt645.read_address_request())

    def two_meters(port: str) -> None:
        with serial.Serial(port, 2400, timeout=3) as line:
            assert line.read(len(request)) == request
            line.write(reply)
            line.flush()

    async with SocatNullModem() as cable:
        meters = asyncio.create_task(asyncio.to_thread(two_meters, cable.paths[0]))
        _code, out, _ = await _cli(
            capsys, "--port", cable.paths[1], "--protocol", "dlt645", "--parity", "N", "--timeout-s", "0.05", "--json"
        )
        await meters
    report = json.loads(out)
    assert report["broadcast"]["single"] is False
    assert says in report["broadcast"]["why"]
    assert "--addresses" in report["broadcast"]["why"]


# --- the command's refusals -------------------------------------------------------------------------


def test_a_missing_port_is_named_with_the_ports_there_are(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    here = ["/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A10K1234-if00-port0", "/dev/ttyUSB1"]
    monkeypatch.setattr(scan_module, "serial_ports", lambda: here)
    code = cli(["scan", "--port", "/dev/ttyUSB7", "--protocol", "modbus_rtu", "--units", "1-2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "/dev/ttyUSB7: no such port" in err
    assert all(port in err for port in here)
    monkeypatch.setattr(scan_module, "serial_ports", list)
    assert cli(["scan", "--port", "/dev/ttyUSB7", "--protocol", "modbus_rtu"]) == 2
    assert "none (is the USB adapter plugged in?" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--units", "0-300"], "unit id 0 is outside 1..247"),
        (["--units", "1-248"], "unit id 248 is outside 1..247"),
        (["--units", "40-1"], "range 40-1 runs backwards"),
        (["--units", "1-x"], "'1-x' is not a unit id"),
        (["--addresses", "123"], "--addresses is for DL/T 645"),
        (["--timeout-s", "0"], "--timeout-s 0.0"),
    ],
)
def test_bad_arguments_are_named(capsys: pytest.CaptureFixture[str], argv: list[str], says: str) -> None:
    assert cli(["scan", "--port", "/dev/null", "--protocol", "modbus_rtu", *argv]) == 2
    assert says in capsys.readouterr().err


def test_unit_and_address_lists() -> None:
    assert parse_units("1-5,10, 20-21,3") == [1, 2, 3, 4, 5, 10, 20, 21]
    assert parse_addresses("123456789012, 000000001234,123456789012") == ["123456789012", "000000001234"]
    with pytest.raises(ScanError, match="'12345678901A' is not a 12-digit"):
        parse_addresses("12345678901A")


# --- the judging, on its own ------------------------------------------------------------------------


def _read(**values: float) -> ReadOutcome:
    return ReadOutcome(Answer.DATA, values=dict(values))


def test_a_reading_is_evidence_by_where_it_falls() -> None:
    sdm630 = load_map("eastron_sdm630")
    assert check_point(sdm630.point("voltage_l1_v"), 231.0).evidence is Evidence.MAINS
    assert check_point(sdm630.point("frequency_hz"), 50.0).evidence is Evidence.MAINS
    assert check_point(sdm630.point("frequency_hz"), 60.0).evidence is Evidence.OFF_MAINS
    assert check_point(sdm630.point("voltage_l1_v"), 23.1).evidence is Evidence.OFF_MAINS  # a scale off by 10
    assert check_point(sdm630.point("voltage_l1_v"), 0.0).evidence is Evidence.ZERO
    assert check_point(sdm630.point("power_kw"), 12.0).evidence is Evidence.PLAUSIBLE
    assert check_point(sdm630.point("power_kw"), 1e9).evidence is Evidence.IMPLAUSIBLE
    assert check_point(sdm630.point("power_kw"), math.nan).evidence is Evidence.IMPLAUSIBLE


def test_a_map_fits_weakly_on_zeros_and_not_at_all_on_garbage_or_refusals() -> None:
    battery = load_map("generic_battery_inverter")
    zeros = _read(soc_pct=0.0, power_kw=0.0, dc_voltage_v=0.0, state_code=0.0, power_setpoint_kw=0.0)
    assert judge_map(battery, [zeros]).fit is Fit.WEAK
    assert "every value zero" in judge_map(battery, [zeros]).why
    garbage = _read(soc_pct=6553.5, power_kw=-0.1, dc_voltage_v=0.0, state_code=65535.0, power_setpoint_kw=0.0)
    assert judge_map(battery, [garbage]).fit is Fit.NO
    refused = ReadOutcome(Answer.REFUSED, code=2, detail="illegal data address")
    assert judge_map(battery, [refused]).fit is Fit.NO
    pv = load_map("generic_pv_inverter")
    assert judge_map(pv, [_read(power_kw=50.0, energy_total_kwh=10.0, state_code=1.0, power_limit_pct=100.0)]).fit is (
        Fit.FITS
    )
    chint = load_map("chint_dtsu666")
    half = [_read(voltage_l1_v=230.0, frequency_hz=50.0, power_kw=3.0), refused]
    assert judge_map(chint, half).fit is Fit.WEAK  # the other energy-register variant, say


def _fit(name: str, fit: Fit, score: int, checks: Sequence[tuple[str, Evidence]] = ()) -> MapFit:
    return MapFit(name, fit, score, 1, 1, tuple(scan_module.PointCheck(q, 1.0, e) for q, e in checks), "why")


def test_identify_names_the_best_map_and_says_when_it_cannot_choose() -> None:
    mains = [("voltage_l1_v", Evidence.MAINS), ("frequency_hz", Evidence.MAINS)]
    clear = identify([_fit("a", Fit.FITS, 9, mains), _fit("b", Fit.FITS, 4, mains[:1]), _fit("c", Fit.NO, 0)])
    assert (clear.best, clear.confidence, clear.also_fits) == ("a", Confidence.HIGH, ("b",))
    tie = identify([_fit("b", Fit.FITS, 6, mains), _fit("a", Fit.FITS, 6, mains)])
    assert (tie.best, tie.confidence, tie.tied) == ("a", Confidence.LOW, ("a", "b"))
    assert "cannot tell them apart" in tie.why
    close = identify([_fit("a", Fit.FITS, 7, mains), _fit("b", Fit.FITS, 6, mains)])
    assert close.confidence is Confidence.MEDIUM  # ahead by less than one mains reading
    no_mains = identify([_fit("inverter", Fit.FITS, 5, [("power_kw", Evidence.PLAUSIBLE)])])
    assert no_mains.confidence is Confidence.MEDIUM
    assert identify([_fit("a", Fit.NO, 0)]).best is None


def test_presence_of_a_unit() -> None:
    refused = ReadOutcome(Answer.REFUSED, code=2, detail="illegal data address")
    assert unit_presence(BusProtocol.MODBUS_RTU, refused)[0] is Presence.PRESENT
    gateway = ReadOutcome(Answer.REFUSED, code=0x0B, detail="gateway target failed to respond")
    assert unit_presence(BusProtocol.MODBUS_RTU, gateway)[0] is Presence.ABSENT
    assert unit_presence(BusProtocol.MODBUS_RTU, ReadOutcome(Answer.GARBLED, detail="9 bytes"))[0] is Presence.GARBLED
    assert unit_presence(BusProtocol.DLT645, ReadOutcome(Answer.REFUSED, code=1))[0] is Presence.UNCONFIRMED
    assert unit_presence(BusProtocol.DLT645, _read(import_energy_kwh=1.0))[0] is Presence.PRESENT


def test_a_late_reply_from_another_device_is_named() -> None:
    late = modbus.encode_reply(modbus.ReadReply(5, 3, (1,)))
    assert reply_for_another(BusProtocol.MODBUS_RTU, b"\x00" + late, 6) == 5
    assert reply_for_another(BusProtocol.MODBUS_RTU, late, 5) is None
    assert reply_for_another(BusProtocol.MODBUS_RTU, b"\x05\x03\x02", 6) is None
    other_meter = _address_frame("000000004321")
    assert reply_for_another(BusProtocol.DLT645, other_meter, METER_ADDRESS) == "000000004321"
    heard = ReadOutcome(Answer.OTHER_REPLY, detail="only a reply from 5 was heard")
    presence, why = unit_presence(BusProtocol.MODBUS_RTU, heard)
    assert presence is Presence.ABSENT
    assert why == "no answer of its own: only a reply from 5 was heard"


def test_the_broadcast_verdicts() -> None:
    assert judge_broadcast(METER_ADDRESS, METER_ADDRESS, 0, [], 0).single
    assert "no meter answered" in judge_broadcast(None, None, 0, [], 0).why
    assert "garbled reply (18 bytes" in judge_broadcast(None, None, 18, [], 0).why
    assert not judge_broadcast(METER_ADDRESS, METER_ADDRESS, 0, [], 22).single  # a second reply came later
    assert not judge_broadcast(METER_ADDRESS, "000000004321", 0, [], 0).single  # address and data disagree
