"""Review of the commissioning work (issue #18): each test shows a defect a site engineer would hit, and is
marked xfail(strict) until the product code is fixed. The step test runs either on the pymodbus plant peer
(tests/plant_peer.py) or on a small in-memory site (`_FakeSite`) whose clock the test steps."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from config import ConfigError, SiteConfig, load_site
from controller.clock import SimClock
from controller.commissioning.probe import SiteDevices
from controller.commissioning.readings import Verdict
from controller.commissioning.step_test import StepTest
from controller.runtime import Runtime
from controller.safety import Setpoints
from controller.simulation import simulated_site
from firmware_bridge.device import Readings
from firmware_bridge.errors import DeviceTimeout, PortError
from firmware_bridge.maps import device_questions
from firmware_bridge.ports import missing_ports
from firmware_bridge.transport import Link, SerialLink
from tests.nullmodem import NullModem
from tests.plant_peer import SPACES, Plant, PlantPeer

CENTRE = Path(__file__).parents[1] / "config" / "sites" / "community_centre_export.toml"
SHANGHAI = ZoneInfo("Asia/Shanghai")
BATTERY_BLOCK = 'name = "battery"\nkind = "battery_inverter"\nmodel = "generic_battery_inverter"\naddress = 10'


def _centre_text(**replace: str) -> str:
    text = CENTRE.read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return text


def _load(text: str) -> SiteConfig:
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as handle:
        handle.write(text)
        handle.flush()
        return load_site(handle.name, environment=False)


def _two_inverters(first_kw: float, second_kw: float) -> str:
    """The community centre with its battery split over two inverters (`battery` first)."""
    return _centre_text(**{
        BATTERY_BLOCK: f"{BATTERY_BLOCK}\nrated_kw = {first_kw}\n\n[[buses.devices]]\nname = \"battery-2\"\n"
        f"kind = \"battery_inverter\"\nmodel = \"generic_battery_inverter\"\naddress = 11\nrated_kw = {second_kw}",
    })  # fmt: skip


class _FakeSite:
    """The community centre's devices in memory: the battery follows its setpoint at once, the grid meter
    sees load - PV + battery, PV makes 60 kW under its limit, no car. Time moves only when the step test
    sleeps. `on_write(device, quantity, value)` may raise or wait before a write lands."""

    def __init__(self, site: SiteConfig) -> None:
        self.site = site
        self.now_s = 0.0
        self.setpoints: dict[tuple[str, str], float] = {
            ("pv-inverter", "power_limit_pct"): 100.0,
            ("charger-1", "current_limit_a"): 16.0,
        }
        self.batteries = [d.name for _, d in site.devices() if d.kind.value == "battery_inverter"]
        for name in self.batteries:
            self.setpoints[(name, "power_setpoint_kw")] = 0.0
        self.writes: list[tuple[str, str, float, dict[tuple[str, str], float]]] = []
        self.restore_started = asyncio.Event()
        self.load_kw = 40.0
        self.ramp_kw_per_s: float | None = None  # None: the battery follows its setpoint at once
        self.battery_kw = dict.fromkeys(self.batteries, 0.0)

    def clock(self) -> float:
        return self.now_s

    async def sleep(self, seconds: float) -> None:
        self.now_s += seconds
        for name in self.batteries:
            target = self.setpoints[(name, "power_setpoint_kw")]
            reach = seconds * (self.ramp_kw_per_s or 0.0)
            now = self.battery_kw[name]
            self.battery_kw[name] = min(target, now + reach) if target > now else max(target, now - reach)
        await asyncio.sleep(0)

    def _battery_now_kw(self, name: str) -> float:
        if self.ramp_kw_per_s is None:
            return self.setpoints[(name, "power_setpoint_kw")]
        return self.battery_kw[name]

    def _pv_kw(self) -> float:
        assert self.site.pv is not None
        return min(60.0, self.setpoints[("pv-inverter", "power_limit_pct")] / 100 * self.site.pv.peak_kw)

    def _power_kw(self, device: str) -> float:
        battery = sum(self._battery_now_kw(name) for name in self.batteries)
        if device == "grid-meter":
            return self.load_kw - self._pv_kw() + battery
        if device in ("pv-meter", "pv-inverter"):
            return self._pv_kw()
        if device in self.batteries:
            return self._battery_now_kw(device)
        return 0.0  # the charger: no car

    async def read(self, device: str, quantities: Sequence[str]) -> Readings:
        await asyncio.sleep(0)
        values: Readings = {}
        for quantity in quantities:
            if (device, quantity) in self.setpoints:
                values[quantity] = self.setpoints[(device, quantity)]
            elif quantity == "power_kw":
                values[quantity] = self._power_kw(device)
            elif quantity == "soc_pct":
                values[quantity] = 42.0
            elif quantity == "state_code":
                values[quantity] = 0.0
        return values

    async def write(self, device: str, quantity: str, value: float) -> None:
        await self.on_write(device, quantity, value)
        self.setpoints[(device, quantity)] = value
        self.writes.append((device, quantity, value, dict(self.setpoints)))

    async def on_write(self, device: str, quantity: str, value: float) -> None:
        await asyncio.sleep(0)


def _step_test(fake: _FakeSite) -> StepTest:
    return StepTest(fake.site, fake, poll_s=1.0, clock=fake.clock, sleep=fake.sleep)


# --- 1. invert_sign reads a setpoint negated, and the step test puts that back ---------------------------


def _peer_site_file(tmp_path: Path, port: str, device: str) -> Path:
    """community_centre_export.toml on the peer's cable, `invert_sign = true` on `device`."""
    text = _centre_text(**{
        'port = "/dev/ttyUSB0"': f'port = "{port}"',
        "simulated = true": "simulated = false",
        f'name = "{device}"\n': f'name = "{device}"\ninvert_sign = true\n',
    })  # fmt: skip
    path = tmp_path / "site.toml"
    path.write_text(text + "\n[commissioning]\nstep_hold_s = 1.0\n")
    return path


