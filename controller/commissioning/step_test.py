"""The step test: with everything else held, one setpoint is moved by a small step (the battery, then a
charger with a car, then the PV limit), the meters are given time to settle, and each meter must move by
what the stepped device did, the way its role says. Every setpoint moved is put back at the end of its
step, and again on the way out, also when the test is interrupted (Ctrl-C, twice) or fails.

Each step is judged on both its edges, the step and the way back: a building load that switches during
one of them shows as edges that disagree, and the step is then inconclusive rather than evidence. Which
meter moved how, over the steps whose edges agree, is explained by the simplest wiring that predicts it:
as configured, a CT reversed, the grid and PV meters swapped, or a meter that sees none of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from config import ChargerRating, DeviceKind, SiteConfig
from controller.commissioning.probe import DeviceIO
from controller.commissioning.readings import Finding, Verdict, fmt_kw
from firmware_bridge.errors import BridgeError

__all__ = [
    "BatteryStep",
    "MeterMove",
    "Observation",
    "Outcome",
    "Restore",
    "StepKind",
    "StepResult",
    "StepSizes",
    "StepTest",
    "StepTestReport",
    "battery_step",
    "diagnose_wiring",
    "judge_edges",
    "step_sizes",
    "step_tolerance_kw",
]

# A meter has moved "by the step" when it is within this share of the step, and never closer than the floor
# in kW: the building's own load moves while the meters settle (a compressor starting is 2-5 kW, a lift
# more), and meters are class 1. A CT reversed misses by 200 % of the step and a meter that sees nothing by
# 100 %, both far outside 25 %; a 10 kW step is told from a 2.5 kW load swing.
STEP_TOLERANCE_SHARE = 0.25
STEP_TOLERANCE_FLOOR_KW = 1.0
# Meters update their power register every 0.2-1 s (averaged over as long), inverters ramp and a car takes
# up to 5 s to follow a new current (IEC 61851-1). A step has settled when the stepped device has moved and
# this many reads a second apart agree within the tolerance floor on every meter, after MIN_SETTLE_S at
# least (a meter that has not started to move yet must not look settled), and for a battery after the time
# its [battery] ramp_kw_per_s needs for the step on top; at step_hold_s it is judged as it is.
SETTLE_POLL_S = 1.0
SETTLE_STABLE_READS = 3
MIN_SETTLE_S = 3.0
# The stepped device itself must have stopped moving too: its reads over the same window within this share
# of the step (at least the floor). A device still moving 2.5 % of its step a second is ramping, not there
# (a battery slower than its site file says); a steady inverter's or car's own reading wanders by 0.1-0.3 kW
# (0.1 kW register steps, the mains voltage), which the floor absorbs.
ACTUATOR_STILL_SHARE = 0.05
ACTUATOR_STILL_FLOOR_KW = 0.5
# The baseline is the mean of this many reads a poll apart (one read may catch a load switching).
BASELINE_READS = 2
# A restore that fails is tried once more (a glitch on the bus must not leave the battery stepped).
RESTORE_ATTEMPTS = 2
# On the way out the restore runs in a task of its own that a second Ctrl-C or SIGTERM does not cancel, for
# this long at most. A restore is a few writes (the battery, a charger, each PV inverter), each at most
# RESTORE_ATTEMPTS x (frame + response_timeout_s, 0.5 s by default): seconds on a live bus. The bound is for
# a dead one: an engineer pressing Ctrl-C again gets the prompt back, and it stays well inside systemd's
# TimeoutStopSec (90 s) before SIGKILL, which would not even say what was left stepped.
RESTORE_ON_EXIT_TIMEOUT_S = 30.0
# Default step sizes: small enough for any building to absorb, large enough to see above a building's noise.
DEFAULT_STEP_KW = 10.0
DEFAULT_PV_STEP_SHARE = 0.1
# A battery is not asked to charge above its SoC window's top (or discharge below its bottom) minus this.
SOC_MARGIN_PTS = 1.0
# Charger states (generic_ev_charger's state_code, IEC 61851): B (connected) and C (charging) have a car.
CAR_STATES = (1.0, 2.0)


def step_tolerance_kw(step_kw: float) -> float:
    return max(STEP_TOLERANCE_FLOOR_KW, STEP_TOLERANCE_SHARE * abs(step_kw))


class StepKind(StrEnum):
    BATTERY = "battery"
    CHARGER = "charger"
    PV = "pv"


class Outcome(StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"
    INCONCLUSIVE = "inconclusive"  # the step's two edges disagree: the building's load moved


@dataclass(frozen=True, slots=True)
class StepSizes:
    battery_kw: float
    pv_kw: float
    charger_a: float
    hold_s: float


def step_sizes(site: SiteConfig) -> StepSizes:
    """The site's [commissioning] steps, defaults filled in from its ratings."""
    steps = site.commissioning
    battery_kw = steps.step_battery_kw
    if battery_kw is None:
        rating = min(site.battery_max_charge_kw, site.battery_max_discharge_kw)
        battery_kw = min(rating, max(2 * STEP_TOLERANCE_FLOOR_KW, min(DEFAULT_STEP_KW, rating / 2)))
    pv_kw = steps.step_pv_kw
    if pv_kw is None:
        peak = site.pv.peak_kw if site.pv is not None else 0.0
        pv_kw = min(peak, max(2 * STEP_TOLERANCE_FLOOR_KW, min(DEFAULT_STEP_KW, DEFAULT_PV_STEP_SHARE * peak)))
    return StepSizes(battery_kw, pv_kw, steps.step_charger_a, steps.step_hold_s)


@dataclass(frozen=True, slots=True)
class MeterMove:
    device: str
    role: str  # "grid", "pv" (as configured), or the stepped device's own kind
    before_kw: float | None
    after_kw: float | None
    expected_kw: float | None  # None: not judged (the stepped device itself, or nothing to expect)
    back_kw: float | None = None  # after the setpoint was put back (None: the way back was not judged)

    @property
    def delta_kw(self) -> float | None:
        if self.before_kw is None or self.after_kw is None:
            return None
        return self.after_kw - self.before_kw


