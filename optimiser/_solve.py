"""The planner's Python API: validate, allocate, run the kernels, and explain the result."""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from optimiser import _kernels as k
from optimiser._scenario import Scenario, load_scenario

__all__ = ["EvShortfall", "Plan", "solve", "solve_scenario"]

FloatArray = npt.NDArray[np.float64]

# Energy grid: at least this many levels, and fine enough that one level per step is at most
# MAX_LEVEL_POWER_KW of battery power; capped so memory stays at T x N floats of a few MB.
MIN_LEVELS = 500
MAX_LEVELS = 4000
MAX_LEVEL_POWER_KW = 1.5
# EV energy is placed in chunks that run to the next kink of the step's grid cost (exact: the cost is
# linear in between), but at most this many kWh so that several cars share a cheap period fairly.
EV_CHUNK_KWH = 2.0
# Battery DP and EV placement alternate until the cost stops improving, at most this often.
MAX_ROUNDS = 6
# Exact car placement (column generation): at most this many plans priced per import cap (a few
# per car suffice; the school's 48 h case with four sessions needs about 20).
MAX_PRICED_PLANS = 80
PRICED_PLANS_PER_CAR = 16
# Cars with a minimum power: a plan that gathers the relaxation's thin charging into whole steps and is
# proven this close to the bound (half the 0.1 %) is kept without trying the slower repairs.
GATHERED_PROVEN_GAP = 5e-4
# A plan within this fraction of column generation's lower bound is optimal (up to rounding).
PROVEN_OPTIMAL = 1e-7
# Demand-charge cap search: stop when the bracket is this narrow (kW). At 32 CNY/kW, 0.02 kW is 0.64 CNY.
CAP_TOLERANCE_KW = 0.02
# Probes of the cap search land where the cutting planes cross, to this resolution (kW): on a
# piecewise-linear cost that is the kink itself (0.02 kW off at 30 CNY/kW would be 0.6 CNY).
CAP_RESOLUTION_KW = 1e-6
# The cap search starts where the battery alone holds the cap and the final SoC if the cost falls up to
# there: checked against a probe this far below it (at 32 CNY/kW, 0.001 kW is 0.03 CNY).
CAP_LEFT_CHECK_KW = 1e-3
# The cap search's tangents: chords of column generation's bound this wide each side of a probe.
CAP_TANGENT_KW = 1e-4
# The cap search's cutting planes end in a few probes on a piecewise-linear cost; a cap on them.
MAX_CAP_PROBES = 24
# ... and stop once the best cap seen is proven within this fraction of the best possible (0.001 %,
# a hundredth of the 0.1 %): the last probes on a cost with many small kinks gain less.
CAP_SEARCH_REL_GAP = 1e-5
# A plan's import or export beyond its limit by more than this is reported (rounding is not).
_LIMIT_TOLERANCE_KW = 1e-6


@dataclass(frozen=True, slots=True)
class EvShortfall:
    charger: str
    requested_kwh: float
    delivered_kwh: float
    reason: str


@dataclass(frozen=True)
class Plan:
    """A dispatch plan: per-step arrays (kW, SoC fraction) and totals."""

    step_minutes: float
    battery_kw: FloatArray  # + charge, - discharge, AC side
    ev_kw: dict[str, FloatArray]  # charger -> kW
    curtail_kw: FloatArray
    grid_import_kw: FloatArray
    grid_export_kw: FloatArray
    soc: FloatArray  # fraction of capacity at the start of each step, plus the end (T + 1)
    cost_cny: float
    energy_cost_cny: float
    demand_charge_cny: float
    wear_cost_cny: float
    import_kwh: float
    export_kwh: float
    curtailed_kwh: float
    peak_import_kw: float
    co2_kg: float
    ev_shortfalls: list[EvShortfall] = field(default_factory=list)
    final_soc_shortfall_kwh: float = 0.0
    limit_violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    solve_time_s: float = 0.0
    # Proven bound on the relative gap to the best plan holding the same import cap (column
    # generation's Lagrangian bound: cars with a minimum power, export paying more than import); None
    # where the planner computed none (no battery or no cars: there the DP is exact on its own).
    gap_bound: float | None = None

    @property
    def steps(self) -> int:
        return int(self.battery_kw.shape[0])

    def to_json(self) -> dict[str, Any]:
        def r(x: float) -> float:
            return round(float(x), 4)

        return {
            "cost_cny": r(self.cost_cny),
            "energy_cost_cny": r(self.energy_cost_cny),
            "demand_charge_cny": r(self.demand_charge_cny),
            "wear_cost_cny": r(self.wear_cost_cny),
            "import_kwh": r(self.import_kwh),
            "export_kwh": r(self.export_kwh),
            "curtailed_kwh": r(self.curtailed_kwh),
            "peak_import_kw": r(self.peak_import_kw),
            "co2_kg": r(self.co2_kg),
            "final_soc_shortfall_kwh": r(self.final_soc_shortfall_kwh),
            "ev_unmet": [
                {
                    "charger": s.charger,
                    "requested_kwh": r(s.requested_kwh),
                    "delivered_kwh": r(s.delivered_kwh),
                    "unmet_kwh": r(s.requested_kwh - s.delivered_kwh),
                    "reason": s.reason,
                }
                for s in self.ev_shortfalls
            ],
            "limit_violations": list(self.limit_violations),
            "notes": list(self.notes),
            "solve_time_s": round(self.solve_time_s, 6),
            "gap_bound": None if self.gap_bound is None else round(self.gap_bound, 6),
            "steps": [
                {
                    "battery_kw": r(self.battery_kw[t]),
                    "ev_kw": {name: r(kw[t]) for name, kw in self.ev_kw.items()},
                    "curtail_kw": r(self.curtail_kw[t]),
                    "grid_import_kw": r(self.grid_import_kw[t]),
                    "grid_export_kw": r(self.grid_export_kw[t]),
                    "soc": r(self.soc[t + 1]),
                }
                for t in range(self.steps)
            ],
        }


