"""The safety layer: whatever the plan says, the setpoints of this tick keep the grid, SoC and device
limits. Pure: measurements and targets in, setpoints out; the runtime applies them.

The grid flow the new setpoints will cause is predicted from the grid meter and the change each lever
makes, so a breach is corrected in the same tick that measured it. A device whose reading is unknown
(stale, implausible) is not a lever: its setpoint is held and whatever it does stays in the measured
grid flow. Each lever's effect is bounded conservatively for the limit at hand: a change that helps a
limit counts only as far as the device has shown it moves within a tick; a change that hurts it counts
in full, at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from config import ChargerRating, SiteConfig

__all__ = [
    "BatteryResponse",
    "LoadSwing",
    "Measured",
    "PvProber",
    "Setpoints",
    "Targets",
    "apply_safety",
    "battery_register_kw",
    "export_headroom_kw",
    "mean_ramp_change_kw",
    "safe_setpoints",
]

# A limit is breached only beyond this margin: meters and inverters are not exact to the watt.
LIMIT_MARGIN_KW = 0.5
# The layer aims this far inside each grid limit: load moves within a second, and setpoints are
# rounded (the PV limit register alone has 0.3 kW steps at 300 kWp), so aiming at the limit itself
# would breach it between ticks. At the import limit it is this; at the export limit, see below.
HEADROOM_KW = 1.0
# Holding the export limit costs the headroom's import (or export revenue) all day while PV is
# curtailed, so on the export side it is sized to the site: three times the load's recent mean change
# per tick (what the load may drop before the next tick corrects it, and the meters' noise: the PV
# limit rests on two meters; at twice, 0.3 kW of noise on each exported 1.3 kW past the limit once in
# a random site-day, at three times none in 500, and the school's first day cost the same), no less than the PV limit
# register's step (0.1 % of 300 kWp). Until the runtime has measured swings, HEADROOM_KW. On a noisy
# site (two noisy meters make the consumption the PV limit rests on) it grows with the swings, up to
# EXPORT_HEADROOM_MAX_KW: capped at HEADROOM_KW, 0.3 kW of meter noise on the grid and PV meters
# exported 1.5 kW beyond the limit on random sites.
EXPORT_HEADROOM_MIN_KW = 0.3
EXPORT_HEADROOM_MAX_KW = 5.0
LOAD_SWING_HEADROOM_FACTOR = 3.0
# PV within this of its limit is taken as held back by it; the battery then probes this much per tick.
PV_AT_LIMIT_KW = 0.5
PV_PROBE_KW = 5.0
# A probe that PV does not follow (the limit only matched what the sun gives) is not repeated every
# tick, which would swing the battery and the PV limit by PV_PROBE_KW each second: the next probe waits
# PROBE_WAIT_MIN_S, doubling up to PROBE_WAIT_MAX_S while PV keeps not following. A probe PV follows
# (sun behind the limit) allows the next at once, and so does PV falling away from its limit (a cloud:
# when it clears, the sun is found within seconds). Each probe is two battery reversals: at 32 s, a
# battery in steady sun reversed 3.5 times a minute; at 300 s, under one every two minutes. What waits
# is the sun's slow rise under a held limit, under 1 kW over the wait.
PROBE_WAIT_MIN_S = 4.0
PROBE_WAIT_MAX_S = 300.0
# A car drawing this much less than it was allowed is limiting itself (full, or its own schedule).
EV_FOLLOWING_MARGIN_KW = 1.0
# A battery within this of its last setpoint is taken to follow it (rounding, deadband, a slow step).
BATTERY_FOLLOWING_MARGIN_KW = 2.0
# In the safe state PV is limited to this share of the last trusted load: loads fall by less than
# this within the stale timeout plus a bus back-off, so the export limit holds while blind ...
SAFE_STATE_LOAD_SHARE = 0.8
# ... for a while. Blind for longer, the load may have changed completely (a school empties at 17:00):
# the share falls linearly to nothing over this long, leaving PV only what may be exported.
BLIND_TRUST_S = 900.0
# The battery's response rate is learned from how far it moved in a tick when asked to move further.
# It never falls below this (a battery that moves slower is not following at all). Setpoints run this
# factor ahead of the rate it has shown (so a faster battery can show more); limits count only what
# it has shown.
BATTERY_RATE_FLOOR_KW_PER_S = 0.5
BATTERY_RATE_GROWTH = 1.2
# A battery that ends a tick further than this from its setpoint fell short of it (it moved all tick).
BATTERY_RATE_TOLERANCE_KW = 0.2
# Halvings of the battery's export relief to fit it under the import side's aim (to 0.02 % of the move).
RELIEF_SEARCH_STEPS = 12
# Within this of the BMS's own SoC bounds (the rating's, not the tuning's), the BMS may stop the battery.
BMS_CUT_MARGIN = 0.01
BATTERY_RATE_TOLERANCE_SHARE = 0.02
# The export headroom follows the load's swings over about this long: a step (lunch ends) raises it
# for a few minutes, a calm afternoon lowers it.
LOAD_SWING_WINDOW_S = 300.0


@dataclass(frozen=True, slots=True)
class Measured:
    """What the tick knows. None is unknown (stale, implausible, never read), never zero."""

    grid_kw: float | None  # None: the grid meter's reading is stale or missing
    pv_kw: float | None
    battery_kw: float | None
    soc: float | None  # fraction
    ev_kw: dict[str, float | None]  # None: the charger's power or state is unknown
    ev_connected: dict[str, bool]
    pv_limit_kw: float | None  # the PV limit in force now (None: unrestricted)
    ev_offered_kw: dict[str, float] = field(default_factory=dict)  # what each car was last allowed
    last_load_kw: float | None = None  # the site load (without battery and cars) at the last trusted reading
    load_swing_kw: float | None = None  # the load's recent mean change per tick (None: not measured yet)
    # How fast the battery has shown it moves towards a setpoint (BatteryResponse); None: not shown yet,
    # so a move that helps a limit is not counted on (it is asked for at the rated ramp all the same).
    battery_rate_kw_per_s: float | None = None
    blind_s: float = 0.0  # how long the grid meter has been stale (safe state only)


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
    # a flat guess, so the battery runs the self-consumption rule instead (store surplus, cover import),
    # bounded by the two fields below.
    self_consumption: bool = False
    # Under self-consumption the battery covers import only down to this SoC (the tuning's reserve) and
    # only while covering pays (not in the day's cheapest band with dearer hours ahead). The grid
    # limits and the peak cap may still use it down to soc_min.
    reserve_soc: float | None = None
    cover_import: bool = True


@dataclass(frozen=True, slots=True)
class Setpoints:
    battery_kw: float
    ev_current_a: dict[str, float]
    pv_limit_kw: float | None  # None: unrestricted
    safe_state: bool
    predicted_grid_kw: float | None
    actions: tuple[str, ...] = ()
    pv_probe_kw: float = 0.0  # extra charge this tick to find PV held back by the limit (see PvProber)
    # The layer could not bring the predicted grid inside this limit ("import"/"export"); unavoidable
    # when every lever was at its end (battery, cars, PV), not merely slower than the breach.
    breach: str | None = None
    unavoidable: bool = False


class PvProber:
    """Paces the battery's probes for PV held back by the export limit (perturb and observe).

    A limited inverter reports only its output, so PV sitting at its limit may be held back by it or
    may simply be all the sun gives. A probe raises the limit; the next tick shows which it was.
    """

    def __init__(self) -> None:
        self._probed_from_kw: float | None = None  # PV before the last tick's probe
        self._wait_s = 0.0
        self._next_s = 0.0

    def allowed(self, now_s: float, pv_kw: float | None, limit_kw: float | None = None) -> bool:
        """Whether this tick may probe; judges the previous tick's probe by the PV measured now.
        `limit_kw`: the PV limit in force; PV well below it (a cloud) resets the wait."""
        if pv_kw is None:
            self._probed_from_kw = None
            return False
        if limit_kw is not None and self._probed_from_kw is None and pv_kw < limit_kw - 2 * PV_AT_LIMIT_KW:
            self._wait_s = 0.0
            self._next_s = min(self._next_s, now_s)
        if self._probed_from_kw is not None:
            gained = pv_kw - self._probed_from_kw
            if gained >= PV_PROBE_KW / 2:
                self._wait_s = 0.0  # PV rose with the limit: there is more sun, keep looking
            elif gained < PV_AT_LIMIT_KW:
                self._wait_s = min(max(2.0 * self._wait_s, PROBE_WAIT_MIN_S), PROBE_WAIT_MAX_S)
            # else the sun is creeping up behind the limit: look again after as long
            self._next_s = now_s + self._wait_s
            self._probed_from_kw = None
        return now_s >= self._next_s

    def applied(self, pv_kw: float | None, setpoints: Setpoints) -> None:
        """The tick's setpoints went out with PV at pv_kw."""
        if setpoints.pv_probe_kw > 0 and pv_kw is not None:
            self._probed_from_kw = pv_kw