@dataclass(frozen=True, slots=True)
class Observation:
    """One step's evidence about the meters: the grid and PV meters were expected to move by grid_kw and
    pv_kw (what the stepped device did), and moved by the sums of the grid meters and of the PV meters."""

    step: StepKind
    grid_kw: float
    pv_kw: float
    grid_meters_kw: float
    pv_meters_kw: float | None  # None: the site has no PV meter
    tolerance_kw: float
    back: bool = False  # the edge where the setpoint was put back (else the step itself)

    @property
    def device_kw(self) -> float:
        """What the stepped device did on this edge."""
        return self.pv_kw if self.step is StepKind.PV else self.grid_kw


@dataclass(frozen=True, slots=True)
class StepResult:
    kind: StepKind
    outcome: Outcome
    summary: str
    device: str = ""
    setpoint: str = ""  # "power_setpoint_kw 0 -> 10"
    moves: tuple[MeterMove, ...] = ()
    findings: tuple[Finding, ...] = ()
    observation: Observation | None = None
    restore_observation: Observation | None = None  # the way back, when it was judged
    settled: bool = False
    waited_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Restore:
    device: str
    quantity: str
    value: float
    ok: bool
    error: str = ""


@dataclass
class StepTestReport:
    steps: list[StepResult] = field(default_factory=list)
    restores: list[Restore] = field(default_factory=list)
    wiring: list[Finding] = field(default_factory=list)
    interrupted: str = ""  # why the test stopped early ("" when it ran to the end)

    @property
    def passed(self) -> bool:
        return (
            not self.interrupted
            and all(s.outcome not in (Outcome.FAILED, Outcome.INCONCLUSIVE) for s in self.steps)
            and all(r.ok for r in self.restores)
            and all(f.verdict is Verdict.OK for f in self.wiring)
        )


# --- the wiring that explains what moved ----------------------------------------------------------------

_ROLES = ("grid", "pv", "none")


@dataclass(frozen=True, slots=True)
class _Wiring:
    grid_role: str  # what the configured grid meters really meter
    grid_sign: int
    pv_role: str | None  # None: no PV meter
    pv_sign: int

    @property
    def faults(self) -> int:
        if self.grid_role == "pv" and self.pv_role == "grid":
            swapped = 1
            return swapped + (self.grid_sign < 0) + (self.pv_sign < 0)
        count = (self.grid_role != "grid") + (self.grid_role != "none" and self.grid_sign < 0)
        if self.pv_role is not None:
            count += (self.pv_role != "pv") + (self.pv_role != "none" and self.pv_sign < 0)
        return count

    @staticmethod
    def _predict(role: str, sign: int, observation: Observation) -> float:
        return sign * {"grid": observation.grid_kw, "pv": observation.pv_kw, "none": 0.0}[role]

    def explains(self, observation: Observation) -> bool:
        tolerance = observation.tolerance_kw
        if abs(self._predict(self.grid_role, self.grid_sign, observation) - observation.grid_meters_kw) > tolerance:
            return False
        if self.pv_role is None or observation.pv_meters_kw is None:
            return True
        return abs(self._predict(self.pv_role, self.pv_sign, observation) - observation.pv_meters_kw) <= tolerance


def _wirings(has_pv_meter: bool) -> list[_Wiring]:
    found: list[_Wiring] = []
    pv_roles: Sequence[str | None] = _ROLES if has_pv_meter else (None,)
    for grid_role, grid_sign, pv_role, pv_sign in itertools.product(_ROLES, (1, -1), pv_roles, (1, -1)):
        if (grid_role == "none" and grid_sign < 0) or (pv_role in (None, "none") and pv_sign < 0):
            continue  # a meter that sees nothing has no sign; no PV meter, no sign
        found.append(_Wiring(grid_role, grid_sign, pv_role, pv_sign))
    return found


def diagnose_wiring(
    observations: Sequence[Observation],
    grid_meters: Sequence[str],
    pv_meters: Sequence[str],
    *,
    inconclusive: Sequence[StepKind] = (),
) -> list[Finding]:
    """The simplest wiring of the grid and PV meters that explains every step's moves, as findings with
    what to fix. Ambiguous evidence is said to be so; evidence nothing simple explains is shown as it is.
    `inconclusive` names the steps left out because their edges disagreed."""
    grids = ", ".join(grid_meters)
    pvs = ", ".join(pv_meters)
    if not observations and inconclusive:
        kinds = ", ".join(dict.fromkeys(k.value for k in inconclusive))
        return [Finding(Verdict.SUSPICIOUS, grids, f"inconclusive: the building's load moved during the {kinds}"
                        " step, so the meters were not verified", RERUN_ADVICE)]  # fmt: skip
    if not observations:
        return [Finding(Verdict.SUSPICIOUS, grids, "the meters were not verified: no step moved anything",
                        "run the step test again when a device can be stepped (see the skipped steps)")]  # fmt: skip
    consistent = [w for w in _wirings(bool(pv_meters)) if all(w.explains(o) for o in observations)]
    if not consistent:
        return [_unexplained(observations, grids, pvs)]
    fewest = min(w.faults for w in consistent)
    simplest = [w for w in consistent if w.faults == fewest]
    if len(simplest) > 1:
        stories = "; or ".join(" and ".join(_faults(w, grids, pvs)) or "wired as configured" for w in simplest)
        return [Finding(
            Verdict.SUSPICIOUS, grids,
            f"the moves fit more than one wiring: {stories}",
            "run the step test again when PV is producing and the battery can step (together they tell these apart)",
        )]  # fmt: skip
    wiring = simplest[0]
    if wiring.faults == 0:
        seen = "the grid meter" + (" and the PV meter" if pv_meters else "")
        kinds = ", ".join(dict.fromkeys(o.step.value for o in observations))
        return [Finding(Verdict.OK, grids, f"{seen} moved as configured in every step ({kinds})")]
    return [Finding(Verdict.IMPLAUSIBLE, grids if "grid" in fault else pvs, fault, fix)
            for fault, fix in _fixes(wiring, grids, pvs)]  # fmt: skip


