"""Judging what a site's devices read once: each value on its own, each device, and the devices together.

Pure functions on readings already taken (probe.py takes them): a value is ok, suspicious (possible on a
real site, worth a look) or implausible (something is wired, addressed or scaled wrong), with why.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from config import BusProtocol, DeviceConfig, DeviceKind, SiteConfig
from controller.clock import clock_plausible
from controller.commissioning.solar import NIGHT_BELOW_DEG, sun_day, sun_elevation_deg

__all__ = [
    "BatteryTrend",
    "DeviceRead",
    "DeviceStatus",
    "Finding",
    "PointReading",
    "RawDeviceRead",
    "RawPoint",
    "Verdict",
    "balance_tolerance_kw",
    "battery_moving_kw",
    "fmt_kw",
    "judge_battery_trend",
    "judge_device",
    "judge_site",
    "unit_of",
    "worst",
]

# Phase-to-neutral voltage of a low-voltage supply: 220 V (China) -15 % to 230 V (IEC) +15 %.
NOMINAL_PHASE_V = (187.0, 264.0)
# Below this a phase is not connected to the meter (its own noise floor is a few volts).
PHASE_ABSENT_V = 20.0
# Phase-to-phase voltage of a 380/400 V supply on a phase-to-neutral register: the meter is set up as
# three-phase three-wire, or its voltage leads are wired line to line.
LINE_TO_LINE_V = (340.0, 460.0)
# 50 and 60 Hz grids hold +-0.2 Hz in normal operation and +-1 Hz through a disturbance.
GRID_FREQUENCY_HZ = ((49.0, 51.0), (59.0, 61.0))
# A power factor this low at a meaningful load: a CT on another phase than its voltage lead (or one phase's
# CT reversed). Buildings run at 0.8-1.0; a lone motor starting goes lower, hence only suspicious.
LOW_POWER_FACTOR = 0.5
# Below this power (kW) the power factor and the signs of the phases say nothing: a meter's no-load noise,
# an idle building's standby loads.
MEANINGFUL_KW = 2.0
# Phases disagreeing with their sum by more than this share (and MEANINGFUL_KW): the meter's wiring mode
# is not what it is set to.
PHASE_SUM_SHARE = 0.05
# A device reading more than its rating by this share is not that device, or not in those units: a
# register scale, a ct_ratio or an address is wrong.
RATING_MARGIN = 1.1
# A PV inverter draws a little to stay awake at night (tens of W on a 50 kW string inverter); a PV meter
# may read that much negative. More than this share of the PV peak (and this floor) is a CT backwards.
PV_STANDBY_SHARE = 0.005
PV_STANDBY_MIN_KW = 0.5
# PV this large at night (share of peak, and floor) is not PV.
PV_AT_NIGHT_SHARE = 0.01
PV_AT_NIGHT_MIN_KW = 1.0
# The meters are read one after another (tens of ms apart at 9600 baud, a second or more on a DL/T 645
# bus) while the building's load moves, and a class-1 meter is 1 % off: sums of meters are trusted to this
# share of the flows involved, and never closer than the floor.
BALANCE_SHARE = 0.05
BALANCE_FLOOR_KW = 1.0
# A SoC this many points outside the BMS window: the BMS or the register is not what the site file says.
SOC_OUTSIDE_PTS = 5.0
# A charger with no car drawing more than this is metering something else.
CHARGER_IDLE_KW = 0.5
# A battery moving less than this (and this share of its rating) shows no SoC trend in seconds.
BATTERY_MOVING_KW = 1.0
BATTERY_MOVING_SHARE = 0.02
# Energy counted by a grid meter before its export total says anything about a zero-export site.
ENERGY_EVIDENCE_KWH = 10.0

_UNITS = {"kw": "kW", "kwh": "kWh", "v": "V", "a": "A", "hz": "Hz", "pct": "%", "fraction": "", "pf": "",
          "code": "", "s": "s"}  # fmt: skip
_STATES = {
    DeviceKind.BATTERY_INVERTER: {0: "standby", 1: "running", 2: "derated", 3: "fault"},
    DeviceKind.PV_INVERTER: {0: "standby", 1: "running", 2: "derated", 3: "fault"},
    DeviceKind.EV_CHARGER: {0: "A: no car", 1: "B: car connected", 2: "C: charging", 3: "fault"},
}
_METERS = (DeviceKind.GRID_METER, DeviceKind.PV_METER)


class Verdict(StrEnum):
    OK = "ok"
    SUSPICIOUS = "suspicious"
    IMPLAUSIBLE = "implausible"


_RANK = {Verdict.OK: 0, Verdict.SUSPICIOUS: 1, Verdict.IMPLAUSIBLE: 2}


def worst(verdicts: Iterable[Verdict]) -> Verdict:
    return max(verdicts, key=_RANK.__getitem__, default=Verdict.OK)


class DeviceStatus(StrEnum):
    ANSWERED = "answered"  # every read answered
    SILENT = "silent"  # nothing came back at all
    ERRORS = "errors"  # it answered some reads and refused, garbled or missed others (or its port failed)


@dataclass(frozen=True, slots=True)
class RawPoint:
    """One point as read: `value` in site units, None when not read or dropped by the map's plausible range."""

    quantity: str
    value: float | None
    where: str  # "holding register 0x2012", "DI 02030000"
    raw: str = ""  # the words or data bytes as they came ("" when not read)
    dropped: str = ""  # why the map's plausible range dropped it


