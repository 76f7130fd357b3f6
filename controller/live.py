"""The live terminal view of `greensite run` (rich): what the site does now, what the loop decided and
why, the plan in force, device health and the counters. Redrawn a few times a second (wall time)."""

from __future__ import annotations

import asyncio
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from controller.mqtt._payloads import health_payload, plan_payload, state_payload
from controller.runtime import Runtime

__all__ = ["LiveView", "render"]

# Redraws per second: enough to follow a 1 s tick, cheap enough to leave the loop alone.
REFRESH_HZ = 4.0


def _kw(value: Any) -> str:
    return "—" if value is None else f"{value:+8.1f} kW"


def render(runtime: Runtime, *, mqtt: str | None = None) -> Group:
    """One frame of the view, from the same payloads MQTT publishes."""
    state = state_payload(runtime)
    mode = state["controller_state"]
    style = {"running": "bold green", "safe_state": "bold red"}.get(mode, "yellow")
    title = Text.assemble((f"{runtime.site.site.name}  ", "bold"), (state["ts"], ""), "  ", (mode.upper(), style))
    if mqtt:
        title.append(f"  MQTT {mqtt}", style="dim")
    now = Table(title="now", show_header=False, expand=True)
    now.add_column("quantity")
    now.add_column("value", justify="right")
    now.add_column("setpoint", justify="right")
    now.add_row("grid (+ import)", _kw(state.get("grid_power_kw")),
                f"limits +{state['import_limit_kw']:.0f} / -{state['export_limit_kw']:.0f} kW")  # fmt: skip
    pv_limit = state.get("setpoint_pv_limit_kw")
    now.add_row("PV", _kw(state.get("pv_power_kw")), "unrestricted" if pv_limit is None else _kw(pv_limit))
    now.add_row("site load", _kw(state.get("load_power_kw")), "")
    soc = state.get("battery_soc_pct")
    now.add_row("battery (+ charge)", _kw(state.get("battery_power_kw")), _kw(state.get("setpoint_battery_kw")))
    now.add_row("battery SoC", "—" if soc is None else f"{soc:.1f} %", "")
    for name, kw in state.get("ev_power_by_charger_kw", {}).items():
        amps = state.get("setpoint_ev_current_a", {}).get(name)
        car = "car" if state.get("ev_connected", {}).get(name) else "no car"
        now.add_row(f"{name} ({car})", _kw(kw), "—" if amps is None else f"{amps:.1f} A")
    now.add_row("month peak (15 min)", f"{state['month_peak_import_kw']:8.1f} kW", "")
    totals = Table(title="since commissioning", show_header=False, expand=True)
    totals.add_column("counter")
    totals.add_column("value", justify="right")
    counters = (
        ("grid_import_kwh", "grid import", "kWh"),
        ("grid_export_kwh", "grid export", "kWh"),
        ("pv_kwh", "PV", "kWh"),
        ("ev_kwh", "EVs", "kWh"),
        ("energy_cost_cny", "energy cost", "CNY"),
        ("carbon_avoided_kg", "CO2 avoided", "kg"),
    )
    for key, label, unit in counters:
        totals.add_row(label, f"{state[key]:.1f} {unit}")
    health = health_payload(runtime)
    devices = Table(title="devices", show_header=False, expand=True)
    devices.add_column("device")
    devices.add_column("state", justify="right")
    for name, info in health["devices"].items():
        colour = {"ok": "green", "degraded": "yellow", "lost": "red"}.get(info["state"], "")
        devices.add_row(name, Text(info["state"], style=colour))
    grid = Table.grid(expand=True)
    grid.add_row(now, totals, devices)
    parts: list[Any] = [title, grid]
    actions = state.get("safety_actions") or []
    parts.append(Text("safety: " + ("; ".join(actions) if actions else "plan followed"), style="cyan"))
    plan = plan_payload(runtime)
    if plan is not None:
        unmet = sum(item["unmet_kwh"] for item in plan["ev_unmet"])
        line = (f"plan from {plan['start']}: {plan['cost_cny']:.0f} CNY over the horizon, peak"
                f" {plan['peak_import_kw']:.0f} kW, EV energy unmet {unmet:.1f} kWh")  # fmt: skip
        parts.append(Text(line, style="dim"))
    s = runtime.stats
    parts.append(Text(f"ticks {s.ticks}, tick processing p99 {_p99_ms(s.tick_processing_s.recent(600)):.2f}"
                      f" ms, plans {s.plans}, bus errors {s.bus_errors}, failed writes {s.write_failures}",
                      style="dim"))  # fmt: skip
    return Group(*parts)


class LiveView:
    """A runtime service: redraws the view until cancelled."""

    def __init__(self, runtime: Runtime, console: Console | None = None, mqtt: str | None = None) -> None:
        self.runtime = runtime
        self.console = console or Console()
        self.mqtt = mqtt

    def attach(self) -> None:
        self.runtime.services.append(self.show)

    async def show(self) -> None:
        with Live(render(self.runtime, mqtt=self.mqtt), console=self.console, auto_refresh=False,
                  transient=False) as live:  # fmt: skip
            while True:
                await asyncio.sleep(1 / REFRESH_HZ)
                live.update(render(self.runtime, mqtt=self.mqtt), refresh=True)


def _p99_ms(values_s: list[float]) -> float:
    """The recent ticks' 99th percentile (NaN before any)."""
    if not values_s:
        return float("nan")
    ordered = sorted(values_s)
    return 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