def _faults(wiring: _Wiring, grids: str, pvs: str) -> list[str]:
    return [fault for fault, _ in _fixes(wiring, grids, pvs)]


def _fixes(wiring: _Wiring, grids: str, pvs: str) -> list[tuple[str, str]]:
    fixes: list[tuple[str, str]] = []
    if wiring.grid_role == "pv" and wiring.pv_role == "grid":
        fixes.append((
            f"the grid and PV meters are swapped: {pvs} moves with the grid and {grids} with PV",
            f"swap the kind of {grids} and {pvs} in the site file (or their addresses, where the models are the"
            " same), or swap the CTs on site",
        ))  # fmt: skip
    else:
        if wiring.grid_role == "none":
            fixes.append((f"{grids} did not move when the site's flow did: it does not meter the grid connection",
                          f"check {grids}'s address, where its CTs are fitted (another cable?) and its ct_ratio"
                          " (behind a 100:5 CT without ct_ratio = 20 a meter shows a twentieth)"))  # fmt: skip
        elif wiring.grid_role == "pv":
            fixes.append((f"{grids} moves with PV only: it meters the PV feeder, not the grid connection",
                          f"fit {grids}'s CTs on the incoming supply, or make it the PV meter"))  # fmt: skip
        if wiring.pv_role == "none":
            fixes.append((f"{pvs} did not move when PV did: it does not meter these PV inverters",
                          f"check {pvs}'s address, where its CTs are fitted and its ct_ratio"))  # fmt: skip
        elif wiring.pv_role == "grid":
            fixes.append((f"{pvs} moves with the grid: it meters the grid connection, not PV",
                          f"fit {pvs}'s CTs on the PV feeder, or make it the grid meter"))  # fmt: skip
    if wiring.grid_role != "none" and wiring.grid_sign < 0:
        fixes.append((f"{grids} moved against the flow: its CT is reversed",
                      f"set invert_sign = true on {grids} (or turn its CTs round)"))  # fmt: skip
    if wiring.pv_role not in (None, "none") and wiring.pv_sign < 0:
        fixes.append((f"{pvs} moved against the flow: its CT is reversed",
                      f"set invert_sign = true on {pvs} (or turn its CTs round)"))  # fmt: skip
    return fixes


def _unexplained(observations: Sequence[Observation], grids: str, pvs: str) -> Finding:
    seen = "; ".join(
        f"{o.step.value} step{' (back)' if o.back else ''}: {grids} {fmt_kw(o.grid_meters_kw)}"
        f" (expected {fmt_kw(o.grid_kw)})"
        + (f", {pvs} {fmt_kw(o.pv_meters_kw)} (expected {fmt_kw(o.pv_kw)})" if o.pv_meters_kw is not None else "")
        for o in observations
    )
    # A meter that moves the right way by the wrong amount in every step has the wrong ct_ratio.
    ratios = [o.grid_meters_kw / o.grid_kw for o in observations if abs(o.grid_kw) > o.tolerance_kw]
    fix = "check each meter's address, CT placement and ct_ratio"
    if ratios and all(r > 0 for r in ratios) and max(ratios) - min(ratios) <= STEP_TOLERANCE_SHARE * max(ratios):
        scale = sum(ratios) / len(ratios)
        fix = (
            f"{grids} reads {scale:.2f} x the flow in every step: its ct_ratio is off by that factor (divide it by it)"
        )
    return Finding(Verdict.IMPLAUSIBLE, grids, f"the meters moved in a way no simple miswiring explains: {seen}", fix)


# --- one step, both edges -----------------------------------------------------------------------------------

RERUN_ADVICE = (
    "run the step test again at a quieter moment: a load switching (a compressor, a lift, a kitchen) moved the"
    " grid meter between the reads"
)


def _explaining(observation: Observation, has_pv_meter: bool) -> frozenset[_Wiring]:
    return frozenset(w for w in _wirings(has_pv_meter) if w.explains(observation))


def _edges_agree(step: Observation, back: Observation, has_pv_meter: bool) -> bool:
    """Do the step and the way back tell the same story? Some simple wiring explains both; or none explains
    either, and each meter moved back by what it moved on the step, scaled as the device moved back (a
    wrong ct_ratio is a story too, told twice). A load that switched during one edge breaks both."""
    on_step, on_back = _explaining(step, has_pv_meter), _explaining(back, has_pv_meter)
    if on_step or on_back:
        return bool(on_step & on_back)
    scale = back.device_kw / step.device_kw  # about -1: the device went back where it was
    if abs(step.grid_meters_kw * scale - back.grid_meters_kw) > back.tolerance_kw:
        return False
    if step.pv_meters_kw is None or back.pv_meters_kw is None:
        return True
    return abs(step.pv_meters_kw * scale - back.pv_meters_kw) <= back.tolerance_kw