@dataclass(frozen=True, slots=True)
class RawDeviceRead:
    device: DeviceConfig
    bus: str
    protocol: BusProtocol
    status: DeviceStatus
    points: tuple[RawPoint, ...]
    errors: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PointReading:
    quantity: str
    value: float | None
    unit: str
    where: str
    raw: str
    verdict: Verdict
    why: str = ""


@dataclass(frozen=True, slots=True)
class DeviceRead:
    """A device read once and judged."""

    name: str
    kind: DeviceKind
    model: str
    bus: str
    address: str
    status: DeviceStatus
    points: tuple[PointReading, ...]
    errors: tuple[str, ...] = ()

    def value(self, quantity: str) -> float | None:
        for point in self.points:
            if point.quantity == quantity:
                return point.value
        return None

    @property
    def verdict(self) -> Verdict:
        return worst(p.verdict for p in self.points)


@dataclass(frozen=True, slots=True)
class Finding:
    """Something seen about a device or the site: what, and what to do about it ('' when nothing)."""

    verdict: Verdict
    subject: str
    what: str
    fix: str = ""


@dataclass(frozen=True, slots=True)
class BatteryTrend:
    """A battery's SoC read twice while its power was read: does the SoC move the way the power says?"""

    device: str
    soc_start_pct: float
    soc_end_pct: float
    power_kw: float  # mean of the reads in between
    elapsed_s: float


def unit_of(quantity: str) -> str:
    return _UNITS.get(quantity.rsplit("_", 1)[-1], "")


def fmt_kw(value: float) -> str:
    return f"{value:+.1f} kW"


def _fmt(value: float, unit: str) -> str:
    text = f"{value:.3f}".rstrip("0").rstrip(".") if math.isfinite(value) else str(value)
    return f"{text} {unit}".rstrip()


def balance_tolerance_kw(terms: Iterable[float]) -> float:
    """How far a sum of meter readings may be off and still be noise (see BALANCE_SHARE)."""
    return max(BALANCE_FLOOR_KW, BALANCE_SHARE * sum(abs(t) for t in terms))


# --- one device ------------------------------------------------------------------------------------


def judge_device(read: RawDeviceRead, site: SiteConfig) -> DeviceRead:
    """Each point of a device judged on its own and against the device's other points and ratings."""
    device = read.device
    values = {p.quantity: p.value for p in read.points if p.value is not None}
    judged: list[PointReading] = []
    for point in read.points:
        unit = unit_of(point.quantity)
        if point.dropped:
            verdict, why = Verdict.IMPLAUSIBLE, point.dropped
        elif point.value is None:
            verdict, why = Verdict.OK, "not read"
        else:
            verdict, why = _judge_point(device, point.quantity, point.value, values, site)
        judged.append(PointReading(point.quantity, point.value, unit, point.where, point.raw, verdict, why))
    return DeviceRead(
        name=device.name,
        kind=device.kind,
        model=device.model,
        bus=read.bus,
        address=str(device.address),
        status=read.status,
        points=tuple(judged),
        errors=read.errors,
    )