@dataclass
class _Arrays:
    """The scenario as float64 arrays, plus the battery's energy grid."""

    dt_h: float
    load: FloatArray
    pv: FloatArray
    price_import: FloatArray
    price_export: FloatArray
    import_limit: FloatArray
    export_cap: FloatArray
    curtail_max: FloatArray
    need_kwh: FloatArray  # each car session's energy
    base: FloatArray  # load - PV: net load without battery and cars
    level_kwh: float = 0.0
    n_levels: int = 1
    start_level: int = 0
    e_low_kwh: float = 0.0
    k_discharge: int = 0
    k_charge: int = 0
    final_min_kwh: float = 0.0
    # Export pays more than import at some step where export is allowed: the step cost has a concave
    # kink at zero (the plan imports or exports; the LP's relaxation would do both).
    direction_matters: bool = False


def _arrays(s: Scenario, notes: list[str]) -> _Arrays:
    steps = s.steps
    pv = np.array(s.pv_kw, dtype=np.float64)
    load = np.array(s.load_kw, dtype=np.float64)
    export = s.price_export_cny_per_kwh
    a = _Arrays(
        dt_h=s.dt_h,
        load=load,
        pv=pv,
        price_import=np.array(s.price_import_cny_per_kwh, dtype=np.float64),
        price_export=np.array(export, dtype=np.float64) if isinstance(export, list) else np.full(steps, export),
        import_limit=np.full(steps, s.grid.import_limit_kw),
        export_cap=np.full(steps, s.grid.export_limit_kw),
        curtail_max=pv if s.pv_curtailable else np.zeros(steps),
        need_kwh=np.array([x.energy_kwh for x in s.ev_sessions], dtype=np.float64),
        base=load - pv,
    )
    a.direction_matters = s.grid.export_limit_kw > 0 and bool((a.price_export > a.price_import).any())
    b = s.battery
    if b is None or (b.max_charge_kw == 0 and b.max_discharge_kw == 0):
        return a
    e_min, e_max = b.soc_min * b.capacity_kwh, b.soc_max * b.capacity_kwh
    e0 = b.soc_initial * b.capacity_kwh
    if not e_min <= e0 <= e_max:
        clamped = min(max(e0, e_min), e_max)
        planned = clamped / b.capacity_kwh
        notes.append(
            f"initial SoC {b.soc_initial:.3f} is outside [{b.soc_min}, {b.soc_max}]; planned from {planned:.3f}"
        )
        e0 = clamped
    span = e_max - e_min
    wanted = math.ceil(span / (MAX_LEVEL_POWER_KW * s.dt_h))
    n = min(max(wanted, MIN_LEVELS), MAX_LEVELS)
    q = span / (n - 1)
    # Shift the grid so that the initial energy lies exactly on a level (never outside [e_min, e_max]).
    below = math.floor((e0 - e_min) / q + 1e-9)
    e_low = e0 - below * q
    n_levels = below + math.floor((e_max - e0) / q + 1e-9) + 1
    a.level_kwh, a.n_levels, a.start_level, a.e_low_kwh = q, n_levels, below, e_low
    a.k_discharge = math.floor(b.max_discharge_kw * s.dt_h / b.discharge_efficiency / q + 1e-9)
    a.k_charge = math.floor(b.max_charge_kw * s.dt_h * b.charge_efficiency / q + 1e-9)
    a.final_min_kwh = b.soc_final_min * b.capacity_kwh
    return a


@dataclass
class _Battery:
    kw: FloatArray  # + charge, - discharge
    energy_kwh: FloatArray  # stored energy at each step boundary (T + 1)
    # Serving one more kWh of load at step t through the battery (discharging more or charging less)
    # costs cny_per_kwh[t] later, for up to room_kw[t]: the DP's shadow price of stored energy.
    cny_per_kwh: FloatArray
    room_kw: FloatArray
    marginal: FloatArray  # shadow price of one kWh in store after each step (inf: none)


def _idle(s: Scenario, a: _Arrays) -> _Battery:
    start = a.e_low_kwh + a.start_level * a.level_kwh
    none = np.full(s.steps, np.inf)
    return _Battery(np.zeros(s.steps), np.full(s.steps + 1, start), none, np.zeros(s.steps), none)


def _battery(s: Scenario, a: _Arrays, net: FloatArray, import_cap: FloatArray) -> _Battery:
    """Battery plan that minimises cost for this net load (idle without a battery).

    The exact piecewise-linear DP (lower envelopes where export pays more than import); the grid DP
    over >= 500 energy levels (which offers no shadow prices) only if a value function splits into
    more convex runs than the exact DP allows (never seen).
    """
    b = s.battery
    if a.n_levels <= 1 or b is None:
        return _idle(s, a)
    e_min, e_max = b.soc_min * b.capacity_kwh, b.soc_max * b.capacity_kwh
    energy = np.empty(s.steps + 1)
    marginal = np.empty(s.steps)
    cost = k.battery_pwl(
        net, a.price_import, a.price_export, import_cap, a.export_cap, a.curtail_max, a.dt_h, e_min, e_max,
        a.e_low_kwh + a.start_level * a.level_kwh, b.max_discharge_kw * a.dt_h / b.discharge_efficiency,
        b.max_charge_kw * a.dt_h * b.charge_efficiency, b.charge_efficiency, b.discharge_efficiency,
        b.wear_cost_cny_per_kwh, a.final_min_kwh, energy, marginal, k.PATH_AND_MARGINALS,
    )  # fmt: skip
    if math.isnan(cost):
        levels = np.empty(s.steps + 1, dtype=np.int64)
        k.battery_dp(
            net, a.price_import, a.price_export, import_cap, a.export_cap, a.curtail_max, a.dt_h,
            a.level_kwh, a.n_levels, a.start_level, a.e_low_kwh, a.k_discharge, a.k_charge,
            b.charge_efficiency, b.discharge_efficiency, b.wear_cost_cny_per_kwh, a.final_min_kwh, False, levels,
        )  # fmt: skip
        energy = a.e_low_kwh + levels.astype(np.float64) * a.level_kwh
        marginal = np.full(s.steps, np.inf)
    return _battery_from(s, a, energy, marginal)


