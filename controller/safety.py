"""The safety layer: whatever the plan says, the setpoints of this tick keep the grid, SoC and device
limits. Pure: measurements and targets in, setpoints out; the runtime applies them.

The site's base load is inferred from the measurements (grid + PV - battery - EVs), and the grid
flow that the new setpoints will cause is predicted from it, so a breach is corrected in the same
tick that measured it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from config import ChargerRating, SiteConfig

__all__ = ["Measured", "PvProber", "Setpoints", "Targets", "apply_safety", "export_headroom_kw"]

# A limit is breached only beyond this margin: meters and inverters are not exact to the watt.
LIMIT_MARGIN_KW = 0.5
# The layer aims this far inside each grid limit: load moves within a second, and setpoints are
# rounded (the PV limit register alone has 0.3 kW steps at 300 kWp), so aiming at the limit itself
# would breach it between ticks. At the import limit it is this; at zero export, see below.
HEADROOM_KW = 1.0
# Zero export costs the headroom's import all day while PV is curtailed, so on the export side it is
# sized to the site: twice the load's recent mean change per tick (what the load may drop before the
# next tick corrects it), no less than the PV limit register's step (0.1 % of 300 kWp) and no more
# than HEADROOM_KW. Until the runtime has measured swings, HEADROOM_KW.
EXPORT_HEADROOM_MIN_KW = 0.3
LOAD_SWING_HEADROOM_FACTOR = 2.0
# PV within this of its limit is taken as held back by it; the battery then probes this much per tick.
PV_AT_LIMIT_KW = 0.5
PV_PROBE_KW = 5.0
# A probe that PV does not follow (the limit only matched what the sun gives) is not repeated every
# tick, which would swing the battery and the PV limit by PV_PROBE_KW each second: the next probe waits
# PROBE_WAIT_MIN_S, doubling up to PROBE_WAIT_MAX_S while PV keeps not following. A probe PV follows
# (sun behind the limit) allows the next at once. Curtailment found late costs at most
# PV_PROBE_KW x PROBE_WAIT_MAX_S, about 0.04 kWh.
PROBE_WAIT_MIN_S = 4.0
PROBE_WAIT_MAX_S = 32.0


@dataclass(frozen=True, slots=True)
class Measured:
    grid_kw: float | None  # None: the grid meter's reading is stale or missing
    pv_kw: float
    battery_kw: float
    soc: float | None  # fraction; None when unknown
    ev_kw: dict[str, float]
    ev_connected: dict[str, bool]
    pv_limit_kw: float | None  # the PV limit in force now (None: unrestricted)
    ev_offered_kw: dict[str, float] = field(default_factory=dict)  # what each car was last allowed
    last_load_kw: float | None = None  # the site load (without battery and cars) at the last trusted reading
    load_swing_kw: float | None = None  # the load's recent mean change per tick (None: not measured yet)


@dataclass(frozen=True, slots=True)
class Targets:
    battery_kw: float = 0.0
    ev_kw: dict[str, float] = field(default_factory=dict)
    # The plan's intent for the grid: planned charging never imports more than planned_import_kw,
    # and import above peak_cap_kw (the demand charge's peak) is shaved with the battery.
    planned_import_kw: float | None = None
    peak_cap_kw: float | None = None
    # With a demand charge: charging from the grid never imports above this (the month's largest
    # 15-minute import so far, or a plan's own peak where the plan rests on a known day's profile).
    charge_cap_kw: float | None = None
    # No load history for this kind of day yet (commissioning, the first weekend): the plan rests on
    # a flat guess, so the battery runs the self-consumption rule instead (store surplus, cover import).
    self_consumption: bool = False


@dataclass(frozen=True, slots=True)
class Setpoints:
    battery_kw: float
    ev_current_a: dict[str, float]
    pv_limit_kw: float | None  # None: unrestricted
    safe_state: bool
    predicted_grid_kw: float | None
    actions: tuple[str, ...] = ()
    pv_probe_kw: float = 0.0  # extra charge this tick to find PV held back by the limit (see PvProber)


class PvProber:
    """Paces the battery's probes for PV held back by the zero-export limit (perturb and observe).

    A limited inverter reports only its output, so PV sitting at its limit may be held back by it or
    may simply be all the sun gives. A probe raises the limit; the next tick shows which it was.
    """

    def __init__(self) -> None:
        self._probed_from_kw: float | None = None  # PV before the last tick's probe
        self._wait_s = 0.0
        self._next_s = 0.0

    def allowed(self, now_s: float, pv_kw: float) -> bool:
        """Whether this tick may probe; judges the previous tick's probe by the PV measured now."""
        if self._probed_from_kw is not None:
            if pv_kw >= self._probed_from_kw + PV_AT_LIMIT_KW:
                self._wait_s = 0.0  # PV rose with the limit: there is more sun, keep looking
            else:
                self._wait_s = min(max(2.0 * self._wait_s, PROBE_WAIT_MIN_S), PROBE_WAIT_MAX_S)
            self._next_s = now_s + self._wait_s
            self._probed_from_kw = None
        return now_s >= self._next_s

    def applied(self, pv_kw: float, setpoints: Setpoints) -> None:
        """The tick's setpoints went out with PV at pv_kw."""
        if setpoints.pv_probe_kw > 0:
            self._probed_from_kw = pv_kw


