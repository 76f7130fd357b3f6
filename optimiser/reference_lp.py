"""The same planning problem solved with HiGHS: the oracle for tests and the benchmark. A
development dependency (highspy), never used by the controller.

`solve_lp` is the linear programme. It is the exact optimum only where the planner's problem is
convex; it relaxes three rules the site keeps:

- the grid meter sees one direction per step: the LP may import and export in the same step, which
  pays wherever export is worth more than import (a paid export above the valley price);
- the battery charges or discharges in a step: the LP may do both, which pays only where wasting
  energy pays (a negative price, PV that cannot be curtailed);
- a car with a minimum power is off or at least min_kw: the LP lets it charge anywhere in 0..max.

`solve_exact` adds a binary per step for each rule that can matter (the import/export direction at
steps where export pays more than import, the battery's direction where wasting energy could pay, a
car's on/off where it has a minimum power) and solves the MIP to optimality; without such a step it
is the LP. Either way a lower bound on any plan, and the optimum the planner is measured against.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import highspy
import numpy as np
import numpy.typing as npt

from optimiser._kernels import PENALTY_CNY_PER_KWH
from optimiser._scenario import Scenario

__all__ = ["LpResult", "exact_binaries", "solve_exact", "solve_lp"]

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class LpResult:
    cost_cny: float  # real money: energy + wear + demand charge increment (no penalties)
    objective: float  # with the penalties of unmet EV energy and final SoC, as the planner counts them
    build_s: float
    solve_s: float
    battery_kw: FloatArray
    grid_import_kw: FloatArray
    grid_export_kw: FloatArray
    ev_unmet_kwh: FloatArray
    binaries: int = 0  # 0: the LP (exact where nothing it relaxes matters), else a MIP with this many


# The MIP is solved to this relative gap: "exact" for a planner measured at 0.1 %.
MIP_REL_GAP = 1e-7


class _Builder:
    def __init__(self) -> None:
        self.cost: list[float] = []
        self.lower: list[float] = []
        self.upper: list[float] = []
        self.starts: list[int] = [0]
        self.index: list[int] = []
        self.value: list[float] = []
        self.row_lower: list[float] = []
        self.row_upper: list[float] = []

        self.integer: list[int] = []

    def var(self, cost: float, lower: float, upper: float) -> int:
        self.cost.append(cost)
        self.lower.append(lower)
        self.upper.append(upper)
        return len(self.cost) - 1

    def binary(self) -> int:
        self.integer.append(self.var(0.0, 0.0, 1.0))
        return self.integer[-1]

    def row(self, terms: list[tuple[int, float]], lower: float, upper: float) -> None:
        for col, coef in terms:
            self.index.append(col)
            self.value.append(coef)
        self.starts.append(len(self.index))
        self.row_lower.append(lower)
        self.row_upper.append(upper)

    def model(self) -> highspy.HighsLp:
        lp = highspy.HighsLp()
        lp.num_col_ = len(self.cost)
        lp.num_row_ = len(self.row_lower)
        lp.col_cost_ = np.asarray(self.cost)
        lp.col_lower_ = np.asarray(self.lower)
        lp.col_upper_ = np.asarray(self.upper)
        lp.row_lower_ = np.asarray(self.row_lower)
        lp.row_upper_ = np.asarray(self.row_upper)
        lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
        lp.a_matrix_.start_ = np.asarray(self.starts, dtype=np.int32)
        lp.a_matrix_.index_ = np.asarray(self.index, dtype=np.int32)
        lp.a_matrix_.value_ = np.asarray(self.value)
        if self.integer:
            kinds = np.zeros(len(self.cost), dtype=np.int8)
            kinds[self.integer] = 1
            lp.integrality_ = [highspy.HighsVarType.kInteger if x else highspy.HighsVarType.kContinuous for x in kinds]
        return lp


def exact_binaries(s: Scenario) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Where the LP relaxes a rule that can matter: steps needing the grid's direction, steps needing
    the battery's, and (session, step) pairs of cars with a minimum power."""
    prices_export = s.export_prices()
    grid = []
    if s.grid.export_limit_kw > 0:
        grid = [t for t in range(s.steps) if prices_export[t] > s.price_import_cny_per_kwh[t]]
    battery: list[int] = []
    if s.battery is not None:
        # Charging and discharging at once only wastes energy: it pays where a price is negative or
        # where PV that cannot be curtailed has nowhere else to go.
        wasting_can_pay = not s.pv_curtailable or min(prices_export) < 0 or min(s.price_import_cny_per_kwh) < 0
        battery = list(range(s.steps)) if wasting_can_pay else []
    cars = [
        (i, t)
        for i, session in enumerate(s.ev_sessions)
        if session.min_kw > 0
        for t in range(session.arrival_step, session.departure_step)
    ]
    return grid, battery, cars


def solve_exact(s: Scenario) -> LpResult:
    """The planner's exact optimum: the LP with a binary for each relaxed rule that can matter (MIP)."""
    return solve_lp(s, exact=True)


