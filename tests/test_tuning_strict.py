"""Remote tuning you can trust: bounded strict parsing on every path, compare-and-swap on the versioned
overrides file, retained commands, identity in the audit (issue 17). No broker: `handle_command` and
`TuningStore` directly; tests/test_mqtt.py covers the same over a real Mosquitto."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controller.clock import SimClock
from controller.mqtt import MqttService
from controller.runtime import Runtime
from controller.simulation import simulated_site
from controller.strict_json import JsonLimits, JsonRefused, decode_json, nesting_depth
from controller.tuning import TuningStore
from tests.test_mqtt import SCHOOL, START, school

NUMBER = "must be a JSON number (not a string, not true/false)"
# The four payloads of the issue that each ended the controller, and their kin.
ISSUE_PAYLOADS: dict[str, bytes] = {
    "2000 [": b"[" * 2000,
    "object 1200 deep": b'{"a":' * 1200 + b"1" + b"}" * 1200,
    "5000-digit integer": b'{"correlation_id": "n", "patch": {"grid": {"import_limit_kw": ' + b"9" * 5000 + b"}}}",
    "patch 500 deep": b'{"correlation_id": "d", "patch": ' + b'{"grid":' * 500 + b"1" + b"}" * 501,
}


class _Controller:
    def __init__(self, runtime: Runtime, service: MqttService, store: TuningStore) -> None:
        self.runtime, self.service, self.store = runtime, service, store


async def _controller(tmp_path: Path, *, remote_tuning: bool = True) -> AsyncIterator[_Controller]:
    site = school(tmp_path, remote_tuning=remote_tuning)
    async with simulated_site(site, START, 1) as (plant, links, _sims):
        runtime = Runtime(site, clock=SimClock(START, None), links=links, line_timing=False, before_tick=plant.advance)
        store = TuningStore(site)
        yield _Controller(runtime, MqttService(site, runtime, store, host="127.0.0.1", port=1), store)


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[_Controller]:
    async for c in _controller(tmp_path):
        yield c


@pytest.fixture
async def tuning_off(tmp_path: Path) -> AsyncIterator[_Controller]:
    async for c in _controller(tmp_path, remote_tuning=False):
        yield c


def _command(patch: Any, **envelope: Any) -> bytes:
    return json.dumps({"correlation_id": "c", "requested_by": "test", "patch": patch, **envelope}).encode()


# --- bounded parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ISSUE_PAYLOADS))
async def test_the_issue_payloads_are_refused_with_remote_tuning_on_and_off(
    controller: _Controller, tuning_off: _Controller, name: str
) -> None:
    for c in (controller, tuning_off):
        reply = await c.service.handle_command(ISSUE_PAYLOADS[name])
        assert reply["accepted"] is False
        assert any("levels deep; at most 8" in e or "number literal" in e for e in reply["errors"]), reply
        assert c.service.commands.failed == 0
        assert not c.store.path.exists()


def test_the_scan_bounds_depth_and_numbers_without_recursion() -> None:
    limits = JsonLimits(max_bytes=10_000_000)
    with pytest.raises(JsonRefused, match="nested 1000000 levels deep; at most 8"):
        decode_json(b"[" * 1_000_000, limits)  # far past the interpreter's recursion limit
    with pytest.raises(JsonRefused, match="a number literal of 5000 characters; at most 40"):
        decode_json(b"[" + b"1" * 5000 + b"]", limits)
    # Brackets inside strings (with escaped quotes) are text, not nesting.
    assert decode_json(b'{"a": "\\"[[[[[[[[[[[[[[{{{{{{{{"}', limits) == {"a": '"[[[[[[[[[[[[[[{{{{{{{{'}
    assert decode_json(b"[[[[[[[[1]]]]]]]]", limits) == [[[[[[[[1]]]]]]]]
    with pytest.raises(JsonRefused, match="nested 9 levels deep"):
        decode_json(b"[[[[[[[[[1]]]]]]]]]", limits)
    assert nesting_depth([[[[[[[[[[1]]]]]]]]]], 4) == 5  # stops counting past the limit
    assert nesting_depth({"a": [1, {"b": 2}]}, 8) == 3


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ('{"patch": {"grid": {"import_limit_kw": 1}}}'.encode("utf-16"), "UTF-16 byte order mark"),
        ('{"patch": {"grid": {"import_limit_kw": 1}}}'.encode("utf-16-le"), "NUL byte at byte offset 1"),
        ('{"patch": {"grid": {"import_limit_kw": 1}}}'.encode("utf-32"), "UTF-32 byte order mark"),
        ('{"patch": {"grid": {"import_limit_kw": 1}}}'.encode("utf-8-sig"), "UTF-8 byte order mark"),
        (b'{"patch": {"grid": {"import_limit_kw": 1}}, "x": "\xe9"}', "not UTF-8 at byte offset 50"),
        (b'{"patch": {"grid": {"import_limit_kw": 100, "import_limit_kw": 350}}}', "duplicate key 'import_limit_kw'"),
        (b'{"patch": {"grid": {"import_limit_kw": 100}}, "patch": {}}', "duplicate key 'patch'"),
        (b'{"patch": {"grid": {"import_limit_kw": 1e999}}}', "beyond a 64-bit float"),
        (b'{"patch": {"grid": {"import_limit_kw": -Infinity}}}', "-Infinity is not a JSON number"),
    ],
)
async def test_encodings_duplicates_and_non_numbers_are_refused(
    controller: _Controller, payload: bytes, error: str
) -> None:
    reply = await controller.service.handle_command(payload)
    assert not reply["accepted"]
    assert any(error in e for e in reply["errors"]), reply["errors"]
    assert not controller.store.path.exists()


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"grid": {"import_limit_kw": "350"}}, "tuning.grid.import_limit_kw: must be a JSON number"),
        ({"battery": {"reserve_soc": " 0.25 "}}, "tuning.battery.reserve_soc: must be a JSON number"),
        ({"grid": {"export_limit_kw": "1_0"}}, "tuning.grid.export_limit_kw: must be a JSON number"),
        ({"grid": {"import_limit_kw": True}}, f"tuning.grid.import_limit_kw: {NUMBER}, got a boolean True"),
        ({"battery": {"wear_cost_cny_per_kwh": True}}, "tuning.battery.wear_cost_cny_per_kwh: must be a JSON num"),
        ({"replan_period_s": "900"}, "tuning.replan_period_s: must be a JSON number"),
        ({"grid": {"import_relief_order": "battery"}}, "tuning.grid.import_relief_order: must be a JSON array"),
        ({"battery": 5}, "tuning.battery: must be a JSON object"),
    ],
)
async def test_wrong_types_are_refused_by_field_and_rule(controller: _Controller, patch: Any, field: str) -> None:
    reply = await controller.service.handle_command(_command(patch))
    assert not reply["accepted"]
    assert any(e.startswith(field) for e in reply["errors"]), reply["errors"]
    assert not controller.store.path.exists()


async def test_an_exception_while_handling_is_answered_and_counted_and_cancellation_is_not(
    controller: _Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(controller.store, "apply", broken)
    reply = await controller.service.handle_command(_command({"grid": {"import_limit_kw": 100}}))
    assert reply["accepted"] is False
    assert "internal error while handling the command (RuntimeError)" in reply["errors"][0]
    assert controller.service.commands.failed == 1

    def cancelled(*_args: Any, **_kwargs: Any) -> Any:
        raise asyncio.CancelledError

    monkeypatch.setattr(controller.store, "apply", cancelled)
    with pytest.raises(asyncio.CancelledError):
        await controller.service.handle_command(_command({"grid": {"import_limit_kw": 100}}))


def test_config_set_refuses_deep_and_loose_patches_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from controller.cli import main

    monkeypatch.chdir(tmp_path)
    deep = '{"grid":' * 600 + "1" + "}" * 600
    assert main(["config", "set", str(SCHOOL), deep]) == 2
    assert "nested 600 levels deep; at most 8" in capsys.readouterr().err
    assert main(["config", "set", str(SCHOOL), '{"grid": {"import_limit_kw": "350"}}']) == 2
    assert "tuning.grid.import_limit_kw: must be a JSON number" in capsys.readouterr().err
    assert main(["config", "set", str(SCHOOL), '{"grid": {"import_limit_kw": 1, "import_limit_kw": 2}}']) == 2
    assert "duplicate key" in capsys.readouterr().err
    (tmp_path / "p.json").write_bytes('{"grid": {"import_limit_kw": 100}}'.encode("utf-16"))
    assert main(["config", "set", str(SCHOOL), f"@{tmp_path / 'p.json'}"]) == 2
    assert "UTF-16" in capsys.readouterr().err
    assert not (tmp_path / "var" / "zhongshan-school.tuning.json").exists()


def test_an_overrides_file_with_loose_types_is_refused_at_start(tmp_path: Path) -> None:
    site = school(tmp_path)
    store = TuningStore(site)
    store.path.parent.mkdir(parents=True, exist_ok=True)
    for text, error in (
        ('{"format": 2, "version": 3, "tuning": {"grid": {"import_limit_kw": "350"}}}', "must be a JSON number"),
        ('{"format": 2, "version": 3, "tuning": {"grid": {"import_limit_kw": true}}}', "got a boolean"),
        ('{"version": 1, "tuning": {"grid": {"import_limit_kw": 1, "import_limit_kw": 2}}}', "duplicate key"),
        ('{"version": 1, "tuning": ' + '{"a":' * 50 + "1" + "}" * 51, "levels deep"),
        ('{"version": true, "tuning": {}}', "version: must be a non-negative JSON integer"),
    ):
        store.path.write_text(text)
        again = TuningStore(site)
        assert again.site.tuning == site.tuning
        assert any(error in line for line in again.load_errors), (text, again.load_errors)
    store.path.write_text('{"version": 1, "tuning": {"grid": {"import_limit_kw": 350}}}')  # format 1 still reads
    assert TuningStore(site).site.import_limit_kw == 350.0


# --- no lost updates -------------------------------------------------------------------------------------


async def test_an_mqtt_patch_right_after_a_cli_change_keeps_the_cli_change(controller: _Controller) -> None:
    """The issue's lost update: the controller's in-memory copy predates the shell's change."""
    shell = TuningStore(controller.store.base)  # another process, as `greensite config set` is
    assert shell.apply({"battery": {"reserve_soc": 0.31}}, by="cli:wang", via="cli").accepted
    assert controller.store.site.tuning.battery.reserve_soc == 0.2  # the follower has not looked yet
    reply = await controller.service.handle_command(_command({"grid": {"import_limit_kw": 300}}))
    assert reply["accepted"], reply
    assert reply["version"] == 2
    assert reply["tuning"]["battery"]["reserve_soc"] == 0.31
    assert reply["changes"] == {"grid.import_limit_kw": [None, 300.0]}
    saved = json.loads(controller.store.path.read_text())
    assert saved["tuning"] == {"battery": {"reserve_soc": 0.31}, "grid": {"import_limit_kw": 300}}
    assert saved["version"] == 2
    assert controller.store.site.tuning.battery.reserve_soc == 0.31  # what the runtime was handed