def _ev_current(charger: ChargerRating, kw: float) -> float:
    """kW to a current limit that keeps the IEC 61851 rule: off, or between min and max."""
    amps = kw * 1000 / (charger.phases * charger.voltage_v)
    if amps < charger.min_current_a - 1e-9:
        return 0.0
    return min(amps, charger.max_current_a)


def _ev_kw(charger: ChargerRating, amps: float) -> float:
    return charger.phases * charger.voltage_v * amps / 1000


# A car drawing this much less than it was allowed is limiting itself (full, or its own schedule).
EV_FOLLOWING_MARGIN_KW = 1.0
# A battery within this of its last setpoint is taken to follow it (rounding, deadband, a slow step).
BATTERY_FOLLOWING_MARGIN_KW = 2.0
# In the safe state PV is limited to this share of the last trusted load: loads fall by less than
# this within the stale timeout plus a bus back-off, so zero export holds while blind.
SAFE_STATE_LOAD_SHARE = 0.8


def _following(measured: Measured, charger: ChargerRating) -> bool:
    """The car drew what it was last offered (an offer below its minimum shows nothing)."""
    offered = measured.ev_offered_kw.get(charger.name, 0.0)
    drawn = measured.ev_kw.get(charger.name, 0.0)
    return offered >= charger.min_kw - 1e-9 and drawn >= offered - EV_FOLLOWING_MARGIN_KW


