"""Human views of a plan: a text table and a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from optimiser import Plan, Scenario

__all__ = ["plan_table", "plot_plan"]


def plan_table(scenario: Scenario, plan: Plan) -> str:
    evs = list(plan.ev_kw)
    head = f"{'step':>4} {'time':>5} {'price':>6} {'pv_kw':>7} {'load_kw':>7} {'batt_kw':>8} {'soc':>5} "
    head += "".join(f"{name[:7]:>8}" for name in evs) + f" {'curt_kw':>7} {'imp_kw':>7} {'exp_kw':>7}\n"
    lines = [head]
    for t in range(plan.steps):
        minutes = round(t * scenario.step_minutes)
        line = (
            f"{t:4d} {minutes // 60 % 24:02d}:{minutes % 60:02d} {scenario.price_import_cny_per_kwh[t]:6.3f}"
            f" {scenario.pv_kw[t]:7.1f} {scenario.load_kw[t]:7.1f} {plan.battery_kw[t]:8.1f} {plan.soc[t + 1]:5.3f} "
        )
        line += "".join(f"{plan.ev_kw[name][t]:8.1f}" for name in evs)
        line += f" {plan.curtail_kw[t]:7.1f} {plan.grid_import_kw[t]:7.1f} {plan.grid_export_kw[t]:7.1f}\n"
        lines.append(line)
    lines.append(
        f"\ncost {plan.cost_cny:.2f} CNY (energy {plan.energy_cost_cny:.2f}, demand {plan.demand_charge_cny:.2f},"
        f" wear {plan.wear_cost_cny:.2f}); import {plan.import_kwh:.1f} kWh, export {plan.export_kwh:.1f} kWh,"
        f" curtailed {plan.curtailed_kwh:.1f} kWh; peak import {plan.peak_import_kw:.1f} kW; {plan.co2_kg:.1f} kgCO2;"
        f" solved in {plan.solve_time_s * 1e3:.1f} ms\n"
    )
    for shortfall in plan.ev_shortfalls:
        delivered, requested = shortfall.delivered_kwh, shortfall.requested_kwh
        lines.append(f"EV {shortfall.charger}: {delivered:.1f} of {requested:.1f} kWh — {shortfall.reason}\n")
    lines.extend(f"limit: {v}\n" for v in plan.limit_violations)
    lines.extend(f"note: {n}\n" for n in plan.notes)
    return "".join(lines)


def plot_plan(scenario: Scenario, plan: Plan, path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - optional extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    hours = np.arange(plan.steps) * scenario.step_minutes / 60
    fig, (ax_price, ax_power, ax_soc) = plt.subplots(3, 1, figsize=(11, 9), sharex=True, height_ratios=[1, 3, 1.2])
    ax_price.step(hours, scenario.price_import_cny_per_kwh, where="post", color="black", label="import price")
    ax_price.set_ylabel("CNY/kWh")
    ax_price.legend(loc="upper left")
    ax_power.plot(hours, scenario.pv_kw, color="orange", label="PV forecast")
    ax_power.plot(hours, scenario.load_kw, color="grey", label="load")
    ax_power.step(hours, plan.battery_kw, where="post", color="green", label="battery (+charge)")
    for name, kw in plan.ev_kw.items():
        ax_power.step(hours, kw, where="post", label=f"EV {name}")
    ax_power.step(hours, plan.grid_import_kw, where="post", color="red", label="grid import")
    ax_power.step(hours, plan.curtail_kw, where="post", color="purple", linestyle=":", label="curtailment")
    ax_power.axhline(0, color="black", linewidth=0.5)
    ax_power.set_ylabel("kW")
    ax_power.legend(loc="upper left", fontsize="small", ncol=2)
    ax_soc.plot(np.arange(plan.steps + 1) * scenario.step_minutes / 60, plan.soc, color="green")
    ax_soc.set_ylabel("SoC")
    ax_soc.set_ylim(0, 1)
    ax_soc.set_xlabel("hours from start")
    fig.suptitle(f"plan: {plan.cost_cny:.2f} CNY, peak import {plan.peak_import_kw:.1f} kW, {plan.co2_kg:.0f} kgCO2")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