class BatteryResponse:
    """Learns how fast the battery moves towards its setpoint (kW/s), so that setpoints never run ahead
    of an inverter slower than its rating (which flapped: a step it could not follow was judged "not
    following" a tick later, then a new step it could not follow either), and limits are worked out
    with what it really does within a tick."""

    def __init__(self, rated_kw_per_s: float) -> None:
        self.rated_kw_per_s = rated_kw_per_s
        # Shown, not rated: a first step against an inverter five times slower than its rating, counted at
        # the rating, exported 13 kW beyond the limit for a tick.
        self.shown_kw_per_s: float | None = None
        self._last: tuple[float, float] | None = None  # (measured, setpoint) when the setpoint went out

    def observe(self, measured_kw: float | None, dt_s: float) -> None:
        """The battery's power one tick after the last setpoint went out."""
        last, self._last = self._last, None
        if last is None or measured_kw is None or dt_s <= 0:
            return
        before_kw, setpoint_kw = last
        asked, moved = setpoint_kw - before_kw, measured_kw - before_kw
        if abs(asked) <= BATTERY_FOLLOWING_MARGIN_KW or moved * asked <= 0:
            return  # a small step tells nothing; no move at all is refusal or the BMS, not slowness
        shown = self.shown_kw_per_s
        if abs(moved) < abs(asked) - max(BATTERY_RATE_TOLERANCE_KW, BATTERY_RATE_TOLERANCE_SHARE * abs(asked)):
            self.shown_kw_per_s = max(BATTERY_RATE_FLOOR_KW_PER_S, abs(moved) / dt_s)  # moving all tick: its rate
        elif shown is None or abs(asked) >= 0.9 * shown * dt_s:
            self.shown_kw_per_s = min(self.rated_kw_per_s, max(shown or 0.0, abs(asked) / dt_s))  # kept up

    @property
    def kw_per_s(self) -> float:
        """The rate setpoints are paced by: what it has shown, or its rating until it has shown any."""
        return self.rated_kw_per_s if self.shown_kw_per_s is None else self.shown_kw_per_s

    def sent(self, measured_kw: float | None, setpoint_kw: float) -> None:
        """A setpoint went out while the battery read measured_kw."""
        self._last = None if measured_kw is None else (measured_kw, setpoint_kw)


