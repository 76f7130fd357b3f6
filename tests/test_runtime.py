"""The controller closing its loop through real bytes against the simulated school, in accelerated time."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from config import SiteConfig, load_site
from controller.clock import SimClock
from controller.plant import EvArrival, Plant
from controller.runtime import EV_FULL_AFTER_S, EV_FULL_RETRY_S, SLOW_POLL_S, Runtime
from controller.safety import LIMIT_MARGIN_KW, Setpoints
from controller.simulation import Recorder, simulated_site
from firmware_bridge.device import DeviceDriver
from firmware_bridge.simulator import Fault, FaultMode

SCHOOL = Path(__file__).parents[1] / "config" / "sites" / "zhongshan_school.toml"


@pytest.fixture(scope="module")
def site() -> SiteConfig:
    return load_site(SCHOOL, environment=False)


async def test_sunny_midday_with_a_car_keeps_zero_export_and_charges(site: SiteConfig) -> None:
    # Monday 07:50-11:50 in July: the car arrives at 08:00, PV exceeds the load from mid-morning.
    start = datetime(2026, 7, 6, 7, 50, tzinfo=ZoneInfo(site.site.timezone))
    soc: list[float] = []
    async with simulated_site(site, start, 1) as (plant, links, _sims):
        recorder = Recorder(site, plant, keep_grid=True)

        def on_tick(now_s: float, setpoints: Setpoints) -> None:
            recorder(now_s, setpoints)
            soc.append(plant.soc)

        runtime = Runtime(site, clock=SimClock(start, None), links=links, line_timing=False,
                          before_tick=plant.advance, on_tick=on_tick)  # fmt: skip
        await runtime.run(4 * 3600)
    assert recorder.breach_ticks == 0
    assert recorder.soc_out_of_bounds_ticks == 0
    assert plant.grid_export_kwh < 0.5  # zero export held within the meters' margin
    assert max(recorder.grid_kw) <= site.import_limit_kw
    assert plant.delivered_kwh > 10.0
    lowest = soc.index(min(soc))
    assert soc[-1] > soc[lowest] + 0.1  # after its low point the battery filled from the surplus
    assert runtime.stats.plans >= 16
    assert runtime.stats.bus_errors == 0


async def test_silent_grid_meter_enters_and_leaves_the_safe_state(site: SiteConfig) -> None:
    start = datetime(2026, 7, 6, 11, 0, tzinfo=ZoneInfo(site.site.timezone))
    states: list[bool] = []
    async with simulated_site(site, start, 1) as (plant, links, sims):
        grid_bus = sims["rs485-2"]

        def on_tick(now_s: float, setpoints: Setpoints) -> None:
            recorder(now_s, setpoints)
            states.append(setpoints.safe_state)
            if now_s == 600:
                grid_bus.set_fault("grid-meter", Fault(FaultMode.SILENT))
            if now_s == 630:
                grid_bus.set_fault("grid-meter", Fault())

        recorder = Recorder(site, plant)
        runtime = Runtime(site, clock=SimClock(start, None), links=links, line_timing=False,
                          before_tick=plant.advance, on_tick=on_tick)  # fmt: skip
        await runtime.run(900)
    stale = int(site.control.stale_data_timeout_s)
    assert not any(states[:600])
    # Blind after the stale timeout (not before), for the rest of the outage, and back once data returns.
    assert not any(states[600 : 600 + stale - 1])
    assert all(states[600 + stale + 1 : 630])
    assert not any(states[640:])
    assert plant.battery_setpoint_kw == 0.0  # the run ended with the devices left safe


def test_run_command_summarises_stores_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from controller.cli import main

    store, report = tmp_path / "ts.sqlite3", tmp_path / "report"
    argv = ["run", str(SCHOOL), "--simulate", "--speed", "max", "--duration", "10m", "--start", "2026-07-06T12:00",
            "--store", str(store), "--report", str(report)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "simulated 0.2 h" in out
    assert "0 ticks beyond the import limit (0 avoidable" in out
    assert "0 ticks beyond the export limit (0 avoidable" in out
    assert (report / "day-2026-07-06.png").read_bytes().startswith(b"\x89PNG")
    assert "bill:" in (report / "summary.md").read_text()
    assert (
        main(
            [
                "export",
                str(SCHOOL),
                "--store",
                str(store),
                "--csv",
                str(tmp_path / "x.csv"),
                "--series",
                "measured.grid_kw",
            ]
        )
        == 0
    )
    assert len((tmp_path / "x.csv").read_text().splitlines()) == 1 + 601


def test_run_refuses_a_broken_site_and_unsimulated_hardware(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from controller.cli import main

    bad = tmp_path / "site.toml"
    bad.write_text(SCHOOL.read_text().replace("export_limit_kw = 0.0", "export_limit_kw = -1.0"))
    assert main(["run", str(bad), "--simulate"]) == 2
    assert "grid.export_limit_kw" in capsys.readouterr().err
    assert main(["run", str(SCHOOL)]) == 2
    assert "add --simulate" in capsys.readouterr().err


class _StepClock:
    realtime = False

    def __init__(self, start: datetime) -> None:
        self.start = start
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def local(self) -> datetime:
        from datetime import timedelta

        return self.start + timedelta(seconds=self.t)

    async def sleep_until(self, at_s: float) -> None:
        self.t = at_s

    def lateness(self, at_s: float) -> float:
        return 0.0


def test_month_peak_is_the_largest_15_minute_average_not_a_spike(site: SiteConfig, tmp_path: Path) -> None:
    from firmware_bridge.transport import SerialLink

    clock = _StepClock(datetime(2026, 7, 31, 23, 0, tzinfo=ZoneInfo(site.site.timezone)))
    links = {bus.name: SerialLink(bus, str(tmp_path / "unused")) for bus in site.buses}
    runtime = Runtime(site, clock=clock, links=links)  # type: ignore[arg-type]
    for second in range(1800):  # two blocks: 100 kW with one 300 kW second, then 120 kW
        clock.t = float(second)
        runtime._demand(300.0 if second == 10 else (100.0 if second < 900 else 120.0), 1.0)
    clock.t = 1800.0
    runtime._demand(0.0, 1.0)
    assert runtime.month_peak_kw == pytest.approx(120.0)  # the spike adds only 0.2 kW to its block's average
    clock.t = 3600.0  # 00:00 on 1 August: a new billing month
    runtime._demand(50.0, 1.0)
    assert runtime.month_peak_kw == 0.0


async def test_live_view_shows_what_the_site_does_and_why(site: SiteConfig) -> None:
    from rich.console import Console

    from controller.live import render

    start = datetime(2026, 7, 6, 12, 0, tzinfo=ZoneInfo(site.site.timezone))
    async with simulated_site(site, start, 1) as (plant, links, _sims):
        runtime = Runtime(site, clock=SimClock(start, None), links=links, line_timing=False, before_tick=plant.advance)
        await runtime.run(30)
    console = Console(record=True, width=160)
    console.print(render(runtime, mqtt="127.0.0.1:1883"))
    text = console.export_text()
    assert "RUNNING" in text
    assert "2026-07-06T12:00:30+08:00" in text
    assert f"{runtime.last_measured.grid_kw:+8.1f} kW" in text  # type: ignore[union-attr]
    assert "battery SoC" in text
    assert "grid-meter" in text
    assert "ok" in text
    assert "plan from 2026-07-06T12:00" in text


def test_forecaster_knows_a_kind_of_day_only_after_seeing_it(site: SiteConfig) -> None:
    from controller.forecast import Forecaster

    forecaster = Forecaster(site, 15)
    monday = datetime(2026, 7, 6, tzinfo=ZoneInfo(site.site.timezone))
    assert not forecaster.knows_day(monday)
    for minute in range(0, 24 * 60 + 15, 5):
        forecaster.observe(monday + timedelta(minutes=minute), 50.0, 0.0, pv_limited=False)
    assert forecaster.knows_day(monday + timedelta(days=1))  # another school day
    assert not forecaster.knows_day(monday + timedelta(days=5))  # Saturday: not seen yet


async def test_idle_chargers_are_read_at_the_slow_poll_and_a_car_is_found_within_it(site: SiteConfig) -> None:
    """A charger with no car and no current offered is read every SLOW_POLL_S, not every tick (the bus
    time goes to the meters); a car plugging in is found within that poll, and its charger is then read
    every tick."""
    start = datetime(2026, 7, 6, 7, 58, tzinfo=ZoneInfo(site.site.timezone))  # ev1's car arrives 08:00
    seen: list[int] = []
    found_at: list[float] = []
    async with simulated_site(site, start, 1) as (plant, links, sims):
        charger = sims["rs485-1"].device("charger-1")

        def on_tick(now_s: float, setpoints: Setpoints) -> None:
            seen.append(charger.requests_seen)
            if not found_at and runtime.last_measured is not None and runtime.last_measured.ev_connected["ev1"]:
                found_at.append(now_s)

        runtime = Runtime(site, clock=SimClock(start, None), links=links, line_timing=False,
                          before_tick=plant.advance, on_tick=on_tick)  # fmt: skip
        await runtime.run(240)
    idle_requests = seen[115] - seen[5]  # 110 s without a car
    keepalives = 110 / DeviceDriver.keepalive_period_s(site.control.device_watchdog_s)  # its watchdog's
    assert idle_requests <= 110 / SLOW_POLL_S + keepalives + 4  # the slow poll (and a setpoint write or two)
    assert found_at
    assert 120 <= found_at[0] <= 120 + SLOW_POLL_S + 1
    connected_requests = seen[239] - seen[180]  # a minute with the car: read every tick
    assert connected_requests >= 59


def test_a_plan_weighs_a_new_peak_by_the_days_it_serves(site: SiteConfig, tmp_path: Path) -> None:
    """The month's peak is billed once and serves every day left in the month: a one-day plan on a known
    day on the 1st weighs a kW of new peak at a 31st of the monthly charge (so it charges in the valley
    night when a kW saves more than that each day), on the 16th at a 16th, on the last day at all of it."""
    from firmware_bridge.transport import SerialLink

    zone = ZoneInfo(site.site.timezone)
    links = {bus.name: SerialLink(bus, str(tmp_path / "unused")) for bus in site.buses}
    runtime = Runtime(site, clock=_StepClock(datetime(2026, 7, 1, tzinfo=zone)), links=links)  # type: ignore[arg-type]
    monthly = site.tariff.demand_charge_cny_per_kw_month

    def weighed(at: datetime) -> float:
        return runtime._scenario(at).grid.demand_charge_cny_per_kw

    # Without load history the plan cannot know where a peak falls: the whole monthly charge.
    assert weighed(datetime(2026, 7, 1, tzinfo=zone)) == pytest.approx(monthly)
    for day in (datetime(2026, 6, 29, tzinfo=zone), datetime(2026, 6, 27, tzinfo=zone)):  # a Monday, a Saturday
        for minute in range(0, 24 * 60 + 15, 5):
            runtime.forecaster.observe(day + timedelta(minutes=minute), 50.0, 0.0, pv_limited=False)
    assert weighed(datetime(2026, 7, 1, tzinfo=zone)) == pytest.approx(monthly / 31)
    assert weighed(datetime(2026, 7, 16, tzinfo=zone)) == pytest.approx(monthly / 16)
    assert weighed(datetime(2026, 7, 31, 12, tzinfo=zone)) == pytest.approx(monthly)  # the horizon outlasts it
    assert weighed(datetime(2026, 2, 1, tzinfo=zone)) == pytest.approx(monthly / 28)


async def test_a_chargers_stays_are_learned_from_the_cars_seen_arriving(site: SiteConfig) -> None:
    """How long cars stay at a charger is learned from the sessions the controller saw begin and end,
    and becomes the departure its plans expect; a car already plugged in at start-up stayed for an
    unknown time and teaches nothing."""
    start = datetime(2026, 7, 6, 10, 0, tzinfo=ZoneInfo(site.site.timezone))
    arrivals = [
        EvArrival("ev1", start - timedelta(hours=1), start + timedelta(minutes=5), 5.0),
        *(EvArrival("ev2", start + timedelta(minutes=m), start + timedelta(minutes=m + 10), 2.0) for m in (2, 15, 28)),
    ]
    plant = Plant(site, start, arrivals=arrivals)
    async with simulated_site(site, start, 1, plant=plant) as (_, links, _sims):
        runtime = Runtime(site, clock=SimClock(start, None), links=links, line_timing=False, before_tick=plant.advance)
        assert runtime.expected_stay_h("ev2") == 8.0  # nothing seen yet: the default
        await runtime.run(40 * 60)
    assert runtime.ev_stays_h["ev1"] == []
    # Plugging in is noticed within the idle charger's slow poll, leaving within a tick.
    assert runtime.ev_stays_h["ev2"] == [pytest.approx(10 / 60, abs=(SLOW_POLL_S + 1) / 3600)] * 3
    assert runtime.expected_stay_h("ev2") == pytest.approx(10 / 60, abs=(SLOW_POLL_S + 1) / 3600)


async def test_a_full_car_stays_out_of_the_plans_until_it_leaves(site: SiteConfig) -> None:
    """A car that takes none of the current it is offered is full: no later plan keeps energy (or buys
    it) for it while it stays plugged in. Judged afresh each tick it flip-flopped: a plan without it
    offered it nothing, so the next plan saw a car that was not declining and planned 60 kWh for it."""
    start = datetime(2026, 7, 6, 9, 0, tzinfo=ZoneInfo(site.site.timezone))
    full_car = EvArrival("ev1", start + timedelta(minutes=1), start + timedelta(hours=6), 0.5)
    plant = Plant(site, start, arrivals=[full_car], weather="sunny")
    plans_after_full: dict[int, float] = {}  # plan number -> kWh it keeps for the full car
    full_at: list[float] = []

    async with simulated_site(site, start, 1, plant=plant) as (_, links, _sims):

        def on_tick(now_s: float, setpoints: Setpoints) -> None:
            if not full_at and plant.delivered_kwh >= full_car.energy_kwh - 1e-6:
                full_at.append(now_s)
            plan = runtime.plan
            if full_at and plan is not None and now_s > full_at[0] + EV_FULL_AFTER_S + 2:
                plans_after_full[runtime.stats.plans] = float(plan.ev_kw["ev1"].sum()) if "ev1" in plan.ev_kw else 0.0

        runtime = Runtime(site, clock=SimClock(start, None), links=links, line_timing=False,
                          before_tick=plant.advance, on_tick=on_tick)  # fmt: skip
        await runtime.run(100 * 60)
    assert plant.delivered_kwh == pytest.approx(full_car.energy_kwh)
    assert full_at
    assert full_at[0] < 60 * 60
    assert len(plans_after_full) >= 3  # re-plans with the full car still plugged in
    assert max(plans_after_full.values()) == 0.0


async def test_zero_export_keeps_the_import_a_calm_load_needs(site: SiteConfig) -> None:
    """A sunny Saturday noon: the battery charges flat out and PV is curtailed to zero export. The
    import kept as headroom follows what the 45 kW weekend load moves in a second (a fraction of a kW),
    not the full 1 kW a noisy site needs, and nothing is exported beyond a meter's error."""
    start = datetime(2026, 7, 11, 12, 0, tzinfo=ZoneInfo(site.site.timezone))
    plant = Plant(site, start, weather="sunny")
    grid_kw: list[float] = []
    async with simulated_site(site, start, 1, plant=plant) as (_, links, _sims):
        runtime = Runtime(site, clock=SimClock(start, None), links=links, line_timing=False,
                          before_tick=plant.advance, on_tick=lambda _t, _sp: grid_kw.append(plant.grid_kw))  # fmt: skip
        await runtime.run(20 * 60)
    assert plant.pv_kw < plant.pv_available_kw - 50.0  # curtailed: zero export is what holds the grid
    last = grid_kw[-300:]
    assert sum(last) / len(last) < 0.7
    assert min(grid_kw[60:]) > -LIMIT_MARGIN_KW