def _battery_from(s: Scenario, a: _Arrays, energy: FloatArray, marginal: FloatArray) -> _Battery:
    b = s.battery
    assert b is not None
    out = _Battery(np.empty(s.steps), energy, np.empty(s.steps), np.empty(s.steps), marginal)
    k.battery_outputs(
        energy, marginal, a.dt_h, b.charge_efficiency, b.discharge_efficiency, b.wear_cost_cny_per_kwh,
        b.max_discharge_kw, out.kw, out.cny_per_kwh, out.room_kw,
    )  # fmt: skip
    return out


def _fill_evs(
    s: Scenario, a: _Arrays, base: FloatArray, ev: FloatArray, import_cap: FloatArray, *, battery: _Battery
) -> None:
    """Re-place each EV's energy given everything else (in place), priced jointly with the battery:

    - load may be served through the battery at its shadow price, within its headroom;
    - where the battery charges below its rate because the grid price jumps above its value of
      energy (a kink: the import cap, or the end of free PV surplus), room a car gives up would go to
      the battery: the car's load there is contested and costs the battery's value of it.
    The cars share the battery's headroom.
    """
    total = ev.sum(axis=0)
    room = battery.room_kw.copy()
    contest_kw, contest_price = _contested(s, a, base + battery.kw + total, import_cap, battery)
    for i, session in enumerate(s.ev_sessions):
        others = base + battery.kw + total - ev[i]
        k.fill_ev(
            others, a.price_import, a.price_export, import_cap, a.export_cap, a.curtail_max,
            battery.cny_per_kwh, room, contest_kw.copy(), contest_price, a.dt_h, session.arrival_step,
            session.departure_step, session.energy_kwh, session.min_kw, session.max_kw, EV_CHUNK_KWH, ev[i],
        )  # fmt: skip
        total = others - base - battery.kw + ev[i]


def _contested(
    s: Scenario, a: _Arrays, net: FloatArray, import_cap: FloatArray, battery: _Battery
) -> tuple[FloatArray, FloatArray]:
    """kW of EV load per step that the battery would take if freed, and what that costs per kWh."""
    kw, price = np.zeros(s.steps), np.zeros(s.steps)
    b = s.battery
    if b is not None and np.isfinite(battery.marginal).any():
        k.contested_room(
            net, a.price_import, a.price_export, import_cap, a.export_cap, a.curtail_max, a.dt_h, battery.kw,
            battery.marginal, b.charge_efficiency, b.wear_cost_cny_per_kwh, b.max_charge_kw, kw, price,
        )  # fmt: skip
    return kw, price


@dataclass
class _Candidate:
    battery: _Battery
    ev: FloatArray
    objective: float
    net_kw: FloatArray  # grid power before curtailment
    peak_kw: float  # the largest grid power (>= 0)
    # A proven lower bound on the cost under the import cap this plan was made for (what the DP
    # minimises there: penalty above the cap, no demand charge); -inf when none was computed.
    lower_bound: float = -math.inf
    gap_bound: float | None = None  # (cost there - lower_bound) / |lower_bound|, where there is a bound

    @classmethod
    def of(cls, s: Scenario, a: _Arrays, battery: _Battery, ev: FloatArray) -> _Candidate:
        """The plan with what it would cost, every broken limit and unmet need at the planner's penalty."""
        net = np.empty(s.steps)
        wear = 0.0 if s.battery is None else s.battery.wear_cost_cny_per_kwh
        objective = k.plan_objective(
            a.base, battery.kw, ev, a.need_kwh, a.price_import, a.price_export, a.import_limit, a.export_cap,
            a.curtail_max, a.dt_h, s.grid.demand_charge_cny_per_kw, s.grid.peak_import_so_far_kw, wear, net,
        )  # fmt: skip
        penalised = objective + k.PENALTY_CNY_PER_KWH * _final_shortfall(s, a, battery)
        return cls(battery, ev, penalised, net, float(net.max(initial=0.0)))


def _final_shortfall(s: Scenario, a: _Arrays, battery: _Battery) -> float:
    if s.battery is None or a.n_levels <= 1:
        return 0.0
    return max(0.0, a.final_min_kwh - float(battery.energy_kwh[-1]))


def _solve_with_cap(s: Scenario, a: _Arrays, cap_kw: float, warm: _Candidate | None, pool: _PlanPool) -> _Candidate:
    """The best plan under this import cap: exact by column generation where it applies; where a car
    has a minimum power (off or at least min_kw, not convex) the exact plan of the relaxation is
    re-placed under that rule and improved by alternating the battery DP and the car placement.
    The plan carries column generation's lower bound and its proven gap to it (gap_bound)."""
    import_cap = np.minimum(a.import_limit, cap_kw)
    base = a.base
    if not _column_generation_applies(s, a):
        return _alternate(s, a, base, import_cap, warm)
    relaxed = _exact_cars(s, a, base, import_cap, None if warm is None else warm.ev, pool=pool)
    if relaxed is None:
        return _alternate(s, a, base, import_cap, warm)
    proven = _bounded(s, relaxed, cap_kw, relaxed.lower_bound).gap_bound
    if a.direction_matters and (proven is None or proven > PROVEN_OPTIMAL):
        # Where export pays more than import the combination of plans column generation returns is
        # not always a plan as cheap as the combination (the cost is not convex); unless the bound
        # proves it optimal, it is improved by alternating the exact battery DP and the car placement.
        improved = _alternate(s, a, base, import_cap, None, ev=relaxed.ev.copy())
        fresh = _alternate(s, a, base, import_cap, None)
        best = min((relaxed, improved, fresh), key=lambda c: _capped_cost(s, c, cap_kw))
        if _respects_minimum(s, best.ev):
            return _bounded(s, best, cap_kw, relaxed.lower_bound)
        best.lower_bound = relaxed.lower_bound
        relaxed = best
    if _respects_minimum(s, relaxed.ev):
        return relaxed  # bounded above
    consolidated = _consolidated(s, a, base, import_cap, relaxed.ev)
    if consolidated is not None:
        consolidated = _bounded(s, consolidated, cap_kw, relaxed.lower_bound)
        if consolidated.gap_bound is not None and consolidated.gap_bound <= GATHERED_PROVEN_GAP:
            return consolidated
    ev = relaxed.ev.copy()
    _fill_evs(s, a, base, ev, import_cap, battery=relaxed.battery)
    tried = [_alternate(s, a, base, import_cap, None, ev=ev), _alternate(s, a, base, import_cap, None)]
    if consolidated is not None:
        tried.append(consolidated)
    return _bounded(s, min(tried, key=lambda c: c.objective), cap_kw, relaxed.lower_bound)