class LoadSwing:
    """The load's mean change per tick, an exponential average over LOAD_SWING_WINDOW_S: sizes the export
    headroom. Starts where the fixed headroom was, and learns down (or up) from there."""

    def __init__(self) -> None:
        self.kw = HEADROOM_KW / LOAD_SWING_HEADROOM_FACTOR
        self.last_load_kw: float | None = None  # the site load (without battery and cars) last seen

    def observe(self, load_kw: float, dt_s: float) -> None:
        if self.last_load_kw is not None:
            weight = min(1.0, dt_s / LOAD_SWING_WINDOW_S)
            self.kw += weight * (abs(load_kw - self.last_load_kw) - self.kw)
        self.last_load_kw = load_kw


def mean_ramp_change_kw(step_kw: float, rate_kw_per_s: float, dt_s: float) -> float:
    """Mean change over a tick of a device moving `step_kw` at `rate_kw_per_s` from the tick's start."""
    reach = rate_kw_per_s * dt_s
    if reach <= 0:
        return 0.0
    size = abs(step_kw)
    mean = size * (1 - size / (2 * reach)) if size <= reach else reach / 2
    return mean if step_kw >= 0 else -mean


def _ev_current(charger: ChargerRating, kw: float) -> float:
    """kW to a current limit that keeps the IEC 61851 rule: off, or between min and max."""
    amps = kw * 1000 / (charger.phases * charger.voltage_v)
    if amps < charger.min_current_a - 1e-9:
        return 0.0
    return min(amps, charger.max_current_a)


def _ev_kw(charger: ChargerRating, amps: float) -> float:
    return charger.phases * charger.voltage_v * amps / 1000


def _following(measured: Measured, charger: ChargerRating) -> bool:
    """The car drew what it was last offered (an offer below its minimum shows nothing)."""
    offered = measured.ev_offered_kw.get(charger.name, 0.0)
    drawn = measured.ev_kw.get(charger.name)
    return drawn is not None and offered >= charger.min_kw - 1e-9 and drawn >= offered - EV_FOLLOWING_MARGIN_KW


