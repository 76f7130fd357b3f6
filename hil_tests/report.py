"""The HIL report: a markdown table of every scenario and a PNG per scenario."""

from __future__ import annotations

from pathlib import Path

from hil_tests.harness import ScenarioResult

__all__ = ["markdown", "write_csv", "write_png"]


def _money(result: ScenarioResult, name: str) -> str:
    outcome = result.realised if name == "realised" else result.outcome(name)
    return "n/a" if outcome is None else f"{outcome.bill_cny:.0f}"


def _carbon(result: ScenarioResult, name: str) -> str:
    outcome = result.realised if name == "realised" else result.outcome(name)
    return "n/a" if outcome is None else f"{outcome.carbon_kg:.0f}"


def _mae(result: ScenarioResult) -> str:
    """The day-ahead forecast's error (made at local midnight), over the days the run covered whole."""
    if result.mae_load_kw is None or result.mae_pv_kw is None:
        return "n/a (no whole day)"
    return f"{result.mae_load_kw:.1f} / {result.mae_pv_kw:.1f}"


def _split(results: list[ScenarioResult]) -> list[str]:
    """Where a run's gap to the optimum is: energy at TOU prices against the demand charge on the
    run's 15-minute peak import (pro rata for its length), the run's and the optimum's side by side."""
    rows = []
    for r in results:
        optimum = r.outcome("perfect foresight")
        if optimum is None or r.realised is None:
            continue
        run = r.realised
        rows.append(
            f"| {r.name} | {run.energy_cost_cny:.0f} / {optimum.energy_cost_cny:.0f}"
            f" ({run.energy_cost_cny - optimum.energy_cost_cny:+.0f}) | {run.peak_15min_kw:.1f} /"
            f" {optimum.peak_15min_kw:.1f} | {run.bill_cny - run.energy_cost_cny:.0f} /"
            f" {optimum.bill_cny - optimum.energy_cost_cny:.0f}"
            f" ({(run.bill_cny - run.energy_cost_cny) - (optimum.bill_cny - optimum.energy_cost_cny):+.0f}) |"
        )
    if not rows:
        return []
    return ["", "## The bill split: run against optimum", "",
            "| scenario | energy CNY: run / optimum (difference) | 15-min peak kW: run / optimum"
            " | demand CNY: run / optimum (difference) |", "|---|---|---|---|", *rows]  # fmt: skip


