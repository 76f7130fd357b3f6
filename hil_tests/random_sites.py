"""The safety layer in closed loop on random sites the schema accepts, breaches counted tick by tick.

Each site-day draws a site (export limit 0-60 kW, import limit 0.6-2x the peak load, battery absent,
empty, full or half, its inverter at its rating or at a fifth of it, PV curtailable or not, 0-4
chargers with random cars, a school or community-centre load with steps and noise, meter noise) and
an adversarial plan (random battery, car and import targets every 15 minutes: the layer must hold the
limits whatever the plan says). The loop is the runtime's tick without the buses: the plant's meters
are read directly, the layer's setpoints written directly, with the runtime's rounding and deadbands.
The plant judges every interval between ticks by its mean grid flow, and whether any setting of the
levers could have kept it inside each limit.

    python -m hil_tests.random_sites --site-days 500          # the goal's count (about 10 minutes)
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from config import DeviceKind, SiteConfig, load_site
from controller.breaches import BreachCount
from controller.plant import EvArrival, Plant
from controller.safety import (
    BatteryResponse,
    LoadSwing,
    Measured,
    PvProber,
    Setpoints,
    Targets,
    apply_safety,
    battery_register_kw,
)
from controller.simulation import Recorder

__all__ = ["DayResult", "closed_loop", "random_site", "run_site_day"]

SCHOOL = Path(__file__).parents[1] / "config" / "sites" / "zhongshan_school.toml"
# The runtime's write rule (controller/runtime.py): a setpoint is rewritten when it moved past this.
BATTERY_DEADBAND_KW = 0.2
EV_DEADBAND_A = 0.2
PV_DEADBAND_KW = 0.5
PLAN_STEP_S = 900
# A tick period drawn per site: 1 s is the default; slower ticks are valid and make days cheaper.
TICK_PERIODS_S = (1.0, 2.0, 5.0)


@dataclass
class DayResult:
    seed: int
    description: str
    ticks: int
    import_breaches: BreachCount
    export_breaches: BreachCount
    reversals: int  # battery setpoint direction changes (beyond the deadband)

    @property
    def avoidable_ticks(self) -> int:
        return self.import_breaches.avoidable_ticks + self.export_breaches.avoidable_ticks

    @property
    def breach_ticks(self) -> int:
        return self.import_breaches.ticks + self.export_breaches.ticks


def random_site(seed: int) -> tuple[SiteConfig, dict[str, Any], str]:
    """A valid site file drawn at random from the corners the schema allows, the plant's extras, and a
    one-line description."""
    rnd = random.Random(seed)
    data = load_site(SCHOOL, environment=False).model_dump(mode="json")
    data["mqtt"]["enabled"] = False
    peak_pv = rnd.choice([0.0, rnd.uniform(30, 400)])
    curtailable = rnd.random() < 0.8
    data["pv"] = None if peak_pv == 0 else {"peak_kw": peak_pv, "curtailable": curtailable}
    battery_kind = rnd.choice(["none", "empty", "full", "half"])
    slow = rnd.random() < 0.5
    if battery_kind == "none":
        data["battery"] = None
    else:
        capacity = rnd.uniform(30, 300)
        power = capacity * rnd.uniform(0.25, 1.0)
        data["battery"] = {"capacity_kwh": capacity, "max_charge_kw": power, "max_discharge_kw": power,
                           "ramp_kw_per_s": rnd.uniform(5, 100), "soc_min": 0.05, "soc_max": 1.0}  # fmt: skip
    profile = rnd.choice(["school", "community_centre"])
    scale = rnd.uniform(0.2, 2.0)
    peak_load = (200.0 if profile == "school" else 90.0) * scale
    step_kw = rnd.uniform(0.0, 0.4) * peak_load
    data["simulation"] = {"load_profile": profile, "load_scale": scale,
                          "battery_response_kw_per_s": None if not slow or data["battery"] is None
                          else data["battery"]["ramp_kw_per_s"] / 5}  # fmt: skip
    chargers = rnd.randint(0, 4)
    if not curtailable and battery_kind == "none" and not chargers:
        curtailable = True  # the schema refuses a site where nothing can hold the export limit
        data["pv"] = None if peak_pv == 0 else {"peak_kw": peak_pv, "curtailable": True}
    data["ev_chargers"] = [
        {"name": f"ev{i + 1}", "device": f"charger-{i + 1}", "phases": rnd.choice([1, 3]),
         "voltage_v": 230.0, "min_current_a": 6.0, "max_current_a": rnd.choice([16.0, 32.0])}
        for i in range(chargers)
    ]  # fmt: skip
    # The school's two buses, with the devices this site has (the loop reads the plant directly, but the
    # site file is the one a real site would have).
    modbus = data["buses"][0]
    kept = {"pv-meter"} | ({"battery"} if data["battery"] else set()) | ({"pv-inverter"} if curtailable else set())
    template = next(d for d in modbus["devices"] if d["kind"] == "ev_charger")
    modbus["devices"] = [d for d in modbus["devices"] if d["name"] in kept] + [
        {**template, "name": f"charger-{i + 1}", "address": 31 + i} for i in range(chargers)
    ]
    if data["pv"] is None or not curtailable:
        modbus["devices"] = [d for d in modbus["devices"] if d["kind"] != "pv_inverter"]
    export_limit = 0.0 if rnd.random() < 0.3 else rnd.uniform(0, 60)
    import_limit = max(2.0, rnd.uniform(0.6, 2.0) * (peak_load + step_kw))
    data["grid"] = {"import_limit_kw": import_limit, "export_limit_kw": export_limit}
    data["tariff"]["demand_charge_cny_per_kw_month"] = rnd.choice([0.0, 32.0])
    data["control"]["tick_period_s"] = tick = rnd.choice(TICK_PERIODS_S)
    data["control"]["stale_data_timeout_s"] = max(10.0, 2 * tick)
    data["control"]["device_watchdog_s"] = max(10.0, 3 * tick)
    site = SiteConfig.model_validate(data)
    # A random day of the year from a random hour (a short run must see the sun too), and how often a PV,
    # battery or car reading goes missing (stale, implausible) for a tick.
    zone = ZoneInfo(site.site.timezone)
    start = datetime(2026, 1, 1, rnd.randrange(24), tzinfo=zone) + timedelta(days=rnd.randrange(365))
    extras: dict[str, Any] = {
        "load_step_kw": step_kw, "load_noise_kw": rnd.uniform(0.0, 2.0), "meter_noise_kw": rnd.uniform(0, 0.3),
        "weather": rnd.choice(["sunny", "overcast", "passing_clouds"]), "battery_kind": battery_kind,
        "start": start, "dropout": rnd.choice([0.0, 0.0, 0.02, 0.1]),
    }  # fmt: skip
    b = site.battery
    description = (
        f"{profile} x{scale:.2f} (peak ~{peak_load:.0f} kW, steps {step_kw:.0f} kW), import {import_limit:.0f} kW,"
        f" export {export_limit:.1f} kW, PV {peak_pv:.0f} kWp{'' if curtailable else ' uncurtailable'},"
        + (" no battery" if b is None else f" battery {b.capacity_kwh:.0f} kWh/{b.max_charge_kw:.0f} kW {battery_kind}"
           f"{' slow ' + format(b.ramp_kw_per_s / 5, '.1f') + ' kW/s' if slow else ''}")
        + f", {chargers} chargers, tick {tick:.0f} s, {extras['weather']}, from {start:%m-%d %H:00},"
        f" {100 * extras['dropout']:.0f} % of readings missing"
    )  # fmt: skip
    return site, extras, description


def _arrivals(site: SiteConfig, start: datetime, rnd: random.Random) -> list[EvArrival]:
    out = []
    for charger in site.ev_chargers:
        at = start + timedelta(hours=rnd.uniform(0, 12))
        while at < start + timedelta(days=1):
            stay = timedelta(hours=rnd.uniform(0.5, 10))
            out.append(EvArrival(charger.name, at, at + stay, rnd.uniform(2, 70)))
            at = at + stay + timedelta(hours=rnd.uniform(0.2, 6))
    return out


def _plan(site: SiteConfig, rnd: random.Random) -> Targets:
    """An adversarial plan step: anything within the ratings, meaningful or not."""
    b = site.battery
    battery = 0.0 if b is None else rnd.uniform(-site.battery_max_discharge_kw, site.battery_max_charge_kw)
    demand = site.tariff.demand_charge_cny_per_kw_month > 0
    return Targets(
        battery_kw=battery,
        ev_kw={c.name: rnd.uniform(0, c.max_kw) for c in site.ev_chargers},
        planned_import_kw=rnd.choice([None, rnd.uniform(-site.export_limit_kw, site.import_limit_kw)]),
        peak_cap_kw=rnd.uniform(0, site.import_limit_kw) if demand else None,
        charge_cap_kw=rnd.uniform(0, site.import_limit_kw) if demand else None,
        self_consumption=rnd.random() < 0.3,
        reserve_soc=site.tuning.battery.reserve_soc,
        cover_import=rnd.random() < 0.7,
    )


def run_site_day(seed: int, *, hours: float = 24.0, missing_readings: bool = True) -> DayResult:
    """One random site for `hours` from a random day of the year, under an adversarial plan.
    `missing_readings`: False keeps every reading (the issue's site set; the draws stay the same)."""
    site, extras, description = random_site(seed)
    if not missing_readings:
        description = description.rsplit(",", 1)[0] + ", no reading missing"
    rnd = random.Random(seed + 1)
    start = extras["start"]
    plant = Plant(site, start, seed=seed, arrivals=_arrivals(site, start, rnd), weather=extras["weather"],
                  load_step_kw=extras["load_step_kw"], load_noise_kw=extras["load_noise_kw"],
                  meter_noise_kw=extras["meter_noise_kw"])  # fmt: skip
    t = site.tuning.battery
    plant.soc = {"empty": t.soc_min, "full": t.soc_max, "half": 0.5, "none": 0.5}[extras["battery_kind"]]
    return closed_loop(site, plant, lambda: _plan(site, rnd), hours * 3600, seed=seed, description=description,
                       dropout=extras["dropout"] if missing_readings else 0.0)  # fmt: skip


def closed_loop(
    site: SiteConfig,
    plant: Plant,
    plan: Callable[[], Targets],
    duration_s: float,
    *,
    seed: int = 0,
    description: str = "",
    on_tick: Callable[[float, Setpoints], None] | None = None,
    dropout: float = 0.0,
) -> DayResult:
    """The runtime's tick without the buses against `plant`, a new plan step from `plan()` every 15 minutes.
    `dropout`: each tick, each PV, battery and car reading is missing (unknown) with this probability."""
    missing = random.Random(seed + 2)
    recorder = Recorder(site, plant)
    dt = site.control.tick_period_s
    prober, swing = PvProber(), LoadSwing()
    response = BatteryResponse(site.battery.ramp_kw_per_s if site.battery else 0.0)
    written: dict[str, float] = {}
    setpoint_battery, pv_limit = 0.0, None
    targets = Targets()
    last_delta, reversals = 0.0, 0
    chargers = {c.name: c for c in site.ev_chargers}
    ticks = int(duration_s / dt)
    for index in range(ticks + 1):
        now = index * dt
        plant.advance(now)
        if index % max(1, int(PLAN_STEP_S / dt)) == 0:
            targets = plan()
        grid = plant.readings(DeviceKind.GRID_METER, "grid")["power_kw"]
        pv: float | None = plant.readings(DeviceKind.PV_METER, "pv")["power_kw"] if site.pv is not None else 0.0
        battery: float | None = plant.battery_kw if site.battery is not None else 0.0
        ev_kw: dict[str, float | None] = {n: plant.evs[n].power_kw for n in chargers}
        if dropout:  # a reading missed this tick is unknown (the runtime's rule for PV, battery, active cars)
            pv = None if site.pv is not None and missing.random() < dropout else pv
            battery = None if site.battery is not None and missing.random() < dropout else battery
            ev_kw = {n: None if missing.random() < dropout else kw for n, kw in ev_kw.items()}
        connected = {n: plant.evs[n].arrival is not None for n in chargers}
        offered = {n: c.phases * c.voltage_v * written.get(n, 0.0) / 1000 for n, c in chargers.items()}
        if pv is not None and battery is not None and all(v is not None for v in ev_kw.values()):
            swing.observe(grid + pv - battery - sum(v for v in ev_kw.values() if v is not None), dt)
        response.observe(battery, dt)
        measured = Measured(grid, pv, battery, plant.soc, ev_kw, connected, pv_limit, offered, swing.last_load_kw,
                            swing.kw, response.shown_kw_per_s)  # fmt: skip
        allowed = prober.allowed(now, pv, pv_limit)
        out = apply_safety(site, measured, targets, setpoint_battery, dt, probe_allowed=allowed)
        prober.applied(pv, out)
        _write(site, plant, out, written)
        delta = out.battery_kw - setpoint_battery
        if abs(delta) > BATTERY_DEADBAND_KW:
            reversals += last_delta * delta < 0
            last_delta = delta
        setpoint_battery, pv_limit = out.battery_kw, out.pv_limit_kw
        response.sent(battery, setpoint_battery)
        recorder(now, out)
        if on_tick is not None:
            on_tick(now, out)
    return DayResult(seed, description, ticks, recorder.import_breaches, recorder.export_breaches, reversals)


def _write(site: SiteConfig, plant: Plant, out: Setpoints, written: dict[str, float]) -> None:
    """The runtime's _apply: rounded values, rewritten when they moved past the deadband."""
    def due(key: str, value: float, deadband: float) -> bool:
        last = written.get(key)
        exact = out.breach is not None and last != value
        if last is None or abs(last - value) > deadband or (value == 0.0 and last != 0.0) or exact:
            written[key] = value
            return True
        return False

    if site.battery is not None and due("battery", kw := battery_register_kw(out), BATTERY_DEADBAND_KW):
        plant.write(DeviceKind.BATTERY_INVERTER, "battery", "power_setpoint_kw", kw)
    for charger in site.ev_chargers:
        if due(charger.name, amps := round(out.ev_current_a.get(charger.name, 0.0), 1), EV_DEADBAND_A):
            plant.write(DeviceKind.EV_CHARGER, charger.device, "current_limit_a", amps)
    if site.pv is not None and site.pv.curtailable:
        limit = out.pv_limit_kw
        pct = 100.0 if limit is None else max(0.0, min(100.0, 100 * limit / site.pv.peak_kw))
        if due("pv", pct := round(pct, 1), 100 * PV_DEADBAND_KW / site.pv.peak_kw):
            plant.write(DeviceKind.PV_INVERTER, "pv-inverter", "power_limit_pct", pct)


PROGRESS_EVERY = 25  # site-days between progress lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hil_tests.random_sites", description=__doc__.splitlines()[0])
    parser.add_argument("--site-days", type=int, default=500)
    parser.add_argument("--hours", type=float, default=24.0, help="length of each site-day")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--no-missing-readings", action="store_true", help="never drop a PV, battery or car reading")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    wall = time.perf_counter()
    results = []
    for seed in range(args.first_seed, args.first_seed + args.site_days):
        result = run_site_day(seed, hours=args.hours, missing_readings=not args.no_missing_readings)
        results.append(result)
        if result.avoidable_ticks:
            sys.stdout.write(f"seed {seed}: {result.avoidable_ticks} avoidable breach ticks: {result.description}\n")
        if len(results) % PROGRESS_EVERY == 0:  # a run takes an hour: say how far it is (stderr, not the report)
            sys.stderr.write(f"{len(results)} of {args.site_days} site-days, {time.perf_counter() - wall:.0f} s\n")
            sys.stderr.flush()
        sys.stdout.flush()
    ticks = sum(r.ticks for r in results)
    total = sum(r.breach_ticks for r in results)
    avoidable = sum(r.avoidable_ticks for r in results)
    worst = max(results, key=lambda r: (r.avoidable_ticks, r.breach_ticks))
    unavoidable_kwh = sum(r.import_breaches.unavoidable_energy_kwh + r.export_breaches.unavoidable_energy_kwh
                          for r in results)  # fmt: skip
    sys.stdout.write(
        f"{len(results)} site-days of {args.hours:g} h, {ticks} ticks in {time.perf_counter() - wall:.0f} s\n"
        f"breach ticks: {total} ({avoidable} avoidable, {total - avoidable} unavoidable,"
        f" {unavoidable_kwh:.1f} kWh beyond the limits unavoidably)\n"
        f"longest run: import {max(r.import_breaches.longest_run_ticks for r in results)},"
        f" export {max(r.export_breaches.longest_run_ticks for r in results)} ticks\n"
        f"sites with unavoidable breaches: {sum(1 for r in results if r.breach_ticks > r.avoidable_ticks)}\n"
        f"worst: seed {worst.seed}: {worst.breach_ticks} breach ticks ({worst.avoidable_ticks} avoidable):"
        f" {worst.description}\n"
    )
    return 1 if avoidable else 0


if __name__ == "__main__":
    raise SystemExit(main())
