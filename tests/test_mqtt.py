"""MQTT: status, Home Assistant discovery and remote tuning against a real Mosquitto (and the embedded
broker), with the controller running the simulated school in accelerated time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiomqtt
import pytest

from config import SiteConfig, load_site
from controller.clock import SimClock
from controller.mqtt import SENSORS, MqttService, Topics, discovery_messages, site_services
from controller.runtime import Runtime
from controller.simulation import simulated_site
from controller.tuning import TuningStore, merge_patch
from hil_tests.broker import Mosquitto, mosquitto, subscribed, wait_for

__all__ = ["mosquitto"]  # the fixture, imported for pytest

SCHOOL = Path(__file__).parents[1] / "config" / "sites" / "zhongshan_school.toml"
START = datetime(2026, 7, 6, 11, 0, tzinfo=ZoneInfo("Asia/Shanghai"))


def school(tmp_path: Path, **mqtt: Any) -> SiteConfig:
    data = load_site(SCHOOL, environment=False).model_dump()
    data["mqtt"].update({"status_max_rate_hz": 1000.0, **mqtt})
    data["storage"] = {"path": str(tmp_path / "series.sqlite3")}
    return SiteConfig.model_validate(data)


# --- tuning, without a broker ------------------------------------------------------------------------


def test_merge_patch_follows_rfc_7396() -> None:
    assert merge_patch({"a": {"b": 1, "c": 2}}, {"a": {"b": None, "d": 3}}) == {"a": {"c": 2, "d": 3}}
    assert merge_patch({"a": 1}, {"a": [1, 2]}) == {"a": [1, 2]}


def test_accepted_patch_is_persisted_atomically_with_the_previous_version_and_logged(tmp_path: Path) -> None:
    site = school(tmp_path)
    store = TuningStore(site)
    first = store.apply({"grid": {"import_limit_kw": 150}}, by="cli:eng", via="cli")
    assert first.accepted
    assert first.changes == {"grid.import_limit_kw": [None, 150.0]}
    assert first.site is not None
    assert first.site.import_limit_kw == 150.0
    second = store.apply({"battery": {"soc_min": 0.2}}, by="mqtt:ops", via="mqtt")
    assert second.accepted
    saved = json.loads(store.path.read_text())
    assert saved["tuning"] == {"grid": {"import_limit_kw": 150}, "battery": {"soc_min": 0.2}}
    assert json.loads((store.path.parent / (store.path.name + ".prev")).read_text())["tuning"] == {
        "grid": {"import_limit_kw": 150}
    }
    audit = [json.loads(line) for line in store.audit_path.read_text().splitlines()]
    assert [(a["by"], a["via"], list(a["changes"])) for a in audit] == [
        ("cli:eng", "cli", ["grid.import_limit_kw"]),
        ("mqtt:ops", "mqtt", ["battery.soc_min"]),
    ]
    # A controller starting later sees both; null hands a field back to the site file.
    again = TuningStore(site)
    assert again.site.import_limit_kw == 150.0
    assert again.site.tuning.battery.soc_min == 0.2
    assert again.apply({"grid": {"import_limit_kw": None}}, by="x", via="cli").site.import_limit_kw == 400.0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("patch", "error"),
    [
        ({"grid": {"import_limit_kw": 900}}, "exceeds the grid rating 400"),
        ({"battery": {"max_charge_kw": 500}}, "exceeds the rating"),
        ({"battery": {"soc_min": "low"}}, "tuning.battery.soc_min"),
        ({"battery": {"soc_min": 0.99}}, "soc_min"),
        ({"mqtt": {"remote_tuning": False}}, "tuning.mqtt"),
        ({"grid": {"import_relief_order": ["ev", "ev"]}}, "each relief lever"),
        ([1, 2], "expected a JSON object"),
        ({}, "empty"),
        ({"a": {"b": {"c": {"d": {"e": 1}}}}}, "nested deeper"),
    ],
)
def test_refused_patch_changes_nothing_and_names_the_field(tmp_path: Path, patch: Any, error: str) -> None:
    store = TuningStore(school(tmp_path))
    store.apply({"grid": {"import_limit_kw": 200}}, by="t", via="cli")
    before = store.path.read_bytes(), store.audit_path.read_bytes(), store.site
    result = store.apply(patch, by="t", via="mqtt")
    assert not result.accepted
    assert any(error in line for line in result.errors), result.errors
    assert (store.path.read_bytes(), store.audit_path.read_bytes(), store.site) == before


def test_damaged_overrides_file_falls_back_to_previous_version(tmp_path: Path) -> None:
    site = school(tmp_path)
    store = TuningStore(site)
    store.apply({"grid": {"import_limit_kw": 200}}, by="t", via="cli")
    store.apply({"grid": {"import_limit_kw": 180}}, by="t", via="cli")
    store.path.write_text('{"version": 1, "tuning": {"grid": {"import_limit_kw": 18')  # torn by hand
    again = TuningStore(site)
    assert again.site.import_limit_kw == 200.0
    assert any("not JSON" in line for line in again.load_errors)


async def _hostile(service: MqttService) -> list[dict[str, Any]]:
    payloads: list[bytes] = [
        b"",
        b"{",
        b"\xff\xfe",
        b"[]",
        b"null",
        b'"patch"',
        json.dumps({"correlation_id": "c1"}).encode(),
        json.dumps({"correlation_id": "c2", "patch": {"grid": {"import_limit_kw": -5}}}).encode(),
        json.dumps({"correlation_id": "c3", "patch": {"grid": {"import_limit_kw": 1e4}}}).encode(),
        json.dumps({"correlation_id": {"x": 1}, "patch": {"grid": {}}}).encode(),
        json.dumps({"correlation_id": "c5", "patch": {"battery": {"soc_max": [1]}}, "extra": 1}).encode(),
        json.dumps({"correlation_id": "c6", "patch": {"grid": {"import_limit_kw": 100}}, "requested_by": 7}).encode(),
        b'{"correlation_id": "big", "patch": {"x": "' + b"a" * 20_000 + b'"}}',
        b'{"patch": {"grid": {"import_limit_kw": NaN}}}',
    ]
    return [await service.handle_command(p) for p in payloads]


async def test_hostile_commands_are_answered_with_errors_and_change_nothing(tmp_path: Path) -> None:
    site = school(tmp_path, remote_tuning=True)
    async with simulated_site(site, START, 1) as (plant, links, _sims):
        runtime = Runtime(site, clock=SimClock(START, None), links=links, line_timing=False, before_tick=plant.advance)
        store = TuningStore(site)
        service = MqttService(site, runtime, store, host="127.0.0.1", port=1)
        replies = await _hostile(service)
    assert all(not r["accepted"] and r["errors"] for r in replies)
    assert not store.path.exists()
    by_id = {r["correlation_id"]: r["errors"] for r in replies}
    assert any("byte offset 1" in e for e in replies[1]["errors"])
    assert any("grid.import_limit_kw" in e for e in by_id["c2"])
    assert any("exceeds the grid rating" in e for e in by_id["c3"])
    assert any("unknown keys ['extra']" in e for e in by_id["c5"])
    assert any("requested_by" in e for e in by_id["c6"])
    assert any("more than the cap" in e for e in replies[12]["errors"])
    assert any("NaN is not a JSON number" in e for e in replies[13]["errors"])
    assert replies[9]["correlation_id"] is None
    assert "correlation_id" in replies[9]["errors"][0]


async def test_remote_tuning_is_refused_unless_enabled(tmp_path: Path) -> None:
    site = school(tmp_path, remote_tuning=False)
    async with simulated_site(site, START, 1) as (plant, links, _sims):
        runtime = Runtime(site, clock=SimClock(START, None), links=links, line_timing=False, before_tick=plant.advance)
        service = MqttService(site, runtime, TuningStore(site), host="127.0.0.1", port=1)
        reply = await service.handle_command(b'{"correlation_id": 4, "patch": {"grid": {"import_limit_kw": 100}}}')
    assert reply == {"correlation_id": 4, "accepted": False, "errors": [reply["errors"][0]]}
    assert "remote tuning is disabled" in reply["errors"][0]


def test_discovery_describes_energy_sensors_for_the_energy_dashboard(tmp_path: Path) -> None:
    site = school(tmp_path)
    messages = dict(discovery_messages(site, Topics(site.topic_prefix)))
    assert len(messages) == len(SENSORS)
    grid_import = json.loads(messages["homeassistant/sensor/greensite_zhongshan_school/grid_import_kwh/config"])
    assert grid_import["device_class"] == "energy"
    assert grid_import["state_class"] == "total_increasing"
    assert grid_import["unit_of_measurement"] == "kWh"
    assert grid_import["state_topic"] == "greensite/zhongshan-school/state"
    assert grid_import["availability_topic"] == "greensite/zhongshan-school/availability"
    assert len({json.loads(m)["unique_id"] for m in messages.values()}) == len(SENSORS)
    cost = json.loads(messages["homeassistant/sensor/greensite_zhongshan_school/energy_cost_cny/config"])
    assert (cost["device_class"], cost["state_class"], cost["unit_of_measurement"]) == ("monetary", "total", "CNY")


# --- against a real broker -------------------------------------------------------------------------------


class _Run:
    def __init__(self, runtime: Runtime, service: MqttService, stop: asyncio.Event) -> None:
        """`stop.set()` ends the run at its next tick (a test done before its duration)."""
        self.runtime, self.service, self.stop = runtime, service, stop


@contextlib.asynccontextmanager
async def running(site: SiteConfig, duration_s: float, speed: float) -> AsyncIterator[_Run]:
    """The controller on the simulated school with MQTT; leaving the block waits for the run's end."""
    async with simulated_site(site, START, 1) as (plant, links, _sims):
        runtime = Runtime(site, clock=SimClock(START, speed), links=links, line_timing=False,
                          before_tick=plant.advance)  # fmt: skip
        async with site_services(runtime, TuningStore(site)) as service:
            assert service is not None
            stop = asyncio.Event()
            task = asyncio.create_task(runtime.run(duration_s, stop), name="runtime")
            try:
                yield _Run(runtime, service, stop)
            except BaseException:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise
            await task