def markdown(results: list[ScenarioResult]) -> str:
    lines = [
        "# greensite HIL report",
        "",
        "Bills in CNY (energy at TOU prices + demand charge pro rata for the run's length), CO2 in kg from"
        " grid import. Baselines from the plant's true profiles: no battery (no control), rule-based"
        " self-consumption, and the perfect-foresight optimum (HiGHS LP on 15-min averages, same car energy"
        " and final SoC as the run). The controller only sees its meters and its own forecasts.",
        "",
        "| scenario | length | result | breach ticks: avoidable / unavoidable (longest run, kWh)"
        " | battery reversals /min | SoC out of bounds | safe state | EV kWh"
        " delivered/requested | log ticks/ticks | bill: run / no battery / self-cons. / optimum | gap to"
        " optimum | kgCO2: run / no battery / self-cons. | day-ahead MAE kW: load / PV | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        optimum = r.outcome("perfect foresight")
        gap = "n/a"
        if optimum is not None and r.realised is not None and optimum.bill_cny > 0:
            gap = f"{100 * (r.realised.bill_cny / optimum.bill_cny - 1):+.1f} %"
        safe = "never"
        if r.safe_entered_s is not None:
            left = "not left" if r.safe_left_s is None else f"left {r.safe_left_s:.0f} s"
            safe = f"entered {r.safe_entered_s:.0f} s, {left}"
        verdict = "PASS" if r.passed else "FAIL: " + "; ".join(r.failures)
        lines.append(
            f"| {r.name} | {r.simulated_s / 3600:.1f} h | {verdict} | {r.avoidable_breach_ticks} /"
            f" {r.unavoidable_breach_ticks} ({r.longest_breach_ticks}, {r.breach_energy_kwh:.2f}) |"
            f" {60 * r.battery_reversals / max(r.simulated_s, 1.0):.2f} |"
            f" {r.soc_out_of_bounds_ticks} | {safe} | {r.ev_delivered_kwh:.1f}/{r.ev_requested_kwh:.1f} |"
            f" {r.logged_ticks}/{r.ticks} | {_money(r, 'realised')} / {_money(r, 'no battery')} /"
            f" {_money(r, 'self-consumption')} / {_money(r, 'perfect foresight')} | {gap} |"
            f" {_carbon(r, 'realised')} / {_carbon(r, 'no battery')} / {_carbon(r, 'self-consumption')} |"
            f" {_mae(r)} | {r.wall_s:.1f} |"
        )
    lines += _split(results)
    weekly = [r for r in results if r.weeks]
    if weekly:
        lines += ["", "## Week by week", "",
                  "| scenario | week | days | bill: run / no battery / self-cons. / optimum | gap to optimum"
                  " | energy CNY: run / optimum | 15-min peak kW: run / optimum | demand CNY: run / optimum |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in weekly:
            for w in r.weeks:
                week_gap = "n/a" if not w.optimum_cny else f"{100 * (w.realised_cny / w.optimum_cny - 1):+.1f} %"
                best = "n/a" if w.optimum_cny is None else f"{w.optimum_cny:.0f}"
                split = "n/a | n/a | n/a"
                if w.optimum_cny is not None and w.optimum_energy_cny is not None and w.optimum_peak_kw is not None:
                    split = (f"{w.realised_energy_cny:.0f} / {w.optimum_energy_cny:.0f} | {w.realised_peak_kw:.1f} /"
                             f" {w.optimum_peak_kw:.1f} | {w.realised_cny - w.realised_energy_cny:.0f} /"
                             f" {w.optimum_cny - w.optimum_energy_cny:.0f}")  # fmt: skip
                lines.append(f"| {r.name} | {w.label} | {w.days:.1f} | {w.realised_cny:.0f} / {w.no_battery_cny:.0f}"
                             f" / {w.self_consumption_cny:.0f} / {best} | {week_gap} | {split} |")  # fmt: skip
    lines += ["", "## Scenarios", ""]
    lines += [f"- **{r.name}**: {r.description}" for r in results]
    return "\n".join(lines) + "\n"


def write_csv(result: ScenarioResult, directory: Path) -> list[Path]:
    """The run's series (one row per simulated minute) as DIR/<scenario>.csv and, where there is one,
    the perfect-foresight optimum's plan (one row per 15 minutes) as DIR/<scenario>.optimum.csv; each
    written whole under a temporary name and then renamed, so a report never holds half a file."""
    written = []
    optimum = result.outcome("perfect foresight")
    tables = [(f"{result.name}.csv", result.series)]
    if optimum is not None and optimum.series:
        tables.append((f"{result.name}.optimum.csv", optimum.series))
    directory.mkdir(parents=True, exist_ok=True)
    for name, series in tables:
        columns = list(series)
        rows = zip(*(series[c] for c in columns), strict=True)
        text = ",".join(columns) + "\n" + "".join(",".join(f"{v:.6g}" for v in row) + "\n" for row in rows)
        path = directory / name
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text)
        partial.replace(path)
        written.append(path)
    return written


def write_png(result: ScenarioResult, path: Path) -> Path:
    import matplotlib  # the plot extra; only the report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result.series
    fig, (power, soc) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True, height_ratios=[2, 1])
    t = s.get("t_h", [])
    for key, label in (("grid_kw", "grid"), ("pv_kw", "PV"), ("load_kw", "load"), ("battery_kw", "battery"),
                       ("ev_kw", "EVs")):  # fmt: skip
        power.plot(t, s.get(key, []), label=label, linewidth=1)
    for start, end, kind in result.fault_windows:
        for axis in (power, soc):
            axis.axvspan(start / 3600, max(end, start + 30) / 3600, color="red", alpha=0.15)
        power.text(start / 3600, power.get_ylim()[1] * 0.9, kind, color="red", fontsize=8)
    power.axhline(0, color="black", linewidth=0.5)
    power.set_ylabel("kW")
    power.legend(loc="upper right", fontsize=8, ncol=5)
    verdict = "PASS" if result.passed else "FAIL"
    power.set_title(f"{result.name}: {verdict}")
    soc.plot(t, [100 * x for x in s.get("soc", [])], color="green", label="SoC %")
    soc.fill_between(t, 0, [100 * x for x in s.get("safe", [])], color="orange", alpha=0.3, label="safe state")
    soc.set_ylabel("SoC %")
    soc.set_xlabel("hours from start")
    soc.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