class _Battery:
    """The battery lever of one tick: its window, its setpoint, and what the setpoint does to the grid."""

    def __init__(self, site: SiteConfig, measured: Measured, previous_kw: float, dt_s: float, accepts: bool) -> None:
        b, t = site.battery, site.tuning.battery
        self.present = b is not None
        self.known = b is not None and measured.battery_kw is not None
        self.now_kw = measured.battery_kw if measured.battery_kw is not None else 0.0
        self.charge_max = site.battery_max_charge_kw
        self.discharge_max = site.battery_max_discharge_kw
        if measured.soc is None:
            self.charge_max = self.discharge_max = 0.0  # unknown SoC: do not move the battery
        else:
            if measured.soc >= t.soc_max:
                self.charge_max = 0.0
            if measured.soc <= t.soc_min:
                self.discharge_max = 0.0
        rated = b.ramp_kw_per_s if b is not None else 0.0
        shown = measured.battery_rate_kw_per_s
        # Setpoints run a little ahead of the rate shown (or at the rating until then); limits count only
        # what it has shown.
        self.reach = (rated if shown is None else min(rated, shown * BATTERY_RATE_GROWTH)) * dt_s
        self.rate = 0.0 if shown is None else min(rated, shown)
        self.rated_reach = rated * dt_s
        self.dt_s = dt_s
        # Near the BMS's own SoC bounds the BMS may cut the battery off at once, whatever the ramp.
        self.bms_may_cut = b is None or measured.soc is None or not (
            b.soc_min + BMS_CUT_MARGIN <= measured.soc <= b.soc_max - BMS_CUT_MARGIN
        )
        # An inverter that is not doing what it was told last tick (refusing setpoints, its BMS in the
        # way) is not counted on. A setpoint that creeps by less than the margin a tick would hide a
        # refusing inverter for ticks, so a failed write counts as not following at once.
        self.follows = self.known and accepts and abs(self.now_kw - previous_kw) <= BATTERY_FOLLOWING_MARGIN_KW
        # Setpoints move from where the battery is going (following) or where it is (not following),
        # by what it has shown it does in a tick.
        self.base = previous_kw if self.follows else self.now_kw
        self.previous_kw = previous_kw
        self.kw = self.clamp(self.base)

    def clamp(self, kw: float, *, urgent: bool = False) -> float:
        """Within the window, and within this tick's reach of the base. A window that closed beyond the
        reach (the SoC reached the tuning's bound while charging hard) is approached at the reach, not
        jumped to: a slow battery told to stop charging 137 kW at once had PV curtailed for a battery at
        0 kW while it still took 130 (125 kW of import). Near the BMS's own bounds, where the BMS cuts
        the battery off at once anyway, the window is jumped to. `urgent` (a limit at stake): as far as the
        rating lets the setpoint move, not only as far as the battery has shown it follows."""
        # The reach is counted from the base or from where the battery is, whichever lets it move further
        # (a battery lagging its last setpoint can still be turned the other way from where it is).
        reach = max(self.reach, self.rated_reach) if urgent else self.reach
        reach_low = min(self.base, self.now_kw) - reach
        reach_high = max(self.base, self.now_kw) + reach
        low = max(-self.discharge_max, reach_low)
        high = min(self.charge_max, reach_high)
        if low > high and not self.bms_may_cut:
            return low if self.base > high else high  # towards the window, by the reach
        kw = max(-self.discharge_max, min(self.charge_max, kw))
        kw = max(reach_low, min(reach_high, kw))
        return max(-self.discharge_max, min(self.charge_max, kw))

    def effect(self, *, charging_helps: bool) -> float:
        """The battery's mean power over the coming tick, counted for a limit: a move that helps the
        limit (more charge at the export limit, more discharge at the import limit) only as far as
        the battery has shown it moves; one that hurts in full."""
        if not self.known:
            return 0.0  # held: whatever it does stays in the measured grid flow (`rest` in apply_safety)
        step = self.kw - self.now_kw
        helps = step > 0 if charging_helps else step < 0
        if not helps:
            return self.kw  # counted in full, at once (setpoints move by the reach at most, see clamp)
        if not self.follows:
            return self.now_kw  # not seen doing what it was told: its help is not counted on
        return self.now_kw + mean_ramp_change_kw(step, self.rate, self.dt_s)

    def relieve(self, amount_kw: float, *, charging_helps: bool, urgent: bool = True) -> float:
        """Move the setpoint so that the counted effect moves `amount_kw` in the helping direction (as far
        as the window and the ramp allow); returns the setpoint change."""
        sign = 1.0 if charging_helps else -1.0
        want = self.effect(charging_helps=charging_helps) + sign * amount_kw
        change = sign * (want - self.now_kw)  # > 0: beyond where the battery is now, in the helping direction
        if not self.follows:
            # Not counted on, asked anyway; never less than the setpoint it is still moving towards (a
            # slow battery still on its way there would be turned back, giving less).
            kw = min(want, self.previous_kw) if sign < 0 else max(want, self.previous_kw)
        elif change <= 0:
            kw = want  # short of where it is now: counted in full
        else:
            reach = self.rate * self.dt_s
            # mean_ramp_change_kw inverted: a step d gives a mean d (1 - d / 2 reach), at most reach / 2.
            # Beyond that (or nothing shown yet): ask for all the rating allows, count what it has shown
            # (asked for only its shown pace, a battery faster than it had shown left a limit breached).
            full = self.rated_reach if urgent else self.reach
            step = full if change >= reach / 2 else reach - (reach * reach - 2 * reach * change) ** 0.5
            kw = self.now_kw + sign * step
        new = self.clamp(kw, urgent=urgent)
        new = max(new, self.kw) if charging_helps else min(new, self.kw)
        moved, self.kw = new - self.kw, new
        return moved


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
    `probe_allowed`: whether the battery may probe for PV held back by the export limit (PvProber).
    `battery_accepts`: False when the battery's last setpoint write failed: it is not counted on."""
    chargers = {c.name: c for c in site.ev_chargers}
    if measured.grid_kw is None:
        return safe_setpoints(site, measured)
    grid_now = measured.grid_kw
    actions: list[str] = []
    bat = _Battery(site, measured, previous_battery_kw, dt_s, battery_accepts)
    if bat.present and not bat.known:
        bat.kw = previous_battery_kw
        actions.append(f"battery reading unknown: setpoint held at {previous_battery_kw:+.1f} kW")
    elif bat.known and not bat.follows:
        why = "" if battery_accepts else " (setpoint refused)"
        actions.append(f"battery not following{why}: {bat.now_kw:+.1f} kW, set {previous_battery_kw:+.1f} kW")
    # Cars: a charger whose power or state is unknown keeps its offer and is no lever.
    drawn_kw = {n: kw for n, kw in measured.ev_kw.items() if kw is not None and n in chargers}
    known_cars = set(drawn_kw)
    ev_amps: dict[str, float] = {}
    for name, charger in chargers.items():
        if name not in known_cars:
            offered = measured.ev_offered_kw.get(name, 0.0)
            ev_amps[name] = offered * 1000 / (charger.phases * charger.voltage_v)
            continue
        kw = targets.ev_kw.get(name, 0.0) if measured.ev_connected.get(name, False) else 0.0
        ev_amps[name] = _ev_current(charger, kw)
    cars_now = sum(drawn_kw.values())
    # The rest of the site as the grid meter sees it: the load, PV, and every device that is no lever.
    rest = grid_now - (bat.now_kw if bat.known else 0.0) - cars_now

    # Asked dozens of times a tick (the relief searches): each car's phases x volts, and whether it follows
    # its offer (the measurements do not change within the tick), worked out once.
    volts = {name: c.phases * c.voltage_v for name, c in chargers.items()}
    following = {name: _following(measured, chargers[name]) for name in known_cars}

    def car_kw(name: str, amps: float, *, high: bool = False) -> float:
        """What a car will draw at this limit: the limit if it follows. Otherwise, conservatively for
        the check at hand: at most what it draws now (export) or at most the limit (import, high)."""
        if name not in known_cars:
            return 0.0  # in `rest`
        offered = volts[name] * amps / 1000  # _ev_kw
        if high or following[name]:
            return offered
        return min(offered, drawn_kw[name])

    # The cars' draw for each set of offers asked about (the searches below ask for the same one often).
    cars_seen: dict[tuple[bool, tuple[float, ...]], float] = {}

    def cars(*, high: bool = False) -> float:
        key = (high, tuple(ev_amps.values()))
        total = cars_seen.get(key)
        if total is None:
            total = 0.0
            for name, amps in ev_amps.items():
                if name in known_cars:  # the others are in `rest` (0 kW here)
                    offered = volts[name] * amps / 1000
                    total += offered if high or following[name] else min(offered, drawn_kw[name])
            cars_seen[key] = total
        return total

    # The battery holds the grid at an import: none under the self-consumption rule (cover import,
    # store surplus); the plan's under a plan, so the battery takes up what a 15-minute forecast cannot
    # know, the load's swings within the step. Held to the plan's battery power, a swing up is bought
    # (at zero export, in the dear hours) and a swing down is curtailed.
    if bat.known:
        bat.kw = bat.clamp(targets.battery_kw)
        grid_target_kw = 0.0 if targets.self_consumption else targets.planned_import_kw
        if grid_target_kw is not None and bat.follows:
            bat.kw = bat.clamp(grid_target_kw - rest - cars())
        if targets.self_consumption and bat.kw < 0:
            reserve = targets.reserve_soc
            if not targets.cover_import or (reserve is not None and measured.soc is not None
                                            and measured.soc <= reserve):  # fmt: skip
                bat.kw = bat.clamp(0.0)  # the import is cheaper bought now, or the reserve is reached
        if targets.planned_import_kw is not None and bat.kw > 0:
            # The forecast was wrong (less sun, more load): charge only as far as the plan meant to import.
            bat.kw = bat.clamp(max(0.0, min(bat.kw, targets.planned_import_kw - rest - cars())))
        if targets.charge_cap_kw is not None and bat.kw > 0 and rest + bat.kw + cars() > targets.charge_cap_kw:
            capped = bat.clamp(max(0.0, targets.charge_cap_kw - rest - cars()))
            actions.append(f"no new peak for charging: battery {capped - bat.kw:+.1f} kW")
            bat.kw = capped
        if bat.follows and targets.peak_cap_kw is not None and rest + bat.kw + cars() > targets.peak_cap_kw:
            shaved = bat.clamp(bat.kw - (rest + bat.kw + cars() - targets.peak_cap_kw))
            if shaved < bat.kw:
                actions.append(f"peak cap {targets.peak_cap_kw:.1f} kW: battery {shaved - bat.kw:+.1f} kW")
                bat.kw = shaved
    pv_now = measured.pv_kw
    curtailable = site.pv is not None and site.pv.curtailable
    pv_levered = curtailable and pv_now is not None
    limit_now = measured.pv_limit_kw
    # PV's part of `rest` is what it gives now; a new limit below that takes the difference off.
    pv_cut = 0.0

    battery_now = bat.now_kw if bat.known else 0.0
    rest_and_battery_now = rest + battery_now

    def grid(*, export_side: bool) -> float:
        """Predicted mean grid flow over the coming tick, bounded for the limit at hand."""
        battery_delta = bat.effect(charging_helps=export_side) - battery_now
        return rest_and_battery_now + battery_delta + cars(high=not export_side) + pv_cut

    # Import limit: discharge, then slow the cars (to their minimum, then off), in the configured order.
    # First, though, a car offered more than it draws gives up what it does not take: the import side
    # must count it at its whole offer (it may start drawing), the export side at what it draws, and the
    # battery discharging for a full car's unused 20 kW exported what the car never took.
    import_aim = site.import_limit_kw - HEADROOM_KW
    if grid(export_side=False) > import_aim:
        for name in sorted(known_cars):
            charger = chargers[name]
            drawn = drawn_kw[name]
            if not _following(measured, charger) and _ev_kw(charger, ev_amps[name]) > drawn + EV_FOLLOWING_MARGIN_KW:
                ev_amps[name] = _ev_current(charger, drawn)
                actions.append(f"import limit: {name} to {ev_amps[name]:.1f} A (draws {drawn:.1f} kW)")
    for import_lever in site.tuning.grid.import_relief_order:
        excess = grid(export_side=False) - import_aim
        if excess <= 0:
            break
        if import_lever == "battery" and bat.known:
            moved = bat.relieve(excess, charging_helps=False)
            if moved < 0:
                actions.append(f"import limit: battery {moved:+.1f} kW")
                excess = grid(export_side=False) - import_aim
        elif import_lever == "ev":
            for name in sorted(ev_amps, key=lambda n: -ev_amps[n]):
                if excess <= 0 or name not in known_cars:
                    continue
                charger = chargers[name]
                now_kw = car_kw(name, ev_amps[name], high=True)
                ev_amps[name] = _ev_current(charger, max(now_kw - excess, 0.0))
                excess -= now_kw - car_kw(name, ev_amps[name], high=True)
                actions.append(f"import limit: {name} to {ev_amps[name]:.1f} A")
    # Export limit: charge, speed the cars up, then limit PV, in the configured order.
    export_headroom = export_headroom_kw(measured)
    export_aim = -site.export_limit_kw + export_headroom
    pv_limit: float | None = None
    probe = 0.0
    def import_room() -> float:
        """How much more the site may take before the import side's aim (counted high) is reached."""
        return max(0.0, import_aim - grid(export_side=False))

    # Relief that aims inside the export limit never pushes the import side past its own aim: where the
    # two aims cannot both be met (cars that may or may not draw, a small import limit), what reaches the
    # export limit itself still goes ahead, what only reaches its headroom does not.
    for lever in site.tuning.grid.export_relief_order:
        surplus = export_aim - grid(export_side=True)
        if lever == "battery" and bat.known and surplus > 0:
            # The battery counts differently on the two sides (a discharge it gives up counts at once for
            # export, at its ramp's mean for import), so its move is tried and checked, not priced.
            # At its shown pace first: asked more (counted the same, the rest in full on the import side),
            # it took the import room a car could have used with certainty. More only if the limit itself
            # is still at stake after every lever (below).
            moved = _relieve_export_within(bat, surplus, lambda: grid(export_side=False),
                                           max(import_aim, grid(export_side=False)), urgent=False)  # fmt: skip
            if moved > 0:
                actions.append(f"export limit: battery {moved:+.1f} kW")
            continue
        surplus = min(surplus, import_room())
        if lever == "ev" and surplus > 0:
            for name, charger in chargers.items():
                if surplus <= 0 or name not in known_cars or not measured.ev_connected.get(name, False):
                    continue
                if not _following(measured, charger):
                    continue  # only a car seen taking what it is offered is counted on to take more
                now_kw = _ev_kw(charger, ev_amps[name])
                # A surplus below the car's minimum current is taken at the minimum (off is no answer),
                # unless the minimum would take the import side past its aim.
                want = min(charger.max_kw, max(charger.min_kw, now_kw + surplus))
                if want - now_kw > import_room() + 1e-9:
                    continue
                ev_amps[name] = _ev_current(charger, want)
                surplus -= _ev_kw(charger, ev_amps[name]) - now_kw
                actions.append(f"export limit: {name} to {ev_amps[name]:.1f} A")
        elif lever == "pv" and pv_levered and site.pv is not None and pv_now is not None:
            # PV may give at most what this tick consumes plus the export allowed, held every tick (a
            # limit released as soon as the export is inside it frees PV, which exports again the next
            # tick). A limited inverter reports only its limit, so while PV sits at its limit the
            # battery probes: it charges a little more and the limit rises with it.
            at_limit = limit_now is not None and pv_now >= limit_now - PV_AT_LIMIT_KW
            if probe_allowed and bat.follows and at_limit and "battery" in site.tuning.grid.export_relief_order:
                probe = max(0.0, min(bat.clamp(bat.kw + PV_PROBE_KW) - bat.kw, import_room()))
                bat.kw += probe
            consumption = grid(export_side=True) - pv_cut + pv_now  # the load, the battery and the cars
            allowed = max(0.0, consumption - export_aim)
            cut = pv_now - allowed
            if cut > import_room():
                needed = pv_now - (consumption + site.export_limit_kw)  # what the limit itself needs
                allowed = pv_now - max(needed, import_room())
            if allowed < site.pv.peak_kw:
                pv_limit = allowed
                pv_cut = max(0.0, pv_now - allowed)
                if pv_cut > 0:
                    actions.append(f"export limit: PV limited to {allowed:.1f} kW")
    surplus = export_aim - grid(export_side=True)
    if surplus > 0 and bat.known and "battery" in site.tuning.grid.export_relief_order:
        moved = _relieve_export_within(bat, surplus, lambda: grid(export_side=False),
                                       max(import_aim, grid(export_side=False)), urgent=True)  # fmt: skip
        if moved > 0:
            actions.append(f"export limit: battery {moved:+.1f} kW more (as fast as its rating allows)")
        surplus = export_aim - grid(export_side=True)
    if grid(export_side=True) < -site.export_limit_kw and "ev" in site.tuning.grid.export_relief_order:
        # Every counted lever is at its end and the site still exports beyond the limit: a connected car not
        # seen taking current is offered some all the same (taking it can only help), though not counted
        # on. Only then: offered whenever there is a surplus, a car the plan gives nothing starts and
        # stops every other tick.
        for name, charger in chargers.items():
            if name in known_cars and measured.ev_connected.get(name, False) and not _following(measured, charger):
                wanted = _ev_current(charger, min(charger.max_kw, max(charger.min_kw, surplus)))
                if wanted > ev_amps[name]:
                    ev_amps[name] = wanted
                    actions.append(f"export limit: {name} offered {wanted:.1f} A")
    if bat.known and bat.kw > bat.now_kw and grid(export_side=False) > import_aim:
        # The battery was asked for more charge than it is counted on for (its rate not shown yet, or
        # asked ahead of its pace), and PV was limited for the export the battery was not counted on to
        # relieve: if the battery does move that far, the two together import beyond the aim (a first
        # tick at 54 kW of export: battery asked +84 kW at its rating, counted 0, PV cut by 54 kW, and
        # the fast battery imported 84 kW over a 61 kW limit). It is asked only as far as the import
        # side allows, never below what is counted on for the export side.
        moved = _pull_back_uncounted(bat, lambda: grid(export_side=True), lambda: grid(export_side=False), import_aim)
        if moved < 0:
            actions.append(f"import limit: battery asked {moved:+.1f} kW less (not counted on for the export)")
    if curtailable and pv_now is None and site.pv is not None:
        # PV unknown, the grid seen: the limit in force stays (never raised while PV is unknown) and comes
        # down by whatever the grid shows exported beyond the aim, so it bites whatever PV gives. It is
        # never worked out from the load: with PV unknown the load is a guess, and a limit that followed
        # the battery's moves spiralled (the battery covering the import the limit made, the limit
        # following the battery down) to 100 kW of discharge. Unrestricted until now, it starts from what
        # the last trusted load, the battery and the cars take (or, without one, the safe state's).
        surplus = max(0.0, export_aim - grid(export_side=True))
        if limit_now is not None:
            start_kw = limit_now
        elif measured.last_load_kw is None:
            start_kw = _blind_pv_limit_kw(site, measured)
        else:
            start_kw = min(site.pv.peak_kw, measured.last_load_kw + grid(export_side=True) - rest - export_aim)
        pv_limit = max(0.0, start_kw - surplus)
        actions.append(f"PV reading unknown: PV limited to {pv_limit:.1f} kW")
    # A device whose reading is unknown is no lever, but some moves can only help whatever it does now:
    # at an import breach a charging battery stops charging and unknown cars are turned off; at an export
    # breach a discharging battery stops. Their help is not counted (they stay in `rest`).
    if grid(export_side=False) > site.import_limit_kw:
        if bat.present and not bat.known:
            # Lower its setpoint by the excess (as if it follows it: then this fixes the breach; if it
            # does not, it changes nothing): whatever the battery does now, that can only lower import.
            lower = max(-bat.discharge_max, bat.kw - (grid(export_side=False) - import_aim))
            if lower < bat.kw:
                actions.append(f"import limit: battery of unknown power {bat.kw:+.1f} -> {lower:+.1f} kW")
                bat.kw = lower
        for name in chargers:
            if name not in known_cars and ev_amps[name] > 0:
                ev_amps[name] = 0.0
                actions.append(f"import limit: {name} (power unknown) off")
    if grid(export_side=True) < -site.export_limit_kw and bat.present and not bat.known:
        higher = min(bat.charge_max, bat.kw + (export_aim - grid(export_side=True)))
        if higher > bat.kw:
            actions.append(f"export limit: battery of unknown power {bat.kw:+.1f} -> {higher:+.1f} kW")
            bat.kw = higher
    # What is left beyond a limit after every lever, and whether it was avoidable at all (every lever at
    # its end, unknown ones included: an unknown battery is at its end only when it is not making it worse).
    breach, unavoidable = None, False
    predicted_import, predicted_export = grid(export_side=False), grid(export_side=True)
    if predicted_import > site.import_limit_kw:
        breach = "import"
        unavoidable = (
            (bat.kw <= -bat.discharge_max + 1e-6 if not bat.known
             else bat.kw <= max(-bat.discharge_max, min(bat.base, bat.now_kw) - bat.rated_reach) + 1e-6)
            and all(ev_amps[n] == 0.0 for n in chargers)
            and (pv_limit is None or (pv_now is not None and pv_limit >= pv_now))
        )
    elif predicted_export < -site.export_limit_kw:
        breach = "export"
        cars_full = all(
            not measured.ev_connected.get(n, False) or ev_amps[n] >= chargers[n].max_current_a - 1e-6
            or not _following(measured, chargers[n])
            for n in known_cars
        )  # fmt: skip
        unavoidable = (
            (bat.kw >= bat.charge_max - 1e-6 if not bat.known
             else bat.kw >= min(bat.charge_max, max(bat.base, bat.now_kw) + bat.rated_reach) - 1e-6)
            and cars_full
            and (not curtailable or (pv_limit is not None and pv_limit <= 0.0))
        )
    if breach is not None:
        actions.append(f"{breach} limit cannot be held this tick" + (": every lever at its end" if unavoidable else ""))
    return Setpoints(
        battery_kw=bat.kw,
        ev_current_a=ev_amps,
        pv_limit_kw=pv_limit,
        safe_state=False,
        predicted_grid_kw=grid(export_side=True),
        actions=tuple(actions),
        pv_probe_kw=probe,
        breach=breach,
        unavoidable=unavoidable,
    )