async def test_every_tick_status_discovery_on_ha_birth_and_remote_tuning(tmp_path: Path, mosquitto: Mosquitto) -> None:
    site = school(tmp_path, broker=f"mqtt://127.0.0.1:{mosquitto.port}", remote_tuning=True)
    topics = Topics(site.topic_prefix)
    async with subscribed(mosquitto.port, f"{topics.prefix}/#", "homeassistant/#") as sub:
        async with running(site, 60.0, speed=20.0) as run, aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            await wait_for(lambda: len(sub.of(topics.state)) >= 10)
            discovery = {t for t, _, _ in sub.messages if t.endswith("/config")}
            assert len(discovery) == len(SENSORS)
            # Home Assistant restarts: its birth message brings the discovery again.
            await client.publish("homeassistant/status", b"online")
            await wait_for(lambda: len([t for t, _, _ in sub.messages if t.endswith("/config")]) >= 2 * len(SENSORS))
            command = {"correlation_id": "abc-1", "requested_by": "site engineer",
                       "patch": {"grid": {"import_limit_kw": 120}}}  # fmt: skip
            await client.publish(topics.config_set, json.dumps(command).encode(), qos=1)
            await wait_for(lambda: len(sub.of(topics.config_reply)) >= 1)
            bad = {"correlation_id": "abc-2", "patch": {"grid": {"import_limit_kw": 9999}}}
            await client.publish(topics.config_set, json.dumps(bad).encode(), qos=1)
            await wait_for(lambda: len(sub.of(topics.config_reply)) >= 2)
            ok, refused = sub.of(topics.config_reply)
            assert ok["correlation_id"] == "abc-1"
            assert ok["accepted"]
            assert ok["changes"] == {"grid.import_limit_kw": [None, 120.0]}
            assert refused["correlation_id"] == "abc-2"
            assert not refused["accepted"]
            assert "exceeds the grid rating" in refused["errors"][0]
            await wait_for(lambda: run.runtime.site.import_limit_kw == 120.0)  # applied at a tick boundary
            await wait_for(lambda: sub.of(topics.state)[-1]["import_limit_kw"] == 120.0)
            assert sub.of(topics.config_state)[-1]["tuning"]["grid"]["import_limit_kw"] == 120.0
        await wait_for(lambda: sub.of(topics.availability)[-1:] == ["offline"])  # said on the way out
    states = sub.of(topics.state)
    ticks = [s["tick"] for s in states]
    assert sorted(set(ticks)) == list(range(1, 62))  # every tick (at least once: QoS 1)
    assert ticks == sorted(ticks)  # in order
    assert run.runtime.stats.ticks == 61
    last = states[-1]
    assert {"grid_power_kw", "pv_power_kw", "battery_soc_pct", "grid_import_kwh", "energy_cost_cny"} <= set(last)
    assert last["controller_state"] == "running"
    assert sub.of(topics.health)[-1]["devices"]["grid-meter"]["state"] == "ok"
    assert "cost_cny" in sub.of(topics.plan)[-1]


