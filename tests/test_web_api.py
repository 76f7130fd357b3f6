"""The web server without a browser (aiohttp's test client against the real app of a running simulated site):
authentication, CSRF, the login back-off, hostile input, the stream's slow-client drop, and the store reads."""

from __future__ import annotations

import asyncio
import io
import json
import stat
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp.test_utils import TestClient, TestServer

from config import load_site
from controller.storage.timeseries import TimeSeriesStore
from controller.web.auth import FREE_FAILURES, LoginLimiter, PasswordFile, password_path, verify_password
from controller.web.history import bills, history
from controller.web.sim_harness import SCHOOL, WebRun, web_run
from controller.web.stream import QUEUE_MESSAGES, StreamHub, Subscriber

PASSWORD = "correct horse battery"


class FakeWall:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def run(tmp_path: Path) -> AsyncIterator[WebRun]:
    async with web_run(tmp_path, speed=5.0, password=PASSWORD, web=False) as running:
        yield running


@pytest.fixture
async def client(run: WebRun) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(run.web.app)) as test_client:
        yield test_client


async def _login(client: TestClient[Any, Any]) -> str:
    response = await client.post("/api/login", json={"user": "engineer", "password": PASSWORD})
    assert response.status == 200
    csrf: str = (await response.json())["csrf"]
    assert "HttpOnly" in response.headers["Set-Cookie"]
    assert "SameSite=Strict" in response.headers["Set-Cookie"]
    return csrf


async def _errors(response: Any) -> str:
    return " ".join((await response.json())["errors"])


async def test_login_back_off_then_success(run: WebRun, client: TestClient[Any, Any]) -> None:
    wall = FakeWall()
    run.web.limiter = LoginLimiter(wall)
    for attempt in range(FREE_FAILURES):
        response = await client.post("/api/login", json={"user": "engineer", "password": f"wrong {attempt}"})
        assert response.status == 401
        assert "password" in await _errors(response)
    # Blocked now, even with the right password; the answer says how long.
    response = await client.post("/api/login", json={"user": "engineer", "password": PASSWORD})
    assert response.status == 429
    assert int(response.headers["Retry-After"]) >= 1
    assert (await client.get("/api/state")).status == 401
    wall.now += 3.0
    await _login(client)
    assert (await client.get("/api/state")).status == 200


async def test_csrf_origin_and_tuning_through_the_store(run: WebRun, client: TestClient[Any, Any]) -> None:
    csrf = await _login(client)
    patch = {"patch": {"grid": {"import_limit_kw": 300}}}
    response = await client.post("/api/tuning", json=patch)
    assert response.status == 403
    assert "X-CSRF-Token" in await _errors(response)
    response = await client.post("/api/tuning", json=patch, headers={"X-CSRF-Token": csrf, "Origin": "http://evil"})
    assert response.status == 403
    assert "Origin" in await _errors(response)
    response = await client.post("/api/tuning", json={**patch, "base_version": 0}, headers={"X-CSRF-Token": csrf})
    assert response.status == 200
    assert (await response.json())["changes"] == {"grid.import_limit_kw": [None, 300.0]}
    assert run.tuning.version == 1
    audit = json.loads(run.tuning.audit_path.read_text().splitlines()[-1])
    assert (audit["by"], audit["via"], audit["verified"]) == ("web:engineer", "web", True)
    # Compare-and-swap: a form loaded at version 0 is refused now, with the version to reload.
    response = await client.post("/api/tuning", json={**patch, "base_version": 0}, headers={"X-CSRF-Token": csrf})
    assert response.status == 409
    assert "base_version" in " ".join((await response.json())["errors"])
    # A value beyond the rating is refused naming the field; nothing changes.
    bad = {"patch": {"grid": {"import_limit_kw": 999}}}
    response = await client.post("/api/tuning", json=bad, headers={"X-CSRF-Token": csrf})
    assert response.status == 422
    assert "tuning.grid.import_limit_kw" in " ".join((await response.json())["errors"])
    assert run.tuning.version == 1
    # Logged out, the token and the cookie are worth nothing.
    assert (await client.post("/api/logout", headers={"X-CSRF-Token": csrf})).status == 200
    assert (await client.post("/api/tuning", json=patch, headers={"X-CSRF-Token": csrf})).status == 401


