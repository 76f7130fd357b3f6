"""A synthetic school scenario (Guangdong TOU, zero export) for examples and the benchmark."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["guangdong_price_cny_per_kwh", "school_scenario"]


def guangdong_price_cny_per_kwh(hour: float, summer: bool) -> float:
    """Pearl River Delta TOU for general commercial supply at 1-10 kV (as in zhongshan_school.toml)."""
    h = hour % 24
    if h < 8:
        return 0.2506
    if summer and (11 <= h < 12 or 15 <= h < 17):
        return 1.4015
    if 10 <= h < 12 or 14 <= h < 19:
        return 1.1212
    return 0.6595


def school_scenario(hours: int = 24, step_minutes: int = 15, *, seed: int = 1, summer: bool = True) -> dict[str, Any]:
    """≈300 kWp PV, school-day load, 200 kWh / 100 kW battery, two 22 kW chargers, zero export."""
    rng = np.random.default_rng(seed)
    steps = hours * 60 // step_minutes
    dt = step_minutes / 60
    pv, load, price = [], [], []
    for t in range(steps):
        hour = t * dt
        h = hour % 24
        day = int(hour // 24)
        sun = max(0.0, math.sin(math.pi * (h - 6.2) / 12.6)) ** 1.3
        cloud = 1.0 - 0.35 * max(0.0, math.sin(2 * math.pi * (hour / 5.3 + 0.3 * day))) * (day % 2)
        pv.append(round(300 * 0.82 * sun * cloud, 3))
        occupied = 7.5 <= h < 17.5
        base = 45 + (120 if occupied else 0) + (35 if 11.5 <= h < 13 else 0) + (25 if 17.5 <= h < 21 else 0)
        load.append(round(base * (1 + 0.08 * rng.standard_normal()), 3))
        price.append(guangdong_price_cny_per_kwh(hour, summer))
    per_day = 24 * 60 // step_minutes
    sessions = []
    for day in range(max(1, hours // 24)):
        start = day * per_day
        for charger, arrive_h, leave_h, energy_kwh in (("ev1", 8, 17, 45.0), ("ev2", 13, 22, 60.0)):
            sessions.append(
                {
                    "charger": charger,
                    "arrival_step": start + per_day * arrive_h // 24,
                    "departure_step": start + per_day * leave_h // 24,
                    "energy_kwh": energy_kwh,
                    "min_kw": 0.0,
                    "max_kw": 22.0,
                }
            )
    return {
        "step_minutes": step_minutes,
        "price_import_cny_per_kwh": price,
        "price_export_cny_per_kwh": 0.0,
        "pv_kw": pv,
        "load_kw": load,
        "grid": {
            "import_limit_kw": 400,
            "export_limit_kw": 0,
            "demand_charge_cny_per_kw": 32.0,
            "peak_import_so_far_kw": 120.0,
        },
        "battery": {
            "capacity_kwh": 200,
            "max_charge_kw": 100,
            "max_discharge_kw": 100,
            "charge_efficiency": 0.95,
            "discharge_efficiency": 0.95,
            "soc_min": 0.1,
            "soc_max": 0.95,
            "soc_initial": 0.5,
            "soc_final_min": 0.5,
            "wear_cost_cny_per_kwh": 0.05,
        },
        "ev_sessions": sessions,
        "carbon_kg_per_kwh": 0.5703,
    }