def _judge_point(
    device: DeviceConfig, quantity: str, value: float, values: dict[str, float], site: SiteConfig
) -> tuple[Verdict, str]:
    kind = device.kind
    if quantity.startswith("voltage_l"):
        return _judge_voltage(value)
    if quantity == "frequency_hz":
        if any(low <= value <= high for low, high in GRID_FREQUENCY_HZ):
            return Verdict.OK, ""
        return Verdict.SUSPICIOUS, "not within 1 Hz of 50 or 60 Hz: a register or scale other than the map's?"
    if quantity == "power_factor_pf":
        power = values.get("power_kw")
        if power is not None and abs(power) >= MEANINGFUL_KW and abs(value) < LOW_POWER_FACTOR:
            return Verdict.SUSPICIOUS, (
                f"at {_fmt(power, 'kW')} a building runs at 0.8-1.0: a CT on another phase than its voltage lead,"
                " or one phase's CT reversed?"
            )
        return Verdict.OK, ""
    if quantity == "power_kw" and kind in _METERS:
        return _judge_phases(value, values) if kind is DeviceKind.GRID_METER else _judge_pv_meter(device, value, site)
    if quantity == "state_code" and kind in _STATES:
        state = _STATES[kind].get(int(value), f"unknown state {value:g}")
        if state == "fault":
            return Verdict.SUSPICIOUS, "the device reports a fault"
        drawing = values.get("power_kw")  # unknown: nothing to hold against the state
        if (
            kind is DeviceKind.EV_CHARGER
            and state.startswith("A")
            and drawing is not None
            and drawing > CHARGER_IDLE_KW
        ):
            return Verdict.IMPLAUSIBLE, f"no car, yet the charger reads {_fmt(drawing, 'kW')}"
        return Verdict.OK, state
    if kind is DeviceKind.BATTERY_INVERTER:
        return _judge_battery(quantity, value, site)
    pv_peak_kw = site.pv.peak_kw if site.pv is not None else math.inf
    if kind is DeviceKind.PV_INVERTER and quantity == "power_kw" and value > pv_peak_kw * RATING_MARGIN:
        return (
            Verdict.IMPLAUSIBLE,
            f"more than the site's PV peak ({pv_peak_kw:g} kW): a register scale or address is wrong",
        )
    if kind is DeviceKind.EV_CHARGER:
        return _judge_charger(device, quantity, value, site)
    if quantity == "export_energy_kwh" and kind is DeviceKind.GRID_METER and site.export_limit_kw == 0:
        imported = values.get("import_energy_kwh")
        if imported is not None and value > max(imported, ENERGY_EVIDENCE_KWH):
            return Verdict.SUSPICIOUS, (
                f"a zero-export site, yet the meter has counted more export than import ({_fmt(imported, 'kWh')}):"
                " its CT backwards since it was fitted?"
            )
    return Verdict.OK, ""


def _judge_voltage(value: float) -> tuple[Verdict, str]:
    low, high = NOMINAL_PHASE_V
    if low <= value <= high:
        return Verdict.OK, ""
    if value < PHASE_ABSENT_V:
        return Verdict.SUSPICIOUS, "no voltage on this phase: its voltage lead is not connected (or single-phase)"
    if LINE_TO_LINE_V[0] <= value <= LINE_TO_LINE_V[1]:
        return Verdict.SUSPICIOUS, "a phase-to-phase voltage: the meter is set up three-wire, or wired line to line"
    return Verdict.SUSPICIOUS, f"outside the {low:g}..{high:g} V of a phase-to-neutral supply"


def _judge_phases(total_kw: float, values: dict[str, float]) -> tuple[Verdict, str]:
    phases = [values[q] for q in ("power_l1_kw", "power_l2_kw", "power_l3_kw") if q in values]
    if len(phases) == 3:
        if abs(sum(phases) - total_kw) > max(MEANINGFUL_KW, PHASE_SUM_SHARE * abs(total_kw)):
            return Verdict.SUSPICIOUS, (
                f"the phases add up to {_fmt(sum(phases), 'kW')}: the meter's wiring mode is not how it is wired"
            )
        big = [p for p in phases if abs(p) >= MEANINGFUL_KW]
        if any(p > 0 for p in big) and any(p < 0 for p in big):
            signs = ", ".join(f"L{i + 1} {_fmt(p, 'kW')}" for i, p in enumerate(phases))
            return Verdict.SUSPICIOUS, (
                f"phases of opposite sign ({signs}): one phase's CT reversed or on another phase (or single-phase PV"
                " exporting on one phase)"
            )
    return Verdict.OK, ""


def _pv_standby_kw(site: SiteConfig) -> float:
    peak = site.pv.peak_kw if site.pv is not None else 0.0
    return max(PV_STANDBY_MIN_KW, PV_STANDBY_SHARE * peak)