async def test_hostile_input_is_refused_naming_the_field(run: WebRun, client: TestClient[Any, Any]) -> None:
    async def refused(response: Any, status: int, field: str) -> None:
        assert response.status == status, (response.status, await response.text())
        assert field in await _errors(response)
        assert "Traceback" not in await response.text()

    await refused(await client.post("/api/login", data=b"x" * 40_000, headers={"Content-Type": "application/json"}),
                  413, "/api/login")  # fmt: skip
    await refused(await client.post("/api/login", data=b'{"user": "engineer", "password": ',
                                    headers={"Content-Type": "application/json"}), 400, "body")  # fmt: skip
    await refused(await client.post("/api/login", json=[1, 2]), 400, "body")
    await refused(await client.post("/api/login", json={"user": 7, "password": "x"}), 400, "user")
    await refused(await client.post("/api/login", json={"user": "e", "password": "x", "admin": True}), 400, "admin")
    await refused(await client.post("/api/login", data="user=engineer"), 415, "Content-Type")
    await refused(await client.get("/display?lang=fr"), 400, "lang")
    await refused(await client.get("/display?lang=en&lang=zh"), 400, "lang")
    await refused(await client.get("/api/history?span=day"), 401, "session")
    csrf = await _login(client)
    await refused(await client.get("/api/history?span=year"), 400, "span")
    await refused(await client.get("/api/export.csv?series=x';drop"), 400, "series")
    await refused(await client.post("/api/tuning", json={"patch": {"grid": {"import_limit_kw": "300"}}},
                                    headers={"X-CSRF-Token": csrf}), 422, "tuning.grid.import_limit_kw")  # fmt: skip
    await refused(await client.post("/api/tuning", json={"patch": {}, "base_version": True},
                                    headers={"X-CSRF-Token": csrf}), 400, "base_version")  # fmt: skip
    for path in ("/static/../auth.py", "/static/%2e%2e/auth.py", "/static/"):
        assert (await client.get(path)).status in (403, 404), path
    response = await client.get("/display")
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    assert run.runtime.stats.ticks > 0  # the loop went on


async def test_kiosk_needs_no_login_and_the_dashboard_does(run: WebRun, client: TestClient[Any, Any]) -> None:
    await asyncio.sleep(0.5)
    body = await (await client.get("/api/display")).json()
    assert {"pv_kw", "today_pv_kwh", "lifetime_pv_kwh", "co2_avoided_kg", "coal_saved_kg", "trees"} <= set(body)
    assert not {"health", "state", "tuning"} & set(body)  # the visitors see flows and savings, nothing else
    assert (await client.get("/", allow_redirects=False)).status == 302
    for path in ("/api/state", "/api/plan", "/api/bills", "/api/tuning", "/api/stream", "/api/export.csv"):
        assert (await client.get(path)).status == 401, path
    async with client.get("/api/display/stream") as stream:
        first = await stream.content.readuntil(b"\n\n")
        assert first.startswith(b"retry: ")


async def test_no_password_set_says_how_to_set_one(tmp_path: Path) -> None:
    async with web_run(tmp_path, speed=5.0, web=False) as running, TestClient(TestServer(running.web.app)) as c:
        response = await c.post("/api/login", json={"user": "engineer", "password": "anything at all"})
        assert response.status == 403
        assert "greensite web password" in await _errors(response)


def test_slow_client_is_dropped_and_the_tick_builds_once() -> None:
    builds: list[int] = []

    def build(_runtime: Any) -> dict[str, Any]:
        builds.append(1)
        return {"n": len(builds)}

    hub = StreamHub(build, max_rate_hz=1e9, max_clients=200)
    readers = [Subscriber() for _ in range(100)]
    slow = Subscriber()
    for subscriber in [*readers, slow]:
        hub._clients.add(subscriber)
    for _ in range(QUEUE_MESSAGES + 1):
        hub.on_tick(None)  # type: ignore[arg-type]
        for reader in readers:
            reader.queue.get_nowait()
    assert len(builds) == QUEUE_MESSAGES + 1  # one build per tick, whatever the number of clients
    assert slow.dropped.is_set()
    assert hub.clients == 100
    assert hub.dropped == 1
    assert not any(reader.dropped.is_set() for reader in readers)