def judge_edges(stepped: StepResult, back: StepResult, *, has_pv_meter: bool) -> StepResult:
    """A step judged on its two edges (`stepped`: the step, `back`: the setpoint put back, each from
    judge_step). Edges that agree are evidence (passed only when both passed); edges that disagree make the
    step inconclusive: the building's load moved, and no wiring is concluded from it. Without evidence
    from the way back (the device did not return, or it was not judged) the step edge stands alone."""
    step_seen, back_seen = stepped.observation, back.observation
    if step_seen is None or back_seen is None or step_seen.device_kw == 0.0:
        return stepped
    back_seen = replace(back_seen, back=True)
    after_back = {m.device: m.after_kw for m in back.moves}
    moves = tuple(replace(m, back_kw=after_back.get(m.device)) for m in stepped.moves)
    findings = tuple(dict.fromkeys((*stepped.findings, *back.findings)))
    summary = f"{stepped.summary}; back: {back.summary}"
    if _edges_agree(step_seen, back_seen, has_pv_meter):
        both = stepped.outcome is Outcome.PASSED and back.outcome is Outcome.PASSED
        return replace(stepped, outcome=Outcome.PASSED if both else Outcome.FAILED, summary=summary, moves=moves,
                       findings=findings, restore_observation=back_seen)  # fmt: skip
    what = (
        f"inconclusive: the building's load moved during the {stepped.kind.value} step: the grid meters moved"
        f" {fmt_kw(step_seen.grid_meters_kw)} on the step and {fmt_kw(back_seen.grid_meters_kw)} on the way back,"
        f" for {fmt_kw(step_seen.grid_kw)} and {fmt_kw(back_seen.grid_kw)}"
    )
    finding = Finding(Verdict.SUSPICIOUS, stepped.device, what, RERUN_ADVICE)
    return replace(stepped, outcome=Outcome.INCONCLUSIVE, moves=moves, findings=(finding, *findings),
                   summary=f"the building's load moved (the step and the way back disagree): {summary}",
                   restore_observation=back_seen)  # fmt: skip


# --- what each step asks for --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatteryStep:
    """The battery inverter the step test moves (the first; the others are held) and how: its share of the
    site's step and of the battery's ratings, as the controller shares the site's setpoint among them."""

    inverter: str
    share: float  # of the site's battery setpoint (1.0 with one inverter)
    step_kw: float
    max_charge_kw: float
    max_discharge_kw: float
    ramp_kw_per_s: float  # this inverter's part of the battery's ramp

    def ramp_s(self, step_kw: float) -> float:
        """How long the inverter takes to make a step of step_kw at the battery's ramp."""
        return abs(step_kw) / self.ramp_kw_per_s


def battery_step(site: SiteConfig, sizes: StepSizes) -> BatteryStep | None:
    """The first battery inverter's step: its share of step_battery_kw, never below what can be told from
    noise (2 kW), within its share of the battery's ratings and its own rated_kw. None without a battery."""
    inverters = [d for _, d in site.devices() if d.kind is DeviceKind.BATTERY_INVERTER]
    if site.battery is None or not inverters:
        return None
    first = inverters[0]
    share = site.battery_shares()[first.name]
    charge_kw, discharge_kw = share * site.battery_max_charge_kw, share * site.battery_max_discharge_kw
    if first.rated_kw is not None:
        charge_kw, discharge_kw = min(charge_kw, first.rated_kw), min(discharge_kw, first.rated_kw)
    step_kw = min(charge_kw, discharge_kw, max(2 * STEP_TOLERANCE_FLOOR_KW, share * sizes.battery_kw))
    return BatteryStep(first.name, share, step_kw, charge_kw, discharge_kw, share * site.battery.ramp_kw_per_s)


def plan_battery_step(
    site: SiteConfig,
    step_kw: float,
    soc_pct: float | None,
    grid_kw: float,
    setpoint_kw: float,
    *,
    rating_kw: tuple[float, float] | None = None,
) -> tuple[float | None, str]:
    """The battery setpoint to step to (None and why when no step fits): towards the middle of the SoC
    window, within the ratings (`rating_kw`: the stepped inverter's charge and discharge rating, else the
    battery's), and with the grid inside its limits after the step."""
    if site.battery is None:
        return None, "the site has no battery"
    max_charge_kw, max_discharge_kw = rating_kw or (site.battery_max_charge_kw, site.battery_max_discharge_kw)
    window = site.tuning.battery  # the SoC window the site is run in (within the BMS's)
    prefer_charge = soc_pct is None or soc_pct < 50 * (window.soc_min + window.soc_max)
    reasons: list[str] = []
    for direction in (1, -1) if prefer_charge else (-1, 1):
        target = setpoint_kw + direction * step_kw
        word = "charge" if direction > 0 else "discharge"
        grid_after = grid_kw + direction * step_kw
        if target > max_charge_kw or -target > max_discharge_kw:
            reasons.append(f"to {word}: {fmt_kw(target)} is beyond the battery's rating")
        elif soc_pct is not None and direction > 0 and soc_pct >= 100 * window.soc_max - SOC_MARGIN_PTS:
            reasons.append(f"to {word}: SoC {soc_pct:g} % is at the top of its window")
        elif soc_pct is not None and direction < 0 and soc_pct <= 100 * window.soc_min + SOC_MARGIN_PTS:
            reasons.append(f"to {word}: SoC {soc_pct:g} % is at the bottom of its window")
        elif grid_after > site.import_limit_kw or grid_after < -site.export_limit_kw:
            reasons.append(f"to {word}: the grid would go to {fmt_kw(grid_after)}, outside its limits")
        else:
            return target, ""
    return None, "; ".join(reasons)


def _charger_kw(charger: ChargerRating, amps: float) -> float:
    drawn = amps if amps >= charger.min_current_a else 0.0  # below its minimum a car does not charge
    return charger.phases * charger.voltage_v * drawn / 1000


def plan_charger_step(
    site: SiteConfig, charger: ChargerRating, step_a: float, limit_a: float, grid_kw: float
) -> tuple[float | None, str]:
    """The current to offer: step_a less if the charger keeps its minimum, else step_a more (within its
    rating), and the grid inside its limits after the car follows."""
    down = limit_a - step_a
    target = (
        down
        if down >= charger.min_current_a
        else min(charger.max_current_a, max(charger.min_current_a, limit_a + step_a))
    )
    if target == limit_a:
        return None, f"the charger offers {limit_a:g} A and cannot be stepped by {step_a:g} A within its rating"
    grid_after = grid_kw + _charger_kw(charger, target) - _charger_kw(charger, limit_a)
    if grid_after > site.import_limit_kw or grid_after < -site.export_limit_kw:
        return None, f"the grid would go to {fmt_kw(grid_after)}, outside its limits"
    return target, ""


