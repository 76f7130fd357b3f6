"""The control runtime: a tick task (measure, enforce limits, apply the plan), a planner task and
the bus pollers, under one TaskGroup. Time is injected, so the same code runs in real time or in
accelerated simulated time against the simulated plant.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from config import DeviceKind, SiteConfig
from controller.breaches import BreachCount
from controller.clock import Clock, clock_plausible
from controller.external_forecast import MAX_FORECAST_BYTES, ForecastRefused, parse_forecast
from controller.forecast import Forecaster
from controller.safety import (
    PV_AT_LIMIT_KW,
    BatteryResponse,
    LoadSwing,
    Measured,
    PvProber,
    Setpoints,
    Targets,
    apply_safety,
    battery_register_kw,
    safe_setpoints,
)
from controller.service_notify import SystemdNotifier
from controller.storage.atomic import write_atomic, write_atomic_off_loop
from controller.storage.timeseries import TimeSeriesStore
from controller.tick_stats import Durations
from firmware_bridge.bus import Bus
from firmware_bridge.device import DeviceDriver, Exchange, Readings
from firmware_bridge.errors import BridgeError
from firmware_bridge.maps import load_map
from firmware_bridge.transport import Link
from optimiser import Plan, Scenario, solve

__all__ = ["Counters", "RunStats", "Runtime"]

_log = logging.getLogger(__name__)

# What the limit arithmetic needs is read every tick; the rest (chargers, PV inverter) every few
# seconds, by the tick too, so that readings stay fresh in simulated time as in real time.
_EVERY_TICK = {
    DeviceKind.GRID_METER: ("power_kw",),
    DeviceKind.PV_METER: ("power_kw",),
    DeviceKind.BATTERY_INVERTER: ("power_kw", "soc_pct"),
    DeviceKind.EV_CHARGER: ("power_kw", "state_code"),  # cars follow their current limit within seconds
}
# A site without a PV meter measures PV at its inverter, every tick then.
_PV_AT_INVERTER = ("power_kw",)
SLOW_POLL_S = 5.0
# A setpoint that keeps failing is logged on the first failure and then every this many.
WRITE_FAILURE_LOG_EVERY = 60
# A grid reading older than this many ticks (a missed poll) freezes the setpoints until it is fresh.
HOLD_AFTER_TICKS = 1.5
# A reading younger than this share of a tick was read this tick.
THIS_TICK = 0.5
# While holding, the grid is not seen but the load still drifts: a PV limit (zero export) is lowered
# this much per held tick, leaning towards import until the reading returns or the safe state takes
# over (stale_data_timeout_s, 10 s by default: at most 10 kW of PV held back, during a fault only).
HOLD_PV_LEAN_KW_PER_TICK = 1.0
# Demand charges are billed on the largest average import over aligned blocks of this length.
DEMAND_BLOCK_MINUTES = 15
# A setpoint is rewritten only when it moved by more than this (the bus has better things to do).
BATTERY_DEADBAND_KW = 0.2
EV_DEADBAND_A = 0.2
PV_DEADBAND_KW = 0.5
# Assumed need of a car that just connected (the charger does not know the car's battery; a full
# car stops drawing by itself): this much energy before this long. A later issue lets the driver say.
DEFAULT_EV_NEED_KWH = 60.0
DEFAULT_EV_STAY_H = 8.0
# PV is held back by its limit when it is within PV_AT_LIMIT_KW of the lowest limit in force over this
# long: a limit raised just now may still be what PV ramps towards (inverters follow a new limit in
# 1-10 s; one ramping at 10 % of its rating a minute takes 10 s for the 5 kW probe on 300 kWp, 30 s
# for 15 kW). Read while ramping and taken for the sun's, the forecast learned a third too little.
PV_LIMIT_SETTLE_S = 30.0
# A car offered at least its minimum current that draws less than EV_DRAWING_KW for EV_FULL_AFTER_S is
# full. IEC 61851-1 gives a car 5 s to follow a new current; a sleeping car can take longer to wake.
EV_DRAWING_KW = 0.1
EV_FULL_AFTER_S = 30.0
# A full car is offered its minimum current again this long after it was last found full: a car that
# paused by itself (its own timer, a cold battery) and wants more is found and planned again. A car
# that is full costs nothing by it: it draws nothing for EV_FULL_AFTER_S.
EV_FULL_RETRY_S = 3600.0
# A charger's cars are expected to stay as long as a quarter of its recent sessions stayed at least
# (a car planned to leave early is charged early; one planned to leave late may leave short). Until
# it has seen this many sessions, DEFAULT_EV_STAY_H.
EV_STAYS_KEPT = 10
EV_STAYS_NEEDED = 3
# A device whose watchdog could not be armed (lost, refusing) is tried again this often: often enough to
# be covered within a minute of coming back, rare enough not to cost its bus a timeout every tick.
WATCHDOG_ARM_RETRY_S = 30.0
# A plan that takes longer than this is given up and the last one kept: planning normally takes a few
# ms, a day's worst case (the first of a month) well under a second on the 2-core box.
PLAN_TIMEOUT_S = 30.0
# A background job (planner, MQTT, live view, tuning follower) that fails is restarted after this,
# doubling up to the maximum while it keeps failing; one that ran this long was healthy again.
RESTART_DELAY_MIN_S = 1.0
RESTART_DELAY_MAX_S = 60.0
RESTART_HEALTHY_AFTER_S = 300.0
# Controller state (counters, month peak, car sessions) is saved this often, so a restart loses at
# most this much of the counters; the time series has its own flush.
STATE_SAVE_PERIOD_S = 60.0
_STATE_VERSION = 1
# A learned load profile older than this says little about the site now: start cold instead.
FORECAST_KEEP_DAYS = 14


@dataclass
class Counters:
    """Energy, money and carbon since commissioning, integrated from the measurements every tick."""

    grid_import_kwh: float = 0.0
    grid_export_kwh: float = 0.0
    pv_kwh: float = 0.0
    battery_charge_kwh: float = 0.0
    battery_discharge_kwh: float = 0.0
    ev_kwh: float = 0.0
    # The cars' energy that came from PV: each tick's car power times PV's share of what supplied the site
    # (PV, grid import, battery discharge; the battery counts as grid, it may have charged in the valley).
    ev_pv_kwh: float = 0.0
    energy_cost_cny: float = 0.0  # import at the TOU price in force, minus export revenue
    carbon_kg: float = 0.0  # grid import × the grid emission factor
    carbon_avoided_kg: float = 0.0  # PV energy used on site × the grid emission factor


@dataclass
class RunStats:
    ticks: int = 0
    tick_processing_s: Durations = field(default_factory=Durations)
    tick_lateness_s: Durations = field(default_factory=Durations)
    plans: int = 0
    plan_time_s: Durations = field(default_factory=lambda: Durations(ring_values=1000))
    plans_failed: int = 0
    safe_state_ticks: int = 0
    safety_actions: int = 0
    bus_errors: int = 0
    write_failures: int = 0
    observed_writes: int = 0  # --observe: setpoint writes computed and not sent
    import_breaches: BreachCount = field(default_factory=BreachCount)
    export_breaches: BreachCount = field(default_factory=BreachCount)

    # Background jobs restarted after an exception (name -> restarts), for health.
    restarts: dict[str, int] = field(default_factory=dict)


@dataclass
class _Latest:
    """A device's last good value of each quantity, with when it was read (per quantity: a meter that
    answers with a NaN power and sane voltages has fresh voltages and no power)."""

    values: Readings
    at_s: dict[str, float]


_heap_frozen = False


def _freeze_startup_heap() -> None:
    """Once per process, when the first run starts ticking: what start-up made (modules, compiled kernels,
    the site's models) is moved out of the garbage collector's generations. A full collection then walks
    only what the run makes since, and does not pause a tick for milliseconds walking objects that live
    as long as the process (gc.freeze: the startup heap is never garbage; new cycles are still collected)."""
    global _heap_frozen  # noqa: PLW0603 - one freeze per process, whichever runtime starts first
    if not _heap_frozen:
        _heap_frozen = True
        gc.collect()
        gc.freeze()


class Runtime:
    """Runs one site. `on_tick` (if given) is called after every tick with the setpoints applied."""

    def __init__(
        self,
        site: SiteConfig,
        *,
        clock: Clock,
        links: dict[str, Link],
        line_timing: bool = True,
        before_tick: Callable[[float], None] | None = None,
        on_tick: Callable[[float, Setpoints], None] | None = None,
        store: TimeSeriesStore | None = None,
        state_path: str | Path | None = None,
        notifier: SystemdNotifier | None = None,
        observe: bool = False,
    ) -> None:
        """`before_tick(now_s)`: the simulation advances its plant here; `on_tick`: a recorder.
        `state_path`: where counters, month peak and car sessions survive a restart (None: nowhere).
        `observe`: the whole loop, nothing written to any device; what would be written is in
        `would_write` (and counted in stats.observed_writes)."""
        self.site = site
        self.observe = observe
        self.would_write: dict[tuple[str, str], float] = {}
        self._pending_site: SiteConfig | None = None
        self.listeners: list[Callable[[Runtime], None]] = []
        self.services: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self.counters = Counters()
        self.last_measured: Measured | None = None
        self.last_setpoints: Setpoints | None = None
        self.state_path = None if state_path is None else Path(state_path)
        # systemd's notify protocol (a no-op outside systemd): READY when the buses are open, a watchdog
        # ping from the loop itself after every tick (a ping from a task of its own would go on while a
        # tick hangs), STOPPING on the way out.
        self.notifier = notifier
        self._next_state_save_s = STATE_SAVE_PERIOD_S
        self._saving: asyncio.Task[None] | None = None
        self.before_tick = before_tick
        self.store = store
        self.clock = clock
        self.stats = RunStats()
        self.on_tick = on_tick
        self.buses = {
            b.name: Bus(b, links[b.name], line_timing=line_timing, health_clock=clock.now) for b in site.buses
        }
        self.drivers: dict[str, DeviceDriver] = {}
        self.kinds: dict[str, DeviceKind] = {}
        self.bus_of: dict[str, str] = {}
        for bus, device in site.devices():
            self.drivers[device.name] = DeviceDriver(
                device.name, load_map(device.model), device.address, ct_ratio=device.ct_ratio,
                invert_sign=device.invert_sign,
            )  # fmt: skip
            self.kinds[device.name] = device.kind
            self.bus_of[device.name] = bus.name
        # Who is where, worked out once: the tick asks these every second. Devices and chargers come
        # from the site file (remote tuning changes neither).
        self._by_kind: dict[DeviceKind, list[str]] = {}
        for name, kind in self.kinds.items():
            self._by_kind.setdefault(kind, []).append(name)
        self._device_of_charger = {c.name: c.device for c in site.ev_chargers}
        # Several battery inverters each take their rating's share of the battery setpoint.
        self._battery_shares = site.battery_shares()
        self._chargers_on: dict[str, list[str]] = {}
        for charger in site.ev_chargers:
            self._chargers_on.setdefault(charger.device, []).append(charger.name)
        self._on_bus = {b.name: [n for n in self.drivers if self.bus_of[n] == b.name] for b in site.buses}
        # The reads a tick cannot miss, per device (None: the device is read at the slow poll only).
        self._tick_reads: dict[str, list[Exchange] | None] = {}
        pv_at_inverter = site.pv is not None and not self._devices(DeviceKind.PV_METER)
        self._pv_sources = self._devices(DeviceKind.PV_INVERTER if pv_at_inverter else DeviceKind.PV_METER)
        for name, driver in self.drivers.items():
            quantities = _EVERY_TICK.get(self.kinds[name])
            if pv_at_inverter and self.kinds[name] is DeviceKind.PV_INVERTER:
                quantities = _PV_AT_INVERTER
            self._tick_reads[name] = (
                None if quantities is None
                else list({id(e): e for e in (driver.exchange_for(q) for q in quantities)}.values())
            )  # fmt: skip
        # The rest of what a ticked device can report (energy, voltages, ...): read one at a time, at most
        # one exchange a tick on each bus, each every max(SLOW_POLL_S, the device's poll_period_s) times
        # its map's every_n_polls, so the limit arithmetic keeps the bus and the counters still get read.
        periods = {device.name: max(SLOW_POLL_S, device.poll_period_s) for _, device in site.devices()}
        self._slow_reads: dict[str, list[tuple[str, Exchange, float]]] = {b.name: [] for b in site.buses}
        for name, driver in self.drivers.items():
            ticked = self._tick_reads[name]
            if ticked is None:
                continue
            for every, exchange in driver.read_schedule():
                if all(exchange is not e for e in ticked):
                    self._slow_reads[self.bus_of[name]].append((name, exchange, every * periods[name]))
        self._slow_due: dict[int, float] = {}
        self._slow_next_due: dict[str, float] = {}  # per bus: the earliest of its slow reads' due times
        self.latest: dict[str, _Latest] = {}
        self.forecaster = Forecaster(site, site.control.step_minutes)
        self._forecast_file_seen: tuple[int, int] | None = None  # (mtime ns, size) of the file last read
        self.plan: Plan | None = None
        self.plan_start: datetime | None = None
        self.plan_scenario: Scenario | None = None  # what the plan in force was made for (prices, PV, load)
        self._replan = asyncio.Event()
        self._ev_connected: dict[str, bool] = {c.name: False for c in site.ev_chargers}
        self._ev_since: dict[str, datetime] = {}
        # How long the last sessions at each charger lasted (hours), newest last: the expected stay.
        self.ev_stays_h: dict[str, list[float]] = {c.name: [] for c in site.ev_chargers}
        # Chargers read empty since this process started: a car connecting there is seen arriving (a car
        # already there at start-up has stayed for an unknown time, so its stay is not learned).
        self._ev_seen_empty: set[str] = set()
        self._ev_arrival_seen: set[str] = set()
        self._setpoint_battery_kw = 0.0
        self._pv_prober = PvProber()
        self.battery_response = BatteryResponse(site.battery.ramp_kw_per_s if site.battery else 0.0)
        self._last_grid_ok_s: float | None = None  # when the grid meter was last fresh
        # The limit ("import"/"export") the last tick's layer said could not be held with every lever at its end.
        self._breach_unavoidable: str | None = None
        # The battery's last setpoint write failed (refused, bus down): it is not following whatever
        # it reads now, until a write lands.
        self._battery_refused = False
        # Per battery inverter: its last setpoint write failed. One refusing is enough to count the battery
        # out (the next inverter accepting its share does not make the first one's share land).
        self._inverter_refused: dict[str, bool] = {}
        self._written: dict[tuple[str, str], float] = {}
        # Devices whose communication watchdog is armed (-> the bus's recovery count then), and when each
        # device was last written (a write keeps its watchdog alive).
        self._watchdog_armed: dict[str, int] = {}
        self._watchdogs = sum(d.watchdog is not None for d in self.drivers.values())
        self._arm_retry_at: dict[str, float] = {}
        self._alive_at: dict[str, float] = {}
        self._write_failed: dict[tuple[str, str], int] = {}
        self._pv_limit_kw: float | None = None
        self._pv_limits: deque[tuple[float, float]] = deque()  # (when, limit kW; inf: none) over PV_LIMIT_SETTLE_S
        self._load_swing = LoadSwing()
        self.month_peak_kw = 0.0  # largest completed 15-minute average import this month
        self._demand_block: tuple[int, int] | None = None
        self._demand_month = 0
        self._demand_kws = 0.0
        self._demand_s = 0.0
        self._next_slow_poll_s = 0.0
        # A connected car that draws nothing of the current it is offered, since when (monotonic s); after
        # EV_FULL_AFTER_S it is full, until it leaves or draws again (offered its minimum hourly).
        self._ev_declining_since: dict[str, float] = {}
        self._ev_full: dict[str, float] = {}  # charger -> when its car was last found full (monotonic s)
        self._next_plan_s = 0.0
        # Each charger's series names in the store, made once rather than formatted every tick.
        self._series_names = {("measured", c.name): f"measured.{c.name}_kw" for c in site.ev_chargers}
        for written in ("setpoint", "would_write"):
            self._series_names |= {(written, c.name): f"{written}.{c.name}_a" for c in site.ev_chargers}
        # The tariff's answers for a local minute: (site, minute, answer); see _price_now.
        self._price_cache: tuple[SiteConfig, tuple[int, int, int, int, int], float] | None = None
        self._valley_cache: tuple[SiteConfig, tuple[int, int, int, int, int], bool] | None = None
        self.restored = self._restore_state()

    # --- helpers ------------------------------------------------------------------------------------

    def _devices(self, kind: DeviceKind) -> list[str]:
        return self._by_kind.get(kind, [])

    def _charger_device(self, charger: str) -> str:
        return self._device_of_charger[charger]

    def _charger_idle(self, device: str) -> bool:
        """No car connected at any charger on this device, and no current offered to it."""
        for name in self._chargers_on.get(device, ()):
            if self._ev_connected[name]:
                return False
        return self._written.get((device, "current_limit_a"), 0.0) == 0.0

    def _value(self, device: str, quantity: str, max_age_s: float) -> float | None:
        """The quantity's last good value if it was read within max_age_s, else None (unknown)."""
        latest = self.latest.get(device)
        if latest is None:
            return None
        at_s = latest.at_s.get(quantity)
        if at_s is None or self.clock.now() - at_s > max_age_s:
            return None
        value = latest.values.get(quantity)
        return value if value is not None and math.isfinite(value) else None

    def _sum(self, devices: list[str], quantity: str, max_age_s: float) -> float | None:
        """The sum over devices, or None if any of them is unknown (a part is not the whole)."""
        total = 0.0
        for name in devices:
            value = self._value(name, quantity, max_age_s)
            if value is None:
                return None
            total += value
        return total

    def _on_measurement(self, device: str, values: Readings) -> None:
        """A device's fresh readings, stamped with the controller's clock now."""
        latest = self.latest.get(device)
        if latest is None:
            latest = self.latest[device] = _Latest({}, {})
        now = self.clock.now()
        for quantity, value in values.items():
            if math.isfinite(value):
                latest.values[quantity] = value
                latest.at_s[quantity] = now

    # --- lifetime -----------------------------------------------------------------------------------

    async def run(self, duration_s: float | None, stop: asyncio.Event | None = None) -> None:
        """Run for `duration_s` of this runtime's clock (None: until `stop`), then leave every device
        in the safe state. `stop` ends the run at the next tick (SIGINT/SIGTERM)."""
        async with contextlib.AsyncExitStack() as stack:
            for bus in self.buses.values():
                await stack.enter_async_context(bus)
            await self._arm_watchdogs()
            _freeze_startup_heap()
            if self.notifier is not None:
                self.notifier.ready("ticking")
            try:
                async with asyncio.TaskGroup() as group:
                    # Only the control loop's failure ends the run: every job around it is supervised.
                    jobs: list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]] = [("planner", self._planner)]
                    jobs += [(getattr(service, "__name__", "service"), service) for service in self.services]
                    background = [group.create_task(self._supervised(name, job), name=name) for name, job in jobs]
                    await self._ticks(duration_s, stop or asyncio.Event())
                    for task in background:
                        task.cancel()
            finally:
                if self.notifier is not None:
                    self.notifier.stopping("leaving the devices safe")
                await self._leave_safe()
                if self._saving is not None:
                    await asyncio.gather(self._saving, return_exceptions=True)
                if self.store is not None:
                    await asyncio.to_thread(self.store.flush)  # bounded: FLUSH_TIMEOUT_S at most
                self.save_state()

    async def _supervised(self, name: str, job: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a background job; when it fails, log it with its stack, count it in health and start it
        again after a back-off. Cancellation ends it (and is never swallowed)."""
        delay_s = RESTART_DELAY_MIN_S
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            try:
                await job()
                return  # a job that ends by itself is done
            except Exception:  # supervision: a job's failure must not end the control loop
                self.stats.restarts[name] = self.stats.restarts.get(name, 0) + 1
                if loop.time() - began > RESTART_HEALTHY_AFTER_S:
                    delay_s = RESTART_DELAY_MIN_S
                fields = {"job": name, "restart_in_s": delay_s, "restarts": self.stats.restarts[name]}
                _log.exception("background job failed; restarting it", extra=fields)
            await asyncio.sleep(delay_s)
            delay_s = min(RESTART_DELAY_MAX_S, 2 * delay_s)

    # --- configuration changes and restarts ---------------------------------------------------------------

    def request_site(self, site: SiteConfig) -> None:
        """A validated tuning change: takes effect at the next tick boundary, then a new plan is made."""
        self._pending_site = site

    def _state(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "site_id": self.site.site.id,
            "saved_local": self.clock.local().isoformat(),
            "counters": asdict(self.counters),
            "month_peak_kw": self.month_peak_kw,
            "demand_month": self._demand_month,
            "ev_since": {name: at.isoformat() for name, at in self._ev_since.items()},
            "ev_connected": self._ev_connected,
            "ev_stays_h": self.ev_stays_h,
            "forecaster": self.forecaster.to_json(),
        }

    def _save_state_in_background(self) -> None:
        """The minute's state save, its fsyncs in a thread: the tick goes on. One at a time (a slow disk
        skips a minute rather than stacking saves)."""
        if self.state_path is None or (self._saving is not None and not self._saving.done()):
            return
        data = json.dumps(self._state(), separators=(",", ":")).encode()
        self._saving = asyncio.get_running_loop().create_task(self._save_off_loop(self.state_path, data))

    async def _save_off_loop(self, path: Path, data: bytes) -> None:
        try:
            await write_atomic_off_loop(path, data)
        except OSError as err:
            _log.error("controller state not saved", extra={"file": str(path), "error": str(err)})

    def save_state(self) -> None:
        if self.state_path is None:
            return
        try:
            # Compact: an indented dump takes json's pure-Python encoder, ~5x slower, once a minute forever.
            write_atomic(self.state_path, json.dumps(self._state(), separators=(",", ":")).encode())
        except OSError as err:
            _log.error("controller state not saved", extra={"file": str(self.state_path), "error": str(err)})

    def _restore_state(self) -> bool:
        """Counters always carry over; the month peak only within the same month; car sessions only if
        the controller was away for less than the time a car stays (their age still counts)."""
        if self.state_path is None or not self.state_path.exists():
            return False
        try:
            body = json.loads(self.state_path.read_bytes())
            if body.get("version") != _STATE_VERSION or body.get("site_id") != self.site.site.id:
                raise ValueError("written by another site or version")
            counters = Counters(**{k: float(v) for k, v in body["counters"].items()})
            saved = datetime.fromisoformat(body["saved_local"])
            peak = float(body["month_peak_kw"])
            since = {str(k): datetime.fromisoformat(v) for k, v in body["ev_since"].items()}
            connected = {str(k): bool(v) for k, v in body["ev_connected"].items()}
            stays = {str(k): [float(h) for h in v][-EV_STAYS_KEPT:] for k, v in body.get("ev_stays_h", {}).items()}
            if any(not 0 < h < 24 * 14 for v in stays.values() for h in v):
                raise ValueError("an EV stay outside 0..336 h")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            _log.error("controller state not restored", extra={"file": str(self.state_path), "error": str(err)})
            return False
        now = self.clock.local()
        self.counters = counters
        for name, hours in stays.items():
            if name in self.ev_stays_h:
                self.ev_stays_h[name] = hours
        if timedelta(0) <= now - saved < timedelta(days=FORECAST_KEEP_DAYS) and "forecaster" in body:
            try:
                self.forecaster.restore(body["forecaster"])
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                _log.error("forecast history not restored", extra={"error": str(err)})
        if (saved.year, saved.month) == (now.year, now.month) and math.isfinite(peak):
            self.month_peak_kw = max(0.0, peak)
            self._demand_month = now.month
        if timedelta(0) <= now - saved < timedelta(hours=DEFAULT_EV_STAY_H):
            for name in self._ev_connected:
                if connected.get(name) and name in since:
                    self._ev_connected[name] = True
                    self._ev_since[name] = since[name]
        _log.warning("controller state restored", extra={"file": str(self.state_path), "saved": saved.isoformat()})
        return True

    async def _leave_safe(self) -> None:
        """On the way out, the safe state (the same one as when the grid meter goes stale): battery idle,
        cars at their minimum (or off), and PV limited to what the site consumes without them, since a
        PV limit that counted on a charging battery would export what the battery no longer takes."""
        measured = self.last_measured or Measured(None, None, None, None, {}, {}, self._pv_limit_kw)
        blind_s = measured.blind_s
        if self._last_grid_ok_s is not None:
            blind_s = max(blind_s, self.clock.now() - self._last_grid_ok_s)
        safe = safe_setpoints(self.site, dataclasses.replace(measured, grid_kw=None, blind_s=blind_s))
        for name in self._devices(DeviceKind.BATTERY_INVERTER):
            await self._write_now(name, "power_setpoint_kw", 0.0, even_if_lost=True)
        for charger in self.site.ev_chargers:
            amps = charger.min_current_a if self.site.control.safe_state.ev_chargers == "minimum" else 0.0
            await self._write_now(self._charger_device(charger.name), "current_limit_a", amps, even_if_lost=True)
        if self.site.pv is not None and self.site.pv.curtailable:
            limit = safe.pv_limit_kw
            pct = 100.0 if limit is None else max(0.0, min(100.0, 100 * limit / self.site.pv.peak_kw))
            for name in self._devices(DeviceKind.PV_INVERTER):
                await self._write_now(name, "power_limit_pct", round(pct, 1), even_if_lost=True)

    # --- device watchdogs ------------------------------------------------------------------------------

    def _watchdog_fallbacks(self, device: str) -> dict[str, float]:
        """The safe state, as each device holds it on its own: the fallbacks it is armed with. A device
        cannot see the load, so PV falls back to what may be exported with no load at all."""
        safe, kind = self.site.control.safe_state, self.kinds[device]
        if kind is DeviceKind.EV_CHARGER:
            chargers = [c for c in self.site.ev_chargers if c.device == device]
            minimum = min((c.min_current_a for c in chargers), default=0.0)
            return {"current_limit_a": minimum if safe.ev_chargers == "minimum" else 0.0}
        if kind is DeviceKind.PV_INVERTER and self.site.pv is not None:
            export_pct = 100 * self.site.export_limit_kw / self.site.pv.peak_kw
            share = {"off": 0.0, "unrestricted": 100.0}.get(safe.pv, export_pct)
            return {"power_limit_pct": round(min(100.0, share), 1)}
        return {}

    async def _arm_watchdogs(self, *, at_start: bool = True) -> None:
        """Configure each device's communication watchdog (at start, and again when a device recovers:
        it may have rebooted with its watchdog off), so that a killed controller leaves the site safe.
        A device that could not be armed is tried again after WATCHDOG_ARM_RETRY_S, when its bus has it due."""
        timeout_s = self.site.control.device_watchdog_s
        if self.observe:
            return  # arming is a write; an observed device keeps its own configuration
        for name, driver in self.drivers.items():
            if driver.watchdog is None or name in self._watchdog_armed:
                continue
            bus = self.buses[self.bus_of[name]]
            if not at_start and (self.clock.now() < self._arm_retry_at.get(name, 0.0) or not bus.is_due(name)):
                continue
            try:
                exchanges = driver.watchdog_setup(timeout_s, self._watchdog_fallbacks(name))
                for exchange in exchanges:
                    await bus.transact(exchange, even_if_lost=at_start)
            except (BridgeError, ValueError) as err:
                self._arm_retry_at[name] = self.clock.now() + WATCHDOG_ARM_RETRY_S
                _log.warning("device watchdog not armed", extra={"device": name, "error": str(err)})
                continue
            self._watchdog_armed[name] = bus.health(name).recoveries
            self._alive_at[name] = self.clock.now()
            _log.info("device watchdog armed", extra={"device": name, "timeout_s": timeout_s})

    async def _keep_watchdogs_alive(self) -> None:
        """Every third of the watchdog's timeout, a heartbeat (or the setpoint again) to each device."""
        timeout_s = self.site.control.device_watchdog_s
        if timeout_s <= 0 or self.observe:
            return
        period_s = DeviceDriver.keepalive_period_s(timeout_s)
        for name in list(self._watchdog_armed):
            bus = self.buses[self.bus_of[name]]
            if bus.health(name).recoveries != self._watchdog_armed[name]:
                del self._watchdog_armed[name]  # it came back: it may have lost its configuration
                continue
            if self.clock.now() - self._alive_at.get(name, -math.inf) < period_s or not bus.is_due(name):
                continue
            exchange = self.drivers[name].keepalive_exchange()
            try:
                if exchange is not None:
                    await bus.transact(exchange)
                    self._alive_at[name] = self.clock.now()
                else:  # no heartbeat register: the setpoint again is the keepalive
                    quantity = "current_limit_a" if self.kinds[name] is DeviceKind.EV_CHARGER else None
                    if quantity is not None:
                        await self._write_now(name, quantity, self._written.get((name, quantity), 0.0))
            except BridgeError as err:
                _log.debug("keepalive failed", extra={"device": name, "error": str(err)})
        if len(self._watchdog_armed) < self._watchdogs:
            await self._arm_watchdogs(at_start=False)

    async def _write_now(self, device: str, quantity: str, value: float, *, even_if_lost: bool = False) -> bool:
        """Write a setpoint; False (logged, counted) when it did not land. `even_if_lost`: ask a device the
        bus has given up on for now (the exit's safe state is worth a timeout). Observing, nothing is sent:
        the value is noted as what would have been written (`would_write`), and the device still holds
        what it held."""
        if self.observe:
            # The same checks as a write, the frame never sent. What the devices hold is still what they
            # held (`_written` is what was sent): each tick's setpoints are worked out from the site as it is.
            try:
                self.drivers[device].write_exchange(quantity, value)
            except ValueError as err:  # a value the register cannot take: counted as a real run counts it
                self.stats.write_failures += 1
                _log.warning("setpoint could not be written", extra={"device": device, "quantity": quantity,
                                                                       "error": str(err)})  # fmt: skip
                return False
            self.would_write[(device, quantity)] = value
            self.stats.observed_writes += 1
            _log.debug("would write", extra={"device": device, "quantity": quantity, "value": value})
            return True
        try:
            exchange = self.drivers[device].write_exchange(quantity, value)
            await self.buses[self.bus_of[device]].transact(exchange, even_if_lost=even_if_lost)
        except (BridgeError, ValueError) as err:
            self.stats.write_failures += 1
            key = (device, quantity)
            failed = self._write_failed.get(key, 0) + 1
            self._write_failed[key] = failed
            if failed == 1 or failed % WRITE_FAILURE_LOG_EVERY == 0:  # a dead bus must not flood the log
                fields = {"device": device, "quantity": quantity, "error": str(err), "failures_in_a_row": failed}
                _log.warning("setpoint not written", extra=fields)
            return False
        if self._write_failed.pop((device, quantity), 0):
            _log.warning("setpoint written again", extra={"device": device, "quantity": quantity})
        self._written[(device, quantity)] = value
        self._alive_at[device] = self.clock.now()  # any write keeps a device's watchdog alive
        return True

    # --- the tick -------------------------------------------------------------------------------------

    async def _ticks(self, duration_s: float | None, stop: asyncio.Event) -> None:
        period = self.site.control.tick_period_s
        ticks = math.inf if duration_s is None else int(duration_s / period)
        index = 0
        while index <= ticks and not stop.is_set():
            due = index * period
            index += 1
            await self.clock.sleep_until(due)
            self.stats.tick_lateness_s.add(max(0.0, self.clock.lateness(due)))
            setpoints = await self.tick(period)
            # The status line rides on systemd's watchdog ping: without a watchdog nobody reads it.
            if self.notifier is not None and self.notifier.watchdog_period_s() is not None:
                self.notifier.watchdog(self._status_line(setpoints))

    def _status_line(self, setpoints: Setpoints) -> str:
        """One line for `systemctl status`."""
        grid = self.last_measured.grid_kw if self.last_measured is not None else None
        lost = sum(str(self.buses[bus].health(name).state) == "lost" for name, bus in self.bus_of.items())
        state = "SAFE STATE" if setpoints.safe_state else "running"
        grid_text = "grid unknown" if grid is None else f"grid {grid:+.1f} kW"
        return f"{state}, {grid_text}, battery {setpoints.battery_kw:+.1f} kW, {lost} devices lost"

    async def _read_devices(self) -> None:
        """Fresh readings for this tick: each distinct exchange once, slow devices every SLOW_POLL_S.
        Buses are independent ports: they are read concurrently."""
        slow = self.clock.now() >= self._next_slow_poll_s
        if slow:
            self._next_slow_poll_s = self.clock.now() + SLOW_POLL_S
        await asyncio.gather(*(self._read_bus(name, slow) for name in self.buses))

    async def _read_bus(self, bus_name: str, slow: bool) -> None:
        bus = self.buses[bus_name]
        for name in self._on_bus[bus_name]:
            tick_reads = self._tick_reads[name]
            if tick_reads is None and not slow:
                continue
            if not slow and self.kinds[name] is DeviceKind.EV_CHARGER and self._charger_idle(name):
                # No car and no current offered: a car plugging in draws nothing until it is offered
                # current, so finding it at the slow poll is soon enough, and the bus time goes to
                # the meters.
                continue
            if not bus.is_due(name):
                continue  # a lost device is backing off: do not spend the tick on it
            exchanges = self.drivers[name].read_exchanges() if tick_reads is None else tick_reads
            values: Readings = {}
            try:
                for exchange in exchanges:
                    values.update(await bus.transact(exchange))
            except BridgeError as err:
                self.stats.bus_errors += 1
                _log.debug("read failed", extra={"device": name, "error": str(err)})
            if values:
                self._on_measurement(name, values)
        await self._read_one_slow(bus_name)

    async def _read_one_slow(self, bus_name: str) -> None:
        """The most overdue of the bus's slow exchanges, if one is due (see _slow_reads)."""
        bus, now = self.buses[bus_name], self.clock.now()
        if now < self._slow_next_due.get(bus_name, 0.0):
            return  # none of the bus's slow reads is due yet (most ticks on a bus of few slow reads)
        due = [(self._slow_due.get(id(e), 0.0), name, e, period) for name, e, period in self._slow_reads[bus_name]
               if self._slow_due.get(id(e), 0.0) <= now and bus.is_due(name)
               and not (self.kinds[name] is DeviceKind.EV_CHARGER and self._charger_idle(name))]  # fmt: skip
        if not due:
            return
        _, name, exchange, period = min(due, key=lambda item: item[0])
        self._slow_due[id(exchange)] = now + period
        self._slow_next_due[bus_name] = min(self._slow_due.get(id(e), 0.0) for _, e, _ in self._slow_reads[bus_name])
        try:
            values = await bus.transact(exchange)
        except BridgeError as err:
            self.stats.bus_errors += 1
            _log.debug("read failed", extra={"device": name, "error": str(err)})
            return
        if values:
            self._on_measurement(name, values)

    async def tick(self, dt_s: float) -> Setpoints:
        """One control tick: fresh grid and battery readings, safety, setpoints out."""
        if self.before_tick is not None:
            self.before_tick(self.clock.now())
        if self._pending_site is not None:
            self.site, self._pending_site = self._pending_site, None
            self._replan.set()  # the limits or the battery window moved: plan against them now
        if self.clock.now() >= self._next_plan_s:
            self._next_plan_s = self.clock.now() + self.site.replan_period_s
            self._replan.set()
        await self._read_devices()
        started = time.perf_counter()
        stale = self.site.control.stale_data_timeout_s
        # PV, battery and active chargers' power are read every tick: one not read this tick is unknown
        # (a reading a tick old, set against this tick's grid reading, misplaced the load by whatever the
        # battery moved since: 1.6 kW past an import limit on a random site).
        fresh = THIS_TICK * dt_s
        grid = self._sum(self._devices(DeviceKind.GRID_METER), "power_kw", stale)
        if not self._devices(DeviceKind.GRID_METER):
            grid = None
        pv = self._sum(self._pv_sources, "power_kw", fresh) if self.site.pv is not None else 0.0
        battery_names = self._devices(DeviceKind.BATTERY_INVERTER)
        battery = self._sum(battery_names, "power_kw", fresh) if self.site.battery is not None else 0.0
        soc_pct = [self._value(n, "soc_pct", stale) for n in battery_names]
        soc = None if not soc_pct or any(v is None for v in soc_pct) else min(v for v in soc_pct if v is not None) / 100
        ev_kw: dict[str, float | None] = {}
        connected: dict[str, bool] = {}
        for charger in self.site.ev_chargers:
            device = self._charger_device(charger.name)
            state = self._value(device, "state_code", stale)
            power = self._value(device, "power_kw", stale if self._charger_idle(device) else fresh)
            ev_kw[charger.name] = None if state is None else power
            if state is None:
                connected[charger.name] = self._ev_connected[charger.name]  # unknown: as last known
                continue
            connected[charger.name] = state >= 1.0
            if not connected[charger.name]:
                self._ev_seen_empty.add(charger.name)
            if connected[charger.name] != self._ev_connected[charger.name]:
                self._learn_stay(charger.name, arrived=connected[charger.name])
                self._ev_connected[charger.name] = connected[charger.name]
                self._ev_since[charger.name] = self.clock.local()
                self._replan.set()  # a car came or went: plan again now
        offered = {
            c.name: c.phases * c.voltage_v * self._written.get((c.device, "current_limit_a"), 0.0) / 1000
            for c in self.site.ev_chargers
        }
        cars_known = all(v is not None for v in ev_kw.values())
        ev_total = sum(v for v in ev_kw.values() if v is not None)
        grid_age = max((self.clock.now() - self.latest[n].at_s.get("power_kw", -math.inf)
                        for n in self._devices(DeviceKind.GRID_METER) if n in self.latest),
                       default=math.inf)  # fmt: skip
        # Read this tick (or the last): only such a reading shows the last correction, and only it may be
        # set against this tick's PV and battery readings to infer the load.
        grid_fresh = grid is not None and grid_age <= HOLD_AFTER_TICKS * dt_s
        load_known = grid_fresh and pv is not None and battery is not None and cars_known
        if load_known and grid is not None and pv is not None and battery is not None:
            self._load_swing.observe(grid + pv - battery - ev_total, dt_s)
        if grid is not None:
            self._last_grid_ok_s = self.clock.now()
        blind_s = 0.0 if self._last_grid_ok_s is None else self.clock.now() - self._last_grid_ok_s
        self.battery_response.observe(battery, dt_s)
        measured = Measured(grid, pv, battery, soc, ev_kw, connected, self._pv_limit_kw, offered,
                            self._load_swing.last_load_kw, self._load_swing.kw, self.battery_response.shown_kw_per_s,
                            blind_s)  # fmt: skip
        # A breach tick is counted on a reading of this tick only: one reading held over several ticks is
        # one correction's outcome, not several.
        self._count_breaches(grid if grid_age < 0.5 * dt_s else None, dt_s)
        self._note_full_cars(connected, offered, ev_kw)
        targets = self._targets()
        held = self.last_setpoints
        if grid is not None and grid_age > HOLD_AFTER_TICKS * dt_s and held is not None and not held.safe_state:
            # The grid reading was not refreshed: the other readings moved on without it, so the limit
            # arithmetic would mix old and new. Hold the levers as they are until it is fresh again
            # (or stale: then the safe state).
            lean = None if held.pv_limit_kw is None else max(0.0, held.pv_limit_kw - HOLD_PV_LEAN_KW_PER_TICK)
            action = f"holding: grid reading {grid_age:.0f} s old" + ("" if lean is None else f", PV {lean:.1f} kW")
            setpoints = dataclasses.replace(held, pv_limit_kw=lean, actions=(action,), breach=None, unavoidable=False)
        else:
            probe = self._pv_prober.allowed(self.clock.now(), pv, self._pv_limit_kw)
            setpoints = apply_safety(
                self.site, measured, targets, self._setpoint_battery_kw, dt_s,
                probe_allowed=probe, battery_accepts=not self._battery_refused,
            )  # fmt: skip
            self._pv_prober.applied(pv, setpoints)
        self._breach_unavoidable = setpoints.breach if setpoints.unavoidable else None
        last_load = self._load_swing.last_load_kw
        if load_known and pv is not None and last_load is not None:
            # Only PV at its limit is held back by it. The export guard keeps a limit in force whenever
            # PV could outgive the site (at the school's zero export, all day): PV well below that limit
            # is the sun's. Left out, a rainy morning's readings kept the forecast at the week's sunny
            # yield (87-130 kW planned, 12 kW given) while the battery covered the difference.
            self.forecaster.observe(self.clock.local(), last_load, pv, self._pv_held_back(pv))
        if grid is not None:
            self._demand(max(grid, 0.0), dt_s)
            self._count(grid, pv, battery, ev_total if cars_known else None, dt_s)
        self.stats.ticks += 1
        self.stats.safe_state_ticks += setpoints.safe_state
        self.stats.safety_actions += bool(setpoints.actions)
        self.stats.tick_processing_s.add(time.perf_counter() - started)
        await self._apply(setpoints)
        if self.observe:
            # The battery never got it: the next tick's setpoint is worked out from where the battery is
            # (as if it had just been told to stay there), not chased from a setpoint it never saw (that
            # made the would-be setpoint swing between -30 and 0 kW every tick on a bench).
            self._setpoint_battery_kw = 0.0 if battery is None else battery
        if self._watchdogs and self.site.control.device_watchdog_s > 0:
            await self._keep_watchdogs_alive()
        self.battery_response.sent(battery, self._setpoint_battery_kw)
        if self.store is not None:
            self._record(measured, setpoints)
        self.last_measured, self.last_setpoints = measured, setpoints
        if self.on_tick is not None:
            self.on_tick(self.clock.now(), setpoints)
        for listener in self.listeners:
            listener(self)
        if self.clock.now() >= self._next_state_save_s:
            self._next_state_save_s = self.clock.now() + STATE_SAVE_PERIOD_S
            self._save_state_in_background()
        return setpoints

    def _count(self, grid_kw: float, pv_kw: float | None, battery_kw: float | None, ev_kw: float | None,
               dt_s: float) -> None:  # fmt: skip
        """Integrate a tick into the counters; an unknown flow adds nothing to its own counter (the gap is
        lost energy in the counters, never a guess)."""
        c, h = self.counters, dt_s / 3600
        imported, exported = max(grid_kw, 0.0) * h, max(-grid_kw, 0.0) * h
        c.grid_import_kwh += imported
        c.grid_export_kwh += exported
        if pv_kw is not None:
            c.pv_kwh += max(pv_kw, 0.0) * h
            c.carbon_avoided_kg += max(0.0, max(pv_kw, 0.0) * h - exported) * self.site.carbon_kg_per_kwh
        if battery_kw is not None:
            c.battery_charge_kwh += max(battery_kw, 0.0) * h
            c.battery_discharge_kwh += max(-battery_kw, 0.0) * h
        if ev_kw is not None:
            c.ev_kwh += max(ev_kw, 0.0) * h
            if pv_kw is not None and battery_kw is not None:
                supply_kw = max(pv_kw, 0.0) + max(grid_kw, 0.0) + max(-battery_kw, 0.0)
                if supply_kw > 0:
                    c.ev_pv_kwh += max(ev_kw, 0.0) * h * max(pv_kw, 0.0) / supply_kw
        price = self._price_now()
        c.energy_cost_cny += imported * price - exported * self.site.tariff.export_price_cny_per_kwh
        c.carbon_kg += imported * self.site.carbon_kg_per_kwh

    def _minute(self) -> tuple[int, int, int, int, int]:
        local = self.clock.local()
        return local.year, local.month, local.day, local.hour, local.minute

    def _price_now(self) -> float:
        """The import price in force. It goes by the local minute (and the site, which tuning may replace):
        looked up once a minute, not every tick."""
        minute, cached = self._minute(), self._price_cache
        if cached is None or cached[0] is not self.site or cached[1] != minute:
            cached = self._price_cache = (self.site, minute, self.site.tariff.band_at(self.clock.local())[1])
        return cached[2]

    def _valley_now(self) -> bool:
        """`Tariff.cheapest_with_dearer_ahead` now, looked up once a minute as the price is."""
        minute, cached = self._minute(), self._valley_cache
        if cached is None or cached[0] is not self.site or cached[1] != minute:
            cached = self._valley_cache = (self.site, minute,
                                           self.site.tariff.cheapest_with_dearer_ahead(self.clock.local()))  # fmt: skip
        return cached[2]

    def _pv_held_back(self, pv_kw: float) -> bool:
        """PV is at (or ramping towards) a limit: the lowest in force over the last PV_LIMIT_SETTLE_S."""
        now, limits = self.clock.now(), self._pv_limits
        limits.append((now, math.inf if self._pv_limit_kw is None else self._pv_limit_kw))
        while limits[0][0] < now - PV_LIMIT_SETTLE_S:
            limits.popleft()
        return pv_kw >= min(limit for _, limit in limits) - PV_AT_LIMIT_KW

    def _count_breaches(self, grid_kw: float | None, dt_s: float) -> None:
        """The grid measured now shows the last tick's correction: count it against the limits."""
        if grid_kw is None or self.last_setpoints is None:
            return
        side = self._breach_unavoidable
        self.stats.import_breaches.add(grid_kw - self.site.import_limit_kw, dt_s, unavoidable=side == "import")
        self.stats.export_breaches.add(-grid_kw - self.site.export_limit_kw, dt_s, unavoidable=side == "export")

    def _demand(self, import_kw: float, dt_s: float) -> None:
        """Month-to-date peak as the utility meters it: the largest 15-minute average import (aligned
        blocks), not the largest one-second reading, which a transient would inflate."""
        local = self.clock.local()
        block = (local.toordinal(), (local.hour * 60 + local.minute) // DEMAND_BLOCK_MINUTES)
        if block != self._demand_block:
            if self._demand_block is not None and self._demand_s > 0:
                self.month_peak_kw = max(self.month_peak_kw, self._demand_kws / self._demand_s)
            if self._demand_block is not None and local.month != self._demand_month:
                self.month_peak_kw = 0.0  # a new billing month
            self._demand_block, self._demand_month = block, local.month
            self._demand_kws = self._demand_s = 0.0
        self._demand_kws += import_kw * dt_s
        self._demand_s += dt_s

    def _record(self, measured: Measured, setpoints: Setpoints) -> None:
        assert self.store is not None
        values: dict[str, float] = {}
        if measured.pv_kw is not None:
            values["measured.pv_kw"] = measured.pv_kw
        if measured.battery_kw is not None:
            values["measured.battery_kw"] = measured.battery_kw
        if measured.grid_kw is not None:
            values["measured.grid_kw"] = measured.grid_kw
        if measured.soc is not None:
            values["measured.soc"] = measured.soc
        names = self._series_names
        for name, kw in measured.ev_kw.items():
            if kw is not None:
                values[names.get(("measured", name)) or f"measured.{name}_kw"] = kw
        # Observing, the setpoints were never written: they are kept apart from those that were.
        kind = "would_write" if self.observe else "setpoint"
        values[f"{kind}.battery_kw"] = setpoints.battery_kw
        values[f"{kind}.pv_limit_kw"] = -1.0 if setpoints.pv_limit_kw is None else setpoints.pv_limit_kw
        for name, amps in setpoints.ev_current_a.items():
            values[names.get((kind, name)) or f"{kind}.{name}_a"] = amps
        values["state.safe"] = float(setpoints.safe_state)
        self.store.record(self.clock.local().timestamp(), values)  # a queue put: its own thread writes and prunes

    def _targets(self) -> Targets:
        if not clock_plausible(self.clock.local()):
            # No tariff, profile or month can be trusted to this clock: the rule-based mode (store
            # surplus, cover import down to the reserve), until the clock is set.
            return Targets(self_consumption=True, reserve_soc=self.site.tuning.battery.reserve_soc)
        plan, start = self.plan, self.plan_start
        if plan is None or start is None:
            return Targets()
        step = int((self.clock.local() - start).total_seconds() // (plan.step_minutes * 60))
        if not 0 <= step < plan.steps:
            return Targets()
        demand = self.site.tariff.demand_charge_cny_per_kw_month > 0
        trusted = self.forecaster.knows_day(self.clock.local())
        # A plan on a known day may mean to raise the peak to charge (it judged the kW worth its price);
        # one on a guess may not: the peak would be paid for sure, the saving is a guess.
        peak_cap: float | None = max(self.month_peak_kw, plan.peak_import_kw)
        charge_cap = peak_cap if trusted else self.month_peak_kw
        valley = self._valley_now()
        if not trusted:
            # On a guessed day the plan's own peak is a guess too: shaving the night's load down to it
            # emptied the battery in the valley before the dear evening that set the peak anyway. Only a
            # peak the month has already paid for is held, and not in the valley band (holding the
            # night's 45 kW through the school's 07:30 start spent 28 kWh at the cheapest price, and the
            # day set a higher peak an hour later all the same); without one, the self-consumption rule.
            peak_cap = self.month_peak_kw if self.month_peak_kw > 0 and not valley else None
        ev_kw = {name: float(kw[step]) for name, kw in plan.ev_kw.items()}
        if self._ev_full:
            wake = self._full_cars_to_wake()
            for charger in self.site.ev_chargers:
                if charger.name in wake:
                    ev_kw[charger.name] = charger.min_kw
        return Targets(
            self_consumption=not trusted,
            battery_kw=float(plan.battery_kw[step]),
            ev_kw=ev_kw,
            planned_import_kw=float(plan.grid_import_kw[step]),
            peak_cap_kw=peak_cap if demand and peak_cap is not None else None,
            charge_cap_kw=charge_cap if demand else None,
            reserve_soc=self.site.tuning.battery.reserve_soc,
            cover_import=not valley,  # the tariff is known even when the load is not
        )

    def _learn_stay(self, charger: str, *, arrived: bool) -> None:
        if arrived:
            if charger in self._ev_seen_empty:
                self._ev_arrival_seen.add(charger)
            return
        if charger in self._ev_arrival_seen and charger in self._ev_since:
            self._ev_arrival_seen.discard(charger)
            stayed_h = (self.clock.local() - self._ev_since[charger]).total_seconds() / 3600
            if stayed_h > 0:
                self.ev_stays_h[charger] = [*self.ev_stays_h[charger], stayed_h][-EV_STAYS_KEPT:]

    def _note_full_cars(
        self, connected: dict[str, bool], offered: dict[str, float], ev_kw: dict[str, float | None]
    ) -> None:
        """A car that takes none of the current it is offered for EV_FULL_AFTER_S is full: it is planned no
        more until it leaves, or draws again when it is offered its minimum each EV_FULL_RETRY_S. Judged
        afresh every tick, a full car would come back into every plan that does not offer it current,
        and each such plan would buy energy for it."""
        now = self.clock.now()
        for c in self.site.ev_chargers:
            name = c.name
            if not connected[name]:
                self._ev_declining_since.pop(name, None)
                self._ev_full.pop(name, None)
                continue
            drawn = ev_kw[name]
            if drawn is None:
                continue  # unknown: neither full nor drawing, judged when it is read again
            if drawn >= EV_DRAWING_KW:
                self._ev_declining_since.pop(name, None)
                if self._ev_full.pop(name, None) is not None:
                    _log.info("car charging again", extra={"charger": name})
                    self._replan.set()  # it was not full after all: plan its charge again
                continue
            if offered[name] < c.min_kw:
                self._ev_declining_since.pop(name, None)  # not offered enough to tell
                continue
            since = self._ev_declining_since.setdefault(name, now)
            if now - since >= EV_FULL_AFTER_S:
                self._ev_declining_since.pop(name)
                if name not in self._ev_full:
                    _log.info("car full", extra={"charger": name})
                    self._replan.set()  # the energy the plan kept for it is free
                self._ev_full[name] = now  # (again, after an offer that woke nothing)

    def _full_cars_to_wake(self) -> set[str]:
        """Full cars due their hourly offer of the minimum current (EV_FULL_RETRY_S)."""
        now = self.clock.now()
        return {name for name, at in self._ev_full.items() if now - at >= EV_FULL_RETRY_S}

    def expected_stay_h(self, charger: str) -> float:
        """How long a car at this charger is planned to stay: what a quarter of its recent sessions
        stayed at least, once there are a few (school staff come and go at the same hours)."""
        stays = sorted(self.ev_stays_h.get(charger, []))
        if len(stays) < EV_STAYS_NEEDED:
            return DEFAULT_EV_STAY_H
        return stays[(len(stays) - 1) // 4]

    def _plan_demand_charge(self, start: datetime) -> float:
        """The demand charge a plan weighs a new kW of peak with. The utility bills the month's peak once,
        and every day left in the month then imports up to it for nothing: a plan over one horizon
        carries the horizon's share of the days left (at the month's end, the whole charge). Without
        this a one-day plan would price a kW that serves the whole month as if it served only today,
        and never charge the battery in the valley above last night's import."""
        rate = self.site.tariff.demand_charge_cny_per_kw_month
        if not self.forecaster.knows_day(start):
            # On a guessed day the plan cannot know where the peak will fall (the cars it places may
            # meet the morning or the evening load): it weighs a new kW at the whole monthly charge.
            return rate
        month_end = (start.replace(day=28) + timedelta(days=4)).replace(day=1, hour=0, minute=0, second=0,
                                                                          microsecond=0)  # fmt: skip
        days_left = (month_end - start).total_seconds() / 86400
        horizon_days = self.site.control.horizon_h / 24
        return rate * min(1.0, horizon_days / max(days_left, horizon_days))

    async def _apply(self, setpoints: Setpoints) -> None:
        writes: list[tuple[str, str, float, float]] = []
        for name, share in self._battery_shares.items():
            writes.append((name, "power_setpoint_kw", battery_register_kw(setpoints, share), BATTERY_DEADBAND_KW))
        for charger in self.site.ev_chargers:
            amps = round(setpoints.ev_current_a.get(charger.name, 0.0), 1)
            writes.append((self._charger_device(charger.name), "current_limit_a", amps, EV_DEADBAND_A))
        if self.site.pv is not None and self.site.pv.curtailable:
            limit = setpoints.pv_limit_kw
            pct = 100.0 if limit is None else max(0.0, min(100.0, 100 * limit / self.site.pv.peak_kw))
            for name in self._devices(DeviceKind.PV_INVERTER):
                writes.append((name, "power_limit_pct", round(pct, 1), 100 * PV_DEADBAND_KW / self.site.pv.peak_kw))
            if not self.observe:  # observing, the inverter keeps whatever limit it had
                self._pv_limit_kw = limit
        for device, quantity, value, deadband in writes:
            last = self._written.get((device, quantity))
            # Safety corrections must land this tick: write whenever the value moved past the deadband, and
            # exactly while a limit is at stake (0.1 A left in the deadband exported 0.03 kW past a limit).
            exact = setpoints.breach is not None and last != value
            if last is None or abs(last - value) > deadband or (value == 0.0 and last != 0.0) or exact:
                written = await self._write_now(device, quantity, value)
                if quantity == "power_setpoint_kw":
                    self._inverter_refused[device] = not written
                    self._battery_refused = any(self._inverter_refused.values())
        self._setpoint_battery_kw = setpoints.battery_kw

    # --- planning -----------------------------------------------------------------------------------

    async def _planner(self) -> None:
        """Plans when the tick says so: on the re-plan period, and when a car comes or goes."""
        while True:
            await self._replan.wait()
            self._replan.clear()
            await self._make_plan()
            self._next_plan_s = self.clock.now() + self.site.replan_period_s

    def _scenario(self, start: datetime) -> Scenario:
        site = self.site
        step_minutes = site.control.step_minutes
        steps = int(site.control.horizon_h * 60 / step_minutes)
        prices = [site.tariff.band_at(start + timedelta(minutes=(i + 0.5) * step_minutes))[1] for i in range(steps)]
        sessions = []
        for charger in site.ev_chargers:
            if not self._ev_connected[charger.name] or charger.name in self._ev_full:
                continue  # no car, or a car that declined the current it was offered: full
            device = self._charger_device(charger.name)
            delivered = self._value(device, "session_energy_kwh", math.inf)
            if delivered is None:
                delivered = 0.0  # never read: the car is planned its whole assumed need
            since = self._ev_since.get(charger.name, start)
            leave = since + timedelta(hours=self.expected_stay_h(charger.name))
            leave_step = min(steps, max(1, int((leave - start).total_seconds() // (step_minutes * 60))))
            need = max(0.0, DEFAULT_EV_NEED_KWH - delivered)
            sessions.append({"charger": charger.name, "arrival_step": 0, "departure_step": leave_step,
                             "energy_kwh": need, "min_kw": charger.min_kw, "max_kw": charger.max_kw})  # fmt: skip
        soc = None
        for name in self._devices(DeviceKind.BATTERY_INVERTER):
            value = self._value(name, "soc_pct", math.inf)
            soc = None if value is None else value / 100
        battery = None
        if site.battery is not None:
            tb = site.tuning.battery
            start_soc = tb.soc_min if soc is None else min(max(soc, 0.0), 1.0)
            battery = {
                "capacity_kwh": site.battery.capacity_kwh,
                "max_charge_kw": site.battery_max_charge_kw,
                "max_discharge_kw": site.battery_max_discharge_kw,
                "charge_efficiency": site.battery.charge_efficiency,
                "discharge_efficiency": site.battery.discharge_efficiency,
                "soc_min": tb.soc_min,
                "soc_max": tb.soc_max,
                "soc_initial": start_soc,
                "soc_final_min": min(tb.reserve_soc, max(start_soc, tb.soc_min)),
                "wear_cost_cny_per_kwh": tb.wear_cost_cny_per_kwh,
            }
        load_kw = self.forecaster.load_kw(start, steps, step_minutes, now=self.clock.local())
        pv_kw = self._planned_pv_kw(start, steps, load_kw)
        return Scenario.model_validate(
            {
                "step_minutes": step_minutes,
                "price_import_cny_per_kwh": prices,
                "price_export_cny_per_kwh": site.tariff.export_price_cny_per_kwh,
                "pv_kw": pv_kw,
                "load_kw": load_kw,
                "grid": {
                    "import_limit_kw": site.import_limit_kw,
                    "export_limit_kw": site.export_limit_kw,
                    "demand_charge_cny_per_kw": self._plan_demand_charge(start),
                    "peak_import_so_far_kw": self.month_peak_kw,
                },
                "battery": battery,
                "ev_sessions": sessions,
                "carbon_kg_per_kwh": site.carbon_kg_per_kwh,
                "pv_curtailable": bool(site.pv and site.pv.curtailable),
            }
        )

    def _planned_pv_kw(self, start: datetime, steps: int, load_kw: list[float]) -> list[float]:
        """The PV a plan is made on: the forecast, except where a demand charge makes too little sun dearer
        than too much. There, in each step where the load over a day as poor as the last week's worst
        would import above the month's peak, the plan counts only on that poor day's PV (a battery
        holding the peak is charged for the rainy day it may be). Planned on the expected sun alone, the
        plans of a rainy 4 September left the valley half charged and drained the battery in the
        morning for an afternoon sun that never came: a new peak of 36 kW, the month's demand charge
        up by 1,100 CNY; too much charge on a sunny day costs a few kWh of PV curtailed."""
        step_minutes = self.site.control.step_minutes
        now = self.clock.local()
        pv_kw = self.forecaster.pv_kw(start, steps, step_minutes, now=now)
        if self.site.tariff.demand_charge_cny_per_kw_month <= 0 or self.site.battery is None:
            return pv_kw
        low_kw = self.forecaster.pv_low_kw(start, steps, step_minutes, now=now)
        peak_kw = self.month_peak_kw
        return [min(pv, low) if load - low > peak_kw else pv
                for pv, low, load in zip(pv_kw, low_kw, load_kw, strict=True)]  # fmt: skip

    def accept_forecast(self, raw: bytes, *, origin: str) -> list[str]:
        """An external forecast (file or MQTT): taken, and a plan made on it soon; or the reasons it is not
        (each naming the field). Never raises on any input."""
        try:
            peak_kw = self.site.pv.peak_kw if self.site.pv else None
            forecast = parse_forecast(raw, now=self.clock.local(), pv_peak_kw=peak_kw)
        except ForecastRefused as err:
            _log.warning("external forecast refused", extra={"origin": origin, "errors": err.errors[:5]})
            return err.errors
        self.forecaster.external = forecast
        self._replan.set()
        _log.info("external forecast taken", extra={
            "origin": origin, "source": forecast.source, "start": forecast.start.isoformat(),
            "end": forecast.end.isoformat(),
        })  # fmt: skip
        return []

    def _read_forecast_file(self) -> None:
        """The site's forecast file, again whenever it changed; a missing or bad file keeps what was taken."""
        path = self.site.forecast.external_file
        if path is None:
            return
        try:
            stat = os.stat(path)
            if (stat.st_mtime_ns, stat.st_size) == self._forecast_file_seen:
                return
            self._forecast_file_seen = (stat.st_mtime_ns, stat.st_size)
            with open(path, "rb") as handle:
                raw = handle.read(MAX_FORECAST_BYTES + 1)
        except OSError as err:
            if self._forecast_file_seen != (-1, -1):
                _log.warning("forecast file unreadable", extra={"path": path, "error": str(err)})
            self._forecast_file_seen = (-1, -1)
            return
        self.accept_forecast(raw, origin=f"file {path}")

    async def _make_plan(self) -> None:
        """A new plan, or the last one kept (the safety layer holds the limits either way). In real time
        the kernels run in a thread (they release the GIL), so a slow plan never delays a tick, and a plan
        that takes longer than PLAN_TIMEOUT_S is given up; in simulated time inline, so a run is the same
        every time."""
        local = self.clock.local()
        if not clock_plausible(local):
            _log.warning("wall clock implausible; no tariff-based plan", extra={"local": local.isoformat()})
            return
        start = local - timedelta(minutes=local.minute % self.site.control.step_minutes, seconds=local.second,
                                  microseconds=local.microsecond)  # fmt: skip
        started = time.perf_counter()
        self._read_forecast_file()
        try:
            scenario = self._scenario(start)
            if self.clock.realtime:
                plan = await asyncio.wait_for(asyncio.to_thread(solve, scenario), PLAN_TIMEOUT_S)
            else:
                plan = solve(scenario)
        except Exception as err:  # any failure of a plan keeps the last one; the loop goes on
            self.stats.plans_failed += 1
            expected = isinstance(err, ValueError | TimeoutError)  # a bad forecast value, a slow plan: no stack
            _log.warning("planning failed, keeping the last plan", exc_info=not expected,
                         extra={"error": f"{type(err).__name__}: {str(err)[:500]}"})  # fmt: skip
            return
        self.plan = plan
        self.plan_start = start
        self.plan_scenario = scenario
        self.stats.plans += 1
        if self.store is not None:
            summary = {k: v for k, v in self.plan.to_json().items() if k != "steps"}
            self.store.record_plan(start.timestamp(), summary)
        self.stats.plan_time_s.add(time.perf_counter() - started)

    def summary_stats(self) -> dict[str, float]:
        s = self.stats
        return {
            "ticks": s.ticks,
            "plans": s.plans,
            "tick_processing_p50_ms": s.tick_processing_s.percentile_ms(0.5),
            "tick_processing_p99_ms": s.tick_processing_s.percentile_ms(0.99),
            "tick_lateness_p50_ms": s.tick_lateness_s.percentile_ms(0.5),
            "tick_lateness_p99_ms": s.tick_lateness_s.percentile_ms(0.99),
            "plan_time_median_ms": s.plan_time_s.percentile_ms(0.5),
            "plans_failed": s.plans_failed,
            "safe_state_ticks": s.safe_state_ticks,
            "safety_action_ticks": s.safety_actions,
            "bus_errors": s.bus_errors,
            "write_failures": s.write_failures,
            **({"observed_writes": s.observed_writes} if self.observe else {}),
            **{f"import_breach_{k}": v for k, v in s.import_breaches.to_json().items()},
            **{f"export_breach_{k}": v for k, v in s.export_breaches.to_json().items()},
        }