async def test_a_stale_base_version_is_refused_with_the_current_version(controller: _Controller) -> None:
    first = await controller.service.handle_command(_command({"grid": {"import_limit_kw": 300}}, base_version=0))
    assert first["accepted"]
    assert first["version"] == 1
    stale = await controller.service.handle_command(_command({"grid": {"import_limit_kw": 250}}, base_version=0))
    assert not stale["accepted"]
    assert stale["version"] == 1
    assert "base_version: 0 is stale, the overrides are at version 1" in stale["errors"][0]
    fresh = await controller.service.handle_command(_command({"grid": {"import_limit_kw": 250}}, base_version=1))
    assert fresh["accepted"]
    assert fresh["version"] == 2
    noop = await controller.service.handle_command(_command({"grid": {"export_limit_kw": None}}))
    assert noop["accepted"]
    assert noop["version"] == 2  # nothing to change, nothing written
    for bad in (True, -1, "1", 1.5):
        reply = await controller.service.handle_command(_command({"grid": {"import_limit_kw": 200}}, base_version=bad))
        assert not reply["accepted"]
        assert reply["errors"][0].startswith("base_version: a JSON integer")


# --- retained commands and who may tune ------------------------------------------------------------------


async def test_a_retained_command_is_never_applied(controller: _Controller) -> None:
    reply = await controller.service.handle_command(_command({"grid": {"import_limit_kw": 300}}), retained=True)
    assert reply["correlation_id"] == "c"
    assert not reply["accepted"]
    assert reply["errors"][0].startswith("retained: a retained command is never applied")
    assert not controller.store.path.exists()