async def test_a_full_car_is_offered_current_hourly_and_planned_again_when_it_takes_it(site: SiteConfig) -> None:
    """A full car is left alone, but offered its minimum current for half a minute each hour: a car that
    had paused by itself (its own timer) and now takes current is planned again instead of left short."""
    start = datetime(2026, 7, 6, 9, 0, tzinfo=ZoneInfo(site.site.timezone))
    car = EvArrival("ev1", start + timedelta(minutes=1), start + timedelta(hours=8), 0.5)
    plant = Plant(site, start, arrivals=[car], weather="sunny")
    minimum_a = site.ev_chargers[0].min_current_a
    full_at: list[float] = []
    offered_while_full: list[float] = []  # seconds after going full at which it was offered current
    async with simulated_site(site, start, 1, plant=plant) as (_, links, _sims):

        def on_tick(now_s: float, setpoints: Setpoints) -> None:
            ev = plant.evs["ev1"]
            if not full_at and ev.arrival is not None and ev.delivered_kwh >= car.energy_kwh - 1e-6:
                full_at.append(now_s)
            if full_at and now_s > full_at[0] + EV_FULL_AFTER_S + 2 and ev.arrival is not None:
                if ev.arrival.energy_kwh == car.energy_kwh and setpoints.ev_current_a["ev1"] >= minimum_a:
                    offered_while_full.append(now_s - full_at[0])
                if now_s >= full_at[0] + EV_FULL_RETRY_S + 300 and ev.arrival.energy_kwh == car.energy_kwh:
                    ev.arrival = dataclasses.replace(car, energy_kwh=3.0)  # its own timer lets it charge on

        runtime = Runtime(site, clock=SimClock(start, None), links=links, line_timing=False,
                          before_tick=plant.advance, on_tick=on_tick)  # fmt: skip
        await runtime.run(3 * 3600)  # two offers
    assert full_at
    # Full: no current for the hour, then one offer of about half a minute.
    assert offered_while_full
    assert EV_FULL_RETRY_S <= offered_while_full[0] <= EV_FULL_RETRY_S + EV_FULL_AFTER_S + 5
    assert offered_while_full[-1] - offered_while_full[0] <= EV_FULL_AFTER_S + 5
    # The next hour's offer the car, wanting more by then, takes: it is planned again and charged to
    # what it wants (full again by the end).
    assert plant.evs["ev1"].delivered_kwh == pytest.approx(3.0)