def plan_pv_step(site: SiteConfig, step_kw: float, pv_kw: float, grid_kw: float) -> tuple[float | None, str]:
    """The PV limit (percent of the PV peak, as the controller writes it) that takes step_kw off what PV makes
    now; None and why when PV makes too little to take a step off that can be told from noise."""
    if site.pv is None or not site.pv.curtailable:
        return None, "the site's PV cannot be limited"
    drop = min(step_kw, pv_kw)
    if drop < 2 * STEP_TOLERANCE_FLOOR_KW:
        return None, f"PV makes {pv_kw:.1f} kW: too little to lower by a step that can be told from noise"
    if grid_kw + drop > site.import_limit_kw:
        return None, f"the grid would go to {fmt_kw(grid_kw + drop)}, above its import limit"
    return round(max(0.0, min(100.0, 100 * (pv_kw - drop) / site.pv.peak_kw)), 1), ""


# --- running it ---------------------------------------------------------------------------------------------


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _sum(snapshot: dict[str, float | None], names: Sequence[str]) -> float | None:
    total = 0.0
    for name in names:
        value = snapshot.get(name)
        if value is None:
            return None
        total += value
    return total


class StepTest:
    """Runs the three steps on a site's devices. `report` holds what was done so far, also when the run is
    interrupted; `progress(line)` (if given) is told what is happening, for a terminal."""

    def __init__(
        self,
        site: SiteConfig,
        devices: DeviceIO,
        *,
        poll_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.site = site
        self.sizes = step_sizes(site)
        self.devices = devices
        self.report = StepTestReport()
        self._poll_s = SETTLE_POLL_S if poll_s is None else poll_s
        self._clock = clock
        self._sleep = sleep
        self._progress = progress or (lambda line: None)
        self._changed: dict[tuple[str, str], float] = {}  # setpoint -> the value to put back
        named: dict[DeviceKind, list[str]] = {kind: [] for kind in DeviceKind}
        for _, device in site.devices():
            named[device.kind].append(device.name)
        self.grid_meters = named[DeviceKind.GRID_METER]
        self.pv_meters = named[DeviceKind.PV_METER]
        self.pv_inverters = named[DeviceKind.PV_INVERTER]
        self.batteries = named[DeviceKind.BATTERY_INVERTER]
        self.chargers = named[DeviceKind.EV_CHARGER]
        self._watched = self.grid_meters + self.pv_meters + self.pv_inverters + self.batteries + self.chargers

    async def run(self) -> StepTestReport:
        failure: BaseException | None = None
        try:
            for step in (self._battery_step, self._charger_step, self._pv_step):
                self.report.steps.append(await step())
        except asyncio.CancelledError as err:
            failure = err
            self.report.interrupted = "interrupted (Ctrl-C or a signal)"
            raise
        except BaseException as err:
            failure = err
            self.report.interrupted = f"stopped by an error: {type(err).__name__}: {err}"
            raise
        finally:
            cancelled = await self._restore_on_exit()  # whatever the interruption left stepped
            evidence = [s for s in self.report.steps if s.outcome is not Outcome.INCONCLUSIVE]
            observations = [o for s in evidence for o in (s.observation, s.restore_observation) if o is not None]
            inconclusive = [s.kind for s in self.report.steps if s.outcome is Outcome.INCONCLUSIVE]
            self.report.wiring = diagnose_wiring(observations, self.grid_meters, self.pv_meters,
                                                 inconclusive=inconclusive)  # fmt: skip
            if cancelled and not isinstance(failure, asyncio.CancelledError):
                # Cancelled while putting back: the cancellation goes on now (an error on its way out is in
                # the report, and chained to it).
                self.report.interrupted = self.report.interrupted or "interrupted (Ctrl-C or a signal)"
                raise asyncio.CancelledError
        return self.report

    # --- I/O ------------------------------------------------------------------------------------------

    async def _read(self, device: str, quantity: str) -> float | None:
        try:
            return (await self.devices.read(device, (quantity,))).get(quantity)
        except BridgeError:
            return None

    async def _snapshot(self) -> dict[str, float | None]:
        return {name: await self._read(name, "power_kw") for name in self._watched}

    async def _baseline(self) -> dict[str, float | None]:
        snapshots = [await self._snapshot()]
        for _ in range(BASELINE_READS - 1):
            await self._sleep(self._poll_s)
            snapshots.append(await self._snapshot())
        return {name: _mean([s[name] for s in snapshots]) for name in self._watched}

    async def _set(self, device: str, quantity: str, value: float, previous: float) -> None:
        """Write a step's setpoint; from here on it is put back whatever happens."""
        self._changed.setdefault((device, quantity), previous)
        await self.devices.write(device, quantity, value)

    async def _restore_on_exit(self) -> bool:
        """Put back whatever is still stepped, in a task of its own that further cancellations of this one
        (a second Ctrl-C, SIGTERM after SIGHUP) do not reach, for RESTORE_ON_EXIT_TIMEOUT_S at most; what it
        could not put back by then is recorded as not restored. True when this task was cancelled meanwhile:
        the caller lets that cancellation go on."""
        if not self._changed:
            return False
        loop = asyncio.get_running_loop()
        restore = asyncio.create_task(self._restore(), name="step-test-restore")
        deadline = loop.time() + RESTORE_ON_EXIT_TIMEOUT_S
        cancelled = False
        while not restore.done():
            left_s = deadline - loop.time()
            if left_s <= 0 and not restore.cancelling():
                restore.cancel()  # the bus is dead: say what is left stepped rather than wait for ever
            try:
                # asyncio.wait, unlike wait_for, never cancels what it waits for: on a timeout, or when
                # this task is cancelled, the restore goes on.
                await asyncio.wait((restore,), timeout=max(left_s, 0.0) or None)
            except asyncio.CancelledError:
                cancelled = True
                self._progress(f"still putting the setpoints back (at most {max(left_s, 0.0):.0f} s more)")
        error = (
            f"not put back within {RESTORE_ON_EXIT_TIMEOUT_S:g} s (the write did not finish)" if restore.cancelled()
            else f"not put back: {type(restore.exception()).__name__}: {restore.exception()}"
        )  # fmt: skip
        for (device, quantity), value in self._changed.items():
            self.report.restores.append(Restore(device, quantity, value, ok=False, error=error))
            self._progress(f"COULD NOT RESTORE {device} {quantity} = {value:g}: {error}")
        self._changed.clear()
        return cancelled

    async def _restore(self) -> None:
        while self._changed:
            (device, quantity), value = next(iter(self._changed.items()))
            error = ""
            for _ in range(RESTORE_ATTEMPTS):
                try:
                    await self.devices.write(device, quantity, value)
                except (BridgeError, ValueError) as err:
                    error = str(err)
                    continue
                error = ""
                break
            del self._changed[(device, quantity)]
            self.report.restores.append(Restore(device, quantity, value, ok=not error, error=error))
            self._progress(f"restored {device} {quantity} = {value:g}" if not error else
                           f"COULD NOT RESTORE {device} {quantity} = {value:g}: {error}")  # fmt: skip

    async def _hold(
        self,
        writes: Sequence[_Write],
        actuator: Sequence[str],
        before: dict[str, float | None],
        step_kw: float,
        ramp_s: float,
    ) -> tuple[dict[str, float | None], bool, float]:
        """Keep writing `writes` (a device watchdog armed by the controller must not undo a step) and read
        until the meters and the stepped device settle or step_hold_s runs out, never calling it settled
        before MIN_SETTLE_S + ramp_s (the device's own ramp over the step). Returns the settled readings,
        whether they settled, and how long it took."""
        hold_s = self.sizes.hold_s
        earliest_s = min(MIN_SETTLE_S + ramp_s, hold_s)
        still_kw = max(ACTUATOR_STILL_FLOOR_KW, ACTUATOR_STILL_SHARE * abs(step_kw))
        start = _sum(before, actuator)
        started = self._clock()
        history: list[dict[str, float | None]] = []
        settled = False
        while True:
            await self._sleep(self._poll_s)
            for write in writes:
                with contextlib.suppress(BridgeError):  # the reads below show whether the step still stands
                    await self.devices.write(write.device, write.quantity, write.target)
            history.append(await self._snapshot())
            waited = self._clock() - started
            recent = history[-SETTLE_STABLE_READS:]
            moved = _sum(recent[-1], actuator)
            has_moved = moved is not None and start is not None and abs(moved - start) >= STEP_TOLERANCE_FLOOR_KW
            stable = len(recent) == SETTLE_STABLE_READS and all(
                _spread([r[name] for r in recent]) <= STEP_TOLERANCE_FLOOR_KW for name in self._watched
            )
            still = _spread([_sum(r, actuator) for r in recent]) <= still_kw
            if has_moved and stable and still and waited >= earliest_s:
                settled = True
                break
            if waited >= hold_s:
                break
        after = {name: _mean([r[name] for r in recent]) for name in self._watched}
        return after, settled, self._clock() - started

    # --- the steps ------------------------------------------------------------------------------------

    async def _battery_step(self) -> StepResult:
        plan = battery_step(self.site, self.sizes)
        if plan is None:
            return StepResult(StepKind.BATTERY, Outcome.SKIPPED, "no battery")
        name = plan.inverter  # the others are held with everything else
        setpoint = await self._read(name, "power_setpoint_kw")
        if setpoint is None:
            return StepResult(StepKind.BATTERY, Outcome.SKIPPED, f"{name}'s setpoint cannot be read, so it could"
                              " not be put back", name)  # fmt: skip
        before = await self._baseline()
        grid = _sum(before, self.grid_meters)
        if grid is None:
            return StepResult(StepKind.BATTERY, Outcome.FAILED, "the grid meter cannot be read", name)
        soc = await self._read(name, "soc_pct")
        target, why = plan_battery_step(self.site, plan.step_kw, soc, grid, setpoint,
                                        rating_kw=(plan.max_charge_kw, plan.max_discharge_kw))  # fmt: skip
        if target is None:
            return StepResult(StepKind.BATTERY, Outcome.SKIPPED, why, name)
        write = _Write(name, "power_setpoint_kw", setpoint, target)
        ramp_s = plan.ramp_s(target - setpoint)
        result = await self._step(StepKind.BATTERY, [write], target - setpoint, before, [name], ramp_s=ramp_s)
        if MIN_SETTLE_S + ramp_s <= self.sizes.hold_s:
            return result
        assert self.site.battery is not None  # a battery_step plan has one
        enough_s = min(600.0, 5 * math.ceil((MIN_SETTLE_S + ramp_s + SETTLE_STABLE_READS * self._poll_s) / 5))
        slow = Finding(Verdict.SUSPICIOUS, name,
                       f"the battery ramps at {self.site.battery.ramp_kw_per_s:g} kW/s ([battery] ramp_kw_per_s):"
                       f" its step of {fmt_kw(target - setpoint)} takes {ramp_s:.0f} s, more than step_hold_s"
                       f" ({self.sizes.hold_s:g} s) leaves it",
                       f"set step_hold_s = {enough_s:g} in [commissioning] (or a smaller step_battery_kw)")  # fmt: skip
        return replace(result, findings=(*result.findings, slow))

    async def _charger_step(self) -> StepResult:
        reasons: list[str] = []
        for charger in self.site.ev_chargers:
            state = await self._read(charger.device, "state_code")
            if state not in CAR_STATES:
                reasons.append(f"{charger.device}: " + ("state not readable" if state is None else "no car"))
                continue
            limit = await self._read(charger.device, "current_limit_a")
            if limit is None:
                reasons.append(f"{charger.device}: its current limit cannot be read, so it could not be put back")
                continue
            before = await self._baseline()
            grid = _sum(before, self.grid_meters)
            if grid is None:
                return StepResult(StepKind.CHARGER, Outcome.FAILED, "the grid meter cannot be read", charger.device)
            target, why = plan_charger_step(self.site, charger, self.sizes.charger_a, limit, grid)
            if target is None:
                reasons.append(f"{charger.device}: {why}")
                continue
            expected = _charger_kw(charger, target) - _charger_kw(charger, limit)
            write = _Write(charger.device, "current_limit_a", limit, target)
            return await self._step(StepKind.CHARGER, [write], expected, before, [charger.device])
        summary = "no car" if reasons and all(r.endswith("no car") for r in reasons) else "; ".join(reasons)
        return StepResult(StepKind.CHARGER, Outcome.SKIPPED, summary or "no charger")

    async def _pv_step(self) -> StepResult:
        if not self.pv_inverters or self.site.pv is None:
            return StepResult(StepKind.PV, Outcome.SKIPPED, "no PV inverter")
        if not self.site.pv.curtailable:
            return StepResult(StepKind.PV, Outcome.SKIPPED, "the site's PV is not curtailable")
        limits: dict[str, float] = {}
        for name in self.pv_inverters:
            limit = await self._read(name, "power_limit_pct")
            if limit is None:
                return StepResult(StepKind.PV, Outcome.SKIPPED, f"the PV limit of {name} cannot be read, so it could"
                                  " not be put back", name)  # fmt: skip
            limits[name] = limit
        before = await self._baseline()
        grid, pv = _sum(before, self.grid_meters), _sum(before, self.pv_inverters)
        if grid is None or pv is None:
            return StepResult(StepKind.PV, Outcome.FAILED, "the grid meter or a PV inverter cannot be read")
        pct, why = plan_pv_step(self.site, self.sizes.pv_kw, pv, grid)
        if pct is None:
            return StepResult(StepKind.PV, Outcome.SKIPPED, why)
        expected = min(0.0, self.site.pv.peak_kw * pct / 100 - pv)
        # Every inverter gets the same limit, in percent of its rating, as the controller writes it.
        writes = [_Write(name, "power_limit_pct", limits[name], pct) for name in self.pv_inverters]
        return await self._step(StepKind.PV, writes, expected, before, self.pv_inverters)

    async def _step(
        self,
        kind: StepKind,
        writes: Sequence[_Write],
        expected_kw: float,
        before: dict[str, float | None],
        actuator: Sequence[str],
        *,
        ramp_s: float = 0.0,
    ) -> StepResult:
        """Make a step, judge it, put it back and judge the way back (judge_edges). `ramp_s`: how long the
        stepped device's own ramp takes over the step."""
        device = writes[0].device
        setpoint = ", ".join(f"{w.device} {w.quantity} {w.previous:g} -> {w.target:g}" for w in writes)
        self._progress(f"{kind.value}: {setpoint} (expect {fmt_kw(expected_kw)}), waiting up to"
                       f" {self.sizes.hold_s:g} s for the meters to settle")  # fmt: skip
        try:
            for write in writes:
                await self._set(write.device, write.quantity, write.target, write.previous)
        except (BridgeError, ValueError) as err:
            # A write that raised may still have landed (a DeviceTimeout: only its reply was lost), so it is
            # put back before the next step's baseline. Not in a `finally`: on a cancellation run() puts it
            # back at once, shielded, without waiting here for the device to come back.
            await self._restore()
            await self._settle_back(actuator, before)
            return StepResult(kind, Outcome.FAILED, f"the step could not be written: {err} (put back in case"
                              f" {device} took it)", device, setpoint)  # fmt: skip
        after, settled, waited = await self._hold(writes, actuator, before, expected_kw, ramp_s)
        base = StepResult(kind, Outcome.FAILED, "", device, setpoint, settled=settled, waited_s=waited)
        stepped = judge_step(base, expected_kw, before=before, after=after, actuator=actuator,
                             grid_meters=self.grid_meters, pv_meters=self.pv_meters)  # fmt: skip
        restored_from = len(self.report.restores)
        await self._restore()
        put_back = all(r.ok for r in self.report.restores[restored_from:])
        if stepped.observation is None or not put_back:
            # Nothing to compare the way back with (the device did not follow), or no way back to judge.
            await self._settle_back(actuator, before)
            return stepped
        back_kw = -stepped.observation.device_kw  # the device goes back by what it did
        after_back, settled_back, waited_back = await self._hold((), actuator, after, back_kw, ramp_s)
        await self._settle_back(actuator, before)
        back = judge_step(replace(base, settled=settled_back, waited_s=waited_back), back_kw, before=after,
                          after=after_back, actuator=actuator, grid_meters=self.grid_meters,
                          pv_meters=self.pv_meters)  # fmt: skip
        return judge_edges(stepped, back, has_pv_meter=bool(self.pv_meters))

    async def _settle_back(self, actuator: Sequence[str], before: dict[str, float | None]) -> None:
        """After a restore, wait (step_hold_s at most) for the stepped device to be back where it was: the next
        step's baseline must not be taken while it ramps back."""
        start = _sum(before, actuator)
        started = self._clock()
        while start is not None and self._clock() - started < self.sizes.hold_s:
            now = _sum({name: await self._read(name, "power_kw") for name in actuator}, actuator)
            if now is not None and abs(now - start) <= STEP_TOLERANCE_FLOOR_KW:
                return
            await self._sleep(self._poll_s)


@dataclass(frozen=True, slots=True)
class _Write:
    device: str
    quantity: str
    previous: float
    target: float


def _spread(values: Sequence[float | None]) -> float:
    known = [v for v in values if v is not None]
    return max(known) - min(known) if known else 0.0


def judge_step(
    base: StepResult,
    expected_kw: float,
    *,
    before: dict[str, float | None],
    after: dict[str, float | None],
    actuator: Sequence[str],
    grid_meters: Sequence[str],
    pv_meters: Sequence[str],
) -> StepResult:
    """One step judged from the readings before and after it: did the stepped device follow, and did each
    meter move as the configured wiring says (the grid by what the device did, PV only with PV)? `base`
    names the step, its device and setpoint, and how the hold went."""
    kind, device = base.kind, base.device
    moved = _delta(before, after, actuator)
    tolerance = step_tolerance_kw(expected_kw)
    grid_delta = _delta(before, after, grid_meters)
    pv_delta = _delta(before, after, pv_meters) if pv_meters else None
    what = {StepKind.BATTERY: "the battery", StepKind.CHARGER: "the car", StepKind.PV: "PV"}[kind]
    moves = [MeterMove(n, kind.value, before.get(n), after.get(n), None) for n in actuator]
    if grid_delta is None or (pv_meters and pv_delta is None):
        return replace(base, outcome=Outcome.FAILED, summary="a meter could not be read during the step",
                       moves=tuple(moves))  # fmt: skip
    findings: list[Finding] = []
    follow_kw = max(STEP_TOLERANCE_FLOOR_KW, STEP_TOLERANCE_SHARE * abs(expected_kw))
    if moved is None or abs(moved) < follow_kw or moved * expected_kw < 0:
        return _not_following(base, what, expected_kw, moved=moved, grid_delta=grid_delta, tolerance=tolerance,
                              moves=moves)  # fmt: skip
    if abs(moved - expected_kw) > tolerance and kind is not StepKind.CHARGER:  # a car takes what it takes
        findings.append(Finding(Verdict.SUSPICIOUS, device, f"{what} moved {fmt_kw(moved)} of the"
                                f" {fmt_kw(expected_kw)} asked (a BMS limit, a ramp slower than step_hold_s,"
                                " clouds?)"))  # fmt: skip
    # What each meter should have done, from what the stepped device did.
    grid_kw, pv_kw = (-moved, moved) if kind is StepKind.PV else (moved, 0.0)
    observed_tolerance = step_tolerance_kw(moved)
    observation = Observation(kind, grid_kw, pv_kw, grid_delta, pv_delta, observed_tolerance)
    for name in grid_meters:
        moves.append(MeterMove(name, "grid", before.get(name), after.get(name), grid_kw / len(grid_meters)))
    for name in pv_meters:
        moves.append(MeterMove(name, "pv", before.get(name), after.get(name), pv_kw / len(pv_meters)))
    grid_ok = abs(grid_delta - grid_kw) <= observed_tolerance
    pv_ok = pv_delta is None or abs(pv_delta - pv_kw) <= observed_tolerance
    seen = f"{what} moved {fmt_kw(moved)}, grid meters {fmt_kw(grid_delta)} (expected {fmt_kw(grid_kw)})"
    if pv_delta is not None:
        seen += f", PV meters {fmt_kw(pv_delta)} (expected {fmt_kw(pv_kw)})"
    if not base.settled:
        findings.append(Finding(Verdict.SUSPICIOUS, device, "the meters had not settled when the hold ran out",
                                "a longer [commissioning] step_hold_s, or a quieter moment"))  # fmt: skip
    outcome = Outcome.PASSED if grid_ok and pv_ok else Outcome.FAILED
    return replace(base, outcome=outcome, summary=seen, moves=tuple(moves), findings=tuple(findings),
                   observation=observation)  # fmt: skip


def _delta(before: dict[str, float | None], after: dict[str, float | None], names: Sequence[str]) -> float | None:
    start, end = _sum(before, names), _sum(after, names)
    return None if start is None or end is None else end - start


def _not_following(
    base: StepResult,
    what: str,
    expected_kw: float,
    *,
    moved: float | None,
    grid_delta: float,
    tolerance: float,
    moves: list[MeterMove],
) -> StepResult:
    """The stepped device did not do what it was asked (or its reading does not show it)."""
    kind, device = base.kind, base.device
    did = "could not be read" if moved is None else f"moved {fmt_kw(moved)}"
    summary = f"{what} {did} for a step of {fmt_kw(expected_kw)}; the grid meters moved {fmt_kw(grid_delta)}"
    if moved is not None and moved * expected_kw < 0 and abs(moved) >= tolerance:
        finding = Finding(Verdict.IMPLAUSIBLE, device, f"{device} moved against its setpoint: {summary}",
                          f"{device}'s setpoint or its power reading has the wrong sign (the map's sign); fix it and"
                          " run the step test again")  # fmt: skip
        outcome = Outcome.FAILED
    elif abs(abs(grid_delta) - abs(expected_kw)) <= tolerance:
        finding = Finding(Verdict.IMPLAUSIBLE, device, f"{device}'s reading stood still, the grid moved: {summary}",
                          f"{device}'s power register (the map, or its address) is not the one that moves")  # fmt: skip
        outcome = Outcome.FAILED
    elif kind is StepKind.CHARGER:
        finding = Finding(Verdict.SUSPICIOUS, device, f"the car did not take the current offered: {summary}",
                          "a full or sleeping car does not; try again with a car that charges (or check the"
                          f" charger's address if {device} never follows)")  # fmt: skip
        outcome = Outcome.SKIPPED
    else:
        finding = Finding(Verdict.IMPLAUSIBLE, device, f"{device} did not follow its setpoint: {summary}",
                          f"{device} is not in remote-control mode, or another device answers at its address"
                          " (wrong address?)")  # fmt: skip
        outcome = Outcome.FAILED
    return replace(base, outcome=outcome, summary=summary, moves=tuple(moves), findings=(finding,))