async def test_a_reading_client_gets_every_update_and_a_dropped_one_sees_its_stream_end() -> None:
    """Over real HTTP: a browser that reads gets each update in order; one the hub gives up on (it fell
    behind, or the server stops) sees its stream end at once instead of hanging until a heartbeat."""
    from aiohttp import web

    hub = StreamHub(lambda runtime: {}, max_rate_hz=1e9, max_clients=10)

    async def stream(request: web.Request) -> web.StreamResponse:
        return await hub.respond(request, {"n": 0})

    app = web.Application()
    app.router.add_get("/stream", stream)
    async with TestClient(TestServer(app)) as c:
        reader = await c.get("/stream")
        assert b'"n":0' in await reader.content.readuntil(b"\n\n")
        assert hub.clients == 1  # counted before its first message was sent
        for n in range(1, 4):
            hub.publish({"n": n})
            assert f'"n":{n}'.encode() in await asyncio.wait_for(reader.content.readuntil(b"\n\n"), 2.0)
        (subscriber,) = hub._clients
        for n in range(QUEUE_MESSAGES * 3):  # published faster than anyone reads: the client is dropped
            hub.publish({"n": n})
            if subscriber.dropped.is_set():
                break
        assert subscriber.dropped.is_set()
        assert hub.dropped == 1
        rest = await asyncio.wait_for(reader.content.read(), 2.0)  # the stream ends, nothing left half-sent
        assert rest.count(b"\n\n") == rest.count(b"event: ")  # whole messages only
        assert len(rest) < 200  # at most what was in flight

        second = await c.get("/stream")
        await second.content.readuntil(b"\n\n")
        assert hub.clients == 1
        hub.close()  # the server stops: every stream ends
        await asyncio.wait_for(second.content.read(), 2.0)
        assert hub.clients == 0


def test_stream_throttles_to_its_rate() -> None:
    wall = FakeWall()
    hub = StreamHub(lambda runtime: {}, max_rate_hz=4.0, max_clients=10, wall=wall)
    hub._clients.add(Subscriber())
    for _ in range(100):  # a --speed max run ticks far faster than the pages need
        hub.on_tick(None)  # type: ignore[arg-type]
        wall.now += 0.01
    assert hub.sent == 4  # 1 s of wall time at 4 Hz


def test_bills_and_history_from_the_store(tmp_path: Path) -> None:
    site = load_site(SCHOOL, environment=False)
    zone = ZoneInfo(site.site.timezone)
    store = TimeSeriesStore(tmp_path / "s.sqlite3", 400)
    start = datetime(2026, 7, 6, 12, 0, tzinfo=zone).timestamp()  # flat band, 0.6595 CNY/kWh
    for i in range(3600):  # one hour: 10 kW imported while the battery charges 4 kW
        store.record(start + i, {"measured.grid_kw": 10.0, "measured.battery_kw": 4.0, "measured.pv_kw": 50.0,
                                 "measured.soc": 0.5, "measured.ev1_kw": 0.0, "measured.ev2_kw": 0.0})  # fmt: skip
    store.flush()
    now = datetime(2026, 7, 6, 13, 0, tzinfo=zone)
    body = bills(store, site, now)
    today = body["today"]
    assert today["actual"]["import_kwh"] == pytest.approx(10.0, abs=0.01)
    assert today["actual"]["energy_cny"] == pytest.approx(6.6, abs=0.01)
    assert today["baseline"]["import_kwh"] == pytest.approx(6.0, abs=0.01)  # without the battery's 4 kW
    assert today["saved_cny"] == pytest.approx(-4 * 0.6595, abs=0.01)  # charging at the flat price costs today
    assert body["month"]["actual"]["demand_cny"] == pytest.approx(10.0 * 32.0, abs=0.1)
    chart = history(store, site, "day", now.timestamp())
    known = [(t, v) for t, v in zip(chart["t_s"], chart["series"]["load_kw"], strict=True) if v is not None]
    assert len(known) == 12  # an hour in 5-minute buckets
    assert all(v == pytest.approx(56.0) for _, v in known)  # 10 + 50 - 4 - 0
    # The fast reader agrees with the row-by-row one.
    cols = store.columns(start, start + 3600, ["measured.grid_kw"])
    assert list(cols.ts) == [ts for ts, _, _ in store.rows(start, start + 3600, "measured.grid_kw")]
    store.close()


def test_password_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from controller.cli import main

    site = tmp_path / "site.toml"
    site.write_text(SCHOOL.read_text().replace('path = "var/zhongshan-school.sqlite3"',
                                               f'path = "{tmp_path}/s.sqlite3"'))  # fmt: skip
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["web", "password", str(site), "--password-stdin"]) == 2
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["web", "password", str(site), "--password-stdin"]) == 0
    path = password_path(str(tmp_path / "s.sqlite3"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = PasswordFile(path).users()["engineer"]
    assert verify_password(stored, PASSWORD)
    assert not verify_password(stored, PASSWORD + "x")
    assert PASSWORD not in path.read_text()
