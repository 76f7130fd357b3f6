"""`greensite check` and its step test against an independent peer (pymodbus over a pty cable, a tiny plant
behind it), and the judging and diagnosis rules on their own."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from config import ConfigError, DeviceConfig, DeviceKind, SiteConfig, load_site, parse_site
from controller.cli import _check_cmd, main
from controller.commissioning import step_test
from controller.commissioning.probe import SiteDevices
from controller.commissioning.readings import (
    BatteryTrend,
    DeviceRead,
    DeviceStatus,
    PointReading,
    Verdict,
    judge_battery_trend,
    judge_site,
)
from controller.commissioning.report import CommissioningReport
from controller.commissioning.solar import sun_day, sun_elevation_deg
from controller.commissioning.step_test import (
    Observation,
    Outcome,
    StepKind,
    StepResult,
    StepTest,
    diagnose_wiring,
    judge_edges,
)
from firmware_bridge.device import Readings
from firmware_bridge.transport import SerialLink
from tests.plant_peer import BATTERY_UNIT, CHARGER_UNIT, GRID_UNIT, SPACES, Plant, PlantPeer, Wiring

CENTRE = Path(__file__).parents[1] / "config" / "sites" / "community_centre_export.toml"
SHANGHAI = ZoneInfo("Asia/Shanghai")
NOON = datetime(2026, 7, 6, 13, 0, tzinfo=SHANGHAI)
MIDNIGHT = datetime(2026, 7, 6, 23, 30, tzinfo=SHANGHAI)


def _site_file(tmp_path: Path, port: str, hold_s: float = 1.0) -> Path:
    """community_centre_export.toml on the test's cable: a real (not simulated) bus, parity N (ptys refuse E)."""
    text = CENTRE.read_text()
    for old, new in (('port = "/dev/ttyUSB0"', f'port = "{port}"'), ("simulated = true", "simulated = false"),
                     ('parity = "N"', 'parity = "N"')):  # fmt: skip
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "site.toml"
    path.write_text(text + f"\n[commissioning]\nstep_hold_s = {hold_s}\n")
    return path


