"""The HIL matrix: every scenario shortened in the default run; full length with `-m long_hil`."""

from __future__ import annotations

from pathlib import Path

import pytest

from hil_tests.harness import run_scenario
from hil_tests.scenario import HilScenario, load_scenarios

SCENARIOS = load_scenarios()


def _check(result_failures: list[str]) -> None:
    assert not result_failures, "\n".join(result_failures)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_scenario_shortened(scenario: HilScenario, tmp_path: Path) -> None:
    result = await run_scenario(scenario, tmp_path, short=True)
    _check(result.failures)
    assert result.ticks == result.logged_ticks > 0
    assert result.realised is not None
    assert {o.name for o in result.baselines} >= {"no battery", "self-consumption"}


@pytest.mark.long_hil
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_scenario_full_length(scenario: HilScenario, tmp_path: Path) -> None:
    result = await run_scenario(scenario, tmp_path, short=False)
    _check(result.failures)