def apply_safety(
    site: SiteConfig,
    measured: Measured,
    targets: Targets,
    previous_battery_kw: float,
    dt_s: float,
    *,
    probe_allowed: bool = True,
    battery_accepts: bool = True,
) -> Setpoints:
    """Setpoints for this tick: the plan's targets, clamped to every rating and limit.
    `probe_allowed`: whether the battery may probe for PV held back by the zero-export limit (PvProber).
    `battery_accepts`: False when the battery's last setpoint write failed: it is not counted on."""
    chargers = {c.name: c for c in site.ev_chargers}
    if measured.grid_kw is None:
        return _safe_state(site, measured, chargers)
    actions: list[str] = []
    b = site.battery
    t = site.tuning.battery
    # What the battery may do this tick: ratings, tuning, SoC window; ramp from the last setpoint.
    charge_max = site.battery_max_charge_kw
    discharge_max = site.battery_max_discharge_kw
    if b is not None and measured.soc is not None:
        if measured.soc >= t.soc_max:
            charge_max = 0.0
        if measured.soc <= t.soc_min:
            discharge_max = 0.0
    elif measured.soc is None:
        charge_max = discharge_max = 0.0  # unknown SoC: do not move the battery
    ramp = (b.ramp_kw_per_s if b else 0.0) * dt_s
    battery = max(-discharge_max, min(charge_max, targets.battery_kw))
    battery = max(previous_battery_kw - ramp, min(previous_battery_kw + ramp, battery))
    battery = max(-discharge_max, min(charge_max, battery))
    ev_amps = {}
    for name, charger in chargers.items():
        kw = targets.ev_kw.get(name, 0.0) if measured.ev_connected.get(name, False) else 0.0
        ev_amps[name] = _ev_current(charger, kw)
    # The site without battery and cars, as measured: what our setpoints act on top of.
    base = measured.grid_kw - measured.battery_kw - sum(measured.ev_kw.values())
    # An inverter that is not doing what it was told last tick (refusing setpoints, its BMS in the
    # way) is not counted on: the limits are worked out with what it does now, by the other levers.
    # A setpoint that creeps by less than the margin a tick would hide a refusing inverter for ticks,
    # so a failed write counts as not following at once.
    follows = battery_accepts and abs(measured.battery_kw - previous_battery_kw) <= BATTERY_FOLLOWING_MARGIN_KW
    if not follows:
        why = "" if battery_accepts else " (setpoint refused)"
        actions.append(f"battery not following{why}: {measured.battery_kw:+.1f} kW, set {previous_battery_kw:+.1f} kW")

    def battery_effect() -> float:
        return battery if follows else measured.battery_kw

    def car_kw(name: str, amps: float, *, high: bool = False) -> float:
        """What a car will draw at this limit: the limit if it follows. Otherwise, conservatively for
        the check at hand: at most what it draws now (export) or at most the limit (import, high)."""
        offered = _ev_kw(chargers[name], amps)
        if high or _following(measured, chargers[name]):
            return offered
        return min(offered, measured.ev_kw.get(name, 0.0))

    cars_kw = sum(car_kw(n, a) for n, a in ev_amps.items())
    # The battery holds the grid at an import: none under the self-consumption rule (cover import,
    # store surplus); the plan's under a plan, so the battery takes up what a 15-minute forecast cannot
    # know, the load's swings within the step. Held to the plan's battery power, a swing up is bought
    # (at zero export, in the dear hours) and a swing down is curtailed.
    grid_target_kw = 0.0 if targets.self_consumption else targets.planned_import_kw
    if grid_target_kw is not None and follows:
        battery = grid_target_kw - base - cars_kw
        battery = max(previous_battery_kw - ramp, min(previous_battery_kw + ramp, battery))
        battery = max(-discharge_max, min(charge_max, battery))
    if targets.planned_import_kw is not None and battery > 0:
        # The forecast was wrong (less sun, more load): charge only as far as the plan meant to import.
        battery = max(0.0, min(battery, targets.planned_import_kw - base - cars_kw))
    if targets.charge_cap_kw is not None and battery > 0 and base + battery + cars_kw > targets.charge_cap_kw:
        capped = max(0.0, targets.charge_cap_kw - base - cars_kw)
        actions.append(f"no new peak for charging: battery {capped - battery:+.1f} kW")
        battery = capped
    if follows and targets.peak_cap_kw is not None and base + battery + cars_kw > targets.peak_cap_kw:
        shave = min(base + battery + cars_kw - targets.peak_cap_kw, battery + discharge_max)
        if shave > 0:
            battery -= shave
            actions.append(f"peak cap {targets.peak_cap_kw:.1f} kW: battery {-shave:+.1f} kW")
    pv_potential = measured.pv_kw  # what PV gives now; under a limit it may give more if released
    # The PV limit follows from what the site can absorb (below), never from the plan's curtailment:
    # that was computed from a forecast, and measured PV is already limited, so it would ratchet down.
    pv_limit: float | None = None

    def grid(pv_out: float, *, high: bool = False) -> float:
        cars = sum(car_kw(n, a, high=high) for n, a in ev_amps.items())
        return base + measured.pv_kw - pv_out + battery_effect() + cars

    pv_out = pv_potential if pv_limit is None else min(pv_potential, pv_limit)
    # Import limit: discharge, then slow the cars (to their minimum, then off), in the configured order.
    excess = grid(pv_out, high=True) - (site.import_limit_kw - HEADROOM_KW)
    for import_lever in site.tuning.grid.import_relief_order:
        if excess <= 0:
            break
        if import_lever == "battery" and follows:
            room = battery + discharge_max
            step = min(room, excess)
            if step > 0:
                battery -= step
                excess -= step
                actions.append(f"import limit: battery {-step:+.1f} kW")
        elif import_lever == "ev":
            for name in sorted(ev_amps, key=lambda n: -ev_amps[n]):
                if excess <= 0:
                    break
                charger = chargers[name]
                now_kw = car_kw(name, ev_amps[name], high=True)
                keep = max(now_kw - excess, 0.0)
                ev_amps[name] = _ev_current(charger, keep)
                excess -= now_kw - car_kw(name, ev_amps[name], high=True)
                actions.append(f"import limit: {name} to {ev_amps[name]:.1f} A")
    # Export limit: charge, speed the cars up, then curtail PV, in the configured order.
    export_headroom = export_headroom_kw(measured)
    surplus = -grid(pv_out) - site.export_limit_kw + export_headroom
    for lever in site.tuning.grid.export_relief_order:
        if surplus <= 0:
            break
        if lever == "battery":
            step = min(charge_max - battery, surplus) if follows else 0.0
            if step > 0:
                battery += step
                surplus -= step
                actions.append(f"export limit: battery {step:+.1f} kW")
        elif lever == "ev":
            for name, charger in chargers.items():
                if surplus <= 0 or not measured.ev_connected.get(name, False) or not _following(measured, charger):
                    continue  # only a car seen taking what it is offered is counted on to take more
                now_kw = _ev_kw(charger, ev_amps[name])
                want = min(_ev_kw(charger, charger.max_current_a), now_kw + surplus)
                if want < _ev_kw(charger, charger.min_current_a):
                    continue
                ev_amps[name] = _ev_current(charger, want)
                surplus -= _ev_kw(charger, ev_amps[name]) - now_kw
                actions.append(f"export limit: {name} to {ev_amps[name]:.1f} A")
        elif site.pv is not None and site.pv.curtailable:
            pv_out = max(0.0, pv_out - surplus)
            pv_limit = pv_out
            surplus = 0.0
            actions.append(f"export limit: PV limited to {pv_out:.1f} kW")
    # Zero export with curtailable PV: PV may give at most what this tick consumes (a battery setpoint
    # does not follow the sun within the second). A limited inverter reports only its limit, so while
    # PV sits at its limit the battery probes: it charges a little more and the limit rises with it.
    # With sun behind the limit, curtailed energy goes into the battery; without, it costs a few kW
    # of import for a second.
    probe = 0.0
    if site.pv is not None and site.pv.curtailable and site.export_limit_kw <= LIMIT_MARGIN_KW:
        at_limit = measured.pv_limit_kw is not None and measured.pv_kw >= measured.pv_limit_kw - PV_AT_LIMIT_KW
        relief = "battery" in site.tuning.grid.export_relief_order
        if probe_allowed and follows and at_limit and pv_limit is None and relief:
            probe = min(PV_PROBE_KW, max(0.0, charge_max - battery))
            battery += probe
        consumption = base + measured.pv_kw + battery_effect() + sum(car_kw(n, a) for n, a in ev_amps.items())
        limit = max(0.0, consumption + site.export_limit_kw - export_headroom)
        if pv_limit is None or limit < pv_limit:
            pv_limit = limit if limit < site.pv.peak_kw else None
    return Setpoints(
        battery_kw=battery,
        ev_current_a=ev_amps,
        pv_limit_kw=pv_limit,
        safe_state=False,
        predicted_grid_kw=grid(pv_out),
        actions=tuple(actions),
        pv_probe_kw=probe,
    )