async def test_broker_killed_mid_run_control_goes_on_and_buffered_status_is_delivered(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    site = school(tmp_path, broker=f"mqtt://127.0.0.1:{mosquitto.port}")
    topics = Topics(site.topic_prefix)
    async with subscribed(mosquitto.port, topics.state, identifier="hil-subscriber") as sub:
        await asyncio.sleep(1.5)  # the broker's autosave has the subscriber's session
        async with running(site, 120.0, speed=20.0) as run:
            await wait_for(lambda: run.runtime.stats.ticks >= 20)
            mosquitto.kill()
            killed_at = run.runtime.stats.ticks
            await wait_for(lambda: run.runtime.stats.ticks >= 60)
            assert not run.service.connected.is_set()
            queued = len(run.service.outbox)
            await asyncio.to_thread(mosquitto.start)
            restarted_at = run.runtime.stats.ticks
        await wait_for(lambda: {s["tick"] for s in sub.of(topics.state)} >= set(range(killed_at + 2, 122)), 15.0)
    assert queued >= 35  # status kept while the broker was away
    assert run.service.connections >= 2
    assert run.runtime.stats.ticks == 121  # the loop never waited on MQTT
    assert run.runtime.stats.safe_state_ticks == 0
    ticks = {s["tick"] for s in sub.of(topics.state)}
    assert set(range(killed_at + 2, restarted_at)) <= ticks  # produced during the outage, delivered after


async def test_a_thousand_hostile_payloads_over_the_broker_are_all_refused(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    site = school(tmp_path, broker=f"mqtt://127.0.0.1:{mosquitto.port}", remote_tuning=True)
    topics = Topics(site.topic_prefix)
    rng = random.Random(7)
    shapes: list[bytes] = [
        b"{", b"[]", b"\x00\x01\x02", b'{"patch": 5}', b'{"patch": {"grid": {"import_limit_kw": "x"}}}',
        b'{"patch": {"battery": {"soc_min": 2}}}', b'{"patch": {"grid": {"export_limit_kw": 50}}}',
        b'{"patch": {"nope": 1}}', b'{"patch": {"battery": {"max_charge_kw": 1e5}}}', b"x" * 40_000,
    ]  # fmt: skip
    async with (
        subscribed(mosquitto.port, topics.config_reply) as sub,
        running(site, 150.0, speed=20.0) as run,
        aiomqtt.Client("127.0.0.1", mosquitto.port) as client,
    ):
        await wait_for(run.service.connected.is_set)
        for index in range(1000):
            payload = shapes[index % len(shapes)] if index % 3 else rng.randbytes(rng.randint(1, 300))
            await client.publish(topics.config_set, payload, qos=1)
        await wait_for(lambda: len(sub.of(topics.config_reply)) >= 1000, 60.0)
        assert run.runtime.site.tuning == site.tuning
    replies = sub.of(topics.config_reply)
    assert len(replies) == 1000
    assert run.service.commands.failed == 0
    assert all(isinstance(r, dict) and r["accepted"] is False and r["errors"] for r in replies)
    assert not TuningStore(site).path.exists()
    assert run.runtime.stats.ticks == 151
    assert run.runtime.stats.safe_state_ticks == 0


async def test_a_retained_command_is_refused_and_cleared_never_replayed(tmp_path: Path, mosquitto: Mosquitto) -> None:
    site = school(tmp_path, broker=f"mqtt://127.0.0.1:{mosquitto.port}", remote_tuning=True)
    topics = Topics(site.topic_prefix)
    command = {"correlation_id": "kept", "patch": {"grid": {"import_limit_kw": 111}}}
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
        await client.publish(topics.config_set, json.dumps(command).encode(), qos=1, retain=True)
    async with subscribed(mosquitto.port, topics.config_reply) as sub, running(site, 40.0, speed=20.0) as run:
        await wait_for(lambda: len(sub.of(topics.config_reply)) >= 1)
        reply = sub.of(topics.config_reply)[0]
        assert reply["correlation_id"] == "kept"
        assert not reply["accepted"]
        assert reply["errors"][0].startswith("retained: a retained command is never applied")
    assert run.service.commands.retained_ignored == 1
    assert run.runtime.site.tuning == site.tuning
    assert not TuningStore(site).path.exists()
    # Cleared: a late subscriber (or the next start) finds no retained command.
    async with subscribed(mosquitto.port, topics.config_set) as late:
        await asyncio.sleep(0.5)
    assert late.messages == []


async def test_a_bug_in_the_mqtt_service_restarts_it_not_the_controller(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = school(tmp_path, broker=f"mqtt://127.0.0.1:{mosquitto.port}")
    real = MqttService._requeue_retained
    calls: list[int] = []

    def buggy(self: MqttService) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("a bug of ours")
        real(self)

    monkeypatch.setattr(MqttService, "_requeue_retained", buggy)
    async with running(site, 100.0, speed=20.0) as run:
        await wait_for(run.service.connected.is_set)
    assert run.service.failures == 1
    assert run.service.connections == 2
    assert run.runtime.stats.ticks == 101


async def test_a_retained_command_sent_while_the_controller_listens_is_refused_too(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """MQTT 5's retain-as-published: the flag reaches a subscriber that is already connected."""
    site = school(tmp_path, broker=f"mqtt://127.0.0.1:{mosquitto.port}", remote_tuning=True)
    topics = Topics(site.topic_prefix)
    command = {"correlation_id": "live-retained", "patch": {"grid": {"import_limit_kw": 111}}}
    async with subscribed(mosquitto.port, topics.config_reply) as sub, running(site, 60.0, speed=20.0) as run:
        await wait_for(run.service.connected.is_set)
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            await client.publish(f"{topics.config_set}/wang", json.dumps(command).encode(), qos=1, retain=True)
        await wait_for(lambda: len(sub.of(topics.config_reply)) >= 1)
        assert not sub.of(topics.config_reply)[0]["accepted"]
    assert run.service.commands.retained_ignored == 1
    assert run.runtime.site.tuning == site.tuning
    async with subscribed(mosquitto.port, f"{topics.config_set}/#") as late:
        await asyncio.sleep(0.5)
    assert late.messages == []  # cleared


@contextlib.asynccontextmanager
async def _mqtt_3_only(upstream_port: int) -> AsyncIterator[int]:
    """A broker front that answers an MQTT 5 CONNECT as a 3.1.1-only broker does (CONNACK, code 1:
    unacceptable protocol version) and passes 3.1.1 through to a real broker. Yields its port."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.read(65536)  # the CONNECT; its protocol level follows the name "MQTT"
        name = first.find(b"\x00\x04MQTT")
        if name < 0 or first[name + 6] == 5:
            writer.write(b"\x20\x02\x00\x01")
            await writer.drain()
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        up_writer.write(first)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def test_a_broker_without_mqtt_5_is_spoken_to_in_3_1_1(tmp_path: Path, mosquitto: Mosquitto) -> None:
    async with _mqtt_3_only(mosquitto.port) as port:
        site = school(tmp_path, broker=f"mqtt://127.0.0.1:{port}")
        async with running(site, 60.0, speed=20.0) as run:
            await wait_for(run.service.connected.is_set)
    assert run.service.protocol is aiomqtt.ProtocolVersion.V311
    assert run.service.connections == 1  # the MQTT 5 attempt was refused, the 3.1.1 one connected


async def test_retained_status_is_sent_again_to_a_broker_that_lost_it(tmp_path: Path, mosquitto: Mosquitto) -> None:
    site = school(tmp_path, broker=f"mqtt://127.0.0.1:{mosquitto.port}", remote_tuning=True)
    topics = Topics(site.topic_prefix)
    # Up to 60 s of wall time, ended once the checks are done: a broker restart and the reconnect back-off
    # on a loaded machine outlasted a 10 s run, whose end then took "online" away before the checks.
    async with running(site, 1200.0, speed=20.0) as run:
        await wait_for(lambda: run.service.connected.is_set() and run.runtime.stats.plans >= 1)
        await wait_for(lambda: len(run.service.outbox.control) == 0)
        mosquitto.kill()
        (tmp_path / "mosquitto.db").unlink(missing_ok=True)  # a broker that comes back with nothing retained
        await asyncio.to_thread(mosquitto.start)
        # Generous waits: the reconnect back-off and a loaded 2-core machine (the suite beside a simulation
        # missed 15 s about one time in five, before and after the forecast topic was added).
        await wait_for(lambda: run.service.connections >= 2 and run.service.connected.is_set(), 30.0)
        async with subscribed(mosquitto.port, f"{topics.prefix}/#", "homeassistant/#") as late:
            await wait_for(lambda: {topics.availability, topics.config_state, topics.plan, topics.health}
                           <= {t for t, _, retained in late.messages if retained}, 30.0)  # fmt: skip
            await wait_for(lambda: len([t for t, _, r in late.messages if r and t.endswith("/config")]) == len(SENSORS))
        assert late.of(topics.config_state)[0]["version"] == 0
        assert late.of(topics.health)[0]["mqtt_commands"] == {"received": 0, "accepted": 0, "refused": 0,
                                                               "failed": 0, "retained_ignored": 0}  # fmt: skip
        run.stop.set()


async def test_embedded_broker_serves_status_and_commands(tmp_path: Path) -> None:
    site = school(tmp_path, broker="embedded", embedded_port=0, remote_tuning=False)  # no tuning: anonymous
    topics = Topics(site.topic_prefix)
    async with running(site, 40.0, speed=20.0) as run:
        await wait_for(run.service.connected.is_set)
        async with subscribed(run.service.port, f"{topics.prefix}/#") as sub:
            await wait_for(lambda: len(sub.of(topics.state)) >= 5)
            assert sub.of(topics.availability)[0] == "online"  # retained
    assert not (tmp_path / "series.mqtt-users.json").exists()


async def test_embedded_broker_with_remote_tuning_authenticates_and_the_topic_names_the_sender(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = school(tmp_path, broker="embedded", embedded_port=0, remote_tuning=True)
    topics = Topics(site.topic_prefix)
    accounts = tmp_path / "series.mqtt-users.json"
    with caplog.at_level("WARNING", logger="controller.mqtt._broker_auth"):
        async with running(site, 60.0, speed=20.0) as run:
            await wait_for(run.service.connected.is_set)
            password = json.loads(accounts.read_text())["engineer"]
            with pytest.raises(aiomqtt.MqttError):
                async with aiomqtt.Client("127.0.0.1", run.service.port):
                    pass  # anonymous: refused
            with pytest.raises(aiomqtt.MqttError):
                async with aiomqtt.Client("127.0.0.1", run.service.port, username="engineer", password="guess"):
                    pass
            replies: list[dict[str, Any]] = []
            async with aiomqtt.Client("127.0.0.1", run.service.port, username="engineer", password=password) as client:
                await client.subscribe(topics.config_reply, qos=1)
                await client.publish(f"{topics.config_set}/greensite", _cmd("impersonating"), qos=1)
                await client.publish(topics.config_set, _cmd("unnamed"), qos=1)
                await client.publish(f"{topics.config_set}/engineer", _cmd("e1"), qos=1)
                async with asyncio.timeout(10):
                    replies.append(await _first_json(client))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        async for message in client.messages:
                            replies.append(json.loads(bytes(message.payload)))
            assert [r["correlation_id"] for r in replies] == ["e1"]  # the ACL dropped the others
            assert replies[0]["accepted"]
    assert accounts.stat().st_mode & 0o777 == 0o600
    audit = [json.loads(line) for line in TuningStore(site).audit_path.read_text().splitlines()]
    assert [(a["correlation_id"], a["by"], a["verified"]) for a in audit] == [("e1", "mqtt-user:engineer", True)]
    shown = [r for r in caplog.records if "accounts generated" in r.getMessage()]
    assert len(shown) == 1
    assert shown[0].password == password  # type: ignore[attr-defined]
    caplog.clear()
    with caplog.at_level("WARNING", logger="controller.mqtt._broker_auth"):
        async with running(site, 5.0, speed=20.0) as run:
            await wait_for(run.service.connected.is_set)  # the same accounts: the controller connects again
    assert not [r for r in caplog.records if "accounts generated" in r.getMessage()]  # shown once only


async def _first_json(client: aiomqtt.Client) -> Any:
    async for message in client.messages:
        assert isinstance(message.payload, bytes)
        return json.loads(message.payload)
    raise AssertionError("no message")


def _cmd(correlation_id: str) -> bytes:
    return json.dumps({"correlation_id": correlation_id, "patch": {"battery": {"reserve_soc": 0.3}}}).encode()


def test_config_set_from_a_shell_is_seen_by_a_running_controller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from controller.cli import main

    monkeypatch.chdir(tmp_path)  # the school's storage paths are relative: var/...
    running_view = TuningStore(load_site(SCHOOL))
    assert running_view.reload_if_changed() is None
    assert main(["config", "set", str(SCHOOL), '{"battery": {"reserve_soc": 0.4}}', "--by", "wang"]) == 0
    assert '"battery.reserve_soc"' in capsys.readouterr().out
    changed = running_view.reload_if_changed()
    assert changed is not None
    assert changed.tuning.battery.reserve_soc == 0.4
    assert main(["config", "set", str(SCHOOL), '{"battery": {"reserve_soc": 0.99}}']) == 2
    assert "reserve_soc must lie between soc_min and soc_max" in capsys.readouterr().err
    assert main(["config", "set", str(SCHOOL), "{oops"]) == 2
    assert "byte offset 1" in capsys.readouterr().err
    assert main(["config", "get", str(SCHOOL)]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["tuning"]["battery"]["reserve_soc"] == 0.4
    audit = (tmp_path / "var" / "zhongshan-school.tuning.audit.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in audit]
    assert [(e["requested_by"], e["verified"], e["by"].startswith("cli:")) for e in entries] == [("wang", True, True)]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _test_pki(folder: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate signed by it; a password file."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-subj", "/CN=greensite test CA", "-days", "2", cwd=folder)  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, subject in (("server", "/CN=127.0.0.1"), ("client", "/CN=greensite-zhongshan-school")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", subject, cwd=folder)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", *(["-extfile", "san.ext"] if name == "server" else []),
                 cwd=folder)  # fmt: skip
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(folder / "passwd"), "school", "s3cret"], check=True)


async def test_tls_with_client_certificate_and_password(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    _test_pki(pki)
    broker = Mosquitto(tmp_path, extra_config=(
        f"cafile {pki}/ca.pem\ncertfile {pki}/server.pem\nkeyfile {pki}/server.key\nrequire_certificate true\n"
        f"allow_anonymous false\npassword_file {pki}/passwd\n"))  # fmt: skip
    broker.start()
    tls = {"ca_file": str(pki / "ca.pem"), "cert_file": str(pki / "client.pem"), "key_file": str(pki / "client.key")}
    try:
        good = school(tmp_path / "good", broker=f"mqtts://127.0.0.1:{broker.port}", username="school",
                      password="s3cret", tls=tls)  # fmt: skip
        async with running(good, 20.0, speed=20.0) as run:
            await wait_for(run.service.connected.is_set)
        assert run.service.connections == 1
        wrong = school(tmp_path / "wrong", broker=f"mqtts://127.0.0.1:{broker.port}", username="school",
                       password="guess", tls=tls)  # fmt: skip
        async with running(wrong, 20.0, speed=20.0) as run:
            pass
        assert run.service.connections == 0  # refused, retried, and the loop ran anyway
        assert run.runtime.stats.ticks == 21
        no_cert = school(tmp_path / "nocert", broker=f"mqtts://127.0.0.1:{broker.port}", username="school",
                         password="s3cret", tls={"ca_file": str(pki / "ca.pem")})  # fmt: skip
        async with running(no_cert, 20.0, speed=20.0) as run:
            pass
        assert run.service.connections == 0
    finally:
        broker.kill()


def _password_file(folder: Path, accounts: dict[str, str]) -> Path:
    passwd = folder / "passwd"
    for index, (user, password) in enumerate(accounts.items()):
        create = ["-c"] if index == 0 else []
        subprocess.run(["mosquitto_passwd", "-b", *create, str(passwd), user, password], check=True)
    return passwd


async def test_the_example_mosquitto_acl_lets_each_user_command_only_as_themselves(tmp_path: Path) -> None:
    acl = Path(__file__).parents[1] / "config" / "mosquitto" / "greensite.acl"
    passwd = _password_file(tmp_path, {"greensite": "controller-pw", "wang": "wang-pw"})
    broker = Mosquitto(tmp_path, extra_config=f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n")
    broker.start()
    try:
        site = school(tmp_path, broker=f"mqtt://127.0.0.1:{broker.port}", remote_tuning=True, username="greensite",
                      password="controller-pw")  # fmt: skip
        topics = Topics(site.topic_prefix)
        async with running(site, 60.0, speed=20.0) as run:
            await wait_for(run.service.connected.is_set)
            async with aiomqtt.Client("127.0.0.1", broker.port, username="wang", password="wang-pw") as client:
                await client.subscribe(topics.config_reply, qos=1)
                await client.publish(topics.config_set, _cmd("shared"), qos=1)  # denied: self-declared only
                await client.publish(f"{topics.config_set}/greensite", _cmd("impersonating"), qos=1)  # denied
                await client.publish(f"{topics.config_set}/wang", _cmd("w1"), qos=1)
                async with asyncio.timeout(10):
                    reply = await _first_json(client)
        assert reply["correlation_id"] == "w1"
        assert reply["accepted"]
        audit = [json.loads(line) for line in TuningStore(site).audit_path.read_text().splitlines()]
        assert [(a["correlation_id"], a["by"], a["verified"]) for a in audit] == [("w1", "mqtt-user:wang", True)]
    finally:
        broker.kill()


async def test_tls_settings_that_cannot_work_are_logged_by_field_at_start(
    tmp_path: Path, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    site = school(tmp_path, broker=f"mqtt://127.0.0.1:{mosquitto.port}", tls={"ca_file": str(tmp_path / "ca.pem")})
    with caplog.at_level("ERROR", logger="controller.mqtt._wiring"):
        async with running(site, 10.0, speed=20.0) as run:
            await wait_for(run.service.connected.is_set)  # plain MQTT still works: the TLS block is ignored
    problems = [r.problem for r in caplog.records if r.getMessage() == "MQTT settings will not work"]  # type: ignore[attr-defined]
    assert len(problems) == 1
    assert problems[0].startswith("mqtt.tls: TLS settings under an mqtt:// broker")


def test_reconnect_back_off_is_jittered_capped_and_reset() -> None:
    from controller.mqtt import Backoff

    backoff = Backoff(initial_s=0.5, cap_s=30.0)
    delays = [backoff.next_delay_s() for _ in range(12)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(d <= 30.0 for d in delays)
    assert min(delays[-4:]) >= 15.0  # capped at 30 s, jittered over its upper half
    assert len(set(delays)) == len(delays)  # jitter: two controllers do not retry in step
    backoff.reset()
    assert backoff.next_delay_s() <= 0.5
