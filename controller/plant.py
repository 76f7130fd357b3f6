"""A simulated plant: PV with passing clouds, a school or community-centre load (with steps and noise),
battery physics (optionally slower than its rating), EV arrivals.

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
from controller.safety import LIMIT_MARGIN_KW, mean_ramp_change_kw

__all__ = ["EvArrival", "Plant", "Weather", "school_arrivals"]

Weather = Literal["sunny", "overcast", "passing_clouds"]
# Overcast sky: this share of the clear-sky yield, with slow variation.
OVERCAST_FACTOR = 0.3

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
    """School-day staff cars: one arrives 08:00 for 45 kWh, one 13:00 for 60 kWh (if two chargers)."""
    out: list[EvArrival] = []
    names = [c.name for c in site.ev_chargers]
    for day in range(days + 1):
        date = (start + timedelta(days=day)).replace(hour=0, minute=0, second=0, microsecond=0)
        if date.weekday() >= 5 or date.date() in holidays:
            continue
        plan = [(8, 17, 45.0), (13, 22, 60.0)]
        for name, (arrive_h, leave_h, energy) in zip(names, plan, strict=False):
            out.append(EvArrival(name, date + timedelta(hours=arrive_h), date + timedelta(hours=leave_h), energy))
    return out


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
        self._random = random.Random(self.seed)
        # Passing clouds: (centre second, half-width s, depth) over the run, a few per day.
        self._clouds = [
            (self._random.uniform(0, 14 * 86400), self._random.uniform(300, 2400), self._random.uniform(0.3, 0.8))
            for _ in range(40)
        ]
        self.evs = {c.name: _Ev() for c in self.site.ev_chargers}
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
        return self.start + timedelta(seconds=self.now_s if at_s is None else at_s)

    def pv_available_at(self, at_s: float) -> float:
        """The truth, for baselines and the perfect-foresight reference (the controller never sees it)."""
        return self._pv_available(at_s)

    def load_at(self, at_s: float) -> float:
        return self._load(at_s)

    def _pv_available(self, at_s: float) -> float:
        if self.site.pv is None:
            return 0.0
        t = self.local_time(at_s)
        hour = t.hour + t.minute / 60 + t.second / 3600
        sun = max(0.0, math.sin(math.pi * (hour - 6.2) / 12.6)) ** 1.3
        shade = 1.0
        if self.weather == "overcast":
            shade = OVERCAST_FACTOR * (1 + 0.3 * math.sin(at_s / 1800.0))
        elif self.weather == "passing_clouds":
            for centre, width, depth in self._clouds:
                distance = abs(at_s - centre)
                if distance < width:
                    shade *= 1 - depth * (1 - distance / width)
        return float(self.site.pv.peak_kw * 0.82 * sun * shade)

    def _load(self, at_s: float) -> float:
        t = self.local_time(at_s)
        hour = t.hour + t.minute / 60
        working_day = t.weekday() < 5 and t.date() not in self.holidays
        sim = self.site.simulation
        if sim.load_profile == "school":
            base = 45.0
            if working_day and 7.5 <= hour < 17.5:
                base += 120.0
            if working_day and 11.5 <= hour < 13.0:
                base += 35.0
            if 17.5 <= hour < 21.0:
                base += 25.0
        else:  # community centre: open every day 08-21, classes in the evening, events at weekends
            base = 15.0
            if 8.0 <= hour < 21.0:
                base += 30.0
            if 18.0 <= hour < 21.0:
                base += 20.0
            if not working_day and 14.0 <= hour < 17.0:
                base += 25.0
        base *= sim.load_scale
        for start, end, kw in self._steps:
            if start <= at_s < end:
                base += kw
        # Deterministic wobble (no state): HVAC and kitchen cycling; then noise.
        load = base * (1 + 0.05 * math.sin(at_s / 97.0) + 0.03 * math.sin(at_s / 13.0))
        if self.load_noise_kw:
            load += self._load_noise[int(at_s) % NOISE_PERIOD_S]
        return max(0.0, load)

    def _refresh(self) -> None:
        self.pv_available_kw = self._pv_available(self.now_s)
        limit_kw = (self.site.pv.peak_kw if self.site.pv else 0.0) * self.pv_limit_pct / 100
        self.pv_kw = min(self.pv_available_kw, limit_kw)
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
            charger = next(c for c in self.site.ev_chargers if c.name == name)
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
            price = self.site.tariff.band_at(self.local_time())[1]
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
        self._refresh()

    def _noise(self) -> float:
        if not self.meter_noise_kw:
            return 0.0
        self._meter_reads += 1
        return self._meter_noise[self._meter_reads % NOISE_PERIOD_S]

    def _charger_name(self, device: str) -> str:
        return next((c.name for c in self.site.ev_chargers if c.device == device), device)


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