def _relieve_export_within(
    bat: _Battery, surplus_kw: float, import_kw: Callable[[], float], ceiling_kw: float, *, urgent: bool
) -> float:
    """Move the battery to relieve `surplus_kw` of export, but no further than keeps the import side
    (`import_kw()`, rising with the setpoint) under `ceiling_kw`, found by bisection on the setpoint;
    returns the setpoint change."""
    before_kw = bat.kw
    bat.relieve(surplus_kw, charging_helps=True, urgent=urgent)
    if import_kw() <= ceiling_kw + 1e-9:
        return bat.kw - before_kw
    fits, too_far = before_kw, bat.kw
    for _ in range(RELIEF_SEARCH_STEPS):
        bat.kw = (fits + too_far) / 2
        if import_kw() <= ceiling_kw + 1e-9:
            fits = bat.kw
        else:
            too_far = bat.kw
    bat.kw = fits
    return fits - before_kw


def _pull_back_uncounted(
    bat: _Battery, export_kw: Callable[[], float], import_kw: Callable[[], float], aim_kw: float
) -> float:
    """Lower a charging ask towards where the battery is now, keeping the export side's counted flow
    (`export_kw()`) where it is, until the import side (`import_kw()`) is at `aim_kw` or the counted
    export would change; returns the setpoint change (<= 0)."""
    before_kw, counted_kw = bat.kw, export_kw()

    def keeps_export() -> bool:
        return export_kw() <= counted_kw + 1e-9

    # The lowest setpoint the export side counts the same (the counted help is nondecreasing in the ask).
    keeps, loses = before_kw, bat.now_kw
    bat.kw = loses
    if keeps_export():
        keeps = loses
    else:
        for _ in range(RELIEF_SEARCH_STEPS):
            bat.kw = (keeps + loses) / 2
            if keeps_export():
                keeps = bat.kw
            else:
                loses = bat.kw
    # The highest setpoint between that and the ask that keeps the import side at its aim.
    bat.kw = keeps
    if import_kw() > aim_kw:
        return keeps - before_kw  # the import side over its aim even there: as low as the export allows
    fits, too_far = keeps, before_kw
    for _ in range(RELIEF_SEARCH_STEPS):
        bat.kw = (fits + too_far) / 2
        if import_kw() <= aim_kw:
            fits = bat.kw
        else:
            too_far = bat.kw
    bat.kw = fits
    return fits - before_kw


