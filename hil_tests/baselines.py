"""What the realised bill is judged against, computed from the plant's true profiles (which the
controller never sees): no battery, a rule-based self-consumption controller, and the
perfect-foresight optimum (an LP over the true profiles, solved by HiGHS)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt

from config import SiteConfig
from controller.plant import EvArrival, Plant
from optimiser import Scenario
from optimiser.reference_lp import solve_lp

__all__ = ["Outcome", "Profiles", "bill_cny", "no_battery", "perfect_foresight", "self_consumption", "true_profiles"]

FloatArray = npt.NDArray[np.float64]
PROFILE_STEP_S = 60.0  # baselines are simulated per minute; demand is still metered per 15 minutes
DEMAND_BLOCK_S = 900.0


def bill_cny(site: SiteConfig, energy_cost_cny: float, peak_15min_kw: float, days: float) -> float:
    """Energy at the TOU prices plus the monthly demand charge pro rata for the run's length (the
    same accounting as the run summary)."""
    return energy_cost_cny + site.tariff.demand_charge_cny_per_kw_month * peak_15min_kw * min(1.0, days / 30)


@dataclass(frozen=True)
class Profiles:
    start: datetime
    step_s: float
    load_kw: FloatArray
    pv_kw: FloatArray  # available (before any curtailment)
    price_cny_per_kwh: FloatArray
    arrivals: list[EvArrival]

    @property
    def days(self) -> float:
        return len(self.load_kw) * self.step_s / 86400


def true_profiles(site: SiteConfig, plant: Plant, duration_s: float, arrivals: list[EvArrival]) -> Profiles:
    steps = int(duration_s // PROFILE_STEP_S)
    mids = [(i + 0.5) * PROFILE_STEP_S for i in range(steps)]
    prices = [site.tariff.band_at(plant.start + timedelta(seconds=t))[1] for t in mids]
    return Profiles(
        plant.start,
        PROFILE_STEP_S,
        np.array([plant.load_at(t) for t in mids]),
        np.array([plant.pv_available_at(t) for t in mids]),
        np.array(prices),
        list(arrivals),
    )


@dataclass(frozen=True)
class Outcome:
    name: str
    energy_cost_cny: float
    peak_15min_kw: float
    bill_cny: float
    import_kwh: float
    export_kwh: float
    carbon_kg: float
    ev_kwh: float
    # The optimum's own plan, one value per 15-minute step (grid import and export, battery, load, PV
    # available, price): the report writes it beside the run's so that the two can be compared.
    series: dict[str, list[float]] = field(default_factory=dict)


def _ev_flat_out(site: SiteConfig, p: Profiles) -> FloatArray:
    """Cars charge at full power from arrival until full or gone (no control)."""
    ev = np.zeros(len(p.load_kw))
    dt_h = p.step_s / 3600
    for arrival in p.arrivals:
        charger = next(c for c in site.ev_chargers if c.name == arrival.charger)
        first = max(0, int((arrival.arrive - p.start).total_seconds() // p.step_s))
        last = min(len(ev), int((arrival.leave - p.start).total_seconds() // p.step_s))
        remaining = arrival.energy_kwh
        for i in range(first, last):
            kw = min(charger.max_kw, remaining / dt_h)
            ev[i] += kw
            remaining -= kw * dt_h
            if remaining <= 1e-9:
                break
    return ev


def _outcome(name: str, site: SiteConfig, p: Profiles, grid_kw: FloatArray, ev_kw: FloatArray) -> Outcome:
    dt_h = p.step_s / 3600
    imports, exports = np.maximum(grid_kw, 0.0), np.maximum(-grid_kw, 0.0)
    energy = float(np.sum(imports * p.price_cny_per_kwh) * dt_h - np.sum(exports) * dt_h
                   * site.tariff.export_price_cny_per_kwh)  # fmt: skip
    per_block = max(1, int(DEMAND_BLOCK_S // p.step_s))
    usable = len(imports) // per_block * per_block
    blocks = imports[:usable].reshape(-1, per_block).mean(axis=1) if usable else imports
    peak = float(blocks.max()) if len(blocks) else 0.0
    import_kwh = float(imports.sum() * dt_h)
    return Outcome(name, energy, peak, bill_cny(site, energy, peak, p.days), import_kwh, float(exports.sum() * dt_h),
                   import_kwh * site.carbon_kg_per_kwh, float(ev_kw.sum() * dt_h))  # fmt: skip


def no_battery(site: SiteConfig, p: Profiles) -> Outcome:
    """No battery, no control: PV curtailed only as far as the export limit requires."""
    ev = _ev_flat_out(site, p)
    grid = np.maximum(p.load_kw + ev - p.pv_kw, -site.export_limit_kw)
    return _outcome("no battery", site, p, grid, ev)


def self_consumption(site: SiteConfig, p: Profiles, soc_initial: float) -> Outcome:
    """The usual rule-based controller: charge from PV surplus, discharge to cover the load, within the
    SoC window; cars flat out; the rest of any surplus curtailed to the export limit."""
    b = site.battery
    ev = _ev_flat_out(site, p)
    net = p.load_kw + ev - p.pv_kw
    grid = np.empty_like(net)
    dt_h = p.step_s / 3600
    soc = soc_initial
    for i, need in enumerate(net):
        battery = 0.0
        if b is not None:
            lo, hi = site.tuning.battery.soc_min, site.tuning.battery.soc_max
            if need < 0:
                room_kw = max(0.0, (hi - soc) * b.capacity_kwh / b.charge_efficiency / dt_h)
                battery = min(-need, site.battery_max_charge_kw, room_kw)
                soc += battery * b.charge_efficiency * dt_h / b.capacity_kwh
            else:
                left_kw = max(0.0, (soc - lo) * b.capacity_kwh * b.discharge_efficiency / dt_h)
                battery = -min(need, site.battery_max_discharge_kw, left_kw)
                soc += battery / b.discharge_efficiency * dt_h / b.capacity_kwh
        grid[i] = max(need + battery, -site.export_limit_kw)
    return _outcome("self-consumption", site, p, grid, ev)


def perfect_foresight(
    site: SiteConfig, p: Profiles, soc_initial: float, soc_final: float, ev_delivered: list[tuple[EvArrival, float]]
) -> Outcome:
    """The LP optimum on 15-minute averages of the true profiles, delivering to each car what the run
    delivered to it and ending at the run's final SoC, so that only the money differs."""
    per = int(DEMAND_BLOCK_S // p.step_s)
    steps = len(p.load_kw) // per
    def mean(values: FloatArray) -> FloatArray:
        return np.asarray(values[: steps * per].reshape(steps, per).mean(axis=1), dtype=np.float64)

    load, pv, price = mean(p.load_kw), mean(p.pv_kw), mean(p.price_cny_per_kwh)
    sessions: list[dict[str, Any]] = []
    for arrival, delivered in ev_delivered:
        charger = next(c for c in site.ev_chargers if c.name == arrival.charger)
        first = max(0, int(np.ceil((arrival.arrive - p.start).total_seconds() / DEMAND_BLOCK_S)))
        last = min(steps, int((arrival.leave - p.start).total_seconds() // DEMAND_BLOCK_S))
        if last > first and delivered > 0.01:
            sessions.append({"charger": charger.name, "arrival_step": first, "departure_step": last,
                             "energy_kwh": delivered, "min_kw": 0.0, "max_kw": charger.max_kw})  # fmt: skip
    b = site.battery
    battery = None
    if b is not None:
        tb = site.tuning.battery
        battery = {
            "capacity_kwh": b.capacity_kwh, "max_charge_kw": site.battery_max_charge_kw,
            "max_discharge_kw": site.battery_max_discharge_kw, "charge_efficiency": b.charge_efficiency,
            "discharge_efficiency": b.discharge_efficiency, "soc_min": tb.soc_min, "soc_max": tb.soc_max,
            "soc_initial": soc_initial, "soc_final_min": min(max(soc_final, tb.soc_min), tb.soc_max),
            "wear_cost_cny_per_kwh": tb.wear_cost_cny_per_kwh,
        }  # fmt: skip
    scenario = Scenario.model_validate(
        {
            "step_minutes": DEMAND_BLOCK_S / 60,
            "price_import_cny_per_kwh": price.tolist(),
            "price_export_cny_per_kwh": site.tariff.export_price_cny_per_kwh,
            "pv_kw": pv.tolist(),
            "load_kw": load.tolist(),
            "grid": {
                "import_limit_kw": site.import_limit_kw,
                "export_limit_kw": site.export_limit_kw,
                "demand_charge_cny_per_kw": site.tariff.demand_charge_cny_per_kw_month * min(1.0, p.days / 30),
            },
            "battery": battery,
            "ev_sessions": sessions,
            "carbon_kg_per_kwh": site.carbon_kg_per_kwh,
            "pv_curtailable": bool(site.pv and site.pv.curtailable),
        }
    )
    # Where export is paid the LP may import and export in the same step (a kWh bought at the valley price
    # and sold at once): not a plan a site can run, so the MIP that keeps the direction (see reference_lp).
    lp = solve_lp(scenario, exact=site.tariff.export_price_cny_per_kwh > 0)
    dt_h = DEMAND_BLOCK_S / 3600
    imports = np.asarray(lp.grid_import_kw, dtype=np.float64)
    exports = np.asarray(lp.grid_export_kw, dtype=np.float64)
    export_kwh = float(exports.sum() * dt_h)
    # Energy as the run counts it: import at its price less export at the export price.
    energy = float(np.sum(imports * price) * dt_h) - export_kwh * site.tariff.export_price_cny_per_kwh
    peak = float(imports.max()) if len(imports) else 0.0
    import_kwh = float(imports.sum() * dt_h)
    series = {"t_h": [i * dt_h for i in range(steps)], "grid_import_kw": imports.tolist(),
              "grid_export_kw": exports.tolist(), "battery_kw": np.asarray(lp.battery_kw, dtype=np.float64).tolist(),
              "load_kw": load.tolist(), "pv_available_kw": pv.tolist(),
              "price_cny_per_kwh": price.tolist()}  # fmt: skip
    return Outcome("perfect foresight", energy, peak, bill_cny(site, energy, peak, p.days), import_kwh, export_kwh,
                   import_kwh * site.carbon_kg_per_kwh, sum(float(s["energy_kwh"]) for s in sessions),
                   series)  # fmt: skip