def _consolidated(
    s: Scenario, a: _Arrays, base: FloatArray, import_cap: FloatArray, relaxed_ev: FloatArray
) -> _Candidate | None:
    """The relaxation's cars with each car's power below its minimum gathered into as few steps as the
    minimum allows, the middle ones of its steps below the minimum; the battery planned for them. None
    where some car cannot be gathered so (less than one step at its minimum).

    The relaxation spreads a car's last kWh thinly where every step is worth the same to it (PV the
    battery cannot take, a flat price); taking them whole in the middle of those steps leaves the
    battery the most room on both sides (the school's cars: 0.21 % -> 0.022 % above the exact
    optimum; first, middle or last chosen by the DP planned no better on 200 random sites)."""
    ev = relaxed_ev.copy()
    tolerance_kw = 1e-9
    for i, session in enumerate(s.ev_sessions):
        kw = ev[i]
        low = np.flatnonzero((kw > tolerance_kw) & (kw < session.min_kw - tolerance_kw))
        if low.size == 0:
            continue
        total_kw = float(kw[low].sum())
        steps = max(1, math.floor(total_kw / session.min_kw + 1e-9))
        while steps < low.size and total_kw / steps > session.max_kw:
            steps += 1
        if total_kw / steps < session.min_kw - tolerance_kw or total_kw / steps > session.max_kw + tolerance_kw:
            return None  # less than one step at the minimum (or more than those steps take): left to the repair
        start = (low.size - steps) // 2
        kw[low] = 0.0
        kw[low[start : start + steps]] = total_kw / steps
    return _Candidate.of(s, a, _battery(s, a, base + ev.sum(axis=0), import_cap), ev)


def _bounded(s: Scenario, c: _Candidate, cap_kw: float, lower_bound: float) -> _Candidate:
    """The plan with column generation's lower bound and the gap to it proven under this import cap."""
    c.lower_bound = lower_bound
    if math.isfinite(lower_bound):
        c.gap_bound = max(0.0, _capped_cost(s, c, cap_kw) - lower_bound) / max(abs(lower_bound), 1e-9)
    return c


def _capped_cost(s: Scenario, c: _Candidate, cap_kw: float) -> float:
    """What the DP minimises under an import cap: the plan's cost with the planner's penalty on import
    above the cap instead of the demand charge (the cap search adds the charge on the cap itself)."""
    charged = s.grid.demand_charge_cny_per_kw * max(0.0, c.peak_kw - s.grid.peak_import_so_far_kw)
    cap = min(cap_kw, s.grid.import_limit_kw)
    over_kwh = 0.0 if c.peak_kw <= cap else float(np.maximum(c.net_kw - cap, 0.0).sum()) * s.dt_h
    return c.objective - charged + k.PENALTY_CNY_PER_KWH * over_kwh


def _respects_minimum(s: Scenario, ev: FloatArray) -> bool:
    """Whether every car is off or at least at its minimum power at every step (to 1e-9 kW: a
    combination of plans can land a few 1e-9 kW below it, which the repair then places exactly)."""
    tolerance_kw = 1e-9
    return all(
        bool(((ev[i] <= tolerance_kw) | (ev[i] >= x.min_kw - tolerance_kw)).all())
        for i, x in enumerate(s.ev_sessions)
        if x.min_kw > 0
    )


def _alternate(
    s: Scenario, a: _Arrays, base: FloatArray, import_cap: FloatArray, warm: _Candidate | None, *,
    ev: FloatArray | None = None,
) -> _Candidate:  # fmt: skip
    """Alternate the battery DP and the EV placement (priced with the battery's shadow prices) from
    `ev`, the warm plan's cars, or cars placed against an idle battery."""
    if ev is None:
        ev = np.zeros((len(s.ev_sessions), s.steps)) if warm is None else warm.ev.copy()
        if s.ev_sessions and warm is None:
            _fill_evs(s, a, base, ev, import_cap, battery=_idle(s, a))
    best: _Candidate | None = None
    for _ in range(MAX_ROUNDS):
        battery = _battery(s, a, base + ev.sum(axis=0), import_cap)
        candidate = _Candidate.of(s, a, battery, ev.copy())
        if best is not None and candidate.objective >= best.objective - 1e-7:
            break
        best = candidate
        if not s.ev_sessions:
            break
        _fill_evs(s, a, base, ev, import_cap, battery=battery)
        if np.array_equal(ev, best.ev):
            break  # the cars stayed where they were: the battery plan stands
    assert best is not None
    return best


def _column_generation_applies(s: Scenario, a: _Arrays) -> bool:
    """Column generation needs a battery and cars (a minimum power is relaxed, then repaired)."""
    return s.battery is not None and a.n_levels > 1 and bool(s.ev_sessions)


