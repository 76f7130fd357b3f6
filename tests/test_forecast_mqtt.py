"""External forecasts over MQTT and from a file: taken into the running controller's plans, hostile payloads
answered on forecast/reply with the field named, and the loop goes on."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import aiomqtt

from config import SiteConfig
from controller.clock import SimClock
from controller.mqtt import MqttService, Topics
from controller.runtime import Runtime
from controller.simulation import simulated_site
from controller.tuning import TuningStore
from hil_tests.broker import Mosquitto, mosquitto, subscribed, wait_for
from tests.test_mqtt import START, running, school

__all__ = ["mosquitto"]  # the fixture, imported for pytest


def _forecast(pv_kw: list[float]) -> bytes:
    return json.dumps({"issued_at": (START - timedelta(hours=1)).isoformat(), "start": START.isoformat(),
                       "step_minutes": 15, "pv_kw": pv_kw, "source": "test"}).encode()  # fmt: skip


HOSTILE: list[bytes] = [
    b"{",
    b"[]",
    b'{"pv_kw": [NaN]}',
    b'{"a": 1, "a": 1}',
    b"[" * 200 + b"]" * 200,
    _forecast([1.0, -5.0]),
    _forecast([1.0, 1e300]),
    b'{"issued_at": 1, "start": "x", "step_minutes": 0, "pv_kw": "lots"}',
    b"\x00" * 70_000,
]


async def test_hostile_forecasts_are_refused_naming_the_field_and_a_good_one_is_planned_on(tmp_path: Path) -> None:
    site = school(tmp_path)
    async with simulated_site(site, START, 1) as (plant, links, _sims):
        runtime = Runtime(site, clock=SimClock(START, None), links=links, line_timing=False, before_tick=plant.advance)
        service = MqttService(site, runtime, TuningStore(site), host="127.0.0.1", port=1)
        replies = [service.handle_forecast(p) for p in HOSTILE]
        assert runtime.forecaster.external is None
        good = service.handle_forecast(_forecast([7.0] * 8))
        await runtime.run(2.0)
    assert all(not r["accepted"] and r["errors"] for r in replies)
    assert any("pv_kw[1]: -5.0 kW" in e for e in replies[5]["errors"])
    assert any("pv_kw[1]" in e for e in replies[6]["errors"])
    assert any(e.startswith(("issued_at", "start", "step_minutes", "pv_kw")) for e in replies[7]["errors"])
    assert good == {"accepted": True, "errors": []}
    assert runtime.plan_scenario is not None
    assert runtime.plan_scenario.pv_kw[:8] == [7.0] * 8  # the plan was made on it


async def test_a_forecast_file_is_read_when_it_changes_and_a_bad_one_keeps_the_last(tmp_path: Path) -> None:
    path = tmp_path / "forecast.json"
    path.write_bytes(_forecast([5.0] * 4))
    data = school(tmp_path).model_dump()
    data["forecast"] = {"external_file": str(path)}
    site = SiteConfig.model_validate(data)
    async with simulated_site(site, START, 1) as (plant, links, _sims):
        runtime = Runtime(site, clock=SimClock(START, None), links=links, line_timing=False, before_tick=plant.advance)
        await runtime.run(1.0)
        assert runtime.forecaster.external is not None
        assert runtime.forecaster.external.pv_kw == (5.0,) * 4
        path.write_bytes(b'{"pv_kw": [1, 2')  # a half-written file: refused, the last one kept
        runtime._read_forecast_file()
        assert runtime.forecaster.external.pv_kw == (5.0,) * 4


async def test_forecasts_over_a_real_broker_are_answered_and_control_goes_on(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    site = school(tmp_path, broker=f"mqtt://127.0.0.1:{mosquitto.port}")
    topics = Topics(site.topic_prefix)
    async with subscribed(mosquitto.port, topics.forecast_reply) as sub, running(site, 20.0, speed=10.0) as run:
        await wait_for(run.service.connected.is_set)
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            for payload in [*HOSTILE[:8], _forecast([3.0] * 8)]:
                await client.publish(topics.forecast_set, payload, qos=1)
        await wait_for(lambda: len(sub.of(topics.forecast_reply)) >= 9)
    replies = sub.of(topics.forecast_reply)
    assert [r["accepted"] for r in replies] == [False] * 8 + [True]
    assert run.runtime.forecaster.external is not None
    assert run.runtime.stats.ticks >= 20
