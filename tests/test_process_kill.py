"""A controller process killed with SIGKILL mid-day leaves a safe site: the devices, in another process,
fall back on their own (their communication watchdogs, armed by the controller at start), and the
controller's database and state file survive. `python -m hil_tests.kill --kills 50` for the full count."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from hil_tests.kill import kill_once


@pytest.mark.timeout(180)
def test_a_killed_controller_leaves_the_devices_to_fall_back_safely(tmp_path: Path) -> None:
    result = kill_once(tmp_path, random.Random(7))
    assert result.battery_at_kill_kw != 0.0  # killed while it was driving the battery: the case that matters
    assert result.fallbacks_applied  # battery idle, PV at what zero export allows, without the controller
    assert result.breach_after_fallback_s == 0
    assert result.database_ok
    assert result.state_ok


@pytest.mark.long_hil
@pytest.mark.timeout(3600)
def test_fifty_kills_at_random_moments_are_all_safe(tmp_path: Path) -> None:
    rnd = random.Random(1)
    unsafe = []
    for index in range(50):
        result = kill_once(tmp_path / f"kill-{index}", rnd)
        if not (result.fallbacks_applied and result.breach_after_fallback_s == 0 and result.database_ok
                and result.state_ok):  # fmt: skip
            unsafe.append((index, result))
    assert not unsafe