async def test_the_audit_carries_the_correlation_id_and_who_the_broker_vouched_for(controller: _Controller) -> None:
    ok = await controller.service.handle_command(_command({"grid": {"import_limit_kw": 300}}), sender="engineer")
    assert ok["accepted"]
    ok = await controller.service.handle_command(
        _command({"grid": {"import_limit_kw": 250}}, correlation_id=7, requested_by="wang")
    )
    assert ok["accepted"]
    audit = [json.loads(line) for line in controller.store.audit_path.read_text().splitlines()]
    assert [(a["correlation_id"], a["by"], a["verified"], a["requested_by"], a["version"]) for a in audit] == [
        ("c", "mqtt-user:engineer", True, "test", 1),
        (7, "mqtt:wang (self-declared)", False, "wang", 2),
    ]


def test_only_command_topics_carry_a_sender() -> None:
    from controller.mqtt import Topics

    topics = Topics("greensite/s")
    assert topics.command_sender("greensite/s/config/set") == ""
    assert topics.command_sender("greensite/s/config/set/wang") == "wang"
    assert topics.command_sender("greensite/s/config/set/a/b") is None
    assert topics.command_sender("greensite/s/config/set/") is None
    assert topics.command_sender("greensite/s/config/reply") is None


def test_nothing_is_written_when_a_patch_only_resets_what_is_not_set(tmp_path: Path) -> None:
    store = TuningStore(school(tmp_path))
    result = store.apply({"grid": {"import_limit_kw": None}}, by="t", via="cli")
    assert result.accepted
    assert result.changes == {}
    assert result.version == 0
    assert not store.path.exists()