def _exact_cars(
    s: Scenario, a: _Arrays, base: FloatArray, import_cap: FloatArray, start_ev: FloatArray | None, *, pool: _PlanPool
) -> _Candidate | None:
    """The optimal battery and car plan for this import cap by column generation (None when the DP
    cannot price: see battery_pwl_tables). Where export pays more than import at a step with a car,
    the combination is the optimum of the relaxation only; its Lagrangian bound says how close.

    The master problem picks the cheapest convex combination of battery-and-car plans that gives each
    car its energy; its duals value each car's kWh; the exact DP, with each car priced into the step
    costs at that value, finds the plan that most improves the master, until none does. The combined
    cars are then fixed and the battery planned for them exactly. The first plan is the battery's
    for `start_ev` (no car charging by default); plans priced for other import caps (`pool`) seed the
    master too: they stay valid plans, only their cost changes.
    """
    b = s.battery
    assert b is not None
    cars = len(s.ev_sessions)
    seeds = min(pool.count, MAX_PRICED_PLANS)
    room = 1 + seeds + min(MAX_PRICED_PLANS, PRICED_PLANS_PER_CAR * (cars + 1))
    energy = np.empty((room, s.steps + 1))
    ev = np.empty((room, cars, s.steps))
    ev[0] = 0.0 if start_ev is None else start_ev
    if seeds:
        energy[1 : 1 + seeds] = pool.energy[pool.count - seeds : pool.count]
        ev[1 : 1 + seeds] = pool.ev[pool.count - seeds : pool.count]
    weights = np.zeros(energy.shape[0])
    bound = np.empty(1)
    count = k.column_generation(
        base, a.price_import, a.price_export, import_cap, a.export_cap, a.curtail_max, a.dt_h, b.charge_efficiency,
        b.discharge_efficiency, b.wear_cost_cny_per_kwh, b.max_discharge_kw * a.dt_h / b.discharge_efficiency,
        b.max_charge_kw * a.dt_h * b.charge_efficiency, b.soc_min * b.capacity_kwh, b.soc_max * b.capacity_kwh,
        a.e_low_kwh + a.start_level * a.level_kwh, a.final_min_kwh, pool.arrival, pool.departure, pool.max_kw,
        pool.need_kwh, energy, ev, 1 + seeds, pool.guesses(), pool.price, weights, bound,
    )  # fmt: skip
    if count < 0:
        return None
    pool.energy, pool.ev, pool.count = energy, ev, count
    combined, path = np.empty((cars, s.steps)), np.empty(s.steps + 1)
    if k.combine_plans(weights, energy, ev, count, combined, path):
        # Plans that charge and discharge in the same step lose more combined than on average:
        # plan the battery again for the combined cars (exact, and no dearer).
        battery = _battery(s, a, base + combined.sum(axis=0), import_cap)
    else:
        battery = _battery_from(s, a, path, np.full(s.steps, np.inf))
    candidate = _Candidate.of(s, a, battery, combined)
    candidate.lower_bound = float(bound[0])
    return candidate


@dataclass
class _PlanPool:
    """The sessions as kernel arrays, and the plans column generation priced so far in this solve."""

    arrival: npt.NDArray[np.int64]
    departure: npt.NDArray[np.int64]
    max_kw: FloatArray
    need_kwh: FloatArray
    energy: FloatArray = field(default_factory=lambda: np.empty((0, 0)))
    ev: FloatArray = field(default_factory=lambda: np.empty((0, 0, 0)))
    count: int = 0
    price: FloatArray = field(default_factory=lambda: np.empty(0))  # each car's CNY/kWh, best known
    # Other car values worth pricing first (a cap search's values at the caps next to the one solved).
    nearby: list[FloatArray] = field(default_factory=list)

    def guesses(self) -> FloatArray:
        """The car values column generation prices first (a row each): the best known, then the others."""
        rows = [self.price]
        for price in self.nearby:
            if not any(np.array_equal(price, row) for row in rows):
                rows.append(price)
        return np.array(rows)

    @classmethod
    def of(cls, s: Scenario, a: _Arrays) -> _PlanPool:
        sessions = s.ev_sessions
        arrival = [x.arrival_step for x in sessions]
        departure = [x.departure_step for x in sessions]
        running = np.cumsum(a.price_import).tolist()
        # First guess of each car's CNY/kWh: its window's mean import price (column generation refines it).
        price = [
            (running[end - 1] - (running[begin - 1] if begin > 0 else 0.0)) / max(end - begin, 1)
            for begin, end in zip(arrival, departure, strict=True)
        ]
        return cls(
            np.array(arrival, dtype=np.int64),
            np.array(departure, dtype=np.int64),
            np.array([x.max_kw for x in sessions], dtype=np.float64),
            a.need_kwh,
            price=np.array(price, dtype=np.float64),
        )


def solve(scenario: Scenario) -> Plan:
    """Plan battery, EV charging and curtailment for a validated scenario."""
    started = time.perf_counter()
    s = scenario
    notes: list[str] = []
    a = _arrays(s, notes)
    if s.grid.demand_charge_cny_per_kw > 0:
        best = _search_cap(s, a, s.grid.peak_import_so_far_kw)
    else:
        best = _solve_with_cap(s, a, math.inf, None, _PlanPool.of(s, a))
    return _plan(s, a, best, notes, time.perf_counter() - started)


