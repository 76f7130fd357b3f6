"""Numba kernels of the dispatch planner. Plain float64/int64 arrays in, results written to `out`
arrays; no validation here (the Python API in `_solve.py` validates and allocates).

The kernels `_solve.py` calls have explicit signatures: importing this module loads them from numba's
cache (compiles them when it is cold). Helpers called only from other kernels are typed by their
callers and linked into them, so a warm process never loads them on their own (faster first plan).

Sign conventions: battery kW > 0 charges (AC side); grid kW > 0 imports; net load excludes the battery.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Cost per kWh of breaking a limit inside the planner. Limits are soft only so that an impossible
# situation still yields the best possible plan (and says what broke); the figure dwarfs any tariff.
PENALTY_CNY_PER_KWH = 1000.0


@njit(cache=True, nogil=True)
def grid_cost(
    grid_kw: float,
    dt_h: float,
    price_import: float,
    price_export: float,
    import_cap_kw: float,
    export_cap_kw: float,
    curtail_max_kw: float,
    penalty: float,
) -> float:
    """Cost of one step at net grid power `grid_kw` (before curtailment), curtailing optimally."""
    if grid_kw >= 0.0:
        over = grid_kw - import_cap_kw
        cost = price_import * grid_kw * dt_h
        if over > 0.0:
            cost += penalty * over * dt_h
        return cost
    surplus = -grid_kw
    if price_export >= 0.0:
        exported = min(surplus, export_cap_kw)
        curtailed = surplus - exported
        over = curtailed - curtail_max_kw  # surplus that can neither be exported nor curtailed
        cost = -price_export * exported * dt_h
    else:
        curtailed = min(surplus, curtail_max_kw)  # a negative price: curtail rather than pay
        exported = surplus - curtailed
        over = exported - export_cap_kw
        cost = -price_export * exported * dt_h
    if over > 0.0:
        cost += penalty * over * dt_h
    return cost


@njit(cache=True, nogil=True)
def battery_kw_for(delta_kwh: float, dt_h: float, eta_charge: float, eta_discharge: float) -> float:
    """AC power that changes the stored energy by `delta_kwh` in one step."""
    if delta_kwh >= 0.0:
        return delta_kwh / (eta_charge * dt_h)
    return delta_kwh * eta_discharge / dt_h


@njit(cache=True, nogil=True)
def _step_costs(
    t: int,
    k_discharge: int,
    k_charge: int,
    level_kwh: float,
    net_kw: np.ndarray,
    price_import: np.ndarray,
    price_export: np.ndarray,
    import_cap_kw: np.ndarray,
    export_cap_kw: np.ndarray,
    curtail_max_kw: np.ndarray,
    dt_h: float,
    eta_charge: float,
    eta_discharge: float,
    wear_cny_per_kwh: float,
    out: np.ndarray,
) -> bool:
    """out[j] = cost of moving (j - k_discharge) levels; returns whether it is discretely convex."""
    n = k_discharge + k_charge + 1
    for j in range(n):
        delta = (j - k_discharge) * level_kwh
        battery = battery_kw_for(delta, dt_h, eta_charge, eta_discharge)
        out[j] = (
            grid_cost(
                net_kw[t] + battery,
                dt_h,
                price_import[t],
                price_export[t],
                import_cap_kw[t],
                export_cap_kw[t],
                curtail_max_kw[t],
                PENALTY_CNY_PER_KWH,
            )
            + wear_cny_per_kwh * abs(battery) * dt_h
        )
    convex = True
    for j in range(1, n - 1):
        if out[j + 1] - out[j] < out[j] - out[j - 1] - 1e-9:
            convex = False
            break
    return convex


@njit(cache=True, nogil=True)
def _final_values(n_levels: int, level_kwh: float, e_low_kwh: float, final_min_kwh: float, out: np.ndarray) -> None:
    for i in range(n_levels):
        short = final_min_kwh - (e_low_kwh + i * level_kwh)
        out[i] = PENALTY_CNY_PER_KWH * short if short > 1e-9 else 0.0


@njit(cache=True, nogil=True)
def _merge_step(v_next: np.ndarray, f: np.ndarray, k_charge: int, v_out: np.ndarray) -> None:
    """v_out[E] = min_d f[d + k_discharge] + v_next[E + d]: an infimal convolution of two convex
    sequences, computed by merging their slope sequences (Minkowski sum of epigraphs) in O(N + K).

    With u = -d the convolution h(z) = min_{y+u=z} v_next(y) + f~(u) starts at z = -k_charge with value
    v_next(0) + f~(-k_charge) = v_next(0) + f[last]; its slopes are the sorted union of both slope lists.
    """
    n = v_next.shape[0]
    k = f.shape[0]
    # f~(u) for u = -k_charge .. k_discharge is f read backwards.
    value = v_next[0] + f[k - 1]
    i = 0  # next slope of v_next
    j = 0  # next slope of f~
    z = -k_charge
    if z >= 0:
        v_out[z] = value
    while z < n - 1:
        take_v = False
        if i < n - 1 and j < k - 1:
            sv = v_next[i + 1] - v_next[i]
            sf = f[k - 2 - j] - f[k - 1 - j]
            take_v = sv <= sf
        elif i < n - 1:
            take_v = True
        elif j >= k - 1:
            break
        if take_v:
            value += v_next[i + 1] - v_next[i]
            i += 1
        else:
            value += f[k - 2 - j] - f[k - 1 - j]
            j += 1
        z += 1
        if z >= 0:
            v_out[z] = value


@njit(cache=True, nogil=True)
def _brute_step(v_next: np.ndarray, f: np.ndarray, k_discharge: int, v_out: np.ndarray) -> None:
    n = v_next.shape[0]
    k = f.shape[0]
    for e in range(n):
        best = np.inf
        for j in range(k):
            target = e + j - k_discharge
            if 0 <= target < n:
                candidate = f[j] + v_next[target]
                best = min(best, candidate)
        v_out[e] = best


@njit(
    "f8(f8[:], f8[:], f8[:], f8[:], f8[:], f8[:], f8, f8, i8, i8, f8, i8, i8, f8, f8, f8, f8, b1, i8[:])",
    cache=True,
    nogil=True,
)
def battery_dp(
    net_kw: np.ndarray,
    price_import: np.ndarray,
    price_export: np.ndarray,
    import_cap_kw: np.ndarray,
    export_cap_kw: np.ndarray,
    curtail_max_kw: np.ndarray,
    dt_h: float,
    level_kwh: float,
    n_levels: int,
    start_level: int,
    e_low_kwh: float,
    k_discharge: int,
    k_charge: int,
    eta_charge: float,
    eta_discharge: float,
    wear_cny_per_kwh: float,
    final_min_kwh: float,
    force_brute: bool,
    out_levels: np.ndarray,
) -> float:
    """Optimal battery trajectory on the energy grid; writes level indices (T+1) and returns the cost.

    Level i stores e_low_kwh + i * level_kwh. The slope-merging step is used when every step cost
    is convex (the common case); otherwise, or when `force_brute`, the O(N*K) minimisation.
    """
    steps = net_kw.shape[0]
    k = k_discharge + k_charge + 1
    values = np.empty((steps + 1, n_levels))
    f = np.empty(k)
    _final_values(n_levels, level_kwh, e_low_kwh, final_min_kwh, values[steps])
    # Backward. Once a step is not convex, V_t may not be either: that step and all earlier ones are
    # minimised by brute force. The later ones merged exactly, since their inputs were all convex.
    brute = force_brute
    for t in range(steps - 1, -1, -1):
        convex = _step_costs(
            t, k_discharge, k_charge, level_kwh, net_kw, price_import, price_export,
            import_cap_kw, export_cap_kw, curtail_max_kw, dt_h, eta_charge, eta_discharge,
            wear_cny_per_kwh, f,
        )  # fmt: skip
        brute = brute or not convex
        if brute:
            _brute_step(values[t + 1], f, k_discharge, values[t])
        else:
            _merge_step(values[t + 1], f, k_charge, values[t])
    # Forward: follow the argmin from the start level.
    level = start_level
    out_levels[0] = level
    for t in range(steps):
        _step_costs(
            t, k_discharge, k_charge, level_kwh, net_kw, price_import, price_export,
            import_cap_kw, export_cap_kw, curtail_max_kw, dt_h, eta_charge, eta_discharge,
            wear_cny_per_kwh, f,
        )  # fmt: skip
        best = np.inf
        best_level = level
        for j in range(k):
            target = level + j - k_discharge
            if 0 <= target < n_levels:
                candidate = f[j] + values[t + 1, target]
                # Prefer the smaller move on ties: no cycling the battery for nothing.
                if candidate < best - 1e-12 or (
                    abs(candidate - best) <= 1e-12 and abs(target - level) < abs(best_level - level)
                ):
                    best = candidate
                    best_level = target
        level = best_level
        out_levels[t + 1] = level
    return float(values[0, start_level])


@njit(cache=True, nogil=True)
def _ev_chunk(
    t: int, base_kw: np.ndarray, out_kw: np.ndarray, price_import: np.ndarray, price_export: np.ndarray,
    import_cap_kw: np.ndarray, export_cap_kw: np.ndarray, curtail_max_kw: np.ndarray, battery_cny_per_kwh: np.ndarray,
    battery_room_kw: np.ndarray, contest_kw: np.ndarray, contest_cny_per_kwh: np.ndarray, dt_h: float,
    min_kw: float, max_kw: float, chunk_kwh: float,
) -> tuple[float, float, float]:  # fmt: skip
    """(cost per kWh, kWh, 1.0 if served through the battery) of the next chunk at step t; inf when full.

    A chunk is served from the grid (priced by the step's grid cost) or, while the battery has
    headroom at t, through the battery at its shadow price; the battery DP re-plans afterwards.
    """
    room = (max_kw - out_kw[t]) * dt_h
    if room <= 1e-12:
        return np.inf, 0.0, 0.0
    before = base_kw[t] + out_kw[t]
    # The grid cost is linear between its kinks: a chunk may run to the next kink at one price.
    to_kink = np.inf
    if price_export[t] >= 0.0:
        kinks = (-(export_cap_kw[t] + curtail_max_kw[t]), -export_cap_kw[t], 0.0, import_cap_kw[t])
    else:
        kinks = (-(export_cap_kw[t] + curtail_max_kw[t]), -curtail_max_kw[t], 0.0, import_cap_kw[t])
    for g in kinks:
        if g > before + 1e-9:
            to_kink = min(to_kink, (g - before) * dt_h)
    contested = (contest_kw[t] - out_kw[t]) * dt_h
    add = min(chunk_kwh, room, to_kink)
    if contested > 1e-12:
        add = min(add, contested)  # the contested part is priced on its own
    if out_kw[t] == 0.0 and add < min_kw * dt_h:
        add = min(min_kw * dt_h, room)
    after = before + add / dt_h
    cost_after = grid_cost(
        after, dt_h, price_import[t], price_export[t], import_cap_kw[t], export_cap_kw[t], curtail_max_kw[t],
        PENALTY_CNY_PER_KWH,
    )  # fmt: skip
    cost_before = grid_cost(
        before, dt_h, price_import[t], price_export[t], import_cap_kw[t], export_cap_kw[t], curtail_max_kw[t],
        PENALTY_CNY_PER_KWH,
    )  # fmt: skip
    grid_unit = (cost_after - cost_before) / add
    if contested > 1e-12:
        grid_unit = max(grid_unit, contest_cny_per_kwh[t])
    through_battery = min(add, battery_room_kw[t] * dt_h)
    # A first chunk smaller than min_kw cannot go through the battery alone: keep the rule simple.
    if through_battery > 1e-9 and battery_cny_per_kwh[t] < grid_unit - 1e-12 and (out_kw[t] > 0.0 or min_kw == 0.0):
        return battery_cny_per_kwh[t], through_battery, 1.0
    return grid_unit, add, 0.0


@njit(
    "f8(f8[:], f8[:], f8[:], f8[:], f8[:], f8[:], f8[:], f8[:], f8[:], f8[:], f8, i8, i8, f8, f8, f8, f8, f8[:])",
    cache=True,
    nogil=True,
)
def fill_ev(
    base_kw: np.ndarray,
    price_import: np.ndarray,
    price_export: np.ndarray,
    import_cap_kw: np.ndarray,
    export_cap_kw: np.ndarray,
    curtail_max_kw: np.ndarray,
    battery_cny_per_kwh: np.ndarray,
    battery_room_kw: np.ndarray,
    contest_kw: np.ndarray,
    contest_cny_per_kwh: np.ndarray,
    dt_h: float,
    arrival: int,
    departure: int,
    energy_kwh: float,
    min_kw: float,
    max_kw: float,
    chunk_kwh: float,
    out_kw: np.ndarray,
) -> float:
    """Water-fill one EV's energy into its window, each chunk where it adds the least cost.

    `base_kw` is the net grid power without this EV. `battery_cny_per_kwh` and `battery_room_kw`
    offer serving load through the battery at its shadow price (the room is used up in place);
    the first `contest_kw` of load at a step cost at least `contest_cny_per_kwh` (room the battery
    would take if the car left it).
    A step used at all gets at least `min_kw`. Writes kW per step into out_kw (zeroed first) and
    returns the energy not delivered.
    """
    steps = base_kw.shape[0]
    for t in range(steps):
        out_kw[t] = 0.0
    # Price, size and route of the next chunk per step; only the step that just received a chunk
    # changes, so only it is recomputed.
    unit = np.full(steps, np.inf)
    size = np.zeros(steps)
    route = np.zeros(steps)
    remaining = energy_kwh
    for t in range(arrival, departure):
        unit[t], size[t], route[t] = _ev_chunk(
            t, base_kw, out_kw, price_import, price_export, import_cap_kw, export_cap_kw, curtail_max_kw,
            battery_cny_per_kwh, battery_room_kw, contest_kw, contest_cny_per_kwh, dt_h, min_kw, max_kw, chunk_kwh,
        )  # fmt: skip
    while remaining > 1e-9:
        best_t = -1
        best_cost = np.inf
        for t in range(arrival, departure):
            # Ties go to the earliest step: charge early, in case the car leaves early.
            if unit[t] < best_cost - 1e-12:
                best_cost = unit[t]
                best_t = t
        if best_t < 0:
            break
        add = min(size[best_t], remaining)
        if out_kw[best_t] == 0.0 and add < min_kw * dt_h:
            add = min(min_kw * dt_h, (max_kw - out_kw[best_t]) * dt_h)
        out_kw[best_t] += add / dt_h
        if route[best_t] > 0.0:
            battery_room_kw[best_t] = max(0.0, battery_room_kw[best_t] - add / dt_h)
        remaining -= add
        unit[best_t], size[best_t], route[best_t] = _ev_chunk(
            best_t, base_kw, out_kw, price_import, price_export, import_cap_kw, export_cap_kw, curtail_max_kw,
            battery_cny_per_kwh, battery_room_kw, contest_kw, contest_cny_per_kwh, dt_h, min_kw, max_kw, chunk_kwh,
        )  # fmt: skip
    return max(remaining, 0.0)


@njit(
    "f8(f8[:], f8[:], f8[:, :], f8[:], f8[:], f8[:], f8[:], f8[:], f8[:], f8, f8, f8, f8, f8[:])",
    cache=True,
    nogil=True,
)
def plan_objective(
    base_kw: np.ndarray, battery_kw: np.ndarray, ev_kw: np.ndarray, need_kwh: np.ndarray, price_import: np.ndarray,
    price_export: np.ndarray, import_limit_kw: np.ndarray, export_cap_kw: np.ndarray, curtail_max_kw: np.ndarray,
    dt_h: float, demand_cny_per_kw: float, peak_floor_kw: float, wear: float, out_net_kw: np.ndarray,
) -> float:  # fmt: skip
    """What a plan costs with every broken limit and unmet car need at the penalty: grid cost, demand
    charge above the month's peak, battery wear. The grid power before curtailment into out_net_kw."""
    total = 0.0
    peak = 0.0
    for t in range(base_kw.shape[0]):
        net = base_kw[t] + battery_kw[t]
        for i in range(ev_kw.shape[0]):
            net += ev_kw[i, t]
        out_net_kw[t] = net
        total += grid_cost(
            net, dt_h, price_import[t], price_export[t], import_limit_kw[t], export_cap_kw[t], curtail_max_kw[t],
            PENALTY_CNY_PER_KWH,
        ) + wear * abs(battery_kw[t]) * dt_h  # fmt: skip
        peak = max(peak, net)
    for i in range(ev_kw.shape[0]):
        total += PENALTY_CNY_PER_KWH * max(0.0, need_kwh[i] - ev_kw[i].sum() * dt_h)
    return total + demand_cny_per_kw * max(0.0, peak - peak_floor_kw)


# --- exact piecewise-linear DP ---------------------------------------------------------------------
#
# The same slope-sequence merge as battery_dp, on exact piecewise-linear convex functions instead of a
# grid: a function on [lo, hi] is a start value and (slope, length) segments with non-decreasing
# slopes. Step costs are piecewise linear in the energy change with at most eight kinks (import/
# export/curtailment thresholds, the efficiency and wear kink at zero), so each value function has few
# segments and the infimal convolution is a merge of two short sorted lists. No quantisation.

_SLOPE_EPS = 1e-12
# Kinks of one step cost without cars: both ends, zero, four grid thresholds.
_KINKS = 8


@njit(cache=True, nogil=True)
def _step_cost_at(
    delta: float, net: float, dt_h: float, p_imp: float, p_exp: float, imp_cap: float, exp_cap: float,
    curt_max: float, eta_c: float, eta_d: float, wear: float, penalty: float,
) -> float:  # fmt: skip
    battery = battery_kw_for(delta, dt_h, eta_c, eta_d)
    return (
        grid_cost(net + battery, dt_h, p_imp, p_exp, imp_cap, exp_cap, curt_max, penalty) + wear * abs(battery) * dt_h
    )


@njit(cache=True, nogil=True)
def _energy_kinks(
    grid_kinks_kw: np.ndarray, count: int, net: float, dt_h: float, eta_c: float, eta_d: float, d_max: float,
    c_max: float, out_delta: np.ndarray,
) -> int:  # fmt: skip
    """The stored-energy changes where a step cost can kink: both ends, zero, and where the grid
    power (net + battery) reaches one of grid_kinks_kw[:count]. Sorted, deduplicated; returns how many."""
    n = 0
    for j in range(count + 3):
        if j == 0:
            d = -d_max
        elif j == 1:
            d = c_max
        elif j == 2:
            d = 0.0
        else:
            b = grid_kinks_kw[j - 3] - net
            d = b * eta_c * dt_h if b >= 0.0 else b * dt_h / eta_d
            if not -d_max < d < c_max:
                continue
        k = n
        while k > 0 and out_delta[k - 1] > d:
            out_delta[k] = out_delta[k - 1]
            k -= 1
        out_delta[k] = d
        n += 1
    m = 0
    for j in range(n):
        if m > 0 and out_delta[j] - out_delta[m - 1] <= 1e-9:  # the same kink from two sources, up to rounding
            continue
        out_delta[m] = out_delta[j]
        m += 1
    return m


@njit(cache=True, nogil=True)
def _step_breakpoints(
    net: float, dt_h: float, p_imp: float, p_exp: float, imp_cap: float, exp_cap: float, curt_max: float,
    eta_c: float, eta_d: float, wear: float, d_max: float, c_max: float,
    out_delta: np.ndarray, out_value: np.ndarray, kinks: np.ndarray,
) -> int:  # fmt: skip
    """Kinks of the step cost in the energy change, sorted, with values; returns how many.
    `kinks`: scratch room for the four grid kinks."""
    kinks[0], kinks[1], kinks[2] = 0.0, imp_cap, -exp_cap if p_exp >= 0.0 else -curt_max
    kinks[3] = -(exp_cap + curt_max)
    m = _energy_kinks(kinks, 4, net, dt_h, eta_c, eta_d, d_max, c_max, out_delta)
    for i in range(m):
        out_value[i] = _step_cost_at(out_delta[i], net, dt_h, p_imp, p_exp, imp_cap, exp_cap, curt_max, eta_c,
                                     eta_d, wear, PENALTY_CNY_PER_KWH)  # fmt: skip
    return m


@njit(cache=True, nogil=True)
def _pwl_value(xs: np.ndarray, ys: np.ndarray, start: int, stop: int, x: float) -> float:
    """Value at x of the function with breakpoints xs/ys[start:stop] (clamped to its domain)."""
    if x <= xs[start]:
        return float(ys[start])
    if x >= xs[stop - 1]:
        return float(ys[stop - 1])
    lo, hi = start, stop - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if xs[mid] <= x:
            lo = mid
        else:
            hi = mid
    w = (x - xs[lo]) / (xs[hi] - xs[lo])
    return float(ys[lo] + w * (ys[hi] - ys[lo]))


@njit(cache=True, nogil=True)
def _left_slope_cost(xs: np.ndarray, ys: np.ndarray, start: int, stop: int, x: float) -> float:
    """-(dV/dE) just left of x: the future cost of one kWh less in store; inf at the domain start."""
    if x <= xs[start] + 1e-9:
        return np.inf
    j = start
    while j + 1 < stop - 1 and xs[j + 1] < x - 1e-9:
        j += 1
    return float(-(ys[j + 1] - ys[j]) / (xs[j + 1] - xs[j]))


@njit(cache=True, nogil=True)
def step_tables(
    net_kw: np.ndarray, price_import: np.ndarray, price_export: np.ndarray, import_cap_kw: np.ndarray,
    export_cap_kw: np.ndarray, curtail_max_kw: np.ndarray, dt_h: float, eta_c: float, eta_d: float, wear: float,
    d_max: float, c_max: float, out_delta: np.ndarray, out_value: np.ndarray, out_count: np.ndarray,
) -> None:  # fmt: skip
    """Each step's cost as a function of the stored-energy change: its kinks (row t, sorted) and values."""
    kinks = np.empty(4)
    for t in range(net_kw.shape[0]):
        out_count[t] = _step_breakpoints(net_kw[t], dt_h, price_import[t], price_export[t], import_cap_kw[t],
                                         export_cap_kw[t], curtail_max_kw[t], eta_c, eta_d, wear, d_max, c_max,
                                         out_delta[t], out_value[t], kinks)  # fmt: skip


# --- non-convex step costs -------------------------------------------------------------------------
#
# Where export pays more than import (a paid export above the valley price), the grid cost has a
# concave kink at zero: the site imports or exports in a step, never both. A piecewise-linear function
# is the minimum of its maximal convex runs (each on its own interval), so the DP step is the lower
# envelope of the slope merges of every run of the step cost with every run of the value function;
# still exact, still no grid. Where everything is convex there is one run each and the plain merge runs.

# What the exact DP computes after its value functions (its `forward` argument): the optimal cost only
# (a bound), also the optimal stored-energy path (a plan), or also each step's shadow price of
# stored energy (for the car placement around it).
COST_ONLY = 0
PATH = 1
PATH_AND_MARGINALS = 2

# Breakpoints of an envelope closer than this (kWh) are one: crossings found from different runs
# differ by rounding, and the sliver between them would read as a kink.
_ENVELOPE_X_TOL = 1e-7
# A value function split into more convex runs than this is left to the grid DP (a guard on time and
# memory: each run is merged with each run of the step cost).
_MAX_RUNS = 256


@njit(cache=True, nogil=True)
def _rounding(value: float) -> float:
    """How far (CNY) a value of this size may be off through rounding in the DP (values carry the
    planner's penalty, up to millions, so an absolute tolerance alone would not do)."""
    return 1e-9 + 1e-10 * abs(value)


@njit(cache=True, nogil=True)
def _convex_runs(xs: np.ndarray, ys: np.ndarray, start: int, stop: int, out_cuts: np.ndarray) -> int:
    """Split breakpoints xs/ys[start:stop] at their concave kinks: run k spans breakpoint indices
    out_cuts[k]..out_cuts[k + 1] (inclusive; neighbours share the kink). Returns the number of runs."""
    n = 0
    out_cuts[0] = start
    prev = -np.inf
    prev_len = 0.0
    for i in range(start, stop - 1):
        length = xs[i + 1] - xs[i]
        if length < _ENVELOPE_X_TOL:
            continue  # a sliver's slope is rounding noise, not a kink
        slope = (ys[i + 1] - ys[i]) / length
        # A kink counts when the value misses the straight line by more than rounding.
        if slope < prev and (prev - slope) * min(length, prev_len) > _rounding(ys[i]):
            n += 1
            out_cuts[n] = i
        prev, prev_len = slope, length
    n += 1
    out_cuts[n] = max(stop - 1, start)
    return n


@njit(cache=True, nogil=True)
def _merge_run(
    fd: np.ndarray, fv: np.ndarray, f0: int, f1: int, xs: np.ndarray, ys: np.ndarray, v0: int, v1: int,
    e_min: float, e_max: float, out_x: np.ndarray, out_y: np.ndarray, at: int,
) -> int:  # fmt: skip
    """h(e) = min_d f(d) + V(e + d) for one convex run of f (breakpoints f0..f1) and of V (v0..v1),
    kept on [e_min, e_max], written from out_x/out_y[at]; returns the end (== at when h is empty there).

    h starts at e = V's start - f's end with value V(start) + f(end); its slopes are V's and f's
    reversed and negated, merged in order."""
    out = at
    x = xs[v0] - fd[f1]
    y = ys[v0] + fv[f1]
    i_v, i_f = v0, f1
    wrote = False
    while True:
        has_v = i_v < v1
        has_f = i_f > f0
        if not has_v and not has_f:
            break
        if has_v and has_f:
            sv = (ys[i_v + 1] - ys[i_v]) / (xs[i_v + 1] - xs[i_v])
            sf = -(fv[i_f - 1] - fv[i_f]) / (fd[i_f - 1] - fd[i_f])
            take_v = sv <= sf
        else:
            take_v = has_v
        if take_v:
            length = xs[i_v + 1] - xs[i_v]
            rise = ys[i_v + 1] - ys[i_v]
            i_v += 1
        else:
            length = fd[i_f] - fd[i_f - 1]
            rise = fv[i_f - 1] - fv[i_f]
            i_f -= 1
        x_next = x + length
        y_next = y + rise
        if x_next > e_min and x < e_max and length > 0.0:
            lo = max(x, e_min)
            hi = min(x_next, e_max)
            if not wrote:
                out_x[out] = lo
                out_y[out] = y + rise * (lo - x) / length
                out += 1
                wrote = True
            if hi - out_x[out - 1] > 1e-12:
                out_x[out] = hi
                out_y[out] = y + rise * (hi - x) / length
                out += 1
        x, y = x_next, y_next
        if x >= e_max:
            break
    if not wrote and e_min - 1e-12 <= x <= e_max + 1e-12 and x - (xs[v0] - fd[f1]) <= 1e-12:
        out_x[out] = min(max(x, e_min), e_max)  # a single point (e_min == e_max, or both runs points)
        out_y[out] = y
        out += 1
    return out


@njit(cache=True, nogil=True)
def _lower_envelope(
    px: np.ndarray, py: np.ndarray, starts: np.ndarray, stops: np.ndarray, count: int, out_x: np.ndarray,
    out_y: np.ndarray,
) -> int:  # fmt: skip
    """Lower envelope of `count` piecewise-linear functions (px/py[starts[k]:stops[k]], each on its own
    interval) into out_x/out_y; returns its number of breakpoints. Between two consecutive breakpoints
    of any function all are linear: the envelope of those lines is walked crossing by crossing."""
    total = 0
    for k in range(count):
        total += stops[k] - starts[k]
    xs = np.empty(total)
    n = 0
    for k in range(count):
        for j in range(starts[k], stops[k]):
            xs[n] = px[j]
            n += 1
    xs.sort()
    m = 0
    for j in range(n):
        if m == 0 or xs[j] - xs[m - 1] > 1e-10:
            xs[m] = xs[j]
            m += 1
    ptr = starts.copy()
    value = np.empty(count)
    slope = np.empty(count)
    covers = np.zeros(count, dtype=np.bool_)
    out = 0
    for u in range(m):
        xa = xs[u]
        last = u == m - 1
        xb = xa if last else xs[u + 1]
        cur = -1
        for k in range(count):
            s, e = starts[k], stops[k]
            covers[k] = False
            if e - s == 1:
                if abs(px[s] - xa) <= 1e-10:
                    covers[k], value[k], slope[k] = True, py[s], 0.0
            elif px[s] <= xa + 1e-10 and px[e - 1] >= xb - 1e-10:
                while ptr[k] + 2 < e and px[ptr[k] + 1] <= xa + 1e-10:
                    ptr[k] += 1
                j = ptr[k]
                slope[k] = (py[j + 1] - py[j]) / (px[j + 1] - px[j])
                value[k] = py[j] + slope[k] * (xa - px[j])
                covers[k] = True
            if covers[k] and (cur < 0 or value[k] < value[cur] - 1e-12
                              or (value[k] <= value[cur] + 1e-12 and slope[k] < slope[cur])):  # fmt: skip
                cur = k
        if cur < 0:
            continue
        out_x[out], out_y[out] = xa, value[cur]
        out += 1
        if last:
            break
        x = xa
        while True:
            nxt = -1
            best_x = xb
            for k in range(count):
                if covers[k] and slope[k] < slope[cur] - 1e-15:
                    xc = xa + (value[k] - value[cur]) / (slope[cur] - slope[k])
                    if x + 1e-10 < xc < best_x - 1e-10:
                        best_x, nxt = xc, k
            if nxt < 0:
                break
            out_x[out], out_y[out] = best_x, value[cur] + slope[cur] * (best_x - xa)
            out += 1
            x, cur = best_x, nxt
    # Drop slivers and the breakpoints where the slope does not change (up to rounding).
    k = 0
    for j in range(out):
        if k >= 1 and out_x[j] - out_x[k - 1] < _ENVELOPE_X_TOL and j < out - 1:
            continue
        if k >= 1 and out_x[j] - out_x[k - 1] < _ENVELOPE_X_TOL:
            k -= 1  # keep the domain's end exactly
        if k >= 2:
            w = (out_x[k - 1] - out_x[k - 2]) / (out_x[j] - out_x[k - 2])
            on_line = out_y[k - 2] + w * (out_y[j] - out_y[k - 2])
            if abs(out_y[k - 1] - on_line) <= _rounding(out_y[k - 1]):
                k -= 1
        out_x[k], out_y[k] = out_x[j], out_y[j]
        k += 1
    return k


@njit(cache=True, nogil=True)
def _nonconvex_step(
    fd: np.ndarray, fv: np.ndarray, m: int, xs: np.ndarray, ys: np.ndarray, a0: int, a1: int, e_min: float,
    e_max: float, f_cuts: np.ndarray, f_runs: int, v_cuts: np.ndarray, v_runs: int,
) -> tuple[np.ndarray, np.ndarray, int]:  # fmt: skip
    """min_d f(d) + V(e + d) for non-convex f or V: the lower envelope of the merges of their runs."""
    pairs = f_runs * v_runs
    room = pairs * (a1 - a0 + m + 4)
    px = np.empty(room)
    py = np.empty(room)
    starts = np.empty(pairs, dtype=np.int64)
    stops = np.empty(pairs, dtype=np.int64)
    count = 0
    at = 0
    for a in range(f_runs):
        for b in range(v_runs):
            end = _merge_run(fd, fv, f_cuts[a], f_cuts[a + 1], xs, ys, v_cuts[b], v_cuts[b + 1], e_min, e_max,
                             px, py, at)  # fmt: skip
            if end > at:
                starts[count], stops[count] = at, end
                count += 1
                at = end
    out_x = np.empty(at * (count + 1) + 2)
    out_y = np.empty(at * (count + 1) + 2)
    n = _lower_envelope(px, py, starts, stops, count, out_x, out_y)
    return out_x, out_y, n


@njit(cache=True, nogil=True)
def _best_move_any(
    fd: np.ndarray, fv: np.ndarray, m: int, xs: np.ndarray, ys: np.ndarray, a0: int, a1: int, energy: float,
    lo: float, hi: float,
) -> float:  # fmt: skip
    """The stored energy after the step: energy + d for the d in [lo, hi] minimising f(d) + V(energy + d)
    (f: breakpoints fd/fv[:m]; V: xs/ys[a0:a1]), for f or V not convex; on ties the smaller move. The
    minimum lies at an end or a kink of either: try them all."""
    best = np.inf
    best_d = 0.0
    for c in range(m + (a1 - a0) + 2):
        if c == 0:
            d = lo
        elif c == 1:
            d = hi
        elif c < m + 2:
            d = fd[c - 2]
        else:
            d = xs[a0 + c - m - 2] - energy
        if d < lo - 1e-12 or d > hi + 1e-12:
            continue
        d = min(max(d, lo), hi)
        total = _pwl_value(fd, fv, 0, m, d) + _pwl_value(xs, ys, a0, a1, energy + d)
        if total < best - 1e-9 or (total <= best + 1e-9 and abs(d) < abs(best_d)):
            best = min(best, total)
            best_d = d
    return energy + best_d


# Slopes of a value function and a step cost this close (relative) are one: either order of their
# merge is optimal, and the one recorded moves the battery least (no cycling for nothing).
_TIE_SLOPE = 1e-9


@njit(cache=True, nogil=True)
def _grown(values: np.ndarray, n: int, capacity: int) -> np.ndarray:
    """values[:n] in a new array of `capacity`."""
    out = np.empty(capacity)
    out[:n] = values[:n]
    return out


@njit(cache=True, nogil=True)
def _battery_pwl_convex(
    step_delta: np.ndarray,
    step_value: np.ndarray,
    step_count: np.ndarray,
    e_min: float,
    e_max: float,
    e_start: float,
    d_max: float,
    c_max: float,
    final_min_kwh: float,
    out_energy: np.ndarray,
    out_marginal: np.ndarray,
    forward: int,
) -> float:
    """battery_pwl_tables where every step cost is convex (so is every value function): one slope
    merge per step. Kept apart from the general DP so that its loop compiles as tight as it did.

    The merge also records, at each breakpoint of V_t, the stored energy after the step that attains
    it (`after`): the forward pass reads each step's move off V_t instead of searching f_t + V_{t+1}
    (a third less time for the DP)."""
    steps = step_count.shape[0]
    capacity = 64 * (steps + 1)
    xs = np.empty(capacity)
    ys = np.empty(capacity)
    after = np.empty(capacity)
    # V_T on [e_min, e_max]: the penalty for ending below final_min_kwh.
    target = min(max(final_min_kwh, e_min), e_max)
    n = 0
    xs[n] = e_min
    ys[n] = PENALTY_CNY_PER_KWH * max(0.0, final_min_kwh - e_min)
    n += 1
    if target > e_min + 1e-12:
        xs[n] = target
        ys[n] = PENALTY_CNY_PER_KWH * max(0.0, final_min_kwh - target)
        n += 1
    if e_max > xs[n - 1] + 1e-12:
        xs[n] = e_max
        ys[n] = ys[n - 1]
        n += 1
    # V_t is stored at [offsets[t], offsets[t + 1]); fill from T down to 0 in reverse order.
    starts = np.zeros(steps + 1, dtype=np.int64)
    stops = np.zeros(steps + 1, dtype=np.int64)
    starts[steps], stops[steps] = 0, n
    for t in range(steps - 1, -1, -1):
        fd, fv, m = step_delta[t], step_value[t], step_count[t]
        # Slopes of f~(u) = f(-u): f's segments reversed, slopes negated; check convexity on the way.
        prev = -np.inf
        for i in range(m - 1, 0, -1):
            slope = -(fv[i - 1] - fv[i]) / (fd[i - 1] - fd[i])
            if slope < prev - 1e-7 * max(1.0, abs(prev)):
                return np.nan
            prev = slope
        a0, a1 = starts[t + 1], stops[t + 1]
        need = stops[t + 1] + (a1 - a0) + m + 4
        if need > capacity:
            capacity = 2 * need
            xs = _grown(xs, n, capacity)
            ys = _grown(ys, n, capacity)
            after = _grown(after, n, capacity)
        # Merge: V_t starts at e_min - c_max with value f(c_max) + V_{t+1}(e_min). Of two equal slopes the
        # step's is taken first where it charges and V's where it discharges: the optimum recorded in
        # `after` is then the smallest move (no cycling for nothing).
        out = n
        x = e_min - c_max
        y = fv[m - 1] + ys[a0]
        e_after = xs[a0]  # where V_{t+1} is read: the energy after the step
        i_v = a0  # next segment of V: (xs[i_v], xs[i_v + 1])
        i_f = m - 1  # next segment of f~: from fd[i_f] down to fd[i_f - 1]
        wrote = False
        while True:
            has_v = i_v + 1 < a1
            has_f = i_f > 0
            if not has_v and not has_f:
                break
            take_v = False
            if has_v and has_f:
                sv = (ys[i_v + 1] - ys[i_v]) / (xs[i_v + 1] - xs[i_v])
                sf = -(fv[i_f - 1] - fv[i_f]) / (fd[i_f - 1] - fd[i_f])
                tie = abs(sv - sf) <= _TIE_SLOPE * max(1.0, abs(sv))
                take_v = fd[i_f - 1] < -1e-12 if tie else sv < sf  # on a tie: V first where the step discharges
            else:
                take_v = has_v
            if take_v:
                length = xs[i_v + 1] - xs[i_v]
                rise = ys[i_v + 1] - ys[i_v]
                i_v += 1
            else:
                length = fd[i_f] - fd[i_f - 1]
                rise = fv[i_f - 1] - fv[i_f]
                i_f -= 1
            x_next = x + length
            y_next = y + rise
            # Keep only [e_min, e_max], cutting the segments that cross its ends.
            if x_next > e_min and x < e_max:
                lo = max(x, e_min)
                hi = min(x_next, e_max)
                y_lo = y + rise * (lo - x) / length
                y_hi = y + rise * (hi - x) / length
                if not wrote:
                    xs[out] = lo
                    ys[out] = y_lo
                    after[out] = e_after + (lo - x) if take_v else e_after
                    out += 1
                    wrote = True
                if hi - xs[out - 1] > 1e-12:
                    # Merge collinear segments so the function stays short.
                    if out - n >= 2:
                        s_prev = (ys[out - 1] - ys[out - 2]) / (xs[out - 1] - xs[out - 2])
                        s_new = (y_hi - ys[out - 1]) / (hi - xs[out - 1])
                        if abs(s_new - s_prev) <= _SLOPE_EPS * max(1.0, abs(s_prev)):
                            out -= 1
                    xs[out] = hi
                    ys[out] = y_hi
                    after[out] = e_after + (hi - x) if take_v else e_after
                    out += 1
            x, y = x_next, y_next
            if take_v:
                e_after = xs[i_v]
            if x >= e_max:
                break
        if not wrote:  # e_min == e_max: a single point
            xs[out] = e_min
            ys[out] = y
            after[out] = e_after
            out += 1
        starts[t], stops[t] = n, out
        n = out
    start = min(max(e_start, e_min), e_max)
    if forward == COST_ONLY:
        return _pwl_value(xs, ys, starts[0], stops[0], start)
    # Forward: from e_start the energy after each step that V_t records as optimal.
    energy = start
    out_energy[0] = energy
    for t in range(steps):
        # On a segment of V_t both the energy after the step (a) and the step's move reversed (z - a)
        # run between their values at its ends (both move on a segment of equal slopes of V_{t+1} and
        # the step cost); of the splits of this energy between them, the smallest move.
        j, stop = starts[t], stops[t]
        while j + 2 < stop and xs[j + 1] <= energy:
            j += 1
        if stop - starts[t] == 1:
            following = after[j]
        else:
            za, zc, ya, yc = xs[j], xs[j + 1], after[j], after[j + 1]
            low = max(ya, energy - (zc - yc))
            high = min(yc, energy - (za - ya))
            if low <= high:
                following = min(max(energy, low), high)
            else:
                following = ya + (min(max(energy, za), zc) - za) * (yc - ya) / (zc - za)
        energy = min(max(following, e_min), e_max)
        out_energy[t + 1] = energy
        if forward == PATH_AND_MARGINALS:
            out_marginal[t] = _left_slope_cost(xs, ys, starts[t + 1], stops[t + 1], energy)
    return _pwl_value(xs, ys, starts[0], stops[0], start)


@njit(cache=True, nogil=True)
def battery_pwl_tables(
    step_delta: np.ndarray,
    step_value: np.ndarray,
    step_count: np.ndarray,
    e_min: float,
    e_max: float,
    e_start: float,
    d_max: float,
    c_max: float,
    final_min_kwh: float,
    out_energy: np.ndarray,
    out_marginal: np.ndarray,
    forward: int,
) -> float:
    """The exact DP on step costs given as tables (step_tables, step_tables_cars): the optimal
    stored-energy path into out_energy and its cost (NaN only past _MAX_RUNS, see the general DP).

    All step costs convex (the usual case: export worth no more than import): the plain slope merge,
    which checks each step cost on its way and gives up (NaN) at the first that is not convex; then
    the general DP with lower envelopes. (A scan first would cost the usual case 4 %.)"""
    cost = _battery_pwl_convex(step_delta, step_value, step_count, e_min, e_max, e_start, d_max, c_max,
                               final_min_kwh, out_energy, out_marginal, forward)  # fmt: skip
    if np.isnan(cost):
        return _battery_pwl_general(step_delta, step_value, step_count, e_min, e_max, e_start, d_max, c_max,
                                    final_min_kwh, out_energy, out_marginal, forward)  # fmt: skip
    return cost


@njit(cache=True, nogil=True)
def _recorded_move(xs: np.ndarray, after: np.ndarray, start: int, stop: int, energy: float) -> float:
    """The energy after the step from `energy` as the merge that made V_t (xs[start:stop]) recorded it
    (see _battery_pwl_convex, which has this inline)."""
    j = start
    while j + 2 < stop and xs[j + 1] <= energy:
        j += 1
    if stop - start == 1:
        return float(after[start])
    za, zc, ya, yc = xs[j], xs[j + 1], after[j], after[j + 1]
    low = max(ya, energy - (zc - yc))
    high = min(yc, energy - (za - ya))
    if low <= high:
        return float(min(max(energy, low), high))
    return float(ya + (min(max(energy, za), zc) - za) * (yc - ya) / (zc - za))


@njit(cache=True, nogil=True)
def _battery_pwl_general(
    step_delta: np.ndarray,
    step_value: np.ndarray,
    step_count: np.ndarray,
    e_min: float,
    e_max: float,
    e_start: float,
    d_max: float,
    c_max: float,
    final_min_kwh: float,
    out_energy: np.ndarray,
    out_marginal: np.ndarray,
    forward: int,
) -> float:
    """battery_pwl_tables for any step costs: where a step cost or a value function is not convex,
    the step is the lower envelope of the merges of their convex runs (NaN if a value function has
    more than _MAX_RUNS of them)."""
    steps = step_count.shape[0]
    capacity = 64 * (steps + 1)
    xs = np.empty(capacity)
    ys = np.empty(capacity)
    after = np.empty(capacity)  # as in the convex DP, at the breakpoints of plain steps' V_t
    # V_T on [e_min, e_max]: the penalty for ending below final_min_kwh.
    target = min(max(final_min_kwh, e_min), e_max)
    n = 0
    xs[n] = e_min
    ys[n] = PENALTY_CNY_PER_KWH * max(0.0, final_min_kwh - e_min)
    n += 1
    if target > e_min + 1e-12:
        xs[n] = target
        ys[n] = PENALTY_CNY_PER_KWH * max(0.0, final_min_kwh - target)
        n += 1
    if e_max > xs[n - 1] + 1e-12:
        xs[n] = e_max
        ys[n] = ys[n - 1]
        n += 1
    # V_t is stored at [offsets[t], offsets[t + 1]); fill from T down to 0 in reverse order.
    starts = np.zeros(steps + 1, dtype=np.int64)
    stops = np.zeros(steps + 1, dtype=np.int64)
    starts[steps], stops[steps] = 0, n
    plain = np.ones(steps, dtype=np.bool_)  # f_t and V_{t+1} convex: the plain merge, the recorded move
    v_convex = True  # V_{t+1} is known to be convex
    f_cuts = np.empty(_KINKS + 64, dtype=np.int64)
    v_cuts = np.empty(64, dtype=np.int64)  # grown when a value function has more breakpoints
    for t in range(steps - 1, -1, -1):
        fd, fv, m = step_delta[t], step_value[t], step_count[t]
        a0, a1 = starts[t + 1], stops[t + 1]
        f_runs = _convex_runs(fd, fv, 0, m, f_cuts)
        if a1 - a0 + 1 > v_cuts.shape[0]:
            v_cuts = np.empty(2 * (a1 - a0 + 1), dtype=np.int64)
        if v_convex:
            v_runs = 1  # V_T is convex, and so is every merge of convex functions: no need to look
            v_cuts[0], v_cuts[1] = a0, a1 - 1
        else:
            v_runs = _convex_runs(xs, ys, a0, a1, v_cuts)
        v_convex = f_runs == 1 and v_runs == 1
        if not v_convex:
            plain[t] = False
            if v_runs > _MAX_RUNS:
                return np.nan  # the caller plans on the energy grid instead (never seen; memory stays bounded)
            env_x, env_y, count = _nonconvex_step(fd, fv, m, xs, ys, a0, a1, e_min, e_max, f_cuts, f_runs, v_cuts,
                                                  v_runs)  # fmt: skip
            if n + count > capacity:
                capacity = 2 * (n + count)
                xs = _grown(xs, n, capacity)
                ys = _grown(ys, n, capacity)
                after = _grown(after, n, capacity)
            xs[n : n + count] = env_x[:count]
            ys[n : n + count] = env_y[:count]
            starts[t], stops[t] = n, n + count
            n += count
            continue
        need = stops[t + 1] + (a1 - a0) + m + 4
        if need > capacity:
            capacity = 2 * need
            xs = _grown(xs, n, capacity)
            ys = _grown(ys, n, capacity)
            after = _grown(after, n, capacity)
        # Merge as in the convex DP (recording the energy after the step at each breakpoint).
        out = n
        x = e_min - c_max
        y = fv[m - 1] + ys[a0]
        e_after = xs[a0]
        i_v = a0  # next segment of V: (xs[i_v], xs[i_v + 1])
        i_f = m - 1  # next segment of f~: from fd[i_f] down to fd[i_f - 1]
        wrote = False
        while True:
            has_v = i_v + 1 < a1
            has_f = i_f > 0
            if not has_v and not has_f:
                break
            take_v = False
            if has_v and has_f:
                sv = (ys[i_v + 1] - ys[i_v]) / (xs[i_v + 1] - xs[i_v])
                sf = -(fv[i_f - 1] - fv[i_f]) / (fd[i_f - 1] - fd[i_f])
                tie = abs(sv - sf) <= _TIE_SLOPE * max(1.0, abs(sv))
                take_v = fd[i_f - 1] < -1e-12 if tie else sv < sf
            else:
                take_v = has_v
            if take_v:
                length = xs[i_v + 1] - xs[i_v]
                rise = ys[i_v + 1] - ys[i_v]
                i_v += 1
            else:
                length = fd[i_f] - fd[i_f - 1]
                rise = fv[i_f - 1] - fv[i_f]
                i_f -= 1
            x_next = x + length
            y_next = y + rise
            # Keep only [e_min, e_max], cutting the segments that cross its ends.
            if x_next > e_min and x < e_max:
                lo = max(x, e_min)
                hi = min(x_next, e_max)
                y_lo = y + rise * (lo - x) / length
                y_hi = y + rise * (hi - x) / length
                if not wrote:
                    xs[out] = lo
                    ys[out] = y_lo
                    after[out] = e_after + (lo - x) if take_v else e_after
                    out += 1
                    wrote = True
                if hi - xs[out - 1] > 1e-12:
                    # Merge collinear segments so the function stays short.
                    if out - n >= 2:
                        s_prev = (ys[out - 1] - ys[out - 2]) / (xs[out - 1] - xs[out - 2])
                        s_new = (y_hi - ys[out - 1]) / (hi - xs[out - 1])
                        if abs(s_new - s_prev) <= _SLOPE_EPS * max(1.0, abs(s_prev)):
                            out -= 1
                    xs[out] = hi
                    ys[out] = y_hi
                    after[out] = e_after + (hi - x) if take_v else e_after
                    out += 1
            x, y = x_next, y_next
            if take_v:
                e_after = xs[i_v]
            if x >= e_max:
                break
        if not wrote:  # e_min == e_max: a single point
            xs[out] = e_min
            ys[out] = y
            after[out] = e_after
            out += 1
        starts[t], stops[t] = n, out
        n = out
    start = min(max(e_start, e_min), e_max)
    if forward == COST_ONLY:
        return _pwl_value(xs, ys, starts[0], stops[0], start)
    # Forward: from e_start follow the minimiser of f_t(d) + V_{t+1}(e + d).
    energy = start
    out_energy[0] = energy
    for t in range(steps):
        lo, hi = max(-d_max, e_min - energy), min(c_max, e_max - energy)
        if plain[t]:
            energy = _recorded_move(xs, after, starts[t], stops[t], energy)
        else:
            energy = _best_move_any(step_delta[t], step_value[t], step_count[t], xs, ys, starts[t + 1],
                                    stops[t + 1], energy, lo, hi)  # fmt: skip
        energy = min(max(energy, e_min), e_max)
        out_energy[t + 1] = energy
        if forward == PATH_AND_MARGINALS:
            out_marginal[t] = _left_slope_cost(xs, ys, starts[t + 1], stops[t + 1], energy)
    return _pwl_value(xs, ys, starts[0], stops[0], start)


@njit(
    "f8(f8[:], f8[:], f8[:], f8[:], f8[:], f8[:], f8, f8, f8, f8, f8, f8, f8, f8, f8, f8, f8[:], f8[:], i8)",
    cache=True,
    nogil=True,
)
def battery_pwl(
    net_kw: np.ndarray,
    price_import: np.ndarray,
    price_export: np.ndarray,
    import_cap_kw: np.ndarray,
    export_cap_kw: np.ndarray,
    curtail_max_kw: np.ndarray,
    dt_h: float,
    e_min: float,
    e_max: float,
    e_start: float,
    d_max: float,
    c_max: float,
    eta_c: float,
    eta_d: float,
    wear: float,
    final_min_kwh: float,
    out_energy: np.ndarray,
    out_marginal: np.ndarray,
    forward: int,
) -> float:
    """Exact optimal stored-energy trajectory (T + 1 values into out_energy); returns its cost, or
    NaN when a value function has more convex runs than _MAX_RUNS (the caller then uses the grid DP).

    out_marginal[t]: what one kWh less in store after step t would cost later (the left slope of
    the value function, a shadow price); inf at the lower SoC bound. `forward` (COST_ONLY, PATH,
    PATH_AND_MARGINALS): which of the outputs to write.
    """
    steps = net_kw.shape[0]
    delta = np.empty((steps, _KINKS))
    value = np.empty((steps, _KINKS))
    count = np.empty(steps, dtype=np.int64)
    step_tables(net_kw, price_import, price_export, import_cap_kw, export_cap_kw, curtail_max_kw, dt_h, eta_c,
                eta_d, wear, d_max, c_max, delta, value, count)  # fmt: skip
    return battery_pwl_tables(delta, value, count, e_min, e_max, e_start, d_max, c_max, final_min_kwh, out_energy,
                              out_marginal, forward)  # fmt: skip


# --- cars priced into the step costs (Lagrangian pricing for column generation) ---------------------
#
# With a value per kWh for each car (the master problem's dual), a step's cheapest use of the grid,
# the battery and the cars together is F(y) = min over car powers of f(y + sum e) - dt * sum value * e,
# the infimal convolution of the grid cost f with each car's linear value: f's slope sequence with a
# segment of width max_kw and slope value*dt inserted per car. It stays convex and piecewise linear, so
# the exact DP runs on it unchanged. A car whose segment lies right of y charges fully, left of it not.


# Where the step's grid cost is not convex (export paying more than import) and a car is present,
# the cars are convolved with each convex run of the grid cost separately, and the step's cost is the
# lower envelope of those (the convex merge would price the run's convex hull: import and export at
# once). Each run keeps its own car edges; the allocation takes the run that is cheapest at the grid
# power the plan ends up with. At most three runs (the kinks at zero, the export limit, the cap).
_CAR_RUNS = 3


@njit(cache=True, nogil=True)
def _car_runs_step(
    t: int, base: float, p_imp: float, p_exp: float, cap: float, exp_cap: float, curt: float, dt_h: float,
    eta_c: float, eta_d: float, wear: float, d_max: float, c_max: float, arrival: np.ndarray,
    departure: np.ndarray, car_max_kw: np.ndarray, car_cny_per_kwh: np.ndarray, row_d: np.ndarray,
    row_v: np.ndarray, run_x: np.ndarray, run_v: np.ndarray, run_n: np.ndarray, run_edge: np.ndarray,
) -> int:  # fmt: skip
    """Row t of the car-priced step tables where the grid cost is not convex; returns its kink count,
    or 0 when the grid cost is convex here or the row would not fit (the caller prices the hull)."""
    cars = arrival.shape[0]
    g1 = -(exp_cap + curt)
    g2 = -exp_cap if p_exp >= 0.0 else -curt
    s0 = -PENALTY_CNY_PER_KWH * dt_h if p_exp >= 0.0 else (p_exp - PENALTY_CNY_PER_KWH) * dt_h
    s1 = 0.0 if p_exp >= 0.0 else p_exp * dt_h
    s2 = p_exp * dt_h if p_exp >= 0.0 else 0.0
    s3 = p_imp * dt_h
    s4 = (p_imp + PENALTY_CNY_PER_KWH) * dt_h
    # The grid cost's segments (slope, left, right) of non-zero width; the first and last unbounded.
    seg_s = np.empty(5)
    seg_l = np.empty(5)
    seg_r = np.empty(5)
    bounds = (-np.inf, g1, g2, 0.0, cap, np.inf)
    slopes = (s0, s1, s2, s3, s4)
    n_seg = 0
    for j in range(5):
        if bounds[j + 1] - bounds[j] > 1e-12:
            seg_s[n_seg], seg_l[n_seg], seg_r[n_seg] = slopes[j], bounds[j], bounds[j + 1]
            n_seg += 1
    run_start = np.empty(4, dtype=np.int64)
    runs = 1
    run_start[0] = 0
    for j in range(1, n_seg):
        if seg_s[j] < seg_s[j - 1] - 1e-12:
            if runs == _CAR_RUNS:
                return 0
            run_start[runs] = j
            runs += 1
    if runs == 1:
        return 0
    run_start[runs] = n_seg
    # The grid powers the battery can reach here.
    y_lo = base + battery_kw_for(-d_max, dt_h, eta_c, eta_d)
    y_hi = base + battery_kw_for(c_max, dt_h, eta_c, eta_d)
    width = run_x.shape[2]
    cs = np.empty(3 + cars)
    cw = np.empty(3 + cars)
    cc = np.empty(3 + cars, dtype=np.int64)
    for r in range(_CAR_RUNS):
        run_n[t, r] = 0
    for r in range(runs):
        a, b = run_start[r], run_start[r + 1] - 1
        left_open = seg_l[a] == -np.inf
        right_open = seg_r[b] == np.inf
        n = 0
        for j in range(a, b + 1):
            if seg_l[j] > -np.inf and seg_r[j] < np.inf:
                cs[n], cw[n], cc[n] = seg_s[j], seg_r[j] - seg_l[j], -1
                n += 1
        on_kw = 0.0
        on_value = 0.0
        for i in range(cars):
            run_edge[t, r, i] = -np.inf
            if not arrival[i] <= t < departure[i]:
                continue
            slope = car_cny_per_kwh[i] * dt_h
            if left_open and slope <= seg_s[a]:
                continue
            on_kw += car_max_kw[i]
            on_value += slope * car_max_kw[i]
            if right_open and slope >= seg_s[b]:
                run_edge[t, r, i] = np.inf
                continue
            cs[n], cw[n], cc[n] = slope, car_max_kw[i], i
            n += 1
        for u in range(1, n):
            j = u
            while j > 0 and cs[j - 1] > cs[j]:
                cs[j - 1], cs[j] = cs[j], cs[j - 1]
                cw[j - 1], cw[j] = cw[j], cw[j - 1]
                cc[j - 1], cc[j] = cc[j], cc[j - 1]
                j -= 1
        # The run's finite start: its left kink (or, left-open, its first finite kink), all cars on.
        start = seg_r[a] if left_open else seg_l[a]
        xs = np.empty(n + 3)
        vs = np.empty(n + 3)
        xs[0] = start - on_kw
        vs[0] = grid_cost(start, dt_h, p_imp, p_exp, cap, exp_cap, curt, PENALTY_CNY_PER_KWH) - on_value
        k = 1
        for j in range(n):
            xs[k] = xs[k - 1] + cw[j]
            vs[k] = vs[k - 1] + cs[j] * cw[j]
            if cc[j] >= 0:
                run_edge[t, r, cc[j]] = xs[k]
            if cw[j] > 1e-12:
                k += 1
        # Onto [y_lo, y_hi]: the open ends extend at the penalty slopes, the closed ones stop.
        out = 0
        if left_open and y_lo < xs[0]:
            run_x[t, r, 0], run_v[t, r, 0] = y_lo, vs[0] + seg_s[a] * (y_lo - xs[0])
            out = 1
        for j in range(k):
            if y_lo <= xs[j] <= y_hi:
                if out == 0 and xs[j] > y_lo and j > 0:
                    w = (y_lo - xs[j - 1]) / (xs[j] - xs[j - 1])
                    run_x[t, r, 0], run_v[t, r, 0] = y_lo, vs[j - 1] + w * (vs[j] - vs[j - 1])
                    out = 1
                if out + 2 > width:
                    return 0
                run_x[t, r, out], run_v[t, r, out] = xs[j], vs[j]
                out += 1
            elif xs[j] > y_hi and j > 0 and xs[j - 1] < y_hi:
                w = (y_hi - xs[j - 1]) / (xs[j] - xs[j - 1])
                lo_x = max(xs[j - 1], y_lo)
                if out == 0:
                    w0 = (lo_x - xs[j - 1]) / (xs[j] - xs[j - 1])
                    run_x[t, r, 0], run_v[t, r, 0] = lo_x, vs[j - 1] + w0 * (vs[j] - vs[j - 1])
                    out = 1
                run_x[t, r, out], run_v[t, r, out] = y_hi, vs[j - 1] + w * (vs[j] - vs[j - 1])
                out += 1
                break
        if right_open and out > 0 and y_hi > run_x[t, r, out - 1]:
            last = run_x[t, r, out - 1]
            run_x[t, r, out], run_v[t, r, out] = y_hi, run_v[t, r, out - 1] + seg_s[b] * (y_hi - last)
            out += 1
        elif right_open and out == 0 and xs[k - 1] < y_lo:
            run_x[t, r, 0], run_v[t, r, 0] = y_lo, vs[k - 1] + seg_s[b] * (y_lo - xs[k - 1])
            run_x[t, r, 1], run_v[t, r, 1] = y_hi, vs[k - 1] + seg_s[b] * (y_hi - xs[k - 1])
            out = 2
        run_n[t, r] = out
    # The step's cost over y: the lower envelope of the runs.
    starts = np.empty(runs, dtype=np.int64)
    stops = np.empty(runs, dtype=np.int64)
    px = np.empty(runs * width)
    py = np.empty(runs * width)
    count = 0
    at = 0
    for r in range(runs):
        if run_n[t, r] > 0:
            starts[count] = at
            for j in range(run_n[t, r]):
                px[at], py[at] = run_x[t, r, j], run_v[t, r, j]
                at += 1
            stops[count] = at
            count += 1
    env_x = np.empty(at * (count + 1) + 2)
    env_y = np.empty(at * (count + 1) + 2)
    n_env = _lower_envelope(px, py, starts, stops, count, env_x, env_y)
    if n_env == 0 or n_env + 3 > row_d.shape[0]:
        return 0
    m = _energy_kinks(env_x, n_env, base, dt_h, eta_c, eta_d, d_max, c_max, row_d)
    for j in range(m):
        battery = battery_kw_for(row_d[j], dt_h, eta_c, eta_d)
        row_v[j] = _pwl_value(env_x, env_y, 0, n_env, base + battery) + wear * abs(battery) * dt_h
    return m


@njit(cache=True, nogil=True)
def step_tables_cars(
    base_kw: np.ndarray, price_import: np.ndarray, price_export: np.ndarray, import_cap_kw: np.ndarray,
    export_cap_kw: np.ndarray, curtail_max_kw: np.ndarray, dt_h: float, eta_c: float, eta_d: float, wear: float,
    d_max: float, c_max: float, arrival: np.ndarray, departure: np.ndarray, car_max_kw: np.ndarray,
    car_cny_per_kwh: np.ndarray, out_delta: np.ndarray, out_value: np.ndarray, out_count: np.ndarray,
    out_car_edge: np.ndarray, only_car_steps: bool, run_x: np.ndarray, run_v: np.ndarray, run_n: np.ndarray,
    run_edge: np.ndarray,
) -> None:  # fmt: skip
    """step_tables for net load `base_kw` without the cars, each car valued at car_cny_per_kwh.

    out_car_edge[t, i]: the car charges min(max(edge - y, 0), max_kw) at net load y (battery included):
    +inf for a car that always charges at its value, -inf for one that never does or is away.
    Where the grid cost is not convex, per convex run r instead: its cost over y in run_x/run_v[t, r,
    :run_n[t, r]] and the edges in run_edge[t, r] (run_n[t, 0] == 0 elsewhere).
    `only_car_steps`: leave the rows of steps without a car as they are (they do not depend on values).
    """
    cars = arrival.shape[0]
    seg_slope = np.empty(3 + cars)
    seg_width = np.empty(3 + cars)
    seg_car = np.empty(3 + cars, dtype=np.int64)
    xs = np.empty(4 + cars)
    vs = np.empty(4 + cars)
    kinks = np.empty(4)
    for t in range(base_kw.shape[0]):
        present = False
        for i in range(cars):
            present = present or arrival[i] <= t < departure[i]
        if not present:
            if not only_car_steps:
                # The step's own cost, exactly (also where it is not convex: export paying more than import).
                for i in range(cars):
                    out_car_edge[t, i] = -np.inf
                out_count[t] = _step_breakpoints(base_kw[t], dt_h, price_import[t], price_export[t],
                                                 import_cap_kw[t], export_cap_kw[t], curtail_max_kw[t], eta_c, eta_d,
                                                 wear, d_max, c_max, out_delta[t], out_value[t], kinks)  # fmt: skip
            continue
        p_imp, p_exp, cap = price_import[t], price_export[t], import_cap_kw[t]
        run_n[t, 0] = 0
        if p_exp > p_imp or p_imp < 0.0:
            m = _car_runs_step(t, base_kw[t], p_imp, p_exp, cap, export_cap_kw[t], curtail_max_kw[t], dt_h, eta_c,
                               eta_d, wear, d_max, c_max, arrival, departure, car_max_kw, car_cny_per_kwh,
                               out_delta[t], out_value[t], run_x, run_v, run_n, run_edge)  # fmt: skip
            if m > 0:
                out_count[t] = m
                continue
            run_n[t, :] = 0
        exp_cap, curt = export_cap_kw[t], curtail_max_kw[t]
        # The grid cost's kinks and slopes (CNY per kW over the step), as in grid_cost.
        g1 = -(exp_cap + curt)
        g2 = -exp_cap if p_exp >= 0.0 else -curt
        s0 = -PENALTY_CNY_PER_KWH * dt_h if p_exp >= 0.0 else (p_exp - PENALTY_CNY_PER_KWH) * dt_h
        s1 = 0.0 if p_exp >= 0.0 else p_exp * dt_h
        s2 = p_exp * dt_h if p_exp >= 0.0 else 0.0
        s3 = p_imp * dt_h
        s4 = (p_imp + PENALTY_CNY_PER_KWH) * dt_h
        n_seg = 0
        for slope, width in ((s1, g2 - g1), (s2, -g2), (s3, cap)):
            seg_slope[n_seg], seg_width[n_seg], seg_car[n_seg] = slope, max(width, 0.0), -1
            n_seg += 1
        on_kw = 0.0
        on_value = 0.0
        for i in range(cars):
            out_car_edge[t, i] = -np.inf
            if not arrival[i] <= t < departure[i]:
                continue
            slope = car_cny_per_kwh[i] * dt_h
            if slope <= s0:
                continue
            on_kw += car_max_kw[i]
            on_value += slope * car_max_kw[i]
            if slope >= s4:
                out_car_edge[t, i] = np.inf
                continue
            seg_slope[n_seg], seg_width[n_seg], seg_car[n_seg] = slope, car_max_kw[i], i
            n_seg += 1
        # Insertion sort by slope (stable: the grid's own segments first on ties).
        for a in range(1, n_seg):
            j = a
            while j > 0 and seg_slope[j - 1] > seg_slope[j]:
                seg_slope[j - 1], seg_slope[j] = seg_slope[j], seg_slope[j - 1]
                seg_width[j - 1], seg_width[j] = seg_width[j], seg_width[j - 1]
                seg_car[j - 1], seg_car[j] = seg_car[j], seg_car[j - 1]
                j -= 1
        # Left of everything every car that values energy charges: F(y) = f(y + on_kw) - values.
        xs[0] = g1 - on_kw
        vs[0] = grid_cost(g1, dt_h, p_imp, p_exp, cap, exp_cap, curt, PENALTY_CNY_PER_KWH) - on_value
        n = 1
        for j in range(n_seg):
            x = xs[n - 1] + seg_width[j]
            v = vs[n - 1] + seg_slope[j] * seg_width[j]
            if seg_car[j] >= 0:
                out_car_edge[t, seg_car[j]] = x
            if seg_width[j] <= 1e-12:
                continue
            xs[n], vs[n] = x, v
            n += 1
        # Kinks in the stored-energy change: both ends, zero, and every kink of F.
        row_d, row_v = out_delta[t], out_value[t]
        m = _energy_kinks(xs, n, base_kw[t], dt_h, eta_c, eta_d, d_max, c_max, row_d)
        # The grid power rises with the energy change: one walk along F's kinks values every row.
        p = 0
        for j in range(m):
            battery = battery_kw_for(row_d[j], dt_h, eta_c, eta_d)
            y = base_kw[t] + battery
            while p + 1 < n and xs[p + 1] <= y:
                p += 1
            if y <= xs[0]:
                value = vs[0] + s0 * (y - xs[0])
            elif p == n - 1:
                value = vs[n - 1] + s4 * (y - xs[n - 1])
            else:
                value = vs[p] + (y - xs[p]) * (vs[p + 1] - vs[p]) / (xs[p + 1] - xs[p])
            row_v[j] = value + wear * abs(battery) * dt_h
        out_count[t] = m


@njit(cache=True, nogil=True)
def car_allocation(
    base_kw: np.ndarray, energy: np.ndarray, dt_h: float, eta_c: float, eta_d: float, arrival: np.ndarray,
    departure: np.ndarray, car_max_kw: np.ndarray, car_edge: np.ndarray, run_x: np.ndarray, run_v: np.ndarray,
    run_n: np.ndarray, run_edge: np.ndarray, out_kw: np.ndarray,
) -> None:  # fmt: skip
    """Each car's kW per step for a battery path priced with step_tables_cars (into out_kw[car, t])."""
    for t in range(base_kw.shape[0]):
        y = base_kw[t] + battery_kw_for(energy[t + 1] - energy[t], dt_h, eta_c, eta_d)
        run = -1
        if run_n[t, 0] > 0 or run_n[t, 1] > 0:
            best = np.inf
            for r in range(run_n.shape[1]):
                n = run_n[t, r]
                if n > 0 and run_x[t, r, 0] - 1e-9 <= y <= run_x[t, r, n - 1] + 1e-9:
                    value = _pwl_value(run_x[t, r], run_v[t, r], 0, n, y)
                    if value < best - 1e-12:
                        best, run = value, r
        for i in range(arrival.shape[0]):
            if arrival[i] <= t < departure[i]:
                edge = car_edge[t, i] if run < 0 else run_edge[t, run, i]
                out_kw[i, t] = min(max(edge - y, 0.0), car_max_kw[i])
            else:
                out_kw[i, t] = 0.0


@njit(cache=True, nogil=True)
def _invert_basis(
    basis: np.ndarray, car_kwh: np.ndarray, plans: int, cars: int, work: np.ndarray, out_inverse: np.ndarray
) -> bool:
    """The inverse of master_lp's basis matrix (columns: plans' kWh per car and 1, or a car's shortfall)
    by Gauss-Jordan with partial pivoting into out_inverse; False where it is singular."""
    rows = cars + 1
    work[:] = 0.0
    out_inverse[:] = 0.0
    for i in range(rows):
        j = basis[i]
        if j < plans:
            for r in range(cars):
                work[r, i] = car_kwh[j, r]
            work[cars, i] = 1.0
        else:
            work[j - plans, i] = 1.0
        out_inverse[i, i] = 1.0
    for col in range(rows):
        pivot_row = col
        for r in range(col + 1, rows):
            if abs(work[r, col]) > abs(work[pivot_row, col]):
                pivot_row = r
        pivot = work[pivot_row, col]
        if abs(pivot) < 1e-12:
            return False
        if pivot_row != col:
            for c in range(rows):
                work[col, c], work[pivot_row, c] = work[pivot_row, c], work[col, c]
                out_inverse[col, c], out_inverse[pivot_row, c] = out_inverse[pivot_row, c], out_inverse[col, c]
        for c in range(rows):
            work[col, c] /= pivot
            out_inverse[col, c] /= pivot
        for r in range(rows):
            factor = work[r, col]
            if r != col and factor != 0.0:
                for c in range(rows):
                    work[r, c] -= factor * work[col, c]
                    out_inverse[r, c] -= factor * out_inverse[col, c]
    return True


@njit(cache=True, nogil=True)
def master_lp(
    car_kwh: np.ndarray,
    cost: np.ndarray,
    need_kwh: np.ndarray,
    penalty: float,
    out_weight: np.ndarray,
    out_dual: np.ndarray,
) -> float:
    """Cheapest convex combination of plans that gives each car its energy (a shortfall costs `penalty`
    per kWh): min cost.w st. sum_j w_j car_kwh[j, i] + short_i = need_kwh[i], sum w = 1, w, short >= 0.

    Revised simplex with Bland's rule, started from the basis {shortfalls, plan 0} (plan 0 must not
    deliver more than any need). Writes the weights and the duals (one per car, then the convexity
    row's) and returns the objective.
    """
    plans, cars = car_kwh.shape
    rows = cars + 1
    columns = plans + cars  # plans, then one shortfall per car

    def column(j: int, out: np.ndarray) -> float:
        out[:] = 0.0
        if j < plans:
            for i in range(cars):
                out[i] = car_kwh[j, i]
            out[cars] = 1.0
            return float(cost[j])
        out[j - plans] = 1.0
        return penalty

    basis = np.empty(rows, dtype=np.int64)
    inverse = np.zeros((rows, rows))
    x = np.empty(rows)
    for i in range(cars):
        basis[i] = plans + i
        inverse[i, i] = 1.0
        inverse[i, cars] = -car_kwh[0, i]
        x[i] = max(need_kwh[i] - car_kwh[0, i], 0.0)
    basis[cars] = 0
    inverse[cars, cars] = 1.0
    x[cars] = 1.0
    a = np.empty(rows)
    alpha = np.empty(rows)
    c_basis = np.empty(rows)
    dual = np.empty(rows)
    rhs = np.empty(rows)
    rhs[:cars] = need_kwh
    rhs[cars] = 1.0
    work = np.empty((rows, rows))
    fresh = np.empty((rows, rows))
    scale = 1.0
    for j in range(plans):
        scale = max(scale, abs(cost[j]))
    for _ in range(50 * (rows + columns)):
        # The basis inverse and values afresh each iteration (Gauss-Jordan, a few rows): updated in
        # place only, they drift on nearly equal plans until the weights no longer sum to one (a
        # combination of plans 0.1 % above every car's and the battery's power limits).
        if _invert_basis(basis, car_kwh, plans, cars, work, fresh):
            inverse[:] = fresh
            for i in range(rows):
                total = 0.0
                for r in range(rows):
                    total += inverse[i, r] * rhs[r]
                x[i] = total
        for i in range(rows):
            c_basis[i] = column(basis[i], a)
        for r in range(rows):
            total = 0.0
            for i in range(rows):
                total += c_basis[i] * inverse[i, r]
            dual[r] = total
        entering = -1
        for j in range(columns):
            in_basis = False
            for i in range(rows):
                if basis[i] == j:
                    in_basis = True
            if in_basis:
                continue
            reduced = column(j, a)
            for r in range(rows):
                reduced -= dual[r] * a[r]
            if reduced < -1e-10 * scale:
                entering = j
                break
        if entering < 0:
            break
        column(entering, a)
        for i in range(rows):
            total = 0.0
            for r in range(rows):
                total += inverse[i, r] * a[r]
            alpha[i] = total
        leaving = -1
        best = np.inf
        for i in range(rows):
            if alpha[i] > 1e-12:
                ratio = x[i] / alpha[i]
                if ratio < best - 1e-15 or (ratio <= best + 1e-15 and leaving >= 0 and basis[i] < basis[leaving]):
                    best = ratio
                    leaving = i
        if leaving < 0:
            break  # unbounded cannot happen (the weights sum to one and shortfalls cost); stop safely
        pivot = alpha[leaving]
        for r in range(rows):
            inverse[leaving, r] /= pivot
        x[leaving] /= pivot
        for i in range(rows):
            if i != leaving and alpha[i] != 0.0:
                factor = alpha[i]
                for r in range(rows):
                    inverse[i, r] -= factor * inverse[leaving, r]
                x[i] -= factor * x[leaving]
        basis[leaving] = entering
    out_weight[:] = 0.0
    total_weight = 0.0
    for i in range(rows):
        if basis[i] < plans:
            out_weight[basis[i]] = max(x[i], 0.0)
            total_weight += out_weight[basis[i]]
    objective = 0.0
    for i in range(rows):
        if basis[i] < plans:
            out_weight[basis[i]] /= total_weight  # a convex combination, whatever rounding is left
            objective += column(basis[i], a) * out_weight[basis[i]]
        else:
            objective += column(basis[i], a) * max(x[i], 0.0)
    for r in range(rows):
        out_dual[r] = dual[r]
    return objective


@njit(cache=True, nogil=True)
def _priced_cost(
    base_kw: np.ndarray, energy: np.ndarray, ev_kw: np.ndarray, price_import: np.ndarray, price_export: np.ndarray,
    import_cap_kw: np.ndarray, export_cap_kw: np.ndarray, curtail_max_kw: np.ndarray, dt_h: float, eta_c: float,
    eta_d: float, wear: float, final_min_kwh: float,
) -> float:  # fmt: skip
    """A plan's cost as the DP counts it: grid (penalty above the cap), wear, and a final SoC shortfall."""
    total = PENALTY_CNY_PER_KWH * max(0.0, final_min_kwh - energy[energy.shape[0] - 1])
    for t in range(base_kw.shape[0]):
        battery = battery_kw_for(energy[t + 1] - energy[t], dt_h, eta_c, eta_d)
        net = base_kw[t] + battery
        for i in range(ev_kw.shape[0]):
            net += ev_kw[i, t]
        total += grid_cost(net, dt_h, price_import[t], price_export[t], import_cap_kw[t], export_cap_kw[t],
                           curtail_max_kw[t], PENALTY_CNY_PER_KWH) + wear * abs(battery) * dt_h  # fmt: skip
    return float(total)


# Column generation prices a stalled master's duals this far towards the car values of the best bound.
_SMOOTHING = 0.5


@njit(
    "i8(f8[:], f8[:], f8[:], f8[:], f8[:], f8[:], f8, f8, f8, f8, f8, f8, f8, f8, f8, f8, i8[:], i8[:], f8[:],"
    " f8[:], f8[:, :], f8[:, :, :], i8, f8[:, :], f8[:], f8[:], f8[:])",
    cache=True,
    nogil=True,
)
def column_generation(
    base_kw: np.ndarray, price_import: np.ndarray, price_export: np.ndarray, import_cap_kw: np.ndarray,
    export_cap_kw: np.ndarray, curtail_max_kw: np.ndarray, dt_h: float, eta_c: float, eta_d: float, wear: float,
    d_max: float, c_max: float, e_min: float, e_max: float, e_start: float, final_min_kwh: float,
    arrival: np.ndarray, departure: np.ndarray, car_max_kw: np.ndarray, need_kwh: np.ndarray,
    plan_energy: np.ndarray, plan_ev: np.ndarray, initial: int, start_prices: np.ndarray, out_price: np.ndarray,
    out_weight: np.ndarray, out_bound: np.ndarray,
) -> int:  # fmt: skip
    """Optimal battery and car plan by column generation over plans (battery path, car kW).

    Plans [0, initial) are given, except plan 0's battery path: the optimal one for plan 0's cars
    (which must not deliver more than any need). New plans are priced
    into plan_energy/plan_ev until no plan improves the master problem or the arrays are full.
    `start_prices`: guesses of each car's CNY/kWh (a row each), priced first; the prices of the best
    bound are written into out_price.
    Returns the number of plans, with the optimal combination's weights in out_weight, and in
    out_bound[0] the best Lagrangian lower bound on the cost (valid for any plan, also one where a car
    has a minimum power or the step cost is not convex); -1 when the DP cannot price.
    """
    steps, cars, capacity = base_kw.shape[0], arrival.shape[0], plan_energy.shape[0]
    kwh = np.empty((capacity, cars))
    cost = np.empty(capacity)
    # Where some grid cost is not convex, room for the envelope of its runs with the cars (and the
    # runs themselves); elsewhere the tables stay as small as they were.
    concave = False
    for t in range(steps):
        concave = concave or price_export[t] > price_import[t] or price_import[t] < 0.0
    width = 2 * (_KINKS + cars) if concave else _KINKS + cars
    delta = np.empty((steps, width))
    value = np.empty((steps, width))
    count = np.empty(steps, dtype=np.int64)
    marginal = np.empty(steps)
    net = base_kw.copy()
    for i in range(cars):
        net += plan_ev[0, i]
    step_tables(net, price_import, price_export, import_cap_kw, export_cap_kw, curtail_max_kw, dt_h, eta_c, eta_d,
                wear, d_max, c_max, delta, value, count)  # fmt: skip
    # Where some step cost is not convex, straight to the general DP (the convex one would give up part
    # way, having spent a third of the general one's time).
    if concave:
        first = _battery_pwl_general(delta, value, count, e_min, e_max, e_start, d_max, c_max, final_min_kwh,
                                     plan_energy[0], marginal, PATH)  # fmt: skip
    else:
        first = battery_pwl_tables(delta, value, count, e_min, e_max, e_start, d_max, c_max, final_min_kwh,
                                   plan_energy[0], marginal, PATH)  # fmt: skip
    if np.isnan(first):
        return -1
    for j in range(initial):
        cost[j] = _priced_cost(base_kw, plan_energy[j], plan_ev[j], price_import, price_export, import_cap_kw,
                               export_cap_kw, curtail_max_kw, dt_h, eta_c, eta_d, wear, final_min_kwh)  # fmt: skip
        for i in range(cars):
            kwh[j, i] = min(plan_ev[j, i].sum() * dt_h, need_kwh[i]) if j == 0 else plan_ev[j, i].sum() * dt_h
    edge = np.empty((steps, cars))
    run_steps = steps if concave else 1
    run_x = np.empty((run_steps, _CAR_RUNS, width))
    run_v = np.empty((run_steps, _CAR_RUNS, width))
    run_n = np.zeros((steps, _CAR_RUNS), dtype=np.int64)
    run_edge = np.empty((run_steps, _CAR_RUNS, cars))
    duals = np.empty(cars + 1)
    # The first master's duals are degenerate (shortfall prices): the first plan is priced at
    # the guesses instead (the car values found for the caps next to this one, in a cap search: often
    # the ones that prove this cap's combination optimal at once), later ones at the master's duals.
    price = start_prices[0].copy()
    out_price[:] = price
    guesses = 0
    best_bound = -np.inf
    out_bound[0] = -np.inf
    n = initial
    tables_ready = False
    previous = np.inf
    smoothing = _SMOOTHING
    while n < capacity:
        objective = master_lp(kwh[:n], cost[:n], need_kwh, PENALTY_CNY_PER_KWH, out_weight[:n], duals)
        tolerance = 1e-9 * max(1.0, abs(objective))
        if objective - best_bound <= tolerance:
            break  # the combination is proven optimal
        stalled = objective >= previous - tolerance
        previous = objective
        guess = guesses < start_prices.shape[0]
        smoothed = False
        if guess:
            price[:] = start_prices[guesses]
            guesses += 1
        elif stalled and smoothing > 0.0 and best_bound > -np.inf:
            # The last plan left the combination's cost where it was (a degenerate master: its duals
            # jump between equally good ones, and the bound waits for the right ones): price between
            # them and the values of the best bound (Wentges' smoothing).
            price[:] = smoothing * out_price + (1.0 - smoothing) * duals[:cars]
            smoothed = True
        else:
            price[:] = duals[:cars]
        step_tables_cars(base_kw, price_import, price_export, import_cap_kw, export_cap_kw, curtail_max_kw, dt_h,
                         eta_c, eta_d, wear, d_max, c_max, arrival, departure, car_max_kw, price, delta, value,
                         count, edge, tables_ready, run_x, run_v, run_n, run_edge)  # fmt: skip
        tables_ready = True
        if concave:  # straight to the general DP: the convex one would only give up part way
            lagrangian = _battery_pwl_general(delta, value, count, e_min, e_max, e_start, d_max, c_max,
                                              final_min_kwh, plan_energy[n], marginal, PATH)  # fmt: skip
        else:
            lagrangian = battery_pwl_tables(delta, value, count, e_min, e_max, e_start, d_max, c_max,
                                            final_min_kwh, plan_energy[n], marginal, PATH)  # fmt: skip
        if np.isnan(lagrangian):
            return -1
        # Lagrangian bound on the optimum (none where a price exceeds the shortfall penalty).
        bound = lagrangian
        for i in range(cars):
            bound = bound + price[i] * need_kwh[i] if price[i] <= PENALTY_CNY_PER_KWH else -np.inf
        if bound > best_bound:
            best_bound = bound
            out_bound[0] = bound
            out_price[:] = price
        car_allocation(base_kw, plan_energy[n], dt_h, eta_c, eta_d, arrival, departure, car_max_kw, edge, run_x,
                       run_v, run_n, run_edge, plan_ev[n])  # fmt: skip
        cost[n] = _priced_cost(base_kw, plan_energy[n], plan_ev[n], price_import, price_export, import_cap_kw,
                               export_cap_kw, curtail_max_kw, dt_h, eta_c, eta_d, wear, final_min_kwh)  # fmt: skip
        reduced = cost[n] - duals[cars]
        for i in range(cars):
            kwh[n, i] = plan_ev[n, i].sum() * dt_h
            reduced -= duals[i] * kwh[n, i]
        if reduced >= -tolerance:
            if guess:
                continue  # the guess added nothing; the next guess, or the master's duals
            if smoothed:
                smoothing = 0.0  # nothing at the smoothed values: the master's own say whether any plan helps
                continue
            break  # no plan improves the combination: it is optimal
        n += 1
        smoothing = _SMOOTHING
    return n


@njit(
    "f8(f8[:], f8[:], f8[:], f8[:], f8[:], f8[:], f8, f8, f8, f8, f8, f8, f8, f8, f8, f8, i8[:], i8[:], f8[:], f8[:],"
    " f8[:])",
    cache=True,
    nogil=True,
)
def priced_lower_bound(
    base_kw: np.ndarray, price_import: np.ndarray, price_export: np.ndarray, import_cap_kw: np.ndarray,
    export_cap_kw: np.ndarray, curtail_max_kw: np.ndarray, dt_h: float, eta_c: float, eta_d: float, wear: float,
    d_max: float, c_max: float, e_min: float, e_max: float, e_start: float, final_min_kwh: float,
    arrival: np.ndarray, departure: np.ndarray, car_max_kw: np.ndarray, need_kwh: np.ndarray,
    car_cny_per_kwh: np.ndarray,
) -> float:  # fmt: skip
    """Column generation's Lagrangian bound at fixed car values under this import cap: the exact DP
    of battery and cars with each car's kWh worth car_cny_per_kwh, plus the needs at that worth. A
    lower bound on the cost of any plan under this cap (whatever cap the values were found for);
    -inf where a value exceeds the shortfall penalty, nan where the DP cannot price."""
    steps, cars = base_kw.shape[0], arrival.shape[0]
    concave = False
    for t in range(steps):
        concave = concave or price_export[t] > price_import[t] or price_import[t] < 0.0
    width = 2 * (_KINKS + cars) if concave else _KINKS + cars
    delta = np.empty((steps, width))
    value = np.empty((steps, width))
    count = np.empty(steps, dtype=np.int64)
    edge = np.empty((steps, cars))
    run_steps = steps if concave else 1
    run_x = np.empty((run_steps, _CAR_RUNS, width))
    run_v = np.empty((run_steps, _CAR_RUNS, width))
    run_n = np.zeros((steps, _CAR_RUNS), dtype=np.int64)
    run_edge = np.empty((run_steps, _CAR_RUNS, cars))
    step_tables_cars(base_kw, price_import, price_export, import_cap_kw, export_cap_kw, curtail_max_kw, dt_h,
                     eta_c, eta_d, wear, d_max, c_max, arrival, departure, car_max_kw, car_cny_per_kwh, delta,
                     value, count, edge, False, run_x, run_v, run_n, run_edge)  # fmt: skip
    energy = np.empty(steps + 1)
    marginal = np.empty(steps)
    if concave:
        bound = _battery_pwl_general(delta, value, count, e_min, e_max, e_start, d_max, c_max, final_min_kwh,
                                     energy, marginal, COST_ONLY)  # fmt: skip
    else:
        bound = battery_pwl_tables(delta, value, count, e_min, e_max, e_start, d_max, c_max, final_min_kwh,
                                   energy, marginal, COST_ONLY)  # fmt: skip
    for i in range(cars):
        if car_cny_per_kwh[i] > PENALTY_CNY_PER_KWH:
            return -np.inf
        bound += car_cny_per_kwh[i] * need_kwh[i]
    return bound


# out_totals of grid_flows: import kWh, export kWh, curtailed kWh, peak import kW, and the largest
# import above the limit and export above the cap (kW; <= 0 when every limit holds).
FLOW_TOTALS = 6


@njit("f8(f8[:], f8[:], f8[:], f8[:], f8[:], f8[:], f8, f8[:], f8[:], f8[:], f8[:])", cache=True, nogil=True)
def grid_flows(
    net_kw: np.ndarray, price_import: np.ndarray, price_export: np.ndarray, import_limit_kw: np.ndarray,
    export_cap_kw: np.ndarray, curtail_max_kw: np.ndarray, dt_h: float, out_import: np.ndarray,
    out_export: np.ndarray, out_curtail: np.ndarray, out_totals: np.ndarray,
) -> float:  # fmt: skip
    """Import, export and curtailment per step for a net grid power (curtailing as grid_cost does:
    beyond the export limit at a non-negative price, before exporting at a negative one; what can be
    neither is exported, limit or not), their totals (FLOW_TOTALS); returns the energy cost in CNY."""
    cost = 0.0
    out_totals[:] = 0.0
    out_totals[4] = -np.inf
    out_totals[5] = -np.inf
    for t in range(net_kw.shape[0]):
        net = net_kw[t]
        surplus = max(-net, 0.0)
        # At a non-negative price export first, at a negative one curtail first.
        exported = min(surplus, export_cap_kw[t]) if price_export[t] >= 0.0 else max(surplus - curtail_max_kw[t], 0.0)
        curtailed = min(surplus - exported, curtail_max_kw[t])
        out_import[t] = max(net, 0.0)
        out_export[t] = surplus - curtailed
        out_curtail[t] = curtailed
        cost += (price_import[t] * out_import[t] - price_export[t] * out_export[t]) * dt_h
        out_totals[0] += out_import[t] * dt_h
        out_totals[1] += out_export[t] * dt_h
        out_totals[2] += curtailed * dt_h
        out_totals[3] = max(out_totals[3], out_import[t])
        out_totals[4] = max(out_totals[4], out_import[t] - import_limit_kw[t])
        out_totals[5] = max(out_totals[5], out_export[t] - export_cap_kw[t])
    return cost


@njit("b1(f8[:], f8[:, :], f8[:, :, :], i8, f8[:, :], f8[:])", cache=True, nogil=True)
def combine_plans(
    weight: np.ndarray, plan_energy: np.ndarray, plan_ev: np.ndarray, count: int, out_ev: np.ndarray,
    out_energy: np.ndarray,
) -> bool:  # fmt: skip
    """The weighted combination of plans [0, count) into out_ev/out_energy; True where two plans with
    weight move the battery in opposite directions in the same step."""
    out_ev[:] = 0.0
    out_energy[:] = 0.0
    for j in range(count):
        if weight[j] > 0.0:
            out_ev += weight[j] * plan_ev[j]
            out_energy += weight[j] * plan_energy[j]
    for t in range(plan_energy.shape[1] - 1):
        up = False
        down = False
        for j in range(count):
            if weight[j] > 0.0:
                move = plan_energy[j, t + 1] - plan_energy[j, t]
                up = up or move > 1e-9
                down = down or move < -1e-9
        if up and down:
            return True
    return False


@njit("f8(f8[:], f8[:], f8[:], f8[:], f8[:], f8[:], f8, f8, f8, f8, f8)", cache=True, nogil=True)
def cap_saving_bound(
    net_kw: np.ndarray, price_import: np.ndarray, price_export: np.ndarray, import_limit_kw: np.ndarray,
    export_cap_kw: np.ndarray, curtail_max_kw: np.ndarray, dt_h: float, cap_kw: float, eta_c: float,
    eta_d: float, wear: float,
) -> float:  # fmt: skip
    """An upper bound on what one more kW of import cap could save (CNY): dt * sum over the steps
    importing at the cap of (most a kWh there is worth - price there); inf while a limit is broken.

    A kWh imported there displaces an import or feeds an export elsewhere (at most the dearest price),
    or spares the battery a discharge: 1 / eta_d stored kWh, each worth at most what charging one
    costs (the dearest price and wear over eta_c), and the discharge's wear. Pass 1, 1, 0 without
    a battery."""
    tolerance_kw = 1e-6
    dearest = -np.inf
    for t in range(net_kw.shape[0]):
        dearest = max(dearest, price_import[t], price_export[t])
    dearest = max(dearest, (dearest + wear) / (eta_c * eta_d) + wear)
    saving = 0.0
    for t in range(net_kw.shape[0]):
        cap = min(cap_kw, import_limit_kw[t])
        if net_kw[t] > cap + tolerance_kw or -net_kw[t] > export_cap_kw[t] + curtail_max_kw[t] + tolerance_kw:
            return np.inf
        if net_kw[t] >= cap - tolerance_kw:
            saving += max(dearest - price_import[t], 0.0) * dt_h
    return saving


@njit(cache=True, nogil=True)
def _battery_holds_cap(
    base_kw: np.ndarray, cap_kw: float, dt_h: float, e_min_kwh: float, e_max_kwh: float, e_start_kwh: float,
    max_charge_kw: float, max_discharge_kw: float, eta_c: float, eta_d: float, final_min_kwh: float,
    tolerance_kwh: float,
) -> bool:  # fmt: skip
    """Whether some battery path keeps base + battery <= cap at every step and ends with at least
    final_min_kwh (no cars, no export limit): the reachable stored energy is an interval, carried
    forward step by step."""
    low, high = e_start_kwh, e_start_kwh
    down_kwh = max_discharge_kw * dt_h / eta_d
    for t in range(base_kw.shape[0]):
        most_kw = min(max_charge_kw, cap_kw - base_kw[t])  # the most the battery may charge (< 0: must discharge)
        if most_kw < -max_discharge_kw:
            return False
        up_kwh = most_kw * dt_h * eta_c if most_kw >= 0.0 else most_kw * dt_h / eta_d
        low = max(e_min_kwh, low - down_kwh)
        high = min(e_max_kwh, high + up_kwh)
        if low > high + tolerance_kwh:
            return False
    return high >= final_min_kwh - tolerance_kwh


@njit("f8(f8[:], f8, f8, f8, f8, f8, f8, f8, f8, f8, f8)", cache=True, nogil=True)
def least_holdable_cap_kw(
    base_kw: np.ndarray, dt_h: float, e_min_kwh: float, e_max_kwh: float, e_start_kwh: float,
    max_charge_kw: float, max_discharge_kw: float, eta_c: float, eta_d: float, final_min_kwh: float,
    at_least_kw: float,
) -> float:  # fmt: skip
    """The least import cap (kW, to 1e-9 kW) not below at_least_kw that the battery alone can hold at
    every step ending with at least final_min_kwh, without cars or export limit (a relaxation: no plan
    of the full problem holds a lower cap so); inf where no cap lets the battery end with
    final_min_kwh. One pass where at_least_kw holds (the month's peak, usually)."""
    tolerance_kwh = 1e-12 * max(1.0, e_max_kwh)
    if _battery_holds_cap(
        base_kw, at_least_kw, dt_h, e_min_kwh, e_max_kwh, e_start_kwh, max_charge_kw, max_discharge_kw, eta_c,
        eta_d, final_min_kwh, tolerance_kwh,
    ):  # fmt: skip
        return at_least_kw
    peak = -np.inf
    for t in range(base_kw.shape[0]):
        peak = max(peak, base_kw[t])
    # Infeasible below (the battery discharges at most its rate); charging at its rate all along is
    # the most any cap above the peak by that rate allows.
    low, high = max(peak - max_discharge_kw, at_least_kw), peak + max_charge_kw
    if high <= low:
        return np.inf
    if not _battery_holds_cap(
        base_kw, high, dt_h, e_min_kwh, e_max_kwh, e_start_kwh, max_charge_kw, max_discharge_kw, eta_c, eta_d,
        final_min_kwh, tolerance_kwh,
    ):  # fmt: skip
        return np.inf
    while high - low > 1e-9 * max(1.0, abs(high)):
        middle = 0.5 * (low + high)
        if _battery_holds_cap(
            base_kw, middle, dt_h, e_min_kwh, e_max_kwh, e_start_kwh, max_charge_kw, max_discharge_kw, eta_c,
            eta_d, final_min_kwh, tolerance_kwh,
        ):  # fmt: skip
            high = middle
        else:
            low = middle
    return high


@njit("void(f8[:], f8[:], f8, f8, f8, f8, f8, f8[:], f8[:], f8[:])", cache=True, nogil=True)
def battery_outputs(
    energy: np.ndarray,
    marginal: np.ndarray,
    dt_h: float,
    eta_c: float,
    eta_d: float,
    wear: float,
    max_discharge_kw: float,
    out_kw: np.ndarray,
    out_cny_per_kwh: np.ndarray,
    out_room_kw: np.ndarray,
) -> None:
    """AC power per step from the energy path, and the price and headroom of serving one more kWh
    of load through the battery (discharging more, or charging less) at its shadow price."""
    for t in range(out_kw.shape[0]):
        delta = energy[t + 1] - energy[t]
        kw = battery_kw_for(delta, dt_h, eta_c, eta_d)
        out_kw[t] = kw
        if not np.isfinite(marginal[t]):
            out_cny_per_kwh[t] = np.inf
            out_room_kw[t] = 0.0
        elif kw > 1e-9:
            out_cny_per_kwh[t] = marginal[t] * eta_c - wear
            out_room_kw[t] = kw
        else:
            out_cny_per_kwh[t] = marginal[t] / eta_d + wear
            out_room_kw[t] = max(max_discharge_kw + kw, 0.0)


@njit(
    "void(f8[:], f8[:], f8[:], f8[:], f8[:], f8[:], f8, f8[:], f8[:], f8, f8, f8, f8[:], f8[:])", cache=True, nogil=True
)
def contested_room(
    net_kw: np.ndarray,
    price_import: np.ndarray,
    price_export: np.ndarray,
    import_cap_kw: np.ndarray,
    export_cap_kw: np.ndarray,
    curtail_max_kw: np.ndarray,
    dt_h: float,
    battery_kw: np.ndarray,
    marginal: np.ndarray,
    eta_c: float,
    wear: float,
    max_charge_kw: float,
    out_kw: np.ndarray,
    out_cny_per_kwh: np.ndarray,
) -> None:
    """Where the battery charges below its rate and is stopped by a kink of the grid price (the next
    kWh costs more than it values one, the kWh below costs less), load that a car gives up would be
    taken by the battery: that much car load costs the battery's value of it, not the grid price."""
    eps = 1e-6
    for t in range(net_kw.shape[0]):
        out_kw[t] = 0.0
        out_cny_per_kwh[t] = 0.0
        if battery_kw[t] < -1e-9 or not np.isfinite(marginal[t]):
            continue
        value = marginal[t] * eta_c - wear  # worth of one more AC kWh into the battery at t
        g = net_kw[t]
        here = grid_cost(g, dt_h, price_import[t], price_export[t], import_cap_kw[t], export_cap_kw[t],
                         curtail_max_kw[t], PENALTY_CNY_PER_KWH)  # fmt: skip
        above = grid_cost(g + eps, dt_h, price_import[t], price_export[t], import_cap_kw[t], export_cap_kw[t],
                          curtail_max_kw[t], PENALTY_CNY_PER_KWH)  # fmt: skip
        below = grid_cost(g - eps, dt_h, price_import[t], price_export[t], import_cap_kw[t], export_cap_kw[t],
                          curtail_max_kw[t], PENALTY_CNY_PER_KWH)  # fmt: skip
        price_up = (above - here) / (eps * dt_h)
        price_down = (here - below) / (eps * dt_h)
        if price_up > value + 1e-9 and price_down < value - 1e-9 and battery_kw[t] < max_charge_kw - 1e-9:
            out_kw[t] = max_charge_kw - battery_kw[t]
            out_cny_per_kwh[t] = value
