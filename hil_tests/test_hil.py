"""The HIL matrix: every scenario shortened in the default run; full length with `-m long_hil`. The
simulated buses' bytes go over in-process links (the same codecs, bus and firmware, every fault emulated);
the port's own faults and a plain day go over ptys as well."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from controller.clock import SimClock
from controller.plant import Plant
from controller.runtime import Runtime
from controller.simulation import simulated_site
from firmware_bridge.simulator import Line
from hil_tests.harness import _seed_history, _site, run_scenario
from hil_tests.scenario import HilScenario, load_scenarios

SCENARIOS = load_scenarios()
# Over ptys too: the faults that live in the port (it vanishes, garbage on the line) and the main job.
PTY_SCENARIOS = [s for s in SCENARIOS if s.name in {"port-vanishes", "garbage-on-bus", "main-job-day"}]


def _check(result_failures: list[str]) -> None:
    assert not result_failures, "\n".join(result_failures)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_scenario_shortened(scenario: HilScenario, tmp_path: Path) -> None:
    result = await run_scenario(scenario, tmp_path, short=True)
    _check(result.failures)
    assert result.ticks == result.logged_ticks > 0
    assert result.realised is not None
    assert {o.name for o in result.baselines} >= {"no battery", "self-consumption"}


@pytest.mark.parametrize("scenario", PTY_SCENARIOS, ids=[s.name for s in PTY_SCENARIOS])
async def test_scenario_shortened_over_ptys(scenario: HilScenario, tmp_path: Path) -> None:
    result = await run_scenario(scenario, tmp_path, short=True, line=Line.PTY)
    _check(result.failures)
    assert result.ticks == result.logged_ticks > 0


@pytest.mark.long_hil
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_scenario_full_length(scenario: HilScenario, tmp_path: Path) -> None:
    result = await run_scenario(scenario, tmp_path, short=False)
    _check(result.failures)


@pytest.mark.long_hil
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("scenario", PTY_SCENARIOS, ids=[s.name for s in PTY_SCENARIOS])
async def test_scenario_full_length_over_ptys(scenario: HilScenario, tmp_path: Path) -> None:
    result = await run_scenario(scenario, tmp_path, short=False, line=Line.PTY)
    _check(result.failures)


async def test_history_days_start_the_controller_with_last_weeks_profile(tmp_path: Path) -> None:
    scenario = next(s for s in SCENARIOS if s.history_days)
    site = _site(scenario, tmp_path, None)
    start = scenario.start.replace(tzinfo=ZoneInfo(site.site.timezone))
    plant = Plant(site, start, weather=scenario.weather)
    async with simulated_site(site, start, 1, plant=plant) as (_, links, _sims):
        _seed_history(scenario, site, plant, links)
        runtime = Runtime(site, clock=SimClock(start, None), links=links, state_path=site.storage.state_path)
    assert runtime.restored
    assert runtime.forecaster.knows_day(start)  # the first day is planned on a profile, not a guess
    # The school morning it has seen before: 08:00-09:00 of the first day, within the load's wobble.
    morning = runtime.forecaster.load_kw(start + timedelta(hours=8), 4, 15)
    truth = [plant.load_at(8 * 3600 + 900 * i + 450) for i in range(4)]
    assert all(abs(kw - true_kw) < 0.1 * true_kw for kw, true_kw in zip(morning, truth, strict=True))
    assert runtime.expected_stay_h("ev2") == 9.0  # the afternoon car stayed 13:00-22:00 each school day
    assert runtime.month_peak_kw == 0.0  # history from last month sets no peak in this one
    assert runtime.counters.grid_import_kwh == 0.0