def _search_cap(s: Scenario, a: _Arrays, floor_kw: float) -> _Candidate:
    """Import cap minimising energy cost + demand charge.

    With the cap c as a soft limit (the planner's penalty above it), G(c) = the optimal cost under c
    + the demand charge on c above the month's peak is convex in c wherever the plan is an LP optimum
    (the cap is a right-hand side), and piecewise linear. The search starts at the month's peak, or
    higher where the battery alone cannot hold that (below there every plan pays the penalty), and
    stops there when a bound proves that raising the cap cannot pay. Otherwise cutting planes, one
    solve per probe: at a probe where column generation's Lagrangian bound meets the plan, the
    bound's slopes each side (three DPs at the car values found for that cap, no column generation)
    are G's tangents; elsewhere G lies above its neighbours' chords extended, and above the uncapped
    peak only the charge grows. The next probe is where that lower model is least; the search ends
    when the best probe meets it. The best plan seen is kept (where G is not convex, the search is a
    heuristic).
    """
    best: _Candidate | None = None
    warm: _Candidate | None = None
    results: dict[float, _Candidate] = {}
    # G's slopes left (-1) and right (+1) of each probe where they are known (nan: not known), and the
    # lower bound that meets the plan there (nan: none does).
    slopes: dict[tuple[float, int], float] = {}
    meeting: dict[float, float] = {}
    prices: dict[float, FloatArray] = {}
    pool = _PlanPool.of(s, a)
    demand = s.grid.demand_charge_cny_per_kw

    def evaluate(cap: float) -> _Candidate:
        nonlocal best, warm
        if cap not in results:
            if prices:  # the car values found at the nearest caps each side are often this cap's too
                below = max((x for x in prices if x < cap), default=None)
                above = min((x for x in prices if x > cap), default=None)
                pool.nearby = [prices[x] for x in (below, above) if x is not None]
            candidate = _solve_with_cap(s, a, cap, warm, pool)
            warm = results[cap] = candidate
            if best is None or candidate.objective < best.objective:
                best = candidate
            # The car values column generation found for this cap, for its tangents if they are asked for.
            prices[cap] = pool.price.copy()
        return results[cap]

    def tangent(cap: float, side: int) -> float:
        """G's slope left (side -1) or right (+1) of an evaluated cap (nan: not known); one DP a side,
        each only when asked for (the no-peak search needs only the right one of its one probe)."""
        if (cap, side) not in slopes:
            if cap not in meeting:
                meeting[cap] = _meeting_bound(s, a, pool, results[cap], cap, floor_kw=floor_kw, price=prices[cap])
            at = meeting[cap]
            slopes[cap, side] = (
                _tangent_slope(s, a, pool, cap, at=at, side=side, price=prices[cap]) if math.isfinite(at) else math.nan
            )
        return slopes[cap, side]

    def g(cap: float) -> float:
        """G(cap): the plan's cost with the penalty above the cap and the demand charge on the cap."""
        capped = _capped_cost(s, evaluate(cap), cap)
        return capped + demand * max(0.0, cap - floor_kw)

    def right_slope(cap: float) -> float:
        """G's slope right of cap: the lower bound's tangent, else measured by a second solve."""
        evaluate(cap)
        slope = tangent(cap, 1)
        return slope if math.isfinite(slope) else (g(cap + CAP_TOLERANCE_KW) - g(cap)) / CAP_TOLERANCE_KW

    def left_slope(cap: float) -> float:
        evaluate(cap)
        slope = tangent(cap, -1)
        return slope if math.isfinite(slope) else (g(cap) - g(cap - CAP_LEFT_CHECK_KW)) / CAP_LEFT_CHECK_KW

    low, start_kw = _least_holdable_caps_kw(s, a, floor_kw)
    if math.isfinite(start_kw) and start_kw > low + CAP_LEFT_CHECK_KW and left_slope(start_kw) <= 0.0:
        # Where holding the cap stops costing the final SoC: the search starts there if the cost falls
        # up to it (convexity: then it falls all the way from the safe start).
        low = start_kw
    if evaluate(low).peak_kw < low - CAP_TOLERANCE_KW:
        assert best is not None
        return best  # the cap does not bind: the plan is the uncapped optimum and adds no demand charge
    holds = evaluate(low).peak_kw <= low + CAP_TOLERANCE_KW
    if holds and _raising_cap_cannot_pay(s, a, evaluate(low), low):
        assert best is not None
        return best  # the usual case: holding the month's peak
    if right_slope(low) >= 0.0:
        assert best is not None
        return best
    # The right end of the search: where no probe has been, G lies above the bound at the first probe's
    # car values without a cap, plus the charge (the bound falls as the cap rises, and no further than
    # that). A line from one DP instead of a probe at the uncapped optimum (a column generation as long
    # as any, and that far right only its end slope counted); without a battery there is no bound.
    top = float(a.import_limit.max())
    line = _lower_bound_at(s, a, pool, math.inf, prices[low]) if math.isfinite(top) and top > low else math.nan
    virtual = math.isfinite(line)
    if virtual:
        caps, values = [low, top], [g(low), line + demand * (top - floor_kw)]
    else:
        high = evaluate(math.inf).peak_kw
        results.setdefault(high, results[math.inf])  # the uncapped plan is the plan for its own peak
        if high <= low + CAP_TOLERANCE_KW:
            assert best is not None
            return best
        if high not in meeting or high == math.inf:
            meeting[high] = math.nan
        caps, values = [low, high], [g(low), g(high)]
    # Cutting planes from one solve per probe: G lies above its tangents at each probe where column
    # generation's bound meets the plan there (the bound's slopes at the car values found for it),
    # elsewhere above the chords of the probe's neighbours extended (convexity), or at least above a
    # line at the charge (G's slope is never more); at the month's peak and at the right end (the
    # bound's line, or above the uncapped peak where only the charge grows) above its end slopes. Each
    # next probe is where the lower model is least; the search ends when the best probe meets it.
    end_slopes = (right_slope(low), demand)

    def lowest_segment() -> tuple[float, float, float, int]:
        """The lower model's least value, where, the width of its segment and the segment; tangents
        not computed yet count as unknown (the chords are weaker, still below G)."""
        lowest, probe, width, segment = math.inf, math.nan, 0.0, 0
        for i in range(len(caps) - 1):
            x0, x1 = caps[i], caps[i + 1]
            s_left = slopes.get((x0, 1), math.nan)
            if not math.isfinite(s_left):
                s_left = end_slopes[0] if i == 0 else (values[i] - values[i - 1]) / (caps[i] - caps[i - 1])
            last = i + 2 == len(caps)
            s_right = end_slopes[1] if last else slopes.get((x1, -1), math.nan)
            if not math.isfinite(s_right):
                # The chord to the right neighbour, unless that is the bound's line (not a value of G).
                beyond = virtual and i + 3 == len(caps)
                s_right = demand if beyond else (values[i + 2] - values[i + 1]) / (caps[i + 2] - caps[i + 1])
            # Lines through (x0, values[i]) with s_left and (x1, values[i + 1]) with s_right.
            x = x0
            if s_left < s_right:
                x = (values[i + 1] - values[i] + s_left * x0 - s_right * x1) / (s_left - s_right)
            x = min(max(x, x0), x1)
            floor = max(values[i] + s_left * (x - x0), values[i + 1] + s_right * (x - x1))
            if floor < lowest:
                lowest, probe, width, segment = floor, x, x1 - x0, i
                probe = min(max(probe, x0 + CAP_RESOLUTION_KW), x1 - CAP_RESOLUTION_KW)
        return lowest, probe, width, segment

    for _ in range(MAX_CAP_PROBES):
        # Tangents (a DP each) only for the segment where the model is least, until that one has its
        # own: a segment whose chords already keep it above the least needs none.
        while True:
            lowest, probe, width, i = lowest_segment()
            wanted = [(caps[i], 1)] + ([] if i + 2 == len(caps) else [(caps[i + 1], -1)])
            missing = [(cap, side) for cap, side in wanted if (cap, side) not in slopes]
            if not missing:
                break
            for cap, side in missing:
                tangent(cap, side)
        upper = min(values[:-1]) if virtual else min(values)
        if upper - lowest <= CAP_SEARCH_REL_GAP * max(1.0, abs(lowest)) or width <= 2 * CAP_RESOLUTION_KW:
            break  # the best probe is proven optimal (or the bracket is as narrow as the search goes)
        at = bisect.bisect(caps, probe)
        caps.insert(at, probe)
        values.insert(at, g(probe))
        if virtual and at + 2 == len(caps):
            # A probe next to the right end: the bound's line at its car values too (one DP), the higher.
            line = max(line, _lower_bound_at(s, a, pool, math.inf, prices[probe]))
            values[-1] = line + demand * (top - floor_kw)
    assert best is not None
    return best


