"""Runs one HIL scenario: the simulated site (plant, meters on ptys speaking the real protocols), the
real controller (runtime, safety layer, planner, storage, MQTT) in accelerated time, the scenario's
faults at their times, and a recorder judging every tick by the plant's truth."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiomqtt

from config import ConfigError, SiteConfig, load_site
from controller.clock import SimClock
from controller.forecast import Forecaster
from controller.interval_csv import IntervalCsvError, IntervalSeries, parse_interval_csv
from controller.mqtt import MqttService, Topics, site_services
from controller.plant import EvArrival, Plant, school_arrivals
from controller.runtime import Runtime
from controller.safety import HEADROOM_KW, Setpoints
from controller.sim_loop import new_event_loop
from controller.simulation import Recorder, simulated_site
from controller.storage.timeseries import TimeSeriesStore
from controller.tuning import TuningStore
from firmware_bridge.bus import LOST_BACKOFF_MAX_S
from firmware_bridge.simulator import Fault as SimFault
from firmware_bridge.simulator import FaultMode, Line
from hil_tests.baselines import (
    Outcome,
    Profiles,
    bill_cny,
    no_battery,
    perfect_foresight,
    self_consumption,
    true_profiles,
)
from hil_tests.broker import Mosquitto, Subscriber, subscribed
from hil_tests.scenario import DATA_DIR, FaultKind, HilScenario

__all__ = ["ScenarioResult", "WeekRow", "run_scenario"]

_log = logging.getLogger(__name__)

SITES = Path(__file__).parents[1] / "config" / "sites"
SAMPLE_EVERY_S = 60  # one point per simulated minute for the PNG
# History before the run is fed to the forecaster at this spacing: its profile keeps slot means, so
# every 10 s of a 15-minute slot says what every second would, at a tenth of the cost.
HISTORY_SAMPLE_S = 10
# After a fault ends, data must be trusted again within the stale timeout plus the longest bus
# back-off (a lost device is retried at most this late) plus a few ticks.
RECOVERY_SLACK_S = 5.0
# A battery setpoint move larger than this counts towards reversals (the runtime's write deadband).
REVERSAL_MOVE_KW = 0.2
# Battery energy a run may spend in the valley without a reason (a tick's rounding, a probe's return).
VALLEY_COVER_SLACK_KWH = 0.5
# Wall time to let MQTT settle at the end (outbox drained, replies in) before judging.
MQTT_SETTLE_S = 10.0
# Day-ahead forecast error: the forecast made at local midnight for the day, in these steps.
DAY_AHEAD_STEP_MINUTES = 15
WEEK_S = 7 * 86400
_MODES = {
    FaultKind.SILENT: FaultMode.SILENT,
    FaultKind.BAD_CRC: FaultMode.BAD_CRC,
    FaultKind.EXCEPTION: FaultMode.EXCEPTION,
    FaultKind.REFUSE_SETPOINTS: FaultMode.EXCEPTION,
}


@dataclass(frozen=True)
class WeekRow:
    """One week of a longer run: the run's bill beside the baselines' over the same days."""

    label: str
    days: float
    realised_cny: float
    no_battery_cny: float
    self_consumption_cny: float
    optimum_cny: float | None
    # The split of the run's bill and the optimum's: energy at TOU prices, and the week's 15-minute peak
    # import (its demand charge pro rata for the week's days).
    realised_energy_cny: float = 0.0
    realised_peak_kw: float = 0.0
    optimum_energy_cny: float | None = None
    optimum_peak_kw: float | None = None


@dataclass
class ScenarioResult:
    name: str
    description: str
    short: bool
    simulated_s: float = 0.0
    wall_s: float = 0.0
    ticks: int = 0
    logged_ticks: int = 0
    breach_ticks: int = 0
    longest_breach_ticks: int = 0
    avoidable_breach_ticks: int = 0
    unavoidable_breach_ticks: int = 0
    breach_energy_kwh: float = 0.0
    valley_cover_kwh: float = 0.0  # battery energy spent covering import in the day's cheapest band
    battery_reversals: int = 0  # the battery setpoint changing direction (moves beyond 0.2 kW)
    soc_out_of_bounds_ticks: int = 0
    safe_state_ticks: int = 0
    safe_entered_s: float | None = None
    safe_left_s: float | None = None
    ended_safe: bool = False
    ev_requested_kwh: float = 0.0
    ev_delivered_kwh: float = 0.0
    ev_shortfall_kwh: float = 0.0  # on finished sessions, below what was physically possible
    ev_sessions_finished: int = 0
    write_failures: int = 0
    bus_errors: int = 0
    mqtt_connections: int = 0
    mqtt_states_after_restart: int = 0
    patch_replies: list[dict[str, Any]] = field(default_factory=list)
    counters_continuous: bool = True
    realised: Outcome | None = None
    baselines: list[Outcome] = field(default_factory=list)
    weeks: list[WeekRow] = field(default_factory=list)
    # Mean absolute error of the forecast made at local midnight for that day (own or external, as planned on).
    mae_load_kw: float | None = None
    mae_pv_kw: float | None = None
    external_forecasts: int = 0
    failures: list[str] = field(default_factory=list)
    series: dict[str, list[float]] = field(default_factory=dict)
    fault_windows: list[tuple[float, float, str]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def outcome(self, name: str) -> Outcome | None:
        return next((o for o in self.baselines if o.name == name), None)


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _replay(scenario: HilScenario, site: SiteConfig) -> IntervalSeries | None:
    if scenario.replay_csv is None:
        return None
    path = DATA_DIR / scenario.replay_csv
    try:
        series = parse_interval_csv(path.read_bytes(), ZoneInfo(site.site.timezone))
    except (OSError, IntervalCsvError) as err:
        raise ConfigError(str(path), [str(err)]) from None
    if scenario.replay == "load":
        return IntervalSeries(series.start, series.step_s, series.load_kw, None)
    if scenario.replay == "pv":
        return IntervalSeries(series.start, series.step_s, None, series.pv_kw)
    return series


def _site(scenario: HilScenario, workdir: Path, broker_port: int | None) -> SiteConfig:
    data = load_site(SITES / f"{scenario.site}.toml", environment=False).model_dump()
    data = _merge(data, scenario.site_overrides)
    data["storage"] = {"path": str(workdir / "series.sqlite3")}
    if scenario.battery_response_kw_per_s is not None:
        data["simulation"]["battery_response_kw_per_s"] = scenario.battery_response_kw_per_s
    if broker_port is None:
        data["mqtt"]["enabled"] = False
    else:
        data["mqtt"].update({"broker": f"mqtt://127.0.0.1:{broker_port}", "remote_tuning": True,
                             "status_max_rate_hz": 20.0})  # fmt: skip
    return SiteConfig.model_validate(data)


def _seed_history(scenario: HilScenario, site: SiteConfig, plant: Plant, links: dict[str, Any]) -> None:
    """Write the state file a controller leaves after `history_days` on this site: the load profile and
    PV yield learned from what its meters read then (the plant's past: load, and PV before curtailment,
    which the forecaster only learns from while PV is not limited), and how long the cars of those days
    stayed. Nothing of the run itself is seen."""
    forecaster = Forecaster(site, site.control.step_minutes)
    start = plant.start
    for at_s in range(-scenario.history_days * 86400, 0, HISTORY_SAMPLE_S):
        local = start + timedelta(seconds=at_s)
        forecaster.observe(local, plant.load_at(at_s), plant.pv_available_at(at_s), pv_limited=False)
    before = SimClock(start - timedelta(seconds=1), None)
    writer = Runtime(site, clock=before, links=links, state_path=site.storage.state_path)
    writer.forecaster = forecaster
    if scenario.cars == "school":
        first = start - timedelta(days=scenario.history_days)
        for arrival in school_arrivals(site, first, scenario.history_days, plant.holidays):
            if arrival.leave <= start:
                stays = writer.ev_stays_h[arrival.charger]
                stays.append((arrival.leave - arrival.arrive).total_seconds() / 3600)
    writer.save_state()


class _Run:
    """The mutable state of one scenario run (faults fire from the tick callback)."""

    def __init__(self, scenario: HilScenario, site: SiteConfig, plant: Plant, result: ScenarioResult) -> None:
        self.scenario, self.site, self.plant, self.result = scenario, site, plant, result
        self.recorder = Recorder(site, plant)
        self.sims: dict[str, Any] = {}
        self.broker: Mosquitto | None = None
        self.service: MqttService | None = None
        self.fired: set[int] = set()
        self.cleared: set[int] = set()
        self.random = random.Random(scenario.seed)
        self.tasks: list[asyncio.Task[None]] = []
        self.broker_restarted_wall: float | None = None
        self.stop = asyncio.Event()
        self.restart_due: tuple[float, float] | None = None  # (stop at s, down for s)
        self.safe: list[bool] = []
        self.last_battery_kw = 0.0
        self.last_move_kw = 0.0
        self.runtime: Runtime | None = None
        self.day_ahead: dict[date, tuple[list[float], list[float]]] = {}
        self.issued: set[tuple[date, int]] = set()
        self.forecast_random = random.Random(f"forecast:{scenario.seed}")
        self.last_tick_s = 0.0
        self.block_import: dict[int, float] = {}  # 15-minute block -> import kWh
        self.week_marks: list[tuple[float, float, float]] = []  # (s, energy cost CNY, SoC) at each week start

    def bus_of(self, device: str) -> str:
        return next(bus.name for bus, d in self.site.devices() if d.name == device)

    def on_tick(self, now_plant_s: float, setpoints: Setpoints) -> None:
        self.recorder(now_plant_s, setpoints)
        self._account(now_plant_s)
        self._forecasts(now_plant_s)
        move = setpoints.battery_kw - self.last_battery_kw
        if abs(move) > REVERSAL_MOVE_KW:
            self.result.battery_reversals += self.last_move_kw * move < 0
            self.last_move_kw = move
        self.last_battery_kw = setpoints.battery_kw
        plant, site = self.plant, self.site
        limit_relief = plant.grid_kw > site.import_limit_kw - 2 * HEADROOM_KW
        if plant.battery_kw < 0 and not limit_relief and site.tariff.cheapest_with_dearer_ahead(plant.local_time()):
            self.result.valley_cover_kwh += -plant.battery_kw * site.control.tick_period_s / 3600
        self.safe.append(setpoints.safe_state)
        if setpoints.safe_state and self.result.safe_entered_s is None:
            self.result.safe_entered_s = now_plant_s
        if not setpoints.safe_state and self.result.safe_entered_s is not None and self.result.safe_left_s is None:
            self.result.safe_left_s = now_plant_s
        if int(now_plant_s) % SAMPLE_EVERY_S == 0:
            s = self.result.series
            for key, value in (("t_h", now_plant_s / 3600), ("grid_kw", self.plant.grid_kw),
                               ("pv_kw", self.plant.pv_kw), ("load_kw", self.plant.load_kw),
                               ("pv_available_kw", self.plant.pv_available_at(now_plant_s)),
                               ("battery_kw", self.plant.battery_kw), ("soc", self.plant.soc),
                               ("ev_kw", sum(e.power_kw for e in self.plant.evs.values())),
                               ("safe", float(setpoints.safe_state)),
                               *self._planned()):  # fmt: skip
                s.setdefault(key, []).append(value)
        self._faults(now_plant_s)

    def _planned(self) -> tuple[tuple[str, float], ...]:
        """The plan in force at this minute: its battery power, grid import and the PV and load it was
        made for, for the step (NaN: no plan)."""
        runtime, nan = self.runtime, float("nan")
        plan = None if runtime is None else runtime.plan
        start = None if runtime is None else runtime.plan_start
        made_for = None if runtime is None else runtime.plan_scenario
        step = -1
        if runtime is not None and plan is not None and start is not None:
            step = int((runtime.clock.local() - start).total_seconds() // (plan.step_minutes * 60))
        if plan is None or made_for is None or not 0 <= step < plan.steps:
            return ("plan_battery_kw", nan), ("plan_import_kw", nan), ("plan_pv_kw", nan), ("plan_load_kw", nan)
        return (("plan_battery_kw", float(plan.battery_kw[step])),
                ("plan_import_kw", float(plan.grid_import_kw[step])),
                ("plan_pv_kw", float(made_for.pv_kw[step])),
                ("plan_load_kw", float(made_for.load_kw[step])))  # fmt: skip

    def _account(self, now_s: float) -> None:
        """Per-week accounting: the energy cost and SoC at each week's start, import per 15-minute block."""
        if not self.week_marks or now_s >= self.week_marks[-1][0] + WEEK_S:
            at = 0.0 if not self.week_marks else self.week_marks[-1][0] + WEEK_S
            self.week_marks.append((at, self.plant.cost_cny, self.plant.soc))
        dt_s = max(0.0, now_s - self.last_tick_s)
        self.last_tick_s = now_s
        block = int((now_s - dt_s) // 900)
        self.block_import[block] = self.block_import.get(block, 0.0) + max(self.plant.grid_kw, 0.0) * dt_s / 3600

    def _forecasts(self, now_s: float) -> None:
        runtime = self.runtime
        if runtime is None:
            return
        local = self.plant.local_time(now_s)
        sim = self.scenario.external_forecast
        if sim is not None:
            due = [h for h in sim.issue_hours if local.hour >= h and (local.date(), h) not in self.issued]
            if due or not self.issued:
                self.issued.update((local.date(), h) for h in sim.issue_hours if local.hour >= h)
                self.issued.add((local.date(), -1))
                self.result.external_forecasts += 1
                errors = runtime.accept_forecast(self._provider_forecast(now_s), origin="hil provider")
                if errors:
                    self.result.failures.append(f"the simulated provider's forecast was refused: {errors[:2]}")
        midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
        if local.date() not in self.day_ahead and (local - midnight).total_seconds() < 60:
            steps = 24 * 60 // DAY_AHEAD_STEP_MINUTES
            self.day_ahead[local.date()] = (
                runtime.forecaster.load_kw(midnight, steps, DAY_AHEAD_STEP_MINUTES, now=local),
                runtime.forecaster.pv_kw(midnight, steps, DAY_AHEAD_STEP_MINUTES, now=local),
            )

    def _provider_forecast(self, now_s: float) -> bytes:
        """What a provider would send: the truth's step means times a per-day error factor, plus per-step noise."""
        sim = self.scenario.external_forecast
        assert sim is not None
        step_s = sim.step_minutes * 60
        first_s = (now_s // step_s) * step_s
        rng, plant = self.forecast_random, self.plant
        day_factor: dict[date, float] = {}
        pv, load = [], []
        peak_kw = self.site.pv.peak_kw if self.site.pv else 0.0
        for index in range(sim.horizon_h * 3600 // step_s):
            start = first_s + index * step_s
            samples = [start + (k + 0.5) * 300 for k in range(step_s // 300)]
            day = plant.local_time(start).date()
            factor = day_factor.setdefault(day, max(0.0, rng.gauss(1.0, sim.pv_error)))
            true_pv = sum(plant.pv_available_at(t) for t in samples) / len(samples)
            pv.append(round(min(1.5 * peak_kw, max(0.0, true_pv * factor * rng.gauss(1.0, sim.pv_error / 2))), 2))
            if sim.load_error is not None:
                true_load = sum(plant.load_at(t) for t in samples) / len(samples)
                load.append(round(max(0.0, true_load * rng.gauss(1.0, sim.load_error)), 2))
        body: dict[str, Any] = {
            "issued_at": plant.local_time(now_s).isoformat(),
            "start": plant.local_time(first_s).isoformat(),
            "step_minutes": sim.step_minutes,
            "pv_kw": pv,
            "source": "hil-provider",
        }
        if load:
            body["load_kw"] = load
        return json.dumps(body).encode()

    def _faults(self, now_s: float) -> None:
        for index, fault in enumerate(self.scenario.faults):
            if index not in self.fired and now_s >= fault.at:
                self.fired.add(index)
                self._start(fault, index)
            if index in self.fired and index not in self.cleared and fault.for_ > 0 and now_s >= fault.until:
                self.cleared.add(index)
                self._end(fault)
            noisy = fault.kind is FaultKind.NOISE and index in self.fired and index not in self.cleared
            if noisy and fault.bus is not None:  # a burst every tick
                self.sims[fault.bus].inject_noise(self.random.randbytes(self.random.randint(1, 24)))

    def _start(self, fault: Any, index: int) -> None:
        self.result.fault_windows.append((fault.at, fault.until, str(fault.kind)))
        kind = fault.kind
        if kind in _MODES:
            self.sims[self.bus_of(fault.device)].set_fault(
                fault.device,
                SimFault(_MODES[kind], probability=fault.probability, writes_only=kind is FaultKind.REFUSE_SETPOINTS),
            )
        elif kind is FaultKind.UNPLUG:
            self.sims[fault.bus].unplug()
        elif kind is FaultKind.BROKER_RESTART and self.broker is not None:
            self.broker.kill()
        elif kind is FaultKind.PATCH:
            self.tasks.append(asyncio.get_running_loop().create_task(self._send_patch(fault, index)))
        elif kind is FaultKind.RESTART:
            self.restart_due = (fault.at, fault.for_)
            self.stop.set()

    def _end(self, fault: Any) -> None:
        kind = fault.kind
        if kind in _MODES:
            self.sims[self.bus_of(fault.device)].set_fault(fault.device, SimFault())
        elif kind is FaultKind.UNPLUG:
            self.sims[fault.bus].replug()
        elif kind is FaultKind.BROKER_RESTART and self.broker is not None:
            self.broker.start()
            self.broker_restarted_wall = time.monotonic()

    async def _send_patch(self, fault: Any, index: int) -> None:
        assert self.broker is not None
        assert fault.payload is not None
        payload = fault.payload.replace("$ID", f"hil-{index}").encode()
        async with aiomqtt.Client("127.0.0.1", self.broker.port) as client:
            await client.publish(Topics(self.site.topic_prefix).config_set, payload, qos=1)


async def run_scenario(
    scenario: HilScenario, workdir: Path, *, short: bool = True, line: Line = Line.MEMORY
) -> ScenarioResult:
    """Run a scenario (shortened or full length) and judge it; `workdir` gets the series and state.
    `line`: the simulated buses' bytes over in-process links (every fault of the matrix is emulated on
    them too: silent, late, broken frames, garbage on the line, an unplugged adapter) or over ptys."""
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    result = ScenarioResult(scenario.name, scenario.description, short)
    duration = scenario.short_duration if short else scenario.duration
    wall = time.perf_counter()
    async with contextlib.AsyncExitStack() as stack:
        broker = None
        if scenario.mqtt:
            broker = Mosquitto(workdir)
            broker.start()
            stack.callback(broker.kill)
        site = _site(scenario, workdir, broker.port if broker else None)
        zone = ZoneInfo(site.site.timezone)
        start = scenario.start.replace(tzinfo=zone) if scenario.start.tzinfo is None else scenario.start
        days = int(duration // 86400) + 1
        holidays = frozenset({start.date()}) if scenario.calendar == "holiday" else frozenset()
        arrivals = school_arrivals(site, start, days, holidays) if scenario.cars == "school" else []
        plant = Plant(site, start, seed=scenario.seed, arrivals=list(arrivals), weather=scenario.weather,
                      holidays=holidays, variation=scenario.variation, replay=_replay(scenario, site),
                      skies=tuple(scenario.skies))  # fmt: skip
        soc_initial = plant.soc = max(site.tuning.battery.soc_min, min(site.tuning.battery.soc_max, 0.5))
        run = _Run(scenario, site, plant, result)
        run.broker = broker
        subscriber: Subscriber | None = None
        if broker is not None:
            topics = Topics(site.topic_prefix)
            subscriber = await stack.enter_async_context(
                subscribed(broker.port, topics.state, topics.config_reply, identifier=f"hil-{scenario.name}")
            )
        _, links, sims = await stack.enter_async_context(simulated_site(site, start, days, plant=plant, line=line))
        run.sims = sims
        if scenario.history_days:
            _seed_history(scenario, site, plant, links)
        # Simulated time may outrun the disk: the store waits for its writer rather than drop ticks.
        store = TimeSeriesStore(site.storage.path, site.storage.retention_days, wait_when_full=True)
        stack.callback(store.close)
        tuning = TuningStore(site)
        offset, counters_before, forecast_before = 0.0, None, {}
        while True:
            clock = SimClock(start + timedelta(seconds=offset), scenario.speed)
            segment_offset = offset
            runtime = Runtime(
                tuning.site, clock=clock, links=links, line_timing=False, store=store,
                state_path=site.storage.state_path,
                before_tick=lambda t, o=segment_offset: plant.advance(o + t),  # type: ignore[misc]
                on_tick=lambda t, sp, o=segment_offset: run.on_tick(o + t, sp),  # type: ignore[misc]
            )  # fmt: skip
            run.runtime = runtime
            if counters_before is not None:
                result.counters_continuous = (
                    runtime.restored
                    and runtime.counters == counters_before
                    and runtime.forecaster.to_json() == forecast_before
                )
            async with site_services(runtime, tuning, mqtt=broker is not None) as service:
                run.service = service
                await runtime.run(duration - offset, run.stop)
                if service is not None:
                    result.mqtt_connections += service.connections
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(MQTT_SETTLE_S):
                            while len(service.outbox) or any(not t.done() for t in run.tasks):  # noqa: ASYNC110
                                await asyncio.sleep(0.05)  # polled: the outbox has no "empty" event
            result.ticks += runtime.stats.ticks
            result.write_failures += runtime.stats.write_failures
            result.bus_errors += runtime.stats.bus_errors
            result.safe_state_ticks += runtime.stats.safe_state_ticks
            if run.restart_due is None:
                break
            _, down_s = run.restart_due
            run.restart_due = None
            run.stop = asyncio.Event()
            counters_before, forecast_before = runtime.counters, runtime.forecaster.to_json()
            offset = plant.now_s + down_s  # the controller is away; the plant holds the last setpoints
        if subscriber is not None:
            await asyncio.sleep(0.2)
            topics = Topics(site.topic_prefix)
            result.patch_replies = [r for r in subscriber.of(topics.config_reply) if isinstance(r, dict)]
            if run.broker_restarted_wall is not None:
                result.mqtt_states_after_restart = len(subscriber.of(topics.state))
        store.flush()
        result.logged_ticks = sum(1 for _ in store.rows(like="state.safe"))
    result.wall_s = time.perf_counter() - wall
    result.simulated_s = plant.now_s
    _judge(scenario, site, plant, run, result, arrivals, soc_initial)
    return result


def _judge(  # noqa: PLR0917 - one call site, every piece of the run it judges
    scenario: HilScenario,
    site: SiteConfig,
    plant: Plant,
    run: _Run,
    result: ScenarioResult,
    arrivals: list[EvArrival],
    soc_initial: float,
) -> None:
    fail = result.failures.append
    rec = run.recorder
    result.breach_ticks = rec.breach_ticks
    result.longest_breach_ticks = rec.longest_breach_ticks
    result.avoidable_breach_ticks = rec.avoidable_breach_ticks
    result.unavoidable_breach_ticks = rec.breach_ticks - rec.avoidable_breach_ticks
    result.breach_energy_kwh = rec.import_breaches.energy_kwh + rec.export_breaches.energy_kwh
    result.soc_out_of_bounds_ticks = run.recorder.soc_out_of_bounds_ticks
    result.ended_safe = bool(run.safe and run.safe[-1])
    if result.avoidable_breach_ticks:
        runs = run.recorder.long_breaches[:3]
        where = ", ".join(f"{n} ticks from {t:.0f} s (worst {kw:+.1f} kW)" for t, n, kw in runs)
        fail(f"{result.avoidable_breach_ticks} avoidable ticks beyond a grid limit: {where}")
    if scenario.expect.no_valley_cover and result.valley_cover_kwh > VALLEY_COVER_SLACK_KWH:
        fail(f"the battery covered {result.valley_cover_kwh:.1f} kWh of valley import with dearer hours ahead")
    if result.soc_out_of_bounds_ticks:
        fail(f"SoC outside its bounds for {result.soc_out_of_bounds_ticks} ticks")
    if result.logged_ticks != result.ticks:
        fail(f"time-series log has {result.logged_ticks} ticks, the controller ran {result.ticks}")
    if not result.counters_continuous:
        fail("counters or the learned forecast were not restored after the restart")
    # Cars: satisfied where physically possible (sessions that ended within the run).
    result.ev_requested_kwh = plant.requested_kwh
    result.ev_delivered_kwh = plant.delivered_kwh
    for arrival, delivered in plant.finished:
        charger = next(c for c in site.ev_chargers if c.name == arrival.charger)
        possible = min(arrival.energy_kwh, charger.max_kw * (arrival.leave - arrival.arrive).total_seconds() / 3600)
        result.ev_sessions_finished += 1
        result.ev_shortfall_kwh += max(0.0, possible - delivered)
    if result.ev_shortfall_kwh > 0.5:
        fail(f"cars left {result.ev_shortfall_kwh:.1f} kWh short of what was possible")
    # Safe state as specified.
    stale = site.control.stale_data_timeout_s
    expect = scenario.expect.safe_state
    if expect == "never" and result.safe_state_ticks:
        fail(f"safe state entered for {result.safe_state_ticks} ticks; expected never")
    if expect == "enters_and_leaves":
        window = next(((a, b) for a, b, _ in result.fault_windows), None)
        if result.safe_entered_s is None or window is None:
            fail("safe state never entered")
        else:
            if not window[0] <= result.safe_entered_s <= window[0] + stale + 2:
                fail(f"safe state entered at {result.safe_entered_s:.0f} s; fault began at {window[0]:.0f} s")
            latest = window[1] + stale + LOST_BACKOFF_MAX_S + RECOVERY_SLACK_S
            if result.safe_left_s is None or result.safe_left_s > latest:
                fail(f"safe state not left by {latest:.0f} s (fault ended at {window[1]:.0f} s)")
            if result.ended_safe:
                fail("the run ended in the safe state")
    # Faults with their own expectations.
    for fault in scenario.faults:
        if fault.kind is FaultKind.PATCH:
            replies = [r for r in result.patch_replies if str(r.get("correlation_id", "")).startswith("hil-")]
            if not replies:
                fail("no reply to the remote config patch")
            for reply in replies:
                if bool(reply.get("accepted")) != fault.expect_accepted:
                    fail(f"patch reply accepted={reply.get('accepted')}, expected {fault.expect_accepted}")
                if fault.expect_error and not any(fault.expect_error in e for e in reply.get("errors", [])):
                    fail(f"patch refusal does not say {fault.expect_error!r}: {reply.get('errors')}")
            if not fault.expect_accepted and TuningStore(site).path.exists():
                fail("a refused patch changed the tuning file")
        if fault.kind is FaultKind.BROKER_RESTART:
            if result.mqtt_connections < 2:
                fail("the controller did not reconnect to the restarted broker")
            if result.mqtt_states_after_restart == 0:
                fail("no status after the broker restart")
    # Money and carbon against the baselines, from the true profiles.
    days = plant.now_s / 86400
    realised_energy = plant.cost_cny
    result.realised = Outcome("realised", realised_energy, plant.peak_15min_kw,
                              bill_cny(site, realised_energy, plant.peak_15min_kw, days), plant.grid_import_kwh,
                              plant.grid_export_kwh, plant.grid_import_kwh * site.carbon_kg_per_kwh,
                              plant.delivered_kwh)  # fmt: skip
    profiles = true_profiles(site, plant, plant.now_s, arrivals)
    per_session = list(plant.finished) + [(ev.arrival, ev.delivered_kwh) for ev in plant.evs.values() if ev.arrival]
    result.baselines = [no_battery(site, profiles), self_consumption(site, profiles, soc_initial)]
    try:
        result.baselines.append(perfect_foresight(site, profiles, soc_initial, plant.soc, per_session))
    except (ValueError, RuntimeError) as err:
        _log.warning("perfect-foresight reference failed", extra={"error": str(err)})
    _forecast_error(plant, run, result)
    if plant.now_s > WEEK_S + 86400:  # a run of more than a week: each full week (and the rest) on its own
        _weeks(site, plant, run, result, profiles)
        if scenario.expect.weekly_beats_self_consumption and not result.short:
            for week in result.weeks:
                if week.realised_cny >= week.self_consumption_cny:
                    fail(f"{week.label}: bill {week.realised_cny:.0f} CNY is not below self-consumption's"
                         f" {week.self_consumption_cny:.0f} CNY")  # fmt: skip
    if not result.short:
        optimum, rule = result.outcome("perfect foresight"), result.outcome("self-consumption")
        gap = scenario.expect.max_gap_to_optimum
        if gap is not None and optimum is not None and result.realised.bill_cny > optimum.bill_cny * (1 + gap):
            fail(f"bill {result.realised.bill_cny:.0f} CNY is more than {gap:.0%} above the optimum "
                 f"{optimum.bill_cny:.0f} CNY")  # fmt: skip
        if scenario.expect.beats_self_consumption and rule is not None and result.realised.bill_cny >= rule.bill_cny:
            fail(f"bill {result.realised.bill_cny:.0f} CNY is not below self-consumption's {rule.bill_cny:.0f} CNY")


def run_sync(scenario: HilScenario, workdir: Path, *, short: bool = True, line: Line = Line.MEMORY) -> ScenarioResult:
    """One scenario on an event loop of its own: over the in-process link, the simulated run's loop (socket
    polls spaced, as `greensite run --simulate --speed max`: controller.sim_loop); over ptys the default one,
    whose every turn asks the OS for the ports' bytes."""
    if line is Line.MEMORY:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(run_scenario(scenario, workdir, short=short, line=line))
    return asyncio.run(run_scenario(scenario, workdir, short=short, line=line))



def _forecast_error(plant: Plant, run: _Run, result: ScenarioResult) -> None:
    """MAE of the day-ahead forecasts (made at local midnight) against the plant's true 15-minute means,
    over the days the run covered whole."""
    load_errors: list[float] = []
    pv_errors: list[float] = []
    step_s = DAY_AHEAD_STEP_MINUTES * 60
    for day, (load_kw, pv_kw) in sorted(run.day_ahead.items()):
        midnight = datetime.combine(day, datetime.min.time(), plant.start.tzinfo)
        first_s = (midnight - plant.start).total_seconds()
        if first_s < 0 or first_s + 86400 > plant.now_s:
            continue
        for index, (load_f, pv_f) in enumerate(zip(load_kw, pv_kw, strict=True)):
            samples = [first_s + index * step_s + 30 + 60 * k for k in range(DAY_AHEAD_STEP_MINUTES)]
            load_errors.append(abs(load_f - sum(plant.load_at(t) for t in samples) / len(samples)))
            pv_errors.append(abs(pv_f - sum(plant.pv_available_at(t) for t in samples) / len(samples)))
    if load_errors:
        result.mae_load_kw = sum(load_errors) / len(load_errors)
        result.mae_pv_kw = sum(pv_errors) / len(pv_errors)


def _weeks(site: SiteConfig, plant: Plant, run: _Run, result: ScenarioResult, profiles: Profiles) -> None:
    marks = [*run.week_marks, (plant.now_s, plant.cost_cny, plant.soc)]
    per = int(profiles.step_s)
    for number, (begin, end) in enumerate(itertools.pairwise(marks), 1):
        (start_s, cost_start, soc_start), (end_s, cost_end, soc_end) = begin, end
        days = (end_s - start_s) / 86400
        if days < 1.0:
            continue
        blocks = [kwh * 4 for block, kwh in run.block_import.items() if start_s <= block * 900 < end_s]
        peak_kw = max(blocks, default=0.0)
        realised = bill_cny(site, cost_end - cost_start, peak_kw, days)
        first, last = int(start_s // per), int(end_s // per)
        week_start = profiles.start + timedelta(seconds=start_s)
        week_end = profiles.start + timedelta(seconds=end_s)
        arrivals = [a for a in profiles.arrivals if week_start <= a.arrive < week_end]
        sliced = Profiles(week_start, profiles.step_s, profiles.load_kw[first:last], profiles.pv_kw[first:last],
                          profiles.price_cny_per_kwh[first:last], arrivals)  # fmt: skip
        sessions = [(a, kwh) for a, kwh in plant.finished if week_start <= a.arrive < week_end]
        sessions += [(ev.arrival, ev.delivered_kwh) for ev in plant.evs.values()
                     if ev.arrival is not None and week_start <= ev.arrival.arrive < week_end]  # fmt: skip
        optimum: Outcome | None = None
        try:
            optimum = perfect_foresight(site, sliced, soc_start, soc_end, sessions)
        except (ValueError, RuntimeError) as err:
            _log.warning("perfect-foresight reference failed", extra={"week": number, "error": str(err)})
        result.weeks.append(WeekRow(
            f"week {number}", days, realised, no_battery(site, sliced).bill_cny,
            self_consumption(site, sliced, soc_start).bill_cny, None if optimum is None else optimum.bill_cny,
            realised_energy_cny=cost_end - cost_start, realised_peak_kw=peak_kw,
            optimum_energy_cny=None if optimum is None else optimum.energy_cost_cny,
            optimum_peak_kw=None if optimum is None else optimum.peak_15min_kw,
        ))  # fmt: skip
