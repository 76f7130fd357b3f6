"""The HIL report on a real (shortened) scenario: where the run's gap to the optimum is (energy against
demand), and the run's and the optimum's series as files a site engineer can open."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import pytest

from config import load_site
from hil_tests.harness import ScenarioResult, WeekRow, run_sync
from hil_tests.report import markdown, write_csv
from hil_tests.scenario import load_scenarios

SITES = Path(__file__).parents[1] / "config" / "sites"


def test_the_report_splits_the_bill_and_writes_both_series(tmp_path: Path) -> None:
    """A sunny Saturday at the export-limited community centre (export paid): PV is limited to the
    feed-in limit, the optimum exports and is paid for it, and both series add up to the report."""
    scenario = next(s for s in load_scenarios() if s.name == "community-export-saturday")
    site = load_site(SITES / f"{scenario.site}.toml", environment=False)
    result = run_sync(scenario, tmp_path / "work")
    run, optimum = result.realised, result.outcome("perfect foresight")
    assert run is not None
    assert optimum is not None

    text = markdown([result])
    row = next(line for line in text.splitlines() if line.startswith(f"| {result.name} | {run.energy_cost_cny:.0f} /"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{run.peak_15min_kw:.1f} / {optimum.peak_15min_kw:.1f}"

    written = write_csv(result, tmp_path / "report")
    assert [p.name for p in written] == [f"{result.name}.csv", f"{result.name}.optimum.csv"]
    assert not list((tmp_path / "report").glob("*.partial"))
    with written[0].open() as f:
        minutes = list(csv.DictReader(f))
    assert len(minutes) >= 0.9 * result.simulated_s / 60  # one row a minute
    assert all(float(m["pv_available_kw"]) >= float(m["pv_kw"]) - 0.5 for m in minutes)
    assert any(float(m["pv_available_kw"]) > float(m["pv_kw"]) + 10.0 for m in minutes)  # the limit held PV back
    planned = [m for m in minutes if not math.isnan(float(m["plan_import_kw"]))]
    assert len(planned) >= len(minutes) - 2  # the plan in force from the first minute or two
    assert max(float(m["plan_pv_kw"]) for m in planned) > 50.0  # made for a sunny morning
    with written[1].open() as f:
        steps = list(csv.DictReader(f))
    # The optimum's plan adds up to the energy and the export the report prints: export paid here.
    imports_cny = sum(float(s["grid_import_kw"]) * float(s["price_cny_per_kwh"]) for s in steps) * 0.25
    export_kwh = sum(float(s["grid_export_kw"]) for s in steps) * 0.25
    assert export_kwh == pytest.approx(optimum.export_kwh, abs=0.01)
    assert export_kwh > 1.0
    export_cny = export_kwh * site.tariff.export_price_cny_per_kwh
    assert imports_cny - export_cny == pytest.approx(optimum.energy_cost_cny, abs=0.01)


def test_a_week_row_shows_where_its_gap_is() -> None:
    """A week's row carries the run's and the optimum's energy, peak and demand charge side by side."""
    scenario = next(s for s in load_scenarios() if s.name == "stochastic-month")
    result = ScenarioResult(scenario.name, scenario.description, short=False)
    week = WeekRow("week 2", 7.0, 6142.0, 7244.0, 6743.0, 4948.0, realised_energy_cny=4604.0, realised_peak_kw=205.9,
                   optimum_energy_cny=4283.0, optimum_peak_kw=88.9)  # fmt: skip
    result.weeks.append(week)
    line = next(line for line in markdown([result]).splitlines() if line.startswith("| stochastic-month | week 2 |"))
    assert line.endswith("| +24.1 % | 4604 / 4283 | 205.9 / 88.9 | 1538 / 665 |")
    unknown = dataclasses.replace(week, optimum_cny=None, optimum_energy_cny=None, optimum_peak_kw=None)
    result.weeks[0] = unknown
    line = next(line for line in markdown([result]).splitlines() if line.startswith("| stochastic-month | week 2 |"))
    assert line.endswith("| n/a | n/a | n/a | n/a |")