def _meeting_bound(
    s: Scenario, a: _Arrays, pool: _PlanPool, c: _Candidate, cap_kw: float, *, floor_kw: float, price: FloatArray
) -> float:
    """A lower bound on G at cap_kw that meets the plan there (nan where none does, or where the cap is
    too close to the month's peak for tangents): column generation's Lagrangian bound at the car values
    it found for this cap (the exact DP without cars), a convex function of the cap that lies below G.
    Its chords over CAP_TANGENT_KW each side (_tangent_slope) are G's tangents up to that width."""
    if not math.isfinite(cap_kw) or cap_kw - CAP_TANGENT_KW < floor_kw:
        return math.nan
    # Column generation's own bound is the one at the pool's car values (one DP fewer).
    at = c.lower_bound if s.ev_sessions and math.isfinite(c.lower_bound) else _lower_bound_at(s, a, pool, cap_kw, price)
    if not abs(_capped_cost(s, c, cap_kw) - at) <= CAP_SEARCH_REL_GAP * 1e-2 * max(1.0, abs(at)):
        return math.nan  # the bound does not meet the plan (a car's minimum power, a cost that is not convex)
    return at


def _tangent_slope(
    s: Scenario, a: _Arrays, pool: _PlanPool, cap_kw: float, *, at: float, side: int, price: FloatArray
) -> float:
    """G's slope left (side -1) or right (+1) of cap_kw, from the bound `at` that meets the plan there."""
    other = _lower_bound_at(s, a, pool, cap_kw + side * CAP_TANGENT_KW, price)
    return side * (other - at) / CAP_TANGENT_KW + s.grid.demand_charge_cny_per_kw


def _lower_bound_at(s: Scenario, a: _Arrays, pool: _PlanPool, cap_kw: float, price: FloatArray) -> float:
    """A lower bound on the cost under an import cap as the DP counts it (penalty above the cap, no
    demand charge): column generation's Lagrangian bound at these car values (CNY/kWh), or without
    cars the exact DP; nan without a battery or where the DP cannot price."""
    b = s.battery
    if b is None or a.n_levels <= 1:
        return math.nan
    import_cap = np.minimum(a.import_limit, cap_kw)
    d_max = b.max_discharge_kw * a.dt_h / b.discharge_efficiency
    c_max = b.max_charge_kw * a.dt_h * b.charge_efficiency
    e_min, e_max = b.soc_min * b.capacity_kwh, b.soc_max * b.capacity_kwh
    e_start = a.e_low_kwh + a.start_level * a.level_kwh
    if s.ev_sessions:
        bound = k.priced_lower_bound(
            a.base, a.price_import, a.price_export, import_cap, a.export_cap, a.curtail_max, a.dt_h,
            b.charge_efficiency, b.discharge_efficiency, b.wear_cost_cny_per_kwh, d_max, c_max, e_min, e_max, e_start,
            a.final_min_kwh, pool.arrival, pool.departure, pool.max_kw, pool.need_kwh, price,
        )  # fmt: skip
        return float(bound)
    energy, marginal = np.empty(s.steps + 1), np.empty(s.steps)
    cost = k.battery_pwl(
        a.base, a.price_import, a.price_export, import_cap, a.export_cap, a.curtail_max, a.dt_h, e_min, e_max,
        e_start, d_max, c_max, b.charge_efficiency, b.discharge_efficiency, b.wear_cost_cny_per_kwh,
        a.final_min_kwh, energy, marginal, k.COST_ONLY,
    )  # fmt: skip
    return float(cost)


def _least_holdable_caps_kw(s: Scenario, a: _Arrays, floor_kw: float) -> tuple[float, float]:
    """The least import caps from floor_kw up that the battery alone holds at every step, without cars
    or export limit: without and with the final SoC (floor_kw where the search may not start higher).

    No plan holds a cap below the first (a relaxation). Below it, lowering the cap by x kW adds at
    least penalty x dt to any plan's cost (some step imports above it) while the demand charge saves x
    times the charge: with the charge below penalty x dt, the best cap is not lower. The second is
    where holding the cap stops costing the final SoC; the search checks that the cost falls up to it.
    """
    if s.grid.demand_charge_cny_per_kw >= k.PENALTY_CNY_PER_KWH * a.dt_h:
        return floor_kw, floor_kw
    b = s.battery
    if b is None or a.n_levels <= 1:
        peak = max(float(a.base.max()), floor_kw)
        return peak, peak
    e_min, e_max = b.soc_min * b.capacity_kwh, b.soc_max * b.capacity_kwh
    e_start = a.e_low_kwh + a.start_level * a.level_kwh
    battery = (e_min, e_max, e_start, b.max_charge_kw, b.max_discharge_kw, b.charge_efficiency, b.discharge_efficiency)
    start = float(k.least_holdable_cap_kw(a.base, a.dt_h, *battery, a.final_min_kwh, floor_kw))
    if start <= floor_kw:
        return floor_kw, floor_kw  # the usual case: the battery holds the month's peak (one pass)
    return float(k.least_holdable_cap_kw(a.base, a.dt_h, *battery, e_min, floor_kw)), start