@pytest.mark.parametrize(
    ("device", "plant", "held"),
    [
        ("battery", Plant(battery_setpoint_kw=5.0), ("battery_setpoint_kw", 5.0)),
        ("charger-1", Plant(car_connected=True), ("charger_limit_a", 16.0)),
    ],
    ids=["battery", "charger"],
)
async def test_step_test_puts_back_what_a_device_with_invert_sign_held(
    device: str, plant: Plant, held: tuple[str, float], tmp_path: Path
) -> None:
    with PlantPeer(plant, tuple(SPACES)) as peer:
        site = load_site(_peer_site_file(tmp_path, peer.port, device))
        links: dict[str, Link] = {bus.name: SerialLink(bus) for bus in site.buses}
        async with SiteDevices(site, links) as devices:
            report = await StepTest(site, devices, poll_s=0.2).run()
        attribute, value = held
        assert all(r.ok for r in report.restores), report.restores
        assert getattr(peer.plant, attribute) == value


# --- 2. a second Ctrl-C / SIGTERM during the restore ------------------------------------------------------


async def test_a_second_cancellation_during_the_restore_still_puts_the_battery_back() -> None:
    fake = _FakeSite(_load(CENTRE.read_text()))
    stepped = asyncio.Event()

    async def slow_restore(device: str, quantity: str, value: float) -> None:
        if quantity == "power_setpoint_kw" and value != 0.0:
            stepped.set()
        elif quantity == "power_setpoint_kw" and stepped.is_set():
            fake.restore_started.set()
            await asyncio.sleep(0.05)  # the write's frame on the line, its reply awaited

    fake.on_write = slow_restore  # type: ignore[method-assign]
    test = _step_test(fake)
    task = asyncio.create_task(test.run())
    await asyncio.wait_for(stepped.wait(), 5.0)
    task.cancel()  # the first Ctrl-C
    await asyncio.wait_for(fake.restore_started.wait(), 5.0)
    task.cancel()  # the impatient second one (or systemd's SIGTERM after a SIGHUP)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fake.setpoints[("battery", "power_setpoint_kw")] == 0.0
    assert [(r.device, r.ok) for r in test.report.restores] == [("battery", True)]


# --- 3. a step whose write timed out is left standing through the next steps ------------------------------


async def test_a_step_whose_reply_was_lost_is_put_back_before_the_next_step() -> None:
    fake = _FakeSite(_load(CENTRE.read_text()))
    lost = [False]

    async def reply_lost_once(device: str, quantity: str, value: float) -> None:
        await asyncio.sleep(0)
        if quantity == "power_setpoint_kw" and value != 0.0 and not lost[0]:
            lost[0] = True
            fake.setpoints[(device, quantity)] = value  # the inverter took it
            raise DeviceTimeout("battery: no reply to the write within 0.3 s")

    fake.on_write = reply_lost_once  # type: ignore[method-assign]
    report = await _step_test(fake).run()
    assert [s.kind.value for s in report.steps] == ["battery", "charger", "pv"]
    pv_writes = [w for w in fake.writes if w[1] == "power_limit_pct" and w[2] != 100.0]
    assert pv_writes, "the PV step was not made"
    _, _, _, during_pv_step = pv_writes[0]
    assert during_pv_step[("battery", "power_setpoint_kw")] == 0.0


# --- 4. several battery inverters --------------------------------------------------------------------------


async def test_one_battery_inverter_refusing_is_not_hidden_by_the_next_one_accepting() -> None:
    site = _load(_two_inverters(18.0, 12.0))
    start = datetime(2026, 7, 6, 11, 0, tzinfo=SHANGHAI)
    async with simulated_site(site, start, 1) as (_, links, _sims):
        runtime = Runtime(site, clock=SimClock(start, None), links=links, line_timing=False)

        async def first_refuses(device: str, quantity: str, value: float, *, even_if_lost: bool = False) -> bool:
            return device != "battery"  # the first inverter is lost (or refuses); battery-2 takes its share

        runtime._write_now = first_refuses  # type: ignore[method-assign]
        setpoints = Setpoints(battery_kw=20.0, ev_current_a={}, pv_limit_kw=None, safe_state=False,
                              predicted_grid_kw=None, breach="export")  # fmt: skip
        await runtime._apply(setpoints)
    assert runtime._battery_refused