async def test_a_command_cancelled_while_its_patch_is_written_still_reaches_the_runtime(
    controller: _Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lost connection cancels the receive task; the worker thread finishes the write regardless."""
    real_apply = controller.store.apply
    handed: list[Any] = []
    release = threading.Event()

    def slow_apply(*args: Any, **kwargs: Any) -> Any:
        release.wait(5)
        return real_apply(*args, **kwargs)

    monkeypatch.setattr(controller.store, "apply", slow_apply)
    monkeypatch.setattr(controller.runtime, "request_site", handed.append)
    task = asyncio.create_task(controller.service.handle_command(_command({"grid": {"import_limit_kw": 222}})))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert handed == []
    release.set()
    for _ in range(200):
        if handed:
            break
        await asyncio.sleep(0.01)
    assert [site.import_limit_kw for site in handed] == [222.0]
    assert json.loads(controller.store.path.read_text())["tuning"] == {"grid": {"import_limit_kw": 222}}


def test_a_writer_stuck_holding_the_lock_times_the_next_one_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from controller import tuning
    from controller.file_lock import exclusive_lock

    store = TuningStore(school(tmp_path))
    monkeypatch.setattr(tuning, "LOCK_TIMEOUT_S", 0.1)
    with exclusive_lock(store.lock_path, 1.0):  # flock is per open file: this holds it against the store
        result = store.apply({"grid": {"import_limit_kw": 300}}, by="t", via="cli")
    assert not result.accepted
    assert "held by another writer for more than 0.1 s; nothing changed" in result.errors[0]
    assert not store.path.exists()
    assert store.apply({"grid": {"import_limit_kw": 300}}, by="t", via="cli").accepted


async def test_the_file_follower_outlives_an_exception(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from controller.tuning import follow_file

    store = TuningStore(school(tmp_path))
    calls: list[int] = []
    handed: list[Any] = []

    def flaky() -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk hiccup")
        return store.site if len(calls) == 3 else None

    monkeypatch.setattr(store, "reload_if_changed", flaky)
    follower = asyncio.create_task(follow_file(store, handed.append, period_s=0.001))
    for _ in range(500):
        if handed:
            break
        await asyncio.sleep(0.002)
    follower.cancel()
    with pytest.raises(asyncio.CancelledError):
        await follower
    assert handed == [store.site]


def test_config_set_with_a_stale_base_version_is_refused_with_the_current_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from controller.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["config", "get", str(SCHOOL)]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 0
    assert main(["config", "set", str(SCHOOL), '{"battery": {"reserve_soc": 0.3}}', "--base-version", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 1
    assert main(["config", "set", str(SCHOOL), '{"battery": {"reserve_soc": 0.25}}', "--base-version", "0"]) == 2
    err = capsys.readouterr().err
    assert "base_version: 0 is stale, the overrides are at version 1" in err
    assert "overrides version: 1" in err
    assert main(["config", "get", str(SCHOOL)]) == 0
    state = json.loads(capsys.readouterr().out)
    assert (state["version"], state["tuning"]["battery"]["reserve_soc"]) == (1, 0.3)


def test_a_change_the_audit_log_cannot_record_is_not_made(tmp_path: Path) -> None:
    store = TuningStore(school(tmp_path))
    store.audit_path.mkdir(parents=True)  # cannot be opened for appending
    result = store.apply({"grid": {"import_limit_kw": 300}}, by="t", via="cli")
    assert not result.accepted
    assert result.errors[0].endswith("cannot write: Is a directory; nothing changed")
    assert not store.path.exists()
    store.audit_path.rmdir()
    assert store.apply({"grid": {"import_limit_kw": 300}}, by="t", via="cli").accepted
    assert store.path.stat().st_mode & 0o777 == 0o644  # a controller under another account reads a shell's change
