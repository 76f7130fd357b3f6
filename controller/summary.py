"""The end-of-run summary of a simulated run, judged by the plant's truth."""

from __future__ import annotations

from config import SiteConfig
from controller.breaches import BreachCount
from controller.plant import Plant
from controller.runtime import Runtime
from controller.simulation import Recorder

__all__ = ["summary_text"]


def summary_text(
    site: SiteConfig, plant: Plant, recorder: Recorder, runtime: Runtime, *, wall_s: float, interrupted: bool
) -> str:
    days = plant.now_s / 86400
    demand_rate = site.tariff.demand_charge_cny_per_kw_month
    # The demand charge is monthly: show what this run's peak adds, pro rata for its length.
    pro_rata = min(1.0, days / 30)
    demand = demand_rate * plant.peak_15min_kw * pro_rata
    baseline_demand = demand_rate * plant.baseline_peak_15min_kw * pro_rata
    total = plant.cost_cny + demand
    baseline_total = plant.baseline_cost_cny + baseline_demand
    avoided_kg = (plant.baseline_import_kwh - plant.grid_import_kwh) * site.carbon_kg_per_kwh
    stats = runtime.summary_stats()
    lines = [
        f"simulated {plant.now_s / 3600:.1f} h of {site.site.name} in {wall_s:.1f} s"
        + (" (stopped early)" if interrupted else ""),
        f"  energy: import {plant.grid_import_kwh:.1f} kWh, export {plant.grid_export_kwh:.1f} kWh,"
        f" PV used {plant.pv_kwh:.1f} kWh",
        f"  bill: {total:.2f} CNY (energy {plant.cost_cny:.2f} + demand {demand:.2f} for a"
        f" {plant.peak_15min_kw:.1f} kW 15-min peak, pro rata {pro_rata:.3f} month)",
        f"  baseline without battery or control: {baseline_total:.2f} CNY (energy {plant.baseline_cost_cny:.2f}"
        f" + demand {baseline_demand:.2f}, peak {plant.baseline_peak_15min_kw:.1f} kW):"
        f" saved {baseline_total - total:.2f} CNY",
        f"  carbon: {plant.grid_import_kwh * site.carbon_kg_per_kwh:.1f} kgCO2,"
        f" {avoided_kg:.1f} kgCO2 avoided vs baseline",
        f"  EVs: {plant.delivered_kwh:.1f} of {plant.requested_kwh:.1f} kWh requested delivered"
        f" (baseline {plant.baseline_delivered_kwh:.1f})",
        f"  limits (plant truth, after correction): {_breaches('import', recorder.import_breaches)};"
        f" {_breaches('export', recorder.export_breaches)}",
        f"  SoC out of bounds {recorder.soc_out_of_bounds_ticks} ticks; safe state {stats['safe_state_ticks']} ticks;"
        f" the controller's own count (meters): import {stats['import_breach_ticks']:.0f} ticks"
        f" ({stats['import_breach_unavoidable_ticks']:.0f} unavoidable), export {stats['export_breach_ticks']:.0f}"
        f" ({stats['export_breach_unavoidable_ticks']:.0f} unavoidable)",
        f"  ticks: {stats['ticks']}, processing p50 {stats['tick_processing_p50_ms']:.3f} ms,"
        f" p99 {stats['tick_processing_p99_ms']:.3f} ms (excluding bus I/O); {stats['plans']} plans,"
        f" median {stats['plan_time_median_ms']:.1f} ms; bus errors {stats['bus_errors']},"
        f" failed writes {stats['write_failures']}",
    ]
    return "\n".join(lines) + "\n"


def _breaches(limit: str, count: BreachCount) -> str:
    return (
        f"{count.ticks} ticks beyond the {limit} limit ({count.avoidable_ticks} avoidable, {count.unavoidable_ticks}"
        f" unavoidable), longest run {count.longest_run_ticks}, {count.energy_kwh:.2f} kWh beyond"
        f" ({count.unavoidable_energy_kwh:.2f} unavoidable)"
    )