def _judge_pv_meter(device: DeviceConfig, value: float, site: SiteConfig) -> tuple[Verdict, str]:
    if value < -_pv_standby_kw(site):
        return Verdict.IMPLAUSIBLE, (
            f"PV does not consume {_fmt(-value, 'kW')}: the PV meter's CT is backwards"
            f" (set invert_sign = true on {device.name}), or it is not on the PV feeder (swapped with the grid"
            " meter? the site findings below tell)"
        )
    if site.pv is not None and value > site.pv.peak_kw * RATING_MARGIN:
        return Verdict.IMPLAUSIBLE, (
            f"more than the PV peak ({site.pv.peak_kw:g} kW): ct_ratio wrong, or it meters more than PV"
        )
    return _judge_phases(value, {})


def _judge_battery(quantity: str, value: float, site: SiteConfig) -> tuple[Verdict, str]:
    battery = site.battery
    if battery is None:
        return Verdict.OK, ""
    if quantity == "soc_pct":
        low, high = 100 * battery.soc_min, 100 * battery.soc_max
        if value < low - SOC_OUTSIDE_PTS or value > high + SOC_OUTSIDE_PTS:
            return Verdict.SUSPICIOUS, f"outside the BMS window {low:g}..{high:g} % of the site file"
    if quantity in ("power_kw", "power_setpoint_kw"):
        limit = max(battery.max_charge_kw, battery.max_discharge_kw) * RATING_MARGIN
        if abs(value) > limit:
            return Verdict.IMPLAUSIBLE, (
                f"beyond the battery's rating ({battery.max_charge_kw:g} kW charge, {battery.max_discharge_kw:g} kW"
                " discharge): a register scale or address is wrong"
            )
    return Verdict.OK, ""


def _judge_charger(device: DeviceConfig, quantity: str, value: float, site: SiteConfig) -> tuple[Verdict, str]:
    chargers = [c for c in site.ev_chargers if c.device == device.name]
    if not chargers:
        return Verdict.OK, ""
    if quantity == "power_kw":
        rating = sum(c.max_kw for c in chargers)
        if value > rating * RATING_MARGIN:
            return Verdict.IMPLAUSIBLE, f"more than the charger's rating ({rating:g} kW): scale or address wrong"
    if quantity == "current_limit_a":
        rating_a = max(c.max_current_a for c in chargers)
        if value > rating_a:
            return Verdict.SUSPICIOUS, f"offers more than the site file's max_current_a ({rating_a:g} A)"
    return Verdict.OK, ""


# --- the devices together --------------------------------------------------------------------------


def _total(reads: Sequence[DeviceRead], kind: DeviceKind, quantity: str = "power_kw") -> float | None:
    """Sum of a quantity over the devices of a kind; None when any of them is unknown (a part is not the whole)."""
    total = 0.0
    for read in reads:
        if read.kind is kind:
            value = read.value(quantity)
            if value is None:
                return None
            total += value
    return total


def _names(reads: Sequence[DeviceRead], kind: DeviceKind) -> str:
    return ", ".join(r.name for r in reads if r.kind is kind)


def judge_site(
    reads: Sequence[DeviceRead], site: SiteConfig, local: datetime, trend: BatteryTrend | None = None
) -> list[Finding]:
    """What the devices say together: PV or export at night, meters that do not add up, a PV meter that is
    not the inverters', a battery whose power disagrees with its SoC, a revenue meter named as PV meter."""
    findings = _configuration(site)
    findings += _night(reads, site, local)
    findings += _balance(reads, site)
    findings += _pv_agreement(reads, site)
    if trend is not None:
        findings.append(judge_battery_trend(trend, site))
    return findings


def _configuration(site: SiteConfig) -> list[Finding]:
    findings: list[Finding] = []
    for bus, device in site.devices():
        if device.kind is DeviceKind.PV_METER and bus.protocol is BusProtocol.DLT645:
            findings.append(Finding(
                Verdict.SUSPICIOUS, device.name,
                f"{device.name} is a DL/T 645 meter configured as the PV meter; a DL/T 645 meter is usually the"
                " utility's revenue meter at the grid connection",
                "if it is the revenue meter, make it kind = \"grid_meter\"; `--step-test` tells which meter moves"
                " with the grid",
            ))  # fmt: skip
    return findings


