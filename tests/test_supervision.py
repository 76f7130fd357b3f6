"""Only the control loop's failure ends the process: every job around it is restarted, a plan that fails
or hangs leaves the last one in force, the wall clock is read every time, memory is fixed."""

from __future__ import annotations

import asyncio
import logging
import math
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

import controller.runtime as runtime_module
from config import SiteConfig, load_site
from controller.clock import RealClock, SimClock, clock_plausible
from controller.runtime import Runtime
from controller.simulation import simulated_site
from controller.tick_stats import Durations

SCHOOL = Path(__file__).parents[1] / "config" / "sites" / "zhongshan_school.toml"


@pytest.fixture(scope="module")
def site() -> SiteConfig:
    return load_site(SCHOOL, environment=False)


async def test_a_failing_job_is_restarted_and_the_loop_goes_on(site: SiteConfig, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    monkeypatch.setattr(runtime_module, "RESTART_DELAY_MIN_S", 0.01)
    start = datetime(2026, 7, 6, 9, 0, tzinfo=ZoneInfo(site.site.timezone))
    calls = 0

    async def flaky_live_view() -> None:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise RuntimeError(f"the live view broke ({calls})")
        await asyncio.Event().wait()  # then it runs until cancelled

    async with simulated_site(site, start, 1) as (plant, links, _sims):
        runtime = Runtime(site, clock=SimClock(start, 200.0), links=links, line_timing=False,
                          before_tick=plant.advance)  # fmt: skip
        runtime.services.append(flaky_live_view)
        with caplog.at_level(logging.ERROR):
            await runtime.run(60)
    assert runtime.stats.ticks == 61  # every tick ran through three failures of the job beside it
    assert calls == 4
    assert runtime.stats.restarts == {"flaky_live_view": 3}
    assert any("background job failed" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_cancellation_is_not_taken_for_a_failure(site: SiteConfig) -> None:
    start = datetime(2026, 7, 6, 9, 0, tzinfo=ZoneInfo(site.site.timezone))
    async with simulated_site(site, start, 1) as (plant, links, _sims):
        runtime = Runtime(site, clock=SimClock(start, None), links=links, line_timing=False,
                          before_tick=plant.advance)  # fmt: skip
        await runtime.run(5)
    assert runtime.stats.restarts == {}  # the planner was cancelled at the end, not restarted


async def test_a_planner_that_raises_keeps_the_last_plan(site: SiteConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    start = datetime(2026, 7, 6, 9, 0, tzinfo=ZoneInfo(site.site.timezone))
    real_solve = runtime_module.solve  # type: ignore[attr-defined]
    solves = 0

    def failing_after_first(scenario: object) -> object:
        nonlocal solves
        solves += 1
        if solves > 1:
            raise ZeroDivisionError("a planner bug")
        return real_solve(scenario)  # type: ignore[arg-type]

    monkeypatch.setattr(runtime_module, "solve", failing_after_first)
    async with simulated_site(site, start, 1) as (plant, links, _sims):
        runtime = Runtime(site, clock=SimClock(start, None), links=links, line_timing=False,
                          before_tick=plant.advance)  # fmt: skip
        await runtime.run(3 * site.replan_period_s)
    assert runtime.plan is not None  # the first plan stayed in force
    assert runtime.stats.plans == 1
    assert runtime.stats.plans_failed >= 2
    assert runtime.stats.ticks == int(3 * site.replan_period_s) + 1


async def test_a_plan_that_hangs_is_given_up_in_real_time(site: SiteConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_module, "PLAN_TIMEOUT_S", 0.2)
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def hanging(scenario: object) -> object:
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(timeout=5.0)
        raise RuntimeError("released")

    monkeypatch.setattr(runtime_module, "solve", hanging)
    async with simulated_site(site, datetime.now(ZoneInfo(site.site.timezone)), 1) as (plant, links, _sims):
        runtime = Runtime(site, clock=RealClock(datetime.now(ZoneInfo(site.site.timezone))), links=links,
                          line_timing=False, before_tick=plant.advance)  # fmt: skip
        lateness_before = runtime.stats.tick_lateness_s
        await runtime.run(2.0)
        release.set()
    assert runtime.stats.plans_failed >= 1  # timed out, the rule-based mode stayed in force
    assert runtime.stats.plans == 0
    assert runtime.stats.ticks >= 2
    assert lateness_before.percentile_ms(0.99) < 200  # the hanging plan never held a tick up


def test_durations_keep_fixed_memory_and_close_percentiles() -> None:
    d = Durations(ring_values=1000)
    size = len(d._ring) + len(d._counts)
    for i in range(200_000):
        d.add(0.0001 * (1 + i % 100))
    assert len(d._ring) + len(d._counts) == size
    assert d.count == 200_000
    assert d.percentile_ms(0.5) == pytest.approx(5.0, rel=0.07)
    assert d.percentile_ms(0.99) == pytest.approx(9.9, rel=0.07)
    assert d.recent(3) == pytest.approx([0.0098, 0.0099, 0.0100])
    assert d.window(0, 10) == []  # long gone from the ring
    assert math.isnan(Durations().percentile_ms(0.5))


def test_an_implausible_clock_is_not_planned_on() -> None:
    assert not clock_plausible(datetime(1970, 1, 1, 8, 0))
    assert clock_plausible(datetime(2026, 7, 6, 8, 0))


async def test_the_wall_clock_is_read_every_time_and_steps_are_seen(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    zone = ZoneInfo("Asia/Shanghai")
    clock = RealClock(datetime.now(zone))
    first = clock.local()
    import controller.clock as clock_module

    stepped = first + timedelta(hours=1)

    class _Stepped(datetime):
        @classmethod
        def now(cls, tz: object = None) -> datetime:  # type: ignore[override]
            return stepped

    monkeypatch.setattr(clock_module, "datetime", _Stepped)
    with caplog.at_level(logging.WARNING):
        assert clock.local() == stepped  # not start + monotonic
    assert clock.steps == 1
    assert any("wall clock stepped" in r.getMessage() for r in caplog.records)


async def test_an_implausible_clock_runs_the_rule_based_mode(site: SiteConfig) -> None:
    """A box that booted in 1970: no plan is made on the tariff, the battery still stores the surplus."""
    start = datetime(1970, 1, 1, 12, 0, tzinfo=ZoneInfo(site.site.timezone))
    async with simulated_site(site, datetime(2026, 7, 7, 12, 0, tzinfo=ZoneInfo(site.site.timezone)), 1) as (
        plant, links, _sims,
    ):
        runtime = Runtime(site, clock=SimClock(start, None), links=links, line_timing=False,
                          before_tick=plant.advance)  # fmt: skip
        await runtime.run(120)
    assert runtime.plan is None
    assert runtime.last_setpoints is not None
    assert runtime.last_setpoints.battery_kw > 20.0  # the noon surplus goes into the battery