def solve_lp(s: Scenario, *, exact: bool = False) -> LpResult:
    """The LP relaxation (`exact`: the MIP that keeps every rule, see the module docstring)."""
    started = time.perf_counter()
    dt = s.dt_h
    inf = highspy.kHighsInf
    steps = s.steps
    prices_export = s.export_prices()
    m = _Builder()
    b = s.battery
    charge_max = b.max_charge_kw if b else 0.0
    discharge_max = b.max_discharge_kw if b else 0.0
    wear = b.wear_cost_cny_per_kwh if b else 0.0
    imp, exp, ch, dis, curt = [], [], [], [], []
    for t in range(steps):
        imp.append(m.var(s.price_import_cny_per_kwh[t] * dt, 0.0, s.grid.import_limit_kw))
        exp.append(m.var(-prices_export[t] * dt, 0.0, s.grid.export_limit_kw))
        ch.append(m.var(wear * dt, 0.0, charge_max))
        dis.append(m.var(wear * dt, 0.0, discharge_max))
        curt.append(m.var(0.0, 0.0, s.pv_kw[t] if s.pv_curtailable else 0.0))
    ev_cols: list[dict[int, int]] = []
    for session in s.ev_sessions:
        ev_cols.append(
            {t: m.var(0.0, 0.0, session.max_kw) for t in range(session.arrival_step, session.departure_step)}
        )
    ev_slack = [m.var(PENALTY_CNY_PER_KWH, 0.0, inf) for _ in s.ev_sessions]
    for t in range(steps):
        terms = [(imp[t], 1.0), (exp[t], -1.0), (curt[t], -1.0), (ch[t], -1.0), (dis[t], 1.0)]
        terms += [(cols[t], -1.0) for cols in ev_cols if t in cols]
        rhs = s.load_kw[t] - s.pv_kw[t]
        m.row(terms, rhs, rhs)
    for i, session in enumerate(s.ev_sessions):
        # Off or at least min_kw: a need below one step at min_kw can only be met by giving a little more.
        over = session.min_kw * dt if exact else 0.0
        need = session.energy_kwh
        m.row([(col, dt) for col in ev_cols[i].values()] + [(ev_slack[i], 1.0)], need, need + over)
    final_slack = None
    if b is not None:
        e_min, e_max = b.soc_min * b.capacity_kwh, b.soc_max * b.capacity_kwh
        e0 = min(max(b.soc_initial * b.capacity_kwh, e_min), e_max)
        energy = [m.var(0.0, e_min, e_max) for _ in range(steps)]
        for t in range(steps):
            terms = [(energy[t], 1.0), (ch[t], -b.charge_efficiency * dt), (dis[t], dt / b.discharge_efficiency)]
            if t == 0:
                m.row(terms, e0, e0)
            else:
                m.row([*terms, (energy[t - 1], -1.0)], 0.0, 0.0)
        final_slack = m.var(PENALTY_CNY_PER_KWH, 0.0, inf)
        m.row([(energy[-1], 1.0), (final_slack, 1.0)], b.soc_final_min * b.capacity_kwh, inf)
    binaries = 0
    if exact:
        binaries = _add_exact_rules(s, m, imp=imp, exp=exp, ch=ch, dis=dis, ev_cols=ev_cols)
    demand = s.grid.demand_charge_cny_per_kw
    if demand > 0:
        peak = m.var(demand, s.grid.peak_import_so_far_kw, inf)
        for t in range(steps):
            m.row([(peak, 1.0), (imp[t], -1.0)], 0.0, inf)
    h = highspy.Highs()  # type: ignore[no-untyped-call]
    h.setOptionValue("output_flag", False)
    if binaries:
        h.setOptionValue("mip_rel_gap", MIP_REL_GAP)
    h.passModel(m.model())
    built = time.perf_counter()
    h.run()
    solved = time.perf_counter()
    status = h.getModelStatus()
    if status != highspy.HighsModelStatus.kOptimal:
        raise RuntimeError(f"HiGHS: {h.modelStatusToString(status)}")
    x = np.asarray(h.getSolution().col_value)
    objective = float(h.getInfo().objective_function_value) - demand * s.grid.peak_import_so_far_kw
    penalties = sum(x[c] for c in ev_slack) * PENALTY_CNY_PER_KWH
    if final_slack is not None:
        penalties += x[final_slack] * PENALTY_CNY_PER_KWH
    return LpResult(
        cost_cny=objective - penalties,
        objective=objective,
        build_s=built - started,
        solve_s=solved - built,
        battery_kw=x[ch] - x[dis],
        grid_import_kw=x[imp],
        grid_export_kw=x[exp],
        ev_unmet_kwh=np.asarray([x[c] for c in ev_slack]),
        binaries=binaries,
    )


def _add_exact_rules(
    s: Scenario, m: _Builder, *, imp: list[int], exp: list[int], ch: list[int], dis: list[int],
    ev_cols: list[dict[int, int]],
) -> int:  # fmt: skip
    """The rules the LP relaxes, as binaries and big-M rows (M: the most the flow can physically be)."""
    grid, battery, cars = exact_binaries(s)
    b = s.battery
    charge_max = b.max_charge_kw if b else 0.0
    discharge_max = b.max_discharge_kw if b else 0.0
    for t in grid:
        cars_kw = sum(x.max_kw for x in s.ev_sessions if x.arrival_step <= t < x.departure_step)
        import_most = min(s.grid.import_limit_kw, s.load_kw[t] + charge_max + cars_kw)
        export_most = min(s.grid.export_limit_kw, s.pv_kw[t] + discharge_max)
        importing = m.binary()
        m.row([(imp[t], 1.0), (importing, -import_most)], -highspy.kHighsInf, 0.0)
        m.row([(exp[t], 1.0), (importing, export_most)], -highspy.kHighsInf, export_most)
    for t in battery:
        charging = m.binary()
        m.row([(ch[t], 1.0), (charging, -charge_max)], -highspy.kHighsInf, 0.0)
        m.row([(dis[t], 1.0), (charging, discharge_max)], -highspy.kHighsInf, discharge_max)
    for i, t in cars:
        on = m.binary()
        session = s.ev_sessions[i]
        m.row([(ev_cols[i][t], 1.0), (on, -session.max_kw)], -highspy.kHighsInf, 0.0)
        m.row([(ev_cols[i][t], 1.0), (on, -session.min_kw)], 0.0, highspy.kHighsInf)
    return len(grid) + len(battery) + len(cars)