def battery_register_kw(setpoints: Setpoints, share: float = 1.0) -> float:
    """The battery setpoint (an inverter's `share` of it) as its 0.1 kW register takes it: rounded, but
    towards the limit's side while a limit is at stake (rounded the other way, 0.03 kW of a move the layer
    counted on went missing)."""
    kw = setpoints.battery_kw * share
    tenths = kw * 10
    if setpoints.breach == "import":
        return math.floor(tenths + 1e-9) / 10
    if setpoints.breach == "export":
        return math.ceil(tenths - 1e-9) / 10
    return round(kw, 1)


def export_headroom_kw(measured: Measured) -> float:
    """How far inside the export limit this tick aims (see EXPORT_HEADROOM_MIN_KW)."""
    if measured.load_swing_kw is None:
        return HEADROOM_KW
    return min(EXPORT_HEADROOM_MAX_KW, max(EXPORT_HEADROOM_MIN_KW, LOAD_SWING_HEADROOM_FACTOR * measured.load_swing_kw))


def _blind_pv_limit_kw(site: SiteConfig, measured: Measured) -> float:
    """PV while its balance against the load cannot be seen: a share of the last trusted load, falling to
    nothing as the blindness lasts, plus the export allowed."""
    load = measured.last_load_kw
    trust = max(0.0, 1.0 - measured.blind_s / BLIND_TRUST_S)
    covered = 0.0 if load is None else max(0.0, SAFE_STATE_LOAD_SHARE * trust * load)
    return max(0.0, covered + site.export_limit_kw - HEADROOM_KW)


def safe_setpoints(site: SiteConfig, measured: Measured) -> Setpoints:
    """The safe state, for a stale grid meter and for every exit: battery idle, cars at their minimum (or
    off), PV limited to a share of the last trusted load (plus the export allowed)."""
    chargers = {c.name: c for c in site.ev_chargers}
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
            pv_limit = _blind_pv_limit_kw(site, measured)
    return Setpoints(
        battery_kw=0.0,
        ev_current_a=amps,
        pv_limit_kw=pv_limit,
        safe_state=True,
        predicted_grid_kw=None,
        actions=("safe state: grid meter stale",),
    )
