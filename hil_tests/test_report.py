"""The HIL report on a real (shortened) scenario: where the run's gap to the optimum is (energy against
demand), and the run's and the optimum's series as files a site engineer can open."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from hil_tests.harness import run_sync
from hil_tests.report import markdown, write_csv
from hil_tests.scenario import load_scenarios


def test_the_report_splits_the_bill_and_writes_both_series(tmp_path: Path) -> None:
    scenario = next(s for s in load_scenarios() if s.name == "replay-week")
    result = run_sync(scenario, tmp_path / "work")
    run, optimum = result.realised, result.outcome("perfect foresight")
    assert run is not None
    assert optimum is not None

    text = markdown([result])
    row = next(line for line in text.splitlines() if line.startswith(f"| {result.name} | {run.energy_cost_cny:.0f} /"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == (f"{run.energy_cost_cny:.0f} / {optimum.energy_cost_cny:.0f}"
                        f" ({run.energy_cost_cny - optimum.energy_cost_cny:+.0f})")  # fmt: skip
    assert cells[2] == f"{run.peak_15min_kw:.1f} / {optimum.peak_15min_kw:.1f}"
    assert cells[3].startswith(
        f"{run.bill_cny - run.energy_cost_cny:.0f} / {optimum.bill_cny - optimum.energy_cost_cny:.0f}"
    )

    written = write_csv(result, tmp_path / "report")
    assert [p.name for p in written] == ["replay-week.csv", "replay-week.optimum.csv"]
    assert not list((tmp_path / "report").glob("*.partial"))
    with written[0].open() as f:
        minutes = list(csv.DictReader(f))
    assert len(minutes) == len(result.series["t_h"]) >= 0.9 * result.simulated_s / 60  # one row a minute
    assert max(float(m["grid_kw"]) for m in minutes) > 0
    assert all(float(m["pv_available_kw"]) >= float(m["pv_kw"]) - 0.5 for m in minutes)  # curtailment only lowers
    with written[1].open() as f:
        steps = list(csv.DictReader(f))
    # The optimum's plan adds up to the optimum the report prints.
    assert sum(float(s["grid_import_kw"]) for s in steps) * 0.25 == pytest.approx(optimum.import_kwh, rel=1e-3)
    assert max(float(s["grid_import_kw"]) for s in steps) == pytest.approx(optimum.peak_15min_kw, rel=1e-3)