@pytest.fixture
def fast_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The peer answers at once: a step settles in a few polls, so poll often (the real pace is 1 s)."""
    monkeypatch.setattr(step_test, "SETTLE_POLL_S", 0.2)
    monkeypatch.setattr(step_test, "MIN_SETTLE_S", 0.4)


@pytest.fixture
def at_noon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_check_cmd, "local_now", lambda site: NOON)


@pytest.fixture
def peer(request: pytest.FixtureRequest) -> Iterator[PlantPeer]:
    plant, units = getattr(request, "param", (Plant(), tuple(SPACES)))
    with PlantPeer(plant, units) as running:
        yield running


def _report(directory: Path) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((directory / "report.json").read_text())
    assert (directory / "report.md").read_text().startswith("# Commissioning report")
    return body


# --- check -------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("at_noon")
def test_check_reads_every_point_of_every_device_and_passes_a_site_wired_right(
    peer: PlantPeer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = _site_file(tmp_path, peer.port)
    assert main(["check", str(site), "--report", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    report = _report(tmp_path / "report")
    assert report["ok"]
    assert report["to_fix"] == []
    assert report["step_test"] is None
    devices = {d["name"]: d for d in report["devices"]}
    assert {d["status"] for d in devices.values()} == {"answered"}
    grid = {p["quantity"]: p for p in devices["grid-meter"]["points"]}
    # Slow points too, with where they came from and the words as they came.
    assert grid["import_energy_kwh"]["value"] == pytest.approx(81234.5)
    assert grid["power_kw"]["where"] == "holding register 0x2012-0x2013"
    assert grid["power_kw"]["value"] == pytest.approx(-20.0)  # 40 kW load, 60 kW PV: exporting 20
    assert {p["quantity"] for p in devices["pv-meter"]["points"]} >= {"power_kw", "export_energy_kwh", "frequency_hz"}
    assert "load balance: grid -20.0 kW + pv +60.0 kW" in out
    assert "OK: 0 to fix, 0 to look at" in out


@pytest.mark.parametrize(
    "peer",
    # The charger (31) has another address on the bus: nothing answers at 31. The battery's power register
    # holds 0x7FFF and the grid meter's L2 voltage a NaN: garbage in an answer that is otherwise fine.
    [(Plant(garbage={(BATTERY_UNIT, 0x0101): 0x7FFF, (GRID_UNIT, 0x2008): 0x7FC0}), (GRID_UNIT, 2, BATTERY_UNIT, 20))],
    indirect=True,
)
@pytest.mark.usefixtures("at_noon")
def test_check_reports_a_silent_device_and_garbage_by_register_and_exits_non_zero(
    peer: PlantPeer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = _site_file(tmp_path, peer.port)
    assert main(["check", str(site), "--report", str(tmp_path / "report")]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    report = _report(tmp_path / "report")
    devices = {d["name"]: d for d in report["devices"]}
    assert devices["charger-1"]["status"] == "silent"
    assert "no reply" in devices["charger-1"]["errors"][0]
    battery = {p["quantity"]: p for p in devices["battery"]["points"]}
    assert battery["power_kw"]["verdict"] == "implausible"
    assert battery["power_kw"]["value"] is None
    assert "holding register 0x0101 holds 7FFF = 3276.7 kW" in battery["power_kw"]["why"]
    voltage = {p["quantity"]: p for p in devices["grid-meter"]["points"]}["voltage_l2_v"]
    assert voltage["raw"].startswith("7FC0")
    assert "nan" in voltage["why"]
    fixes = [(f["subject"], f["what"]) for f in report["to_fix"]]
    assert any(subject == "charger-1" and what.startswith("silent") for subject, what in fixes)
    # With the battery's power and the charger unknown the load balance is not claimed either way.
    assert any("load balance not checked: battery, chargers not known" in q["what"] for q in report["to_look_at"])


# --- the step test, three wirings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "code", "wiring"),
    [
        ((Plant(car_connected=True), tuple(SPACES)), 0, "moved as configured in every step (battery, charger, pv)"),
        ((Plant(wiring=Wiring.GRID_REVERSED), tuple(SPACES)), 1, "set invert_sign = true on grid-meter"),
        ((Plant(wiring=Wiring.SWAPPED), tuple(SPACES)), 1, "the grid and PV meters are swapped"),
    ],
    indirect=["peer"],
    ids=["correct", "grid-ct-reversed", "meters-swapped"],
)
@pytest.mark.usefixtures("at_noon", "fast_steps")
def test_the_step_test_tells_the_wiring_and_puts_every_setpoint_back(
    peer: PlantPeer, code: int, wiring: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plant = peer.plant
    site = _site_file(tmp_path, peer.port)
    assert main(["check", str(site), "--step-test", "--yes", "--report", str(tmp_path / "report")]) == code
    out = capsys.readouterr().out
    report = _report(tmp_path / "report")
    test = report["step_test"]
    assert wiring in json.dumps(test["wiring"])
    assert wiring in out
    steps = {s["kind"]: s for s in test["steps"]}
    # Each step was made, and seen by the stepped device itself.
    battery = {m["device"]: m for m in steps["battery"]["moves"]}["battery"]
    assert battery["delta_kw"] == pytest.approx(10.0, abs=0.2)
    assert steps["pv"]["outcome"] in ("passed", "failed")
    assert steps["pv"]["observation"] is not None
    if plant.car_connected:
        assert steps["charger"]["outcome"] == "passed"
    else:
        assert (steps["charger"]["outcome"], steps["charger"]["summary"]) == ("skipped", "no car")
    # Everything is back as it was, and the report says so.
    assert (plant.battery_setpoint_kw, plant.pv_limit_pct, plant.charger_limit_a) == (0.0, 100.0, 16.0)
    assert all(r["ok"] for r in test["restores"])
    assert test["restores"]
    assert {(r["device"], r["quantity"]) for r in test["restores"]} >= {
        ("battery", "power_setpoint_kw"),
        ("pv-inverter", "power_limit_pct"),
    }
    assert report["ok"] is (code == 0)


@pytest.mark.parametrize("peer", [(Plant(battery_follows=False), tuple(SPACES))], indirect=True)
@pytest.mark.usefixtures("at_noon", "fast_steps")
def test_a_battery_that_does_not_follow_is_named_with_its_address_and_the_pv_step_still_checks_the_meters(
    peer: PlantPeer, tmp_path: Path
) -> None:
    site = _site_file(tmp_path, peer.port)
    assert main(["check", str(site), "--step-test", "--yes", "--report", str(tmp_path / "report")]) == 1
    test = _report(tmp_path / "report")["step_test"]
    battery = {s["kind"]: s for s in test["steps"]}["battery"]
    assert battery["outcome"] == "failed"
    assert battery["observation"] is None
    (finding,) = battery["findings"]
    assert "battery did not follow its setpoint" in finding["what"]
    assert "wrong address" in finding["fix"]
    assert "moved as configured in every step (pv)" in test["wiring"][0]["what"]
    assert peer.plant.battery_setpoint_kw == 0.0


@pytest.mark.parametrize("peer", [(Plant(), tuple(SPACES))], indirect=True)
async def test_an_interrupted_step_test_puts_the_setpoint_back_and_lets_the_cancellation_through(
    peer: PlantPeer, tmp_path: Path
) -> None:
    site = load_site(_site_file(tmp_path, peer.port, hold_s=30.0))
    plant = peer.plant
    links = {bus.name: SerialLink(bus) for bus in site.buses}
    async with SiteDevices(site, links) as devices:
        test = StepTest(site, devices, poll_s=0.2)
        task = asyncio.create_task(test.run())
        assert await asyncio.to_thread(plant.battery_stepped.wait, 10.0)  # the peer has its own thread
        assert plant.battery_setpoint_kw == 10.0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert plant.battery_setpoint_kw == 0.0
    assert test.report.interrupted.startswith("interrupted")
    assert [(r.device, r.quantity, r.value, r.ok) for r in test.report.restores] == [
        ("battery", "power_setpoint_kw", 0.0, True)
    ]
    # The last write the battery saw is the restore.
    assert plant.writes[-1] == (BATTERY_UNIT, 0x0110, [0])


@pytest.mark.parametrize("peer", [(Plant(), tuple(SPACES))], indirect=True)
@pytest.mark.usefixtures("at_noon", "fast_steps")
def test_ctrl_c_during_the_step_test_puts_the_setpoint_back_writes_the_report_and_exits_130(
    peer: PlantPeer, tmp_path: Path
) -> None:
    site = _site_file(tmp_path, peer.port, hold_s=30.0)

    def ctrl_c_once_stepped() -> None:
        if peer.plant.battery_stepped.wait(10.0):
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c_once_stepped, daemon=True).start()
    assert main(["check", str(site), "--step-test", "--yes", "--report", str(tmp_path / "report")]) == 130
    assert peer.plant.battery_setpoint_kw == 0.0
    test = _report(tmp_path / "report")["step_test"]
    assert test["interrupted"].startswith("interrupted")
    assert [(r["device"], r["value"], r["ok"]) for r in test["restores"]] == [("battery", 0.0, True)]


class _DeadOnTheWayBack:
    """The peer's devices, except that the battery's restore write never finishes (a bus gone dead)."""

    def __init__(self, devices: SiteDevices) -> None:
        self.devices = devices

    async def read(self, device: str, quantities: Sequence[str]) -> Readings:
        return await self.devices.read(device, quantities)

    async def write(self, device: str, quantity: str, value: float) -> None:
        if quantity == "power_setpoint_kw" and value == 0.0:
            await asyncio.Event().wait()
        await self.devices.write(device, quantity, value)


@pytest.mark.parametrize("peer", [(Plant(), tuple(SPACES))], indirect=True)
async def test_a_restore_that_never_finishes_is_bounded_reported_first_and_the_cancellation_goes_on(
    peer: PlantPeer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(step_test, "RESTORE_ON_EXIT_TIMEOUT_S", 0.5)
    site = load_site(_site_file(tmp_path, peer.port, hold_s=30.0))
    links = {bus.name: SerialLink(bus) for bus in site.buses}
    async with SiteDevices(site, links) as devices:
        test = StepTest(site, _DeadOnTheWayBack(devices), poll_s=0.2)
        task = asyncio.create_task(test.run())
        assert await asyncio.to_thread(peer.plant.battery_stepped.wait, 10.0)
        task.cancel()
        await asyncio.sleep(0.1)
        task.cancel()  # a second Ctrl-C while the restore hangs
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5.0)
    (restore,) = test.report.restores
    assert (restore.device, restore.ok) == ("battery", False)
    assert "not put back within 0.5 s" in restore.error
    report = CommissioningReport(site.site.id, site.site.name, "site.toml", NOON, step_test=test.report)
    first = report.problems()[0]
    assert (first.subject, first.fix) == ("battery", "set battery's power_setpoint_kw back to 0 by hand")


def test_the_step_test_is_not_started_without_a_terminal_or_yes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    site = load_site(CENTRE)
    assert not _check_cmd._confirmed(site)
    assert "confirm on a terminal, or pass --yes" in capsys.readouterr().err


# --- the rules on their own ---------------------------------------------------------------------------------


def _read(name: str, kind: DeviceKind, **values: float) -> DeviceRead:
    points = tuple(PointReading(q, v, "kW", "", "", Verdict.OK) for q, v in values.items())
    return DeviceRead(name, kind, "m", "rs485-1", "1", DeviceStatus.ANSWERED, points)


def _centre() -> SiteConfig:
    return load_site(CENTRE)


def test_pv_and_unexplained_export_at_night_are_implausible() -> None:
    reads = [
        _read("grid-meter", DeviceKind.GRID_METER, power_kw=-15.0),
        _read("pv-meter", DeviceKind.PV_METER, power_kw=12.0),
        _read("battery", DeviceKind.BATTERY_INVERTER, power_kw=0.0),
        _read("charger-1", DeviceKind.EV_CHARGER, power_kw=0.0),
    ]
    findings = judge_site(reads, _centre(), MIDNIGHT)
    implausible = [f.what for f in findings if f.verdict is Verdict.IMPLAUSIBLE]
    assert any("pv-meter reads 12 kW of PV at night" in line for line in implausible)
    assert any("15 kW of export at night" in line for line in implausible)
    # A battery discharging that much explains the export.
    reads[1] = _read("pv-meter", DeviceKind.PV_METER, power_kw=0.0)
    reads[2] = _read("battery", DeviceKind.BATTERY_INVERTER, power_kw=-20.0)
    assert all(f.verdict is Verdict.OK for f in judge_site(reads, _centre(), MIDNIGHT))


def test_meters_that_add_up_to_a_generating_building_are_implausible() -> None:
    reads = [
        _read("grid-meter", DeviceKind.GRID_METER, power_kw=-30.0),  # CT reversed: it imports 30
        _read("pv-meter", DeviceKind.PV_METER, power_kw=5.0),
        _read("battery", DeviceKind.BATTERY_INVERTER, power_kw=0.0),
        _read("charger-1", DeviceKind.EV_CHARGER, power_kw=0.0),
    ]
    findings = judge_site(reads, _centre(), NOON)
    assert any(f.verdict is Verdict.IMPLAUSIBLE and "the meters disagree" in f.what for f in findings)


def test_a_battery_whose_power_disagrees_with_its_soc_has_the_wrong_sign() -> None:
    site = _centre()
    wrong = judge_battery_trend(BatteryTrend("battery", 50.0, 49.9, 12.0, 3.0), site)
    assert wrong.verdict is Verdict.IMPLAUSIBLE
    assert "wrong sign" in wrong.fix
    assert judge_battery_trend(BatteryTrend("battery", 50.0, 50.1, 12.0, 3.0), site).verdict is Verdict.OK
    assert "not checked" in judge_battery_trend(BatteryTrend("battery", 50.0, 50.0, 12.0, 10.0), site).what


def test_a_dlt645_meter_configured_as_the_pv_meter_is_questioned() -> None:
    site = _centre().model_dump()
    site["buses"].append({
        "name": "rs485-2", "port": "/dev/ttyUSB1", "protocol": "dlt645", "baud_rate": 2400,
        "devices": [{"name": "revenue", "kind": "pv_meter", "model": "dlt645_3phase", "address": "123456789012"}],
    })  # fmt: skip
    findings = judge_site([], parse_site(site, environment=False), NOON)
    assert any(f.subject == "revenue" and f.verdict is Verdict.SUSPICIOUS for f in findings)


def _observation(kind: StepKind, grid_kw: float, pv_kw: float, grid_meters: float, pv_meters: float) -> Observation:
    return Observation(kind, grid_kw, pv_kw, grid_meters, pv_meters, step_test.step_tolerance_kw(grid_kw or pv_kw))


def test_the_battery_step_alone_cannot_tell_a_blind_grid_meter_from_one_on_the_pv_feeder() -> None:
    battery_only = [_observation(StepKind.BATTERY, 10.0, 0.0, 0.0, 0.0)]
    (finding,) = diagnose_wiring(battery_only, ["grid-meter"], ["pv-meter"])
    assert finding.verdict is Verdict.SUSPICIOUS
    assert "more than one wiring" in finding.what
    # The PV step tells them apart: the grid meter moves with PV.
    with_pv = [*battery_only, _observation(StepKind.PV, 10.0, -10.0, -10.0, -10.0)]
    (finding,) = diagnose_wiring(with_pv, ["grid-meter"], ["pv-meter"])
    assert finding.verdict is Verdict.IMPLAUSIBLE
    assert "meters the PV feeder" in finding.what


def test_swapped_meters_are_the_simplest_story_of_a_pv_step_that_moves_both_the_wrong_way() -> None:
    # Two CTs reversed would explain it too, with two faults where a swap is one.
    (finding,) = diagnose_wiring([_observation(StepKind.PV, 10.0, -10.0, -10.0, 10.0)], ["grid-meter"], ["pv-meter"])
    assert "swapped" in finding.what


def test_a_grid_meter_reading_half_of_every_step_has_the_wrong_ct_ratio() -> None:
    observations = [
        _observation(StepKind.BATTERY, 10.0, 0.0, 5.0, 0.0),
        _observation(StepKind.PV, 8.0, -8.0, 4.0, -8.0),
    ]
    (finding,) = diagnose_wiring(observations, ["grid-meter"], ["pv-meter"])
    assert finding.verdict is Verdict.IMPLAUSIBLE
    assert "0.50 x the flow" in finding.fix


def _edge(kind: StepKind, outcome: Outcome, observation: Observation) -> StepResult:
    return StepResult(kind, outcome, "seen", "battery", observation=observation)


def test_a_step_is_evidence_when_its_way_back_tells_the_same_story_and_inconclusive_when_not() -> None:
    reversed_ct = judge_edges(
        _edge(StepKind.BATTERY, Outcome.FAILED, _observation(StepKind.BATTERY, 10.0, 0.0, -10.0, 0.0)),
        _edge(StepKind.BATTERY, Outcome.FAILED, _observation(StepKind.BATTERY, -10.0, 0.0, 10.0, 0.0)),
        has_pv_meter=True,
    )
    assert reversed_ct.outcome is Outcome.FAILED
    assert reversed_ct.restore_observation is not None
    # A meter reading half the flow both ways is a story no simple wiring tells, but told twice: evidence.
    half = judge_edges(
        _edge(StepKind.BATTERY, Outcome.FAILED, _observation(StepKind.BATTERY, 10.0, 0.0, 5.0, 0.0)),
        _edge(StepKind.BATTERY, Outcome.FAILED, _observation(StepKind.BATTERY, -10.0, 0.0, -5.0, 0.0)),
        has_pv_meter=True,
    )
    assert half.outcome is Outcome.FAILED
    # A 4 kW load switching on with the step and staying on: the way back says the wiring is right.
    load = judge_edges(
        _edge(StepKind.BATTERY, Outcome.FAILED, _observation(StepKind.BATTERY, 10.0, 0.0, 14.0, 0.0)),
        _edge(StepKind.BATTERY, Outcome.PASSED, _observation(StepKind.BATTERY, -10.0, 0.0, -10.0, 0.0)),
        has_pv_meter=True,
    )
    assert load.outcome is Outcome.INCONCLUSIVE
    assert load.findings[0].what.startswith("inconclusive: the building's load moved during the battery step")
    assert "run the step test again" in load.findings[0].fix
    (finding,) = diagnose_wiring([], ["grid-meter"], ["pv-meter"], inconclusive=[StepKind.BATTERY])
    assert (finding.verdict, finding.what.split(":")[0]) == (Verdict.SUSPICIOUS, "inconclusive")


def test_the_battery_steps_towards_the_middle_of_its_window_and_never_past_a_limit() -> None:
    site = _centre()  # 30 kW battery, SoC run within 10..95 %, import 250 kW, export 30 kW
    assert step_test.plan_battery_step(site, 10.0, 40.0, 50.0, 0.0) == (10.0, "")
    assert step_test.plan_battery_step(site, 10.0, 80.0, 50.0, 0.0) == (-10.0, "")
    # Discharging would export past 30 kW: it charges instead.
    assert step_test.plan_battery_step(site, 10.0, 80.0, -25.0, 0.0) == (10.0, "")
    target, why = step_test.plan_battery_step(site, 10.0, 95.0, -25.0, 0.0)
    assert target is None
    assert "top of its window" in why
    assert "outside its limits" in why


def test_commissioning_steps_the_site_cannot_make_are_refused() -> None:
    site = _centre().model_dump()
    for section, problem in (
        ({"step_battery_kw": 40.0}, "exceeds the battery's smaller rating"),
        ({"step_battery_kw": 1.0}, "cannot be told from"),
        ({"step_pv_kw": 400.0}, "exceeds pv.peak_kw"),
        ({"step_charger_a": 40.0}, "exceeds every charger's max_current_a"),
    ):
        with pytest.raises(ConfigError, match=problem):
            parse_site({**site, "commissioning": section}, environment=False)
    sizes = step_test.step_sizes(_centre())
    assert (sizes.battery_kw, sizes.pv_kw, sizes.charger_a, sizes.hold_s) == (10.0, 10.0, 10.0, 20.0)


def test_sunrise_and_sunset_match_the_almanac() -> None:
    # Greenwich on the 2024 June solstice: 04:43 and 21:21 BST (HM Nautical Almanac Office).
    day = sun_day(51.4769, -0.0005, date(2024, 6, 21), ZoneInfo("Europe/London"))
    assert day.sunrise is not None
    assert day.sunset is not None
    assert abs((day.sunrise - datetime(2024, 6, 21, 4, 43, tzinfo=ZoneInfo("Europe/London"))).total_seconds()) < 120
    assert abs((day.sunset - datetime(2024, 6, 21, 21, 21, tzinfo=ZoneInfo("Europe/London"))).total_seconds()) < 120
    assert sun_day(78.2, 15.6, date(2026, 6, 21), ZoneInfo("Arctic/Longyearbyen")).polar == "day"
    assert sun_elevation_deg(22.53, 113.38, NOON) > 60
    assert sun_elevation_deg(22.53, 113.38, MIDNIGHT) < -30


def test_device_config_names_match_the_peer() -> None:
    """The peer's units are the example site's addresses (the tests above rely on it)."""
    devices: dict[str, DeviceConfig] = {d.name: d for _, d in _centre().devices()}
    assert {d.address for d in devices.values()} == set(SPACES)
    assert devices["charger-1"].address == CHARGER_UNIT