async def test_the_battery_step_stays_within_the_stepped_inverters_own_rating() -> None:
    site = _load(_two_inverters(6.0, 24.0))  # 30 kW in all: a 10 kW step by default, the first has 6 kW
    fake = _FakeSite(site)
    await _step_test(fake).run()
    asked = [value for device, quantity, value, _ in fake.writes if device == "battery" and value != 0.0]
    assert asked, "the battery was not stepped"
    assert max(abs(v) for v in asked) <= 6.0


# --- 5. a building load that moves during a step --------------------------------------------------------


async def test_a_load_switching_on_during_the_battery_step_does_not_call_a_correct_wiring_wrong() -> None:
    fake = _FakeSite(_load(CENTRE.read_text()))

    async def compressor_starts(device: str, quantity: str, value: float) -> None:
        await asyncio.sleep(0)
        if quantity == "power_setpoint_kw" and value != 0.0:
            fake.load_kw = 44.0  # and stays on

    fake.on_write = compressor_starts  # type: ignore[method-assign]
    report = await _step_test(fake).run()
    assert [f.verdict for f in report.wiring if f.verdict is Verdict.IMPLAUSIBLE] == [], report.wiring


# --- 6. --observe and a setpoint the register cannot take ------------------------------------------------


async def test_observing_a_setpoint_the_register_cannot_take_is_counted_not_raised() -> None:
    site = _load(_centre_text(**{"max_charge_kw = 30.0": "max_charge_kw = 4000.0",
                                 "max_discharge_kw = 30.0": "max_discharge_kw = 4000.0"}))  # fmt: skip
    start = datetime(2026, 7, 6, 11, 0, tzinfo=SHANGHAI)
    setpoints = Setpoints(battery_kw=3500.0, ev_current_a={}, pv_limit_kw=None, safe_state=False,
                          predicted_grid_kw=None)  # fmt: skip
    async with simulated_site(site, start, 1) as (_, links, _sims):
        real = Runtime(site, clock=SimClock(start, None), links=links, line_timing=False)
        await real._apply(setpoints)  # the generic map's register ends at 3276.7 kW: refused, counted
        assert real.stats.write_failures == 1
        observing = Runtime(site, clock=SimClock(start, None), links=links, line_timing=False, observe=True)
        await observing._apply(setpoints)


# --- 7. check --step-test while the service still holds the port ------------------------------------------


async def test_a_port_already_open_for_another_master_is_refused() -> None:
    site = _load(CENTRE.read_text())
    async with NullModem() as cable:
        service = SerialLink(site.buses[0], cable.paths[1], virtual=True)
        await service.open()
        try:
            check = SerialLink(site.buses[0], cable.paths[1], virtual=True)
            try:
                with pytest.raises(PortError):
                    await check.open()
            finally:
                await check.close()
        finally:
            await service.close()


# --- 8. a slow battery, as the site file says it is -----------------------------------------------------


async def test_a_battery_that_ramps_as_its_site_file_says_is_not_called_deaf() -> None:
    site = _load(_centre_text(**{"ramp_kw_per_s = 30.0": "ramp_kw_per_s = 0.3"}))
    fake = _FakeSite(site)
    fake.ramp_kw_per_s = 0.3
    report = await _step_test(fake).run()
    battery = report.steps[0]
    assert battery.kind.value == "battery"
    assert [f.what for f in battery.findings if f.verdict is Verdict.IMPLAUSIBLE] == [], battery.summary


# --- 9. a bus behind a serial server (a pyserial URL) ---------------------------------------------------


@pytest.mark.parametrize("port", ["socket://192.0.2.10:4001", "rfc2217://192.0.2.10:4002"])
def test_a_bus_on_a_serial_server_url_is_not_called_missing(port: str) -> None:
    site = _load(_centre_text(**{'port = "/dev/ttyUSB0"': f'port = "{port}"', "simulated = true": "simulated = false"}))
    assert missing_ports(site) == []


# --- 10. inverter ratings that do not add up to the battery's ---------------------------------------------


def test_inverter_ratings_that_cannot_carry_the_battery_rating_are_refused_or_questioned() -> None:
    refused: list[str] = []
    questions: list[str] = []
    try:
        site = _load(_two_inverters(8.0, 4.0))  # [battery] max_charge_kw = max_discharge_kw = 30
    except ConfigError as err:
        refused = list(err.errors)
    else:
        questions = device_questions(site)
    assert any("rated_kw" in line for line in refused + questions)