def _night(reads: Sequence[DeviceRead], site: SiteConfig, local: datetime) -> list[Finding]:
    if not clock_plausible(local):
        return [Finding(Verdict.SUSPICIOUS, "site", f"the clock says {local:%Y-%m-%d %H:%M}: night checks skipped",
                        "set the time (NTP) before commissioning")]  # fmt: skip
    where = site.site
    elevation = sun_elevation_deg(where.latitude_deg, where.longitude_deg, local)
    zone = local.tzinfo
    if zone is None:
        raise ValueError("judge_site needs the site's local time with its zone")
    day = sun_day(where.latitude_deg, where.longitude_deg, local.date(), zone)
    sun = (
        f"sunrise {day.sunrise:%H:%M}, sunset {day.sunset:%H:%M}"
        if day.sunrise is not None and day.sunset is not None
        else f"polar {day.polar}"
    )
    when = f"{local:%H:%M} {where.timezone}, sun {elevation:+.0f} deg ({sun})"
    if elevation >= NIGHT_BELOW_DEG:
        return [Finding(Verdict.OK, "site", f"daytime at {when}: night checks (PV, export) not applicable")]
    findings: list[Finding] = []
    peak = site.pv.peak_kw if site.pv is not None else 0.0
    pv_night_kw = max(PV_AT_NIGHT_MIN_KW, PV_AT_NIGHT_SHARE * peak)
    for read in reads:
        value = read.value("power_kw")
        if read.kind in (DeviceKind.PV_METER, DeviceKind.PV_INVERTER) and value is not None and value > pv_night_kw:
            cause = (
                f"{read.name} does not meter PV (the grid? a load?)" if read.kind is DeviceKind.PV_METER
                else f"{read.name}'s power register is not its output"
            )  # fmt: skip
            findings.append(Finding(
                Verdict.IMPLAUSIBLE, read.name, f"{read.name} reads {_fmt(value, 'kW')} of PV at night ({when})",
                f"{cause}, or the site's clock or time zone is wrong",
            ))  # fmt: skip
    grid = _total(reads, DeviceKind.GRID_METER)
    battery = _total(reads, DeviceKind.BATTERY_INVERTER)  # 0.0 without a battery; None: not known
    names = _names(reads, DeviceKind.GRID_METER)
    if grid is not None and grid < -BALANCE_FLOOR_KW and battery is None:
        findings.append(Finding(
            Verdict.SUSPICIOUS, names,
            f"{names} shows {_fmt(-grid, 'kW')} of export at night ({when}); the battery's power is not known",
            f"if the battery is not discharging, the grid CT is backwards: set invert_sign = true on {names}",
        ))  # fmt: skip
    elif grid is not None and battery is not None and grid < -BALANCE_FLOOR_KW:
        discharge = max(0.0, -battery)
        if -grid > discharge + balance_tolerance_kw((grid, battery)):
            findings.append(Finding(
                Verdict.IMPLAUSIBLE, names,
                f"{names} shows {_fmt(-grid, 'kW')} of export at night ({when}) with the battery discharging"
                f" {_fmt(discharge, 'kW')}",
                f"the grid CT is backwards: set invert_sign = true on {names} (or an unmetered generator exports)",
            ))  # fmt: skip
    if not findings:
        findings.append(Finding(Verdict.OK, "site", f"night at {when}: no PV and no unexplained export"))
    return findings


def _balance(reads: Sequence[DeviceRead], site: SiteConfig) -> list[Finding]:
    """grid + pv - battery - chargers is the building's own load: never negative beyond noise."""
    grid = _total(reads, DeviceKind.GRID_METER)
    pv_kind = DeviceKind.PV_METER if any(r.kind is DeviceKind.PV_METER for r in reads) else DeviceKind.PV_INVERTER
    terms = {
        "grid": grid,
        "pv": _total(reads, pv_kind),
        "battery": _total(reads, DeviceKind.BATTERY_INVERTER),
        "chargers": _total(reads, DeviceKind.EV_CHARGER),
    }
    known = {name: value for name, value in terms.items() if value is not None}
    unknown = [name for name in terms if name not in known]
    if unknown:
        return [Finding(Verdict.SUSPICIOUS, "site", f"load balance not checked: {', '.join(unknown)} not known")]
    g, p, b, e = (known[n] for n in ("grid", "pv", "battery", "chargers"))
    load = g + p - b - e
    tolerance = balance_tolerance_kw((g, p, b, e))
    sums = f"grid {fmt_kw(g)} + pv {fmt_kw(p)} - battery {fmt_kw(b)} - chargers {fmt_kw(e)} = {fmt_kw(load)}"
    if load < -tolerance:
        return [Finding(
            Verdict.IMPLAUSIBLE, "site",
            f"the meters disagree: {sums} of building load (a building does not generate; noise is"
            f" {tolerance:.1f} kW)",
            "a CT backwards (grid or PV meter), the grid and PV meters swapped, or a ct_ratio wrong:"
            " `greensite check --step-test` tells which",
        )]  # fmt: skip
    ceiling = site.import_limit_kw + (site.pv.peak_kw if site.pv else 0.0) + site.battery_max_discharge_kw
    if load > ceiling * RATING_MARGIN:
        return [Finding(
            Verdict.IMPLAUSIBLE, "site",
            f"the meters add up to more load than the site can supply: {sums} (at most {ceiling:g} kW)",
            "a ct_ratio or register scale is wrong",
        )]  # fmt: skip
    return [Finding(Verdict.OK, "site", f"load balance: {sums} (tolerance {tolerance:.1f} kW)")]


