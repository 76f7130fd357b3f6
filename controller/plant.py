"""A simulated plant: PV with passing clouds, a school or community-centre load (with steps and noise),
battery physics (optionally slower than its rating), EV arrivals.

Options that add realism (each off by default, so that a scenario keeps its meaning unless it asks):
`weather="mixed"` draws each day's sky (sunny / cloudy / overcast / rain) from the seed; `variation`
makes each day's load its own (cooling driven by the day's temperature, occupancy, events); `replay`
plays recorded interval data (controller.interval_csv) for the load, the PV or both. The kind of day
(working day, vacation, weekend, public holiday) comes from the site's calendar (controller.day_kinds).

It exposes what each device's meter would read and accepts the setpoints the devices would take,
so the simulated meters of firmware_bridge can serve it over real protocols.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Literal

from config import DeviceKind, SiteConfig
from controller import clear_sky
from controller.day_kinds import DayKind, SiteCalendar
from controller.interval_csv import IntervalSeries
from controller.safety import LIMIT_MARGIN_KW, mean_ramp_change_kw

__all__ = ["DayDraw", "EvArrival", "Plant", "Sky", "Weather", "school_arrivals"]

Weather = Literal["sunny", "overcast", "passing_clouds", "mixed"]
Sky = Literal["sunny", "cloudy", "overcast", "rain"]
# Overcast sky: this share of the clear-sky yield, with slow variation.
OVERCAST_FACTOR = 0.3
RAIN_FACTOR = 0.12
# Rough Pearl River Delta climatology for `weather="mixed"`: the chance of each sky, wet season (Apr-Sep)
# and dry season, and each month's mean daily maximum temperature (C).
SKY_ODDS: dict[bool, tuple[tuple[Sky, float], ...]] = {
    True: (("sunny", 0.35), ("cloudy", 0.35), ("overcast", 0.15), ("rain", 0.15)),
    False: (("sunny", 0.45), ("cloudy", 0.30), ("overcast", 0.20), ("rain", 0.05)),
}
MONTH_MAX_TEMP_C = (18.5, 19.0, 22.0, 26.0, 30.0, 32.0, 33.0, 33.0, 32.0, 29.5, 25.5, 20.5)
SKY_TEMP_OFFSET_C: dict[Sky, float] = {"sunny": 1.5, "cloudy": 0.0, "overcast": -1.5, "rain": -3.5}
# Cooling starts above this daily maximum; the school's chillers add this much per degree above it
# (before load_scale), the community centre's half.
COOLING_FROM_C = 27.0
COOLING_KW_PER_C = 8.0

# The battery inverter reports SoC in 0.1 % steps.
SOC_RESOLUTION = 0.001
# Random load noise and meter noise repeat with this period (s): drawn once, looked up by the second.
NOISE_PERIOD_S = 3607

# State codes of the generic EV charger map (IEC 61851): A no vehicle, B connected, C charging.
EV_NO_VEHICLE, EV_CONNECTED, EV_CHARGING = 0.0, 1.0, 2.0


@dataclass(frozen=True, slots=True)
class EvArrival:
    charger: str
    arrive: datetime
    leave: datetime
    energy_kwh: float


def school_arrivals(
    site: SiteConfig, start: datetime, days: int, holidays: frozenset[date] = frozenset()
) -> list[EvArrival]:
    """Staff cars on working days (the site calendar's, make-up Saturdays included): one arrives 08:00 for
    45 kWh, one 13:00 for 60 kWh (if two chargers)."""
    out: list[EvArrival] = []
    names = [c.name for c in site.ev_chargers]
    calendar = SiteCalendar(site.calendar)
    for day in range(days + 1):
        date = (start + timedelta(days=day)).replace(hour=0, minute=0, second=0, microsecond=0)
        if not calendar.working(date.date()) or date.date() in holidays:
            continue
        plan = [(8, 17, 45.0), (13, 22, 60.0)]
        for name, (arrive_h, leave_h, energy) in zip(names, plan, strict=False):
            out.append(EvArrival(name, date + timedelta(hours=arrive_h), date + timedelta(hours=leave_h), energy))
    return out


@dataclass(frozen=True, slots=True)
class DayDraw:
    """One simulated day's weather and occupancy (drawn from the seed and the day alone)."""

    sky: Sky
    max_temp_c: float
    occupancy: float  # multiplies the occupied part of the load
    event: bool  # an evening event on a working day, a daytime one on a day off
    clouds: tuple[tuple[float, float, float], ...]  # (centre s of the day, half-width s, depth)
    dim: float  # overcast / rain: the share of clear sky


@dataclass
class _Ev:
    arrival: EvArrival | None = None
    delivered_kwh: float = 0.0
    current_limit_a: float = 0.0
    power_kw: float = 0.0


@dataclass
class Plant:
    """Physics in simulated time; `advance(to)` integrates the last setpoints up to `to`."""

    site: SiteConfig
    start: datetime  # local wall-clock time at simulated second 0
    seed: int = 1
    arrivals: list[EvArrival] = field(default_factory=list)
    weather: Weather = "passing_clouds"
    holidays: frozenset[date] = frozenset()  # school closed: the weekend load
    variation: bool = False  # each day its own load: cooling by temperature, occupancy, events
    skies: tuple[Sky, ...] = ()  # weather "mixed": these skies day by day from `start` (cycled), not drawn
    replay: IntervalSeries | None = None  # recorded data, for load and/or PV (what the recording has)
    # The site's own kind of load and battery (site.simulation), and what a random site adds: load
    # steps (a few a day, up to this many kW either way), load noise and meter noise (standard
    # deviations, kW).
    load_step_kw: float = 0.0
    load_noise_kw: float = 0.0
    meter_noise_kw: float = 0.0
    now_s: float = 0.0
    soc: float = 0.5
    battery_setpoint_kw: float = 0.0
    battery_kw: float = 0.0
    pv_limit_pct: float = 100.0
    pv_available_kw: float = 0.0
    pv_kw: float = 0.0
    load_kw: float = 0.0
    grid_import_kwh: float = 0.0
    grid_export_kwh: float = 0.0
    pv_kwh: float = 0.0
    requested_kwh: float = 0.0
    delivered_kwh: float = 0.0
    cost_cny: float = 0.0
    # The counterfactual for the summary: no battery, cars charge flat out on arrival, PV curtailed
    # only as the export limit requires.
    baseline_import_kwh: float = 0.0
    baseline_cost_cny: float = 0.0
    baseline_delivered_kwh: float = 0.0
    # Demand is metered as the largest 15-minute average import.
    peak_15min_kw: float = 0.0
    baseline_peak_15min_kw: float = 0.0
    # The last interval between two ticks, judged on its mean grid flow (what the controller's last
    # correction achieved over it): the mean, and whether any setting of the levers could have kept
    # it inside the import / export limit (the battery at the rate it really moves).
    interval_grid_kw: float | None = None
    interval_import_avoidable: bool = True
    interval_export_avoidable: bool = True
    evs: dict[str, _Ev] = field(default_factory=dict)
    # Sessions that ended: (arrival, delivered kWh), to judge "satisfied where physically possible".
    finished: list[tuple[EvArrival, float]] = field(default_factory=list)
    _bucket: list[float] = field(default_factory=lambda: [-1.0, 0.0, 0.0])  # index, kWh actual, kWh baseline
    _baseline_ev_kwh: dict[str, float] = field(default_factory=dict)
    _random: random.Random = field(init=False)
    _clouds: list[tuple[float, float, float]] = field(init=False)
    _battery_at_tick_kw: float = field(init=False, default=0.0)
    _inverter_setpoints_kw: dict[str, float] = field(init=False, default_factory=dict)
    _battery_shares: dict[str, float] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._calendar = SiteCalendar(self.site.calendar)
        self._days: dict[int, DayDraw] = {}
        self._random = random.Random(self.seed)
        # Passing clouds: (centre second, half-width s, depth) over the run, a few per day.
        self._clouds = [
            (self._random.uniform(0, 14 * 86400), self._random.uniform(300, 2400), self._random.uniform(0.3, 0.8))
            for _ in range(40)
        ]
        # The clouds that may cover some second of each hour, in their order: a step looks at those only.
        self._clouds_by_hour: dict[int, list[tuple[float, float, float]]] = {}
        for cloud in self._clouds:
            centre, width, _ = cloud
            for hour in range(int((centre - width) // 3600), int((centre + width) // 3600) + 1):
                self._clouds_by_hour.setdefault(hour, []).append(cloud)
        self.evs = {c.name: _Ev() for c in self.site.ev_chargers}
        # Looked up on every plant step and every request a charger answers: worked out once.
        self._chargers = {c.name: c for c in self.site.ev_chargers}
        self._charger_of_device: dict[str, str] = {}
        for charger in self.site.ev_chargers:
            self._charger_of_device.setdefault(charger.device, charger.name)
        self._local: tuple[float, datetime] | None = None
        self._price: tuple[SiteConfig, tuple[int, int, int, int, int], float] | None = None
        self._battery_shares = self.site.battery_shares()
        # Load steps: (start s, end s, kW), a few a day over two weeks.
        self._steps = [
            (start, start + self._random.uniform(60, 3 * 3600), self._random.uniform(-1, 1) * self.load_step_kw)
            for start in (self._random.uniform(0, 14 * 86400) for _ in range(60 if self.load_step_kw else 0))
        ]
        self._load_noise = [self._random.gauss(0.0, self.load_noise_kw) for _ in range(NOISE_PERIOD_S)]
        self._meter_noise = [self._random.gauss(0.0, self.meter_noise_kw) for _ in range(NOISE_PERIOD_S)]
        self._meter_reads = 0
        self._refresh()
        # The battery's power when the controller last read it: where any setpoint of that tick starts
        # from (a battery that moves at once has moved by the time the interval is judged).
        self._battery_at_tick_kw = self.battery_kw

    # --- the world ---------------------------------------------------------------------------------

    def local_time(self, at_s: float | None = None) -> datetime:
        at_s = self.now_s if at_s is None else at_s
        local = self._local
        if local is None or local[0] != at_s:  # the plant asks for the same second several times a step
            local = self._local = (at_s, self.start + timedelta(seconds=at_s))
        return local[1]

    def pv_available_at(self, at_s: float) -> float:
        """The truth, for baselines and the perfect-foresight reference (the controller never sees it)."""
        return self._pv_available(at_s)

    def load_at(self, at_s: float) -> float:
        return self._load(at_s)

    def day_kind(self, day: date) -> DayKind:
        return DayKind.HOLIDAY if day in self.holidays else self._calendar.kind(day)

    def day_draw(self, day: date) -> DayDraw:
        """The day's weather and occupancy: from the seed and the date alone, so a day is the same whether
        the run reaches it or the history before the run does."""
        index = (day - self.start.date()).days
        draw = self._days.get(index)
        if draw is None:
            draw = self._days[index] = self._draw(day)
        return draw

    def _draw(self, day: date) -> DayDraw:
        rng = random.Random(f"{self.seed}:{day.isoformat()}")
        sky: Sky
        pick = rng.random()
        if self.weather == "mixed" and self.skies:
            sky = self.skies[(day - self.start.date()).days % len(self.skies)]
        elif self.weather == "mixed":
            sky = "sunny"
            for candidate, odds in SKY_ODDS[4 <= day.month <= 9]:
                sky = candidate
                pick -= odds
                if pick < 0:
                    break
        else:
            sky = "sunny" if self.weather == "sunny" else "overcast" if self.weather == "overcast" else "cloudy"
        temp = MONTH_MAX_TEMP_C[day.month - 1] + SKY_TEMP_OFFSET_C[sky] + rng.gauss(0.0, 1.2)
        count, depth = {"sunny": (3, (0.05, 0.2)), "cloudy": (25, (0.3, 0.8))}.get(sky, (0, (0.0, 0.0)))
        clouds = tuple(
            (rng.uniform(6 * 3600, 19 * 3600), rng.uniform(300, 2400), rng.uniform(*depth)) for _ in range(count)
        )
        dim = {"overcast": rng.uniform(0.22, 0.4), "rain": rng.uniform(0.06, 0.18)}.get(sky, 1.0)
        return DayDraw(sky, temp, max(0.7, rng.gauss(1.0, 0.06)), rng.random() < 0.12, clouds, dim)

    def _pv_available(self, at_s: float) -> float:
        pv = self.site.pv
        if pv is None:
            return 0.0
        t = self.local_time(at_s)
        if self.replay is not None and self.replay.pv_kw is not None:
            return min(pv.peak_kw, self.replay.pv_kw[self.replay.index_at(t)])
        sky = clear_sky.clear_sky_kw(pv, self.site.site.latitude_deg, self.site.site.longitude_deg, t)
        shade = 1.0
        if self.weather == "mixed":
            draw = self.day_draw(t.date())
            if draw.sky in {"overcast", "rain"}:
                shade = draw.dim * (1 + 0.3 * math.sin(at_s / 1800.0))
            second = t.hour * 3600 + t.minute * 60 + t.second
            for centre, width, depth in draw.clouds:
                distance = abs(second - centre)
                if distance < width:
                    shade *= 1 - depth * (1 - distance / width)
        elif self.weather == "overcast":
            shade = OVERCAST_FACTOR * (1 + 0.3 * math.sin(at_s / 1800.0))
        elif self.weather == "passing_clouds":
            for centre, width, depth in self._clouds_by_hour.get(int(at_s // 3600), ()):
                distance = abs(at_s - centre)
                if distance < width:
                    shade *= 1 - depth * (1 - distance / width)
        return float(sky * clear_sky.PERFORMANCE_RATIO * shade)

    def _load(self, at_s: float) -> float:
        t = self.local_time(at_s)
        if self.replay is not None and self.replay.load_kw is not None:
            return self.replay.load_kw[self.replay.index_at(t)]
        hour = t.hour + t.minute / 60
        kind = self.day_kind(t.date())
        working_day = kind in {DayKind.WORKDAY, DayKind.VACATION}
        draw = self.day_draw(t.date()) if self.variation else None
        occupancy = 1.0 if draw is None else draw.occupancy
        sim = self.site.simulation
        if sim.load_profile == "school":
            base = 45.0
            if kind is DayKind.WORKDAY and 7.5 <= hour < 17.5:
                base += 120.0 * occupancy
            if kind is DayKind.WORKDAY and 11.5 <= hour < 13.0:
                base += 35.0 * occupancy
            if kind is DayKind.VACATION and 8.0 <= hour < 17.0:
                base += 25.0 * occupancy  # staff, offices, a summer class
            if 17.5 <= hour < 21.0:
                base += 25.0
            cooling_hours, cooling_share = (9.0, 17.5), 1.0 if kind is DayKind.WORKDAY else 0.2
        else:  # community centre: open every day 08-21, classes in the evening, events at weekends
            base = 15.0
            if 8.0 <= hour < 21.0:
                base += 30.0 * occupancy
            if 18.0 <= hour < 21.0:
                base += 20.0 * occupancy
            if not working_day and 14.0 <= hour < 17.0:
                base += 25.0 * occupancy
            cooling_hours, cooling_share = (10.0, 21.0), 0.5
        if draw is not None:
            start_h, end_h = cooling_hours
            if start_h <= hour < end_h and draw.max_temp_c > COOLING_FROM_C:
                shape = math.sin(math.pi * (hour - start_h) / (end_h - start_h))  # peaks mid-afternoon
                base += COOLING_KW_PER_C * cooling_share * (draw.max_temp_c - COOLING_FROM_C) * (0.5 + 0.5 * shape)
            if draw.event and ((working_day and 18.0 <= hour < 21.0) or (not working_day and 9.0 <= hour < 16.0)):
                base += 40.0 if working_day else 30.0  # a parents' evening, an open day, a wedding banquet
        base *= sim.load_scale
        for start, end, kw in self._steps:
            if start <= at_s < end:
                base += kw
        # Deterministic wobble (no state): HVAC and kitchen cycling; then noise.
        load = base * (1 + 0.05 * math.sin(at_s / 97.0) + 0.03 * math.sin(at_s / 13.0))
        if self.load_noise_kw:
            load += self._load_noise[int(at_s) % NOISE_PERIOD_S]
        return max(0.0, load)

    def _refresh(self, *, same_second: bool = False) -> None:
        """The flows now. `same_second`: a setpoint changed and time did not move: the sun and the load are
        what the last refresh found (both depend on the second alone)."""
        if not same_second:
            self.pv_available_kw = self._pv_available(self.now_s)
        limit_kw = (self.site.pv.peak_kw if self.site.pv else 0.0) * self.pv_limit_pct / 100
        self.pv_kw = min(self.pv_available_kw, limit_kw)
        if not same_second:
            self.load_kw = self._load(self.now_s)
        local = self.local_time()
        for name, ev in self.evs.items():
            if ev.arrival is not None and local >= ev.arrival.leave:
                self.finished.append((ev.arrival, ev.delivered_kwh))
                ev.arrival = None
                ev.power_kw = 0.0
            if ev.arrival is None:
                for arrival in self.arrivals:
                    if arrival.charger == name and arrival.arrive <= local < arrival.leave:
                        ev.arrival = arrival
                        ev.delivered_kwh = 0.0
                        self.requested_kwh += arrival.energy_kwh
                        self.arrivals = [a for a in self.arrivals if a is not arrival]
                        break
            charger = self._chargers[name]
            if ev.arrival is None or ev.delivered_kwh >= ev.arrival.energy_kwh - 1e-6:
                ev.power_kw = 0.0
            elif ev.current_limit_a < charger.min_current_a - 1e-6:
                ev.power_kw = 0.0  # below the IEC 61851 minimum the car does not charge
            else:
                amps = min(ev.current_limit_a, charger.max_current_a)
                ev.power_kw = charger.phases * charger.voltage_v * amps / 1000
        if self.site.battery is None:
            self.battery_kw = 0.0
            return
        target = self._battery_target_kw()
        if self.site.simulation.battery_response_kw_per_s is None or (target == 0.0 and self._bms_stops()):
            self.battery_kw = target  # at once (or the BMS cutting it off)

    def _battery_target_kw(self) -> float:
        """Where the battery is going: its setpoint within what the BMS allows (whatever it is told)."""
        b = self.site.battery
        assert b is not None
        kw = max(-b.max_discharge_kw, min(b.max_charge_kw, self.battery_setpoint_kw))
        if kw > 0 and self.soc >= b.soc_max - 1e-6:
            kw = 0.0
        if kw < 0 and self.soc <= b.soc_min + 1e-6:
            kw = 0.0
        return kw

    def _bms_stops(self) -> bool:
        b = self.site.battery
        assert b is not None
        return (self.battery_kw > 0 and self.soc >= b.soc_max - 1e-6) or (
            self.battery_kw < 0 and self.soc <= b.soc_min + 1e-6
        )

    @property
    def grid_kw(self) -> float:
        return self.load_kw + self.battery_kw + sum(ev.power_kw for ev in self.evs.values()) - self.pv_kw

    def advance(self, to_s: float) -> None:
        """Integrate the current flows from now to `to_s` (flows are held over the interval; a battery
        slower than at once moves towards its setpoint at its rate)."""
        dt_s = max(0.0, to_s - self.now_s)
        dt_h = dt_s / 3600
        battery_end_kw = self.battery_kw
        if dt_h > 0:
            rate = self.site.simulation.battery_response_kw_per_s
            if rate is not None and self.site.battery is not None:
                step = self._battery_target_kw() - self.battery_kw
                mean_kw = self.battery_kw + mean_ramp_change_kw(step, rate, dt_s)
                battery_end_kw = self.battery_kw + max(-rate * dt_s, min(rate * dt_s, step))
                self.battery_kw = mean_kw  # the interval's mean, for the energy below
            self._judge_interval(dt_s, self._battery_at_tick_kw)
            grid = self.grid_kw
            price = self._price_now()
            export_price = self.site.tariff.export_price_cny_per_kwh
            self.cost_cny += (price * max(grid, 0.0) - export_price * max(-grid, 0.0)) * dt_h
            baseline_grid = self._advance_baseline(dt_h, price, export_price)
            self._demand(max(grid, 0.0) * dt_h, max(baseline_grid, 0.0) * dt_h)
            self.grid_import_kwh += max(grid, 0.0) * dt_h
            self.grid_export_kwh += max(-grid, 0.0) * dt_h
            self.pv_kwh += self.pv_kw * dt_h
            b = self.site.battery
            if b is not None:
                stored = self.battery_kw * (b.charge_efficiency if self.battery_kw > 0 else 1 / b.discharge_efficiency)
                self.soc = min(b.soc_max, max(b.soc_min, self.soc + stored * dt_h / b.capacity_kwh))
                self.battery_kw = battery_end_kw
            for ev in self.evs.values():
                if ev.arrival is not None and ev.power_kw > 0:
                    add = min(ev.power_kw * dt_h, ev.arrival.energy_kwh - ev.delivered_kwh)
                    ev.delivered_kwh += add
                    self.delivered_kwh += add
        self.now_s = to_s
        self._refresh()
        self._battery_at_tick_kw = self.battery_kw  # what the controller reads before it writes

    def _price_now(self) -> float:
        """The import price now: it goes by the local minute, so it is looked up once a minute."""
        local = self.local_time()
        minute = (local.year, local.month, local.day, local.hour, local.minute)
        cached = self._price
        if cached is None or cached[0] is not self.site or cached[1] != minute:
            cached = self._price = (self.site, minute, self.site.tariff.band_at(local)[1])
        return cached[2]

    def _judge_interval(self, dt_s: float, battery_start_kw: float) -> None:
        """The interval's mean grid flow, and whether the levers could have kept it inside each limit:
        the battery at what the BMS and the tuning allow, moving at its real rate; the cars off or flat
        out (those that want energy); PV at nothing (curtailable) or all the sun gives."""
        site, t = self.site, self.site.tuning.battery
        # The battery moves at its real rate, and no controller may command it faster than its rating.
        rate = site.simulation.battery_response_kw_per_s
        rated_step = math.inf if site.battery is None else site.battery.ramp_kw_per_s * dt_s
        charge = discharge = 0.0
        if site.battery is not None:
            # Within the SoC register's resolution of a bound the controller cannot tell it from the bound.
            if self.soc < t.soc_max - SOC_RESOLUTION:
                charge = site.battery_max_charge_kw
            if self.soc > t.soc_min + SOC_RESOLUTION:
                discharge = site.battery_max_discharge_kw

        def battery_mean(to_kw: float) -> float:
            step = max(-rated_step, min(rated_step, to_kw - battery_start_kw))
            return battery_start_kw + (step if rate is None else mean_ramp_change_kw(step, rate, dt_s))

        cars_max = sum(
            c.max_kw for c in site.ev_chargers
            if (ev := self.evs[c.name]).arrival is not None and ev.delivered_kwh < ev.arrival.energy_kwh - 1e-6
        )  # fmt: skip
        curtailable = site.pv is not None and site.pv.curtailable
        highest = self.load_kw + battery_mean(charge) + cars_max - (0.0 if curtailable else self.pv_available_kw)
        lowest = self.load_kw + battery_mean(-discharge) - self.pv_available_kw
        self.interval_grid_kw = self.grid_kw
        self.interval_export_avoidable = highest >= -site.export_limit_kw - LIMIT_MARGIN_KW
        self.interval_import_avoidable = lowest <= site.import_limit_kw + LIMIT_MARGIN_KW

    def _demand(self, import_kwh: float, baseline_kwh: float) -> None:
        index = float(self.now_s // 900)
        if index != self._bucket[0]:
            self._bucket = [index, 0.0, 0.0]
        self._bucket[1] += import_kwh
        self._bucket[2] += baseline_kwh
        self.peak_15min_kw = max(self.peak_15min_kw, self._bucket[1] * 4)
        self.baseline_peak_15min_kw = max(self.baseline_peak_15min_kw, self._bucket[2] * 4)

    def _advance_baseline(self, dt_h: float, price: float, export_price: float) -> float:
        ev_kw = 0.0
        for charger in self.site.ev_chargers:
            ev = self.evs[charger.name]
            if ev.arrival is None:
                self._baseline_ev_kwh.pop(charger.name, None)
                continue
            done = self._baseline_ev_kwh.get(charger.name, 0.0)
            kw = min(charger.max_kw, max(0.0, ev.arrival.energy_kwh - done) / dt_h)
            self._baseline_ev_kwh[charger.name] = done + kw * dt_h
            self.baseline_delivered_kwh += kw * dt_h
            ev_kw += kw
        grid = self.load_kw + ev_kw - self.pv_available_kw
        grid = max(grid, -self.site.export_limit_kw)  # the rest is curtailed
        self.baseline_import_kwh += max(grid, 0.0) * dt_h
        self.baseline_cost_cny += (price * max(grid, 0.0) - export_price * max(-grid, 0.0)) * dt_h
        return grid

    # --- what the meters read, what the devices accept ---------------------------------------------

    def readings(self, kind: DeviceKind, device: str) -> dict[str, float]:
        if kind is DeviceKind.GRID_METER:
            return _meter(self.grid_kw + self._noise(), self.grid_import_kwh, self.grid_export_kwh)
        if kind is DeviceKind.PV_METER:
            return _meter(self.pv_kw + self._noise(), self.pv_kwh, 0.0)
        if kind is DeviceKind.BATTERY_INVERTER:
            share = self._battery_shares.get(device, 1.0)  # several inverters: each its rating's share
            return {"power_kw": self.battery_kw * share, "soc_pct": self.soc * 100,
                    "dc_voltage_v": 700.0 + 60 * self.soc, "state_code": 1.0}  # fmt: skip
        if kind is DeviceKind.PV_INVERTER:
            return {"power_kw": self.pv_kw, "energy_total_kwh": self.pv_kwh, "state_code": 1.0}
        ev = self.evs.get(self._charger_name(device))
        if ev is None:
            return {}
        state = EV_NO_VEHICLE if ev.arrival is None else (EV_CHARGING if ev.power_kw > 0 else EV_CONNECTED)
        return {"power_kw": ev.power_kw, "state_code": state, "session_energy_kwh": ev.delivered_kwh}

    def write(self, kind: DeviceKind, device: str, quantity: str, value: float) -> None:
        if kind is DeviceKind.BATTERY_INVERTER and quantity == "power_setpoint_kw":
            self._inverter_setpoints_kw[device] = value
            self.battery_setpoint_kw = sum(self._inverter_setpoints_kw.values())
        elif kind is DeviceKind.PV_INVERTER and quantity == "power_limit_pct":
            self.pv_limit_pct = value
        elif kind is DeviceKind.EV_CHARGER and quantity == "current_limit_a":
            ev = self.evs.get(self._charger_name(device))
            if ev is not None:
                ev.current_limit_a = value
        self._refresh(same_second=True)

    def _noise(self) -> float:
        if not self.meter_noise_kw:
            return 0.0
        self._meter_reads += 1
        return self._meter_noise[self._meter_reads % NOISE_PERIOD_S]

    def _charger_name(self, device: str) -> str:
        return self._charger_of_device.get(device, device)


def _meter(power_kw: float, import_kwh: float, export_kwh: float) -> dict[str, float]:
    amps = abs(power_kw) * 1000 / (3 * 230.0)
    return {
        "power_kw": power_kw,
        "power_l1_kw": power_kw / 3,
        "power_l2_kw": power_kw / 3,
        "power_l3_kw": power_kw / 3,
        "voltage_l1_v": 230.5,
        "voltage_l2_v": 229.8,
        "voltage_l3_v": 231.1,
        "current_l1_a": amps,
        "current_l2_a": amps,
        "current_l3_a": amps,
        "power_factor_pf": 0.98,
        "frequency_hz": 50.0,
        "import_energy_kwh": import_kwh,
        "export_energy_kwh": export_kwh,
    }