def export_headroom_kw(measured: Measured) -> float:
    """How far inside the export limit this tick aims (see EXPORT_HEADROOM_MIN_KW)."""
    if measured.load_swing_kw is None:
        return HEADROOM_KW
    return min(HEADROOM_KW, max(EXPORT_HEADROOM_MIN_KW, LOAD_SWING_HEADROOM_FACTOR * measured.load_swing_kw))


def _safe_state(site: SiteConfig, measured: Measured, chargers: dict[str, ChargerRating]) -> Setpoints:
    """Blind: battery idle, cars at their minimum (or off), PV limited to the last trusted load."""
    safe = site.control.safe_state
    amps = {
        name: (c.min_current_a if safe.ev_chargers == "minimum" and measured.ev_connected.get(name, False) else 0.0)
        for name, c in chargers.items()
    }
    pv_limit: float | None = None
    if site.pv is not None and site.pv.curtailable:
        if safe.pv == "off":
            pv_limit = 0.0
        elif safe.pv == "zero_export_limit":
            # Blind, with the battery idle: PV may cover at most a share of the last trusted load (the
            # load may fall while we cannot see it). Not what PV gave: a charging battery took part of that.
            load = measured.last_load_kw
            pv_limit = 0.0 if load is None else max(0.0, SAFE_STATE_LOAD_SHARE * load - HEADROOM_KW)
    return Setpoints(
        battery_kw=0.0,
        ev_current_a=amps,
        pv_limit_kw=pv_limit,
        safe_state=True,
        predicted_grid_kw=None,
        actions=("safe state: grid meter stale",),
    )