def _pv_agreement(reads: Sequence[DeviceRead], site: SiteConfig) -> list[Finding]:
    """A PV meter should read what the PV inverters make (cable losses and meter accuracy aside)."""
    kinds = {r.kind for r in reads}
    if DeviceKind.PV_METER not in kinds or DeviceKind.PV_INVERTER not in kinds:
        return []
    meter = _total(reads, DeviceKind.PV_METER)
    inverters = _total(reads, DeviceKind.PV_INVERTER)
    grid = _total(reads, DeviceKind.GRID_METER)
    if meter is None or inverters is None:
        return []
    names = _names(reads, DeviceKind.PV_METER)
    tolerance = balance_tolerance_kw((meter, inverters))
    seen = f"{names} reads {fmt_kw(meter)}, the PV inverters {fmt_kw(inverters)}"
    if abs(meter - inverters) <= tolerance:
        return [Finding(Verdict.OK, names, f"{seen}: they agree")]
    if abs(inverters) > tolerance and abs(meter + inverters) <= tolerance:
        return [Finding(Verdict.IMPLAUSIBLE, names, f"{seen}: the same power, negated",
                        f"the PV meter's CT is backwards: set invert_sign = true on {names}")]  # fmt: skip
    if grid is not None and abs(inverters) > tolerance and abs(grid - inverters) <= tolerance:
        grids = _names(reads, DeviceKind.GRID_METER)
        return [Finding(
            Verdict.IMPLAUSIBLE, names,
            f"{seen}, and {grids} reads {fmt_kw(grid)}: the grid meter reads what the inverters make",
            f"the grid and PV meters look swapped: swap the kind of {grids} and {names} in the site file (or swap"
            " the CTs on site); `--step-test` confirms",
        )]  # fmt: skip
    return [Finding(
        Verdict.SUSPICIOUS, names, f"{seen}: they disagree by {abs(meter - inverters):.1f} kW",
        "the PV meter meters more (or less) than the inverters' feeder, or a ct_ratio is off",
    )]  # fmt: skip


def battery_moving_kw(site: SiteConfig) -> float:
    """Below this a battery is idle: its SoC shows no trend within seconds."""
    rating = site.battery.max_charge_kw if site.battery is not None else 0.0
    return max(BATTERY_MOVING_KW, BATTERY_MOVING_SHARE * rating)


def judge_battery_trend(trend: BatteryTrend, site: SiteConfig) -> Finding:
    """Charging (power > 0) raises the SoC; a SoC that moves against the power's sign says the sign is wrong."""
    moving_kw = battery_moving_kw(site)
    start, end, power = trend.soc_start_pct, trend.soc_end_pct, trend.power_kw
    seen = f"{trend.device} reads {fmt_kw(power)} while its SoC went {start:g} -> {end:g} % in {trend.elapsed_s:.0f} s"
    if abs(power) < moving_kw:
        return Finding(Verdict.OK, trend.device, f"{seen}: idle, the sign of its power is not checked here")
    if end == start:
        return Finding(Verdict.OK, trend.device, f"{seen}: the SoC did not move yet, sign not checked here")
    if (end > start) == (power > 0):
        return Finding(Verdict.OK, trend.device, f"{seen}: the sign of its power agrees with its SoC")
    doing = "charging" if power > 0 else "discharging"
    return Finding(
        Verdict.IMPLAUSIBLE, trend.device,
        f"{seen}: it reads {doing}, its SoC says the opposite",
        f"{trend.device}'s power reading has the wrong sign: the map's sign for power_kw (the inverter counts"
        " discharge as positive?), or invert_sign on a meter-based reading",
    )  # fmt: skip
