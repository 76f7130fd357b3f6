"""What the pages show, as JSON: the visitors' display (flows and what the PV saved, nothing else) and the
engineer's dashboard (the MQTT payloads: state, health, plan). Pure functions of the runtime's state, plus
`DayTracker`, which keeps today's start of the PV counter."""

from __future__ import annotations

import math
from datetime import datetime, time, timedelta
from typing import TYPE_CHECKING, Any

from config import DeviceKind
from controller.mqtt._payloads import health_payload, plan_payload, state_payload

if TYPE_CHECKING:
    from controller.runtime import Runtime

__all__ = ["DayTracker", "dashboard_payload", "display_payload", "grid_reading_age_s", "plan_chart"]


def grid_reading_age_s(runtime: Runtime) -> float | None:
    """Seconds (the runtime's clock) since the grid meters were last all read; None before the first reading."""
    ages = []
    for name, kind in runtime.kinds.items():
        if kind is not DeviceKind.GRID_METER:
            continue
        latest = runtime.latest.get(name)
        at_s = None if latest is None else latest.at_s.get("power_kw")
        if at_s is None:
            return None
        ages.append(runtime.clock.now() - at_s)
    return max(ages) if ages else None


def _freshness(runtime: Runtime) -> dict[str, Any]:
    now = runtime.clock.local()
    age = grid_reading_age_s(runtime)
    as_of = None if age is None else (now - timedelta(seconds=age)).isoformat(timespec="seconds")
    stale = age is None or age > runtime.site.control.stale_data_timeout_s
    return {"ts": now.isoformat(timespec="seconds"), "as_of": as_of, "stale": stale,
            "stale_after_s": runtime.site.control.stale_data_timeout_s}  # fmt: skip


class DayTracker:
    """Today's PV energy: the lifetime counter minus its value at local midnight. Started mid-day, the part of
    today before this process is added from the time series (`set_before_start`)."""

    def __init__(self) -> None:
        self._next_midnight_s: float | None = None
        self.day: str | None = None
        self.pv_at_day_start_kwh = 0.0
        self.started_local: datetime | None = None  # when tracking began (the first tick seen)

    def on_tick(self, runtime: Runtime) -> None:
        now_s = runtime.clock.now()
        if self._next_midnight_s is not None and now_s < self._next_midnight_s:
            return
        local = runtime.clock.local()
        midnight = datetime.combine(local.date() + timedelta(days=1), time(), local.tzinfo)
        self._next_midnight_s = now_s + (midnight - local).total_seconds()
        self.day = local.date().isoformat()
        self.pv_at_day_start_kwh = runtime.counters.pv_kwh
        if self.started_local is None:
            self.started_local = local

    def set_before_start(self, day: str, kwh: float) -> None:
        """PV recorded today before tracking began (from the store); ignored once the day has changed."""
        if day == self.day and math.isfinite(kwh) and kwh > 0:
            self.pv_at_day_start_kwh -= kwh

    def today_pv_kwh(self, runtime: Runtime) -> float:
        return max(0.0, runtime.counters.pv_kwh - self.pv_at_day_start_kwh) if self.day is not None else 0.0


def display_payload(runtime: Runtime, day: DayTracker) -> dict[str, Any]:
    """The visitors' display: flows now and what the PV has saved. Read-only facts, nothing about setpoints,
    devices or tuning."""
    state = state_payload(runtime)
    site = runtime.site
    pv_kwh = runtime.counters.pv_kwh
    co2_kg = pv_kwh * site.display_co2_kg_per_kwh
    body: dict[str, Any] = {
        **_freshness(runtime),
        "site": site.site.name,
        "pv_kw": state.get("pv_power_kw"),
        "load_kw": state.get("load_power_kw"),
        "battery_kw": state.get("battery_power_kw"),
        "battery_soc_pct": state.get("battery_soc_pct"),
        "ev_kw": state.get("ev_power_kw"),
        "grid_kw": state.get("grid_power_kw"),
        "cars_connected": sum(bool(v) for v in state.get("ev_connected", {}).values()),
        "has_battery": site.battery is not None,
        "chargers": len(site.ev_chargers),
        "today_pv_kwh": round(day.today_pv_kwh(runtime), 2),
        "lifetime_pv_kwh": round(pv_kwh, 2),
        "co2_avoided_kg": round(co2_kg, 1),
        "coal_saved_kg": round(pv_kwh * site.display.coal_kgce_per_kwh, 1),
        "trees": round(co2_kg / site.display.co2_kg_per_tree_year, 1),
        "ev_pv_kwh": round(runtime.counters.ev_pv_kwh, 2),
        "ev_kwh": round(runtime.counters.ev_kwh, 2),
    }
    if state["controller_state"] == "starting":
        body["stale"] = True
    return body


def dashboard_payload(runtime: Runtime, tuning_version: int) -> dict[str, Any]:
    """The engineer's live view: the MQTT state and health payloads, as published, and what changed since."""
    return {
        **_freshness(runtime),
        "state": state_payload(runtime),
        "health": health_payload(runtime),
        "plans": runtime.stats.plans,  # the page fetches /api/plan again when this moves
        "tuning_version": tuning_version,
        "ticks": runtime.stats.ticks,
        "tick_processing_p99_ms": _finite(runtime.stats.tick_processing_s.percentile_ms(0.99)),
        "tick_lateness_p99_ms": _finite(runtime.stats.tick_lateness_s.percentile_ms(0.99)),
    }


def _finite(value: float) -> float | None:
    return round(value, 3) if math.isfinite(value) else None


def plan_chart(runtime: Runtime) -> dict[str, Any] | None:
    """The plan in force as MQTT publishes it, with what it was made for: import prices, PV and load
    forecasts, and each car's power."""
    body = plan_payload(runtime)
    plan, scenario = runtime.plan, runtime.plan_scenario
    if body is None or plan is None:
        return None
    if scenario is not None and len(scenario.pv_kw) == plan.steps:
        body["price_import_cny_per_kwh"] = [round(float(x), 4) for x in scenario.price_import_cny_per_kwh]
        body["pv_kw"] = [round(float(x), 2) for x in scenario.pv_kw]
        body["load_kw"] = [round(float(x), 2) for x in scenario.load_kw]
    body["ev_kw"] = {name: [round(float(x), 2) for x in kw] for name, kw in plan.ev_kw.items()}
    body["curtail_kw"] = [round(float(x), 2) for x in plan.curtail_kw]
    return body