def _raising_cap_cannot_pay(s: Scenario, a: _Arrays, c: _Candidate, cap_kw: float) -> bool:
    """Whether a bound proves that raising the import cap above cap_kw saves less than its demand charge.

    Raising the cap helps only at steps importing at the cap, by the dual of that limit: what one more
    kWh there is worth minus its price. While the plan pays no penalty, a kWh is worth at most the
    dearest price of the horizon (it displaces an import or is exported), or what it spares the
    battery (a discharge that costs its losses to recharge: see cap_saving_bound), so the saving per kW
    is at most dt * sum over those steps of (that worth - price). The LP's cost is convex in the cap,
    so if that is below the demand charge per kW, no higher cap pays.
    """
    if _final_shortfall(s, a, c.battery) > 1e-9 or (c.ev.sum(axis=1) * a.dt_h < a.need_kwh - 1e-6).any():
        return False
    b = s.battery
    losses = (1.0, 1.0, 0.0) if b is None else (b.charge_efficiency, b.discharge_efficiency, b.wear_cost_cny_per_kwh)
    saving = k.cap_saving_bound(
        c.net_kw, a.price_import, a.price_export, a.import_limit, a.export_cap, a.curtail_max, a.dt_h, cap_kw, *losses
    )
    return saving < s.grid.demand_charge_cny_per_kw


def _plan(s: Scenario, a: _Arrays, c: _Candidate, notes: list[str], elapsed_s: float) -> Plan:
    dt = a.dt_h
    grid_import, exported, curtailed = np.empty(s.steps), np.empty(s.steps), np.empty(s.steps)
    totals = np.empty(k.FLOW_TOTALS)
    energy_cost = k.grid_flows(
        c.net_kw, a.price_import, a.price_export, a.import_limit, a.export_cap, a.curtail_max, dt, grid_import,
        exported, curtailed, totals,
    )  # fmt: skip
    import_kwh, export_kwh, curtailed_kwh, peak, import_excess, export_excess = totals.tolist()
    wear = 0.0 if s.battery is None else s.battery.wear_cost_cny_per_kwh * float(np.abs(c.battery.kw).sum()) * dt
    demand = s.grid.demand_charge_cny_per_kw * max(0.0, peak - s.grid.peak_import_so_far_kw)
    broken = max(import_excess, export_excess) > _LIMIT_TOLERANCE_KW
    violations = _violations(s, a, grid_import, exported) if broken else []
    shortfalls = _ev_shortfalls(s, a, c.ev)
    soc = np.full(s.steps + 1, math.nan)
    final_short = 0.0
    if s.battery is not None and a.n_levels > 1:
        soc = c.battery.energy_kwh / s.battery.capacity_kwh
        final_short = _final_shortfall(s, a, c.battery)
        if final_short > 1e-6:
            notes.append(
                f"final SoC {soc[-1]:.3f} is below soc_final_min {s.battery.soc_final_min}: "
                "the battery's power limits or the site's needs do not allow more"
            )
    elif s.battery is not None:
        soc = np.full(s.steps + 1, s.battery.soc_initial)
    return Plan(
        step_minutes=s.step_minutes,
        battery_kw=c.battery.kw,
        ev_kw=_ev_by_charger(s, c.ev),
        curtail_kw=curtailed,
        grid_import_kw=grid_import,
        grid_export_kw=exported,
        soc=soc,
        cost_cny=energy_cost + wear + demand,
        energy_cost_cny=energy_cost,
        demand_charge_cny=demand,
        wear_cost_cny=wear,
        import_kwh=import_kwh,
        export_kwh=export_kwh,
        curtailed_kwh=curtailed_kwh,
        peak_import_kw=peak,
        co2_kg=import_kwh * s.carbon_kg_per_kwh,
        ev_shortfalls=shortfalls,
        final_soc_shortfall_kwh=final_short,
        limit_violations=violations,
        notes=notes,
        solve_time_s=elapsed_s,
        gap_bound=c.gap_bound,
    )


def _ev_by_charger(s: Scenario, ev: FloatArray) -> dict[str, FloatArray]:
    """Each session's kW by its charger's name (`name#i` for a charger with several sessions)."""
    names = [x.charger for x in s.ev_sessions]
    repeated = {name for name in names if names.count(name) > 1} if len(set(names)) < len(names) else set()
    return {name + (f"#{i}" if name in repeated else ""): ev[i] for i, name in enumerate(names)}


def _violations(s: Scenario, a: _Arrays, grid_import: FloatArray, exported: FloatArray) -> list[str]:
    found: list[str] = []
    tolerance = _LIMIT_TOLERANCE_KW
    for t in np.flatnonzero(grid_import > a.import_limit + tolerance)[:5]:
        found.append(f"step {t}: import {grid_import[t]:.2f} kW above the limit {a.import_limit[t]:.2f} kW")
    for t in np.flatnonzero(exported > a.export_cap + tolerance)[:5]:
        why = "" if s.pv_curtailable else " (PV is not curtailable)"
        found.append(f"step {t}: export {exported[t]:.2f} kW above the limit {a.export_cap[t]:.2f} kW{why}")
    return found


def _ev_shortfalls(s: Scenario, a: _Arrays, ev: FloatArray) -> list[EvShortfall]:
    out: list[EvShortfall] = []
    delivered_kwh = ev.sum(axis=1) * a.dt_h
    for i, session in enumerate(s.ev_sessions):
        delivered = float(delivered_kwh[i])
        if delivered >= session.energy_kwh - 1e-6:
            continue
        window = session.departure_step - session.arrival_step
        most = session.max_kw * window * a.dt_h
        if most < session.energy_kwh - 1e-6:
            reason = f"the window allows at most {most:.2f} kWh at {session.max_kw} kW over {window} steps"
        else:
            reason = "the import limit leaves no room to charge more in the window"
        out.append(EvShortfall(session.charger, session.energy_kwh, delivered, reason))
    return out


def solve_scenario(scenario: str | Path | dict[str, Any] | Scenario) -> Plan:
    """Plan a scenario given as a JSON file path, a dict or a Scenario (ScenarioError if invalid)."""
    return solve(load_scenario(scenario))
