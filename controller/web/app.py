"""The embedded web server (aiohttp, in the controller's event loop): the visitors' display at /display
(read-only, no login) and the engineer's dashboard at / (login), with live updates over server-sent events.

Every input is hostile: bodies are capped (413), JSON is decoded strictly, query parameters are checked by
name, and a refusal is a 4xx JSON body naming the field. A handler that fails answers 500 and is logged;
nothing a request does reaches the control loop except a tuning patch, which goes through the same
validated, audited compare-and-swap path (`TuningStore.apply`) as MQTT and `greensite config set`.
"""

from __future__ import annotations

import asyncio
import functools
import html
import json
import logging
import math
import re
import socket
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from config import SiteConfig
from controller.strict_json import JsonLimits, JsonRefused, decode_json, json_type_name
from controller.tuning import TuningStore
from controller.web.auth import (
    MAX_PASSWORD_CHARS,
    MAX_USER_CHARS,
    LoginLimiter,
    PasswordFile,
    Session,
    SessionStore,
    password_path,
)
from controller.web.history import SPANS, bills, history, today_energy_kwh
from controller.web.snapshots import DayTracker, dashboard_payload, display_payload, plan_chart
from controller.web.stream import StreamHub

if TYPE_CHECKING:
    from controller.runtime import Runtime

__all__ = ["WebService"]

_log = logging.getLogger(__name__)

COOKIE = "greensite_session"
CSRF_HEADER = "X-CSRF-Token"
# Requests carry a few hundred bytes (a login, a tuning patch); a larger body is refused before it is read.
MAX_BODY_BYTES = 16_384
BODY_LIMITS = JsonLimits(max_bytes=MAX_BODY_BYTES)
# Charts and bills read the time series in a worker thread; a result is reused for this long (wall time),
# so a dozen open dashboards cost one read, not a dozen.
HISTORY_CACHE_S = 10.0
# On stop, requests in flight (an export) get this long; live streams are ended at once.
SHUTDOWN_TIMEOUT_S = 3.0
# Sessions and login failures are swept this often by the server's own job.
SWEEP_PERIOD_S = 60.0
# CSV export: at most this span per request (a month of one-second ticks is ~30 M rows for the school).
EXPORT_SPANS = {"day": 86400.0, "week": 7 * 86400.0}
EXPORT_CHUNK_ROWS = 10_000
_SERIES_PATTERN = re.compile(r"^[a-z0-9_.%-]{1,64}$")
LANGS = ("zh", "en")
_STATIC = "static"

_TEXT: dict[str, dict[str, str]] = {
    "zh": {
        "lang": "zh-CN", "title": "能源实况", "pv": "光伏", "building": "建筑用电", "battery": "储能电池",
        "cars": "电动汽车", "grid": "电网", "today_pv": "今日发电", "lifetime_pv": "累计发电",
        "co2": "减少二氧化碳", "coal": "节约标准煤", "trees": "相当于植树", "ev_pv": "为电动汽车提供清洁电力",
        "as_of": "数据时间", "stale": "数据已停止更新", "factors": "换算依据", "tree_unit": "棵",
        "basis": "按光伏累计发电量计算", "switch": "English", "switch_lang": "en",
    },
    "en": {
        "lang": "en", "title": "Live energy", "pv": "Solar PV", "building": "Building", "battery": "Battery",
        "cars": "Electric cars", "grid": "Grid", "today_pv": "Solar energy today",
        "lifetime_pv": "Solar energy to date",
        "co2": "CO₂ avoided", "coal": "Standard coal saved", "trees": "Equivalent to trees", "ev_pv":
        "Clean solar energy given to cars", "as_of": "As of", "stale": "Data stopped updating", "factors":
        "Conversion factors", "tree_unit": "tree-years", "basis": "from all solar energy generated", "switch": "中文",
        "switch_lang": "zh",
    },
}  # fmt: skip


def _asset(name: str) -> str:
    return resources.files("controller.web").joinpath(_STATIC, name).read_text(encoding="utf-8")


def _refuse(status: type[web.HTTPException], *errors: str, **headers: str) -> web.HTTPException:
    """A 4xx answer whose JSON body names the field, never a traceback."""
    return status(text=json.dumps({"errors": list(errors)}), content_type="application/json", headers=headers)


def _one_of(request: web.Request, name: str, allowed: tuple[str, ...] | list[str], default: str) -> str:
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise _refuse(web.HTTPBadRequest, f"{name}: given {len(values)} times; give it once")
    value = values[0] if values else default
    if value not in allowed:
        raise _refuse(web.HTTPBadRequest, f"{name}: must be one of {', '.join(allowed)}, got {value[:40]!r}")
    return value


SECURITY_HEADERS = {
    # Everything the pages use is served from here: no CDN, no inline script.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Security headers on every answer; any exception of ours becomes a logged 500 without its details."""
    try:
        response = await handler(request)
    except web.HTTPException as err:
        if err.status >= 400 and err.content_type != "application/json":
            err.text = json.dumps({"errors": [f"{request.path[:100]}: {err.reason}"]})
            err.content_type = "application/json"
        err.headers.update(SECURITY_HEADERS)
        raise
    except Exception:  # a request must never take the server (or the loop) down: logged, answered
        _log.exception("web request failed", extra={"path": request.path[:200], "method": request.method})
        return web.json_response({"errors": ["internal error; see the controller log"]}, status=500,
                                 headers=SECURITY_HEADERS)  # fmt: skip
    if not response.prepared:
        response.headers.update(SECURITY_HEADERS)
    return response


class WebService:
    """The web server of one run. `attach()` adds its tick listeners and its supervised job to the runtime;
    `start()` binds (the run prints the URL) and the job keeps it serving, starting it again after a failure."""

    def __init__(
        self,
        runtime: Runtime,
        tuning: TuningStore,
        *,
        on_tuned: Callable[[SiteConfig], None] | None = None,
        users_path: Path | None = None,
        wall: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime = runtime
        self.tuning = tuning
        self.config = runtime.site.web
        self.on_tuned = on_tuned
        self.passwords = PasswordFile(users_path or password_path(runtime.site.storage.path))
        self.sessions = SessionStore(wall)
        self.limiter = LoginLimiter(wall)
        self._wall = wall
        self.day = DayTracker()
        rate, clients = self.config.stream_max_rate_hz, self.config.max_stream_clients
        self.display_hub = StreamHub(lambda r: display_payload(r, self.day), max_rate_hz=rate, max_clients=clients)
        self.dashboard_hub = StreamHub(lambda r: dashboard_payload(r, self.tuning.version), max_rate_hz=rate,
                                       max_clients=clients)  # fmt: skip
        self._cache: dict[str, tuple[float, Any]] = {}
        self._store_lock = asyncio.Lock()  # one reader of the time series at a time (one SQLite connection)
        self._apply_lock = asyncio.Lock()
        self._pages = {lang: self._render("display.html", lang) for lang in LANGS}
        self._dashboard_html = _asset("dashboard.html")
        self._login_html = _asset("login.html")
        self.app = self._build_app()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self.url: str | None = None
        self._backfilled = False

    # --- wiring --------------------------------------------------------------------------------------

    def attach(self) -> None:
        self.runtime.listeners.append(self.day.on_tick)
        self.runtime.listeners.append(self.display_hub.on_tick)
        self.runtime.listeners.append(self.dashboard_hub.on_tick)
        self.runtime.services.append(self.serve)

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors])
        app.router.add_get("/display", self._display_page)
        app.router.add_get("/api/display", self._display_json)
        app.router.add_get("/api/display/stream", self._display_stream)
        app.router.add_get("/login", self._login_page)
        app.router.add_post("/api/login", self._login)
        app.router.add_post("/api/logout", self._logout)
        app.router.add_get("/", self._dashboard_page)
        app.router.add_get("/api/session", self._session_json)
        app.router.add_get("/api/state", self._state_json)
        app.router.add_get("/api/stream", self._stream)
        app.router.add_get("/api/plan", self._plan_json)
        app.router.add_get("/api/history", self._history_json)
        app.router.add_get("/api/bills", self._bills_json)
        app.router.add_get("/api/export.csv", self._export_csv)
        app.router.add_get("/api/tuning", self._tuning_json)
        app.router.add_post("/api/tuning", self._tuning_patch)
        static = Path(str(resources.files("controller.web").joinpath(_STATIC)))
        app.router.add_static("/static/", static, show_index=False, follow_symlinks=False)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, _app: web.Application) -> None:
        self.display_hub.close()
        self.dashboard_hub.close()

    async def start(self) -> str:
        """Listen on the configured address (a busy port is replaced by a free one, as the embedded broker's
        is); returns the URL. Started again after a failure, it takes the same port."""
        host = self.config.host
        port = self.port if self.port is not None else self.config.port
        runner = web.AppRunner(self.app, shutdown_timeout=SHUTDOWN_TIMEOUT_S, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, reuse_address=True)
            try:
                await site.start()
            except OSError as err:
                if port == 0:
                    raise
                _log.warning("web port busy, using another", extra={"wanted": port, "error": str(err)})
                site = web.TCPSite(runner, host, 0, reuse_address=True)
                await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        server = site._server  # the bound socket tells the port when 0 was asked for
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else port
        shown = host if host not in ("0.0.0.0", "::", "") else socket.gethostname()
        shown = f"[{shown}]" if ":" in shown else shown
        self.url = f"http://{shown}:{self.port}"
        _log.info("web server listening", extra={"url": self.url, "bind": f"{host}:{self.port}"})
        return self.url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def serve(self) -> None:
        """The supervised job: serve until cancelled; sweep sessions; the store backfill of today's PV once."""
        try:
            if self._runner is None:
                await self.start()
            if not self._backfilled:
                self._backfilled = True
                await self._backfill_today()
            while True:
                await asyncio.sleep(SWEEP_PERIOD_S)
                self.sessions.sweep()
        finally:
            await self.stop()

    async def _backfill_today(self) -> None:
        """The PV of today recorded before this process started (the day counter starts at the first tick)."""
        store = self.runtime.store
        for _ in range(100):  # the first tick comes within a tick period; give up after a while
            if self.day.started_local is not None:
                break
            await asyncio.sleep(0.1)
        started, day = self.day.started_local, self.day.day
        if store is None or started is None or day is None:
            return
        try:
            async with self._store_lock:
                kwh = await asyncio.to_thread(today_energy_kwh, store, self.runtime.site, started)
        except Exception as err:  # a damaged store leaves today's count from the start; it must not stop the server
            _log.warning("today's PV not read from the store", extra={"error": str(err)[:300]})
            return
        self.day.set_before_start(day, kwh)

    # --- pages -----------------------------------------------------------------------------------------

    def _render(self, page: str, lang: str) -> str:
        site = self.runtime.site
        text = dict(_TEXT[lang])
        text["site"] = site.site.name
        factors = site.display
        co2_source = factors.co2_source or (
            "site file: carbon_kg_per_kwh" if factors.co2_kg_per_kwh is None else "site file: [display]"
        )
        text["factor_lines"] = " · ".join((
            f"CO₂ {site.display_co2_kg_per_kwh:g} kg/kWh ({co2_source})",
            f"{factors.coal_kgce_per_kwh:g} kgce/kWh ({factors.coal_source})",
            f"{factors.co2_kg_per_tree_year:g} kg CO₂/tree/yr ({factors.tree_source})",
        ))  # fmt: skip
        body = _asset(page)
        for key, value in text.items():
            body = body.replace("{{" + key + "}}", html.escape(value))
        return body

    async def _display_page(self, request: web.Request) -> web.Response:
        lang = _one_of(request, "lang", LANGS, "zh")
        return web.Response(text=self._pages[lang], content_type="text/html", headers={"Cache-Control": "no-store"})

    async def _display_json(self, _request: web.Request) -> web.Response:
        return web.json_response(display_payload(self.runtime, self.day), dumps=_dumps)

    async def _display_stream(self, request: web.Request) -> web.StreamResponse:
        return await self.display_hub.respond(request, display_payload(self.runtime, self.day))

    async def _login_page(self, _request: web.Request) -> web.Response:
        return web.Response(text=self._login_html, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def _dashboard_page(self, request: web.Request) -> web.Response:
        if self._session(request) is None:
            raise web.HTTPFound("/login")
        return web.Response(text=self._dashboard_html, content_type="text/html", headers={"Cache-Control": "no-store"})

    # --- authentication --------------------------------------------------------------------------------

    def _session(self, request: web.Request) -> Session | None:
        return self.sessions.get(request.cookies.get(COOKIE))

    def _require(self, request: web.Request, *, write: bool = False) -> Session:
        """The session of a request, or 401; for a write also the session's CSRF token in its header, or 403."""
        session = self._session(request)
        if session is None:
            raise _refuse(web.HTTPUnauthorized, "session: not logged in (or the session expired); log in at /login")
        if write:
            token = request.headers.get(CSRF_HEADER, "")
            if not token or not _same(token, session.csrf):
                raise _refuse(web.HTTPForbidden, f"{CSRF_HEADER}: missing or wrong; reload the page")
        return session

    @staticmethod
    def _check_origin(request: web.Request) -> None:
        """A cross-site POST is refused even before its cookie (SameSite=Strict) or token is looked at."""
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            raise _refuse(web.HTTPForbidden, f"Origin: {origin[:100]!r} is not this site")

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        if request.content_type != "application/json":
            raise _refuse(web.HTTPUnsupportedMediaType, f"Content-Type: must be application/json, got "
                          f"{request.content_type[:60]!r}")  # fmt: skip
        raw = await request.read()  # past client_max_size: 413 from aiohttp, before the body is kept
        try:
            body = decode_json(raw, BODY_LIMITS, what="body")
        except JsonRefused as err:
            raise _refuse(web.HTTPBadRequest, *err.errors[:10]) from None
        if not isinstance(body, dict):
            raise _refuse(web.HTTPBadRequest, f"body: expected a JSON object, got {json_type_name(body)}")
        return body

    async def _login(self, request: web.Request) -> web.Response:
        self._check_origin(request)
        address = request.remote or "unknown"
        wait = self.limiter.wait_s(address)
        if wait > 0:
            seconds = math.ceil(wait)
            raise _refuse(web.HTTPTooManyRequests, f"password: too many failed logins; try again in {seconds} s",
                          **{"Retry-After": str(seconds)})  # fmt: skip
        body = await self._json_body(request)
        user, password = body.get("user"), body.get("password")
        errors = []
        if not isinstance(user, str) or not 0 < len(user) <= MAX_USER_CHARS:
            errors.append(f"user: a string of 1 to {MAX_USER_CHARS} characters")
        if not isinstance(password, str) or not 0 < len(password) <= MAX_PASSWORD_CHARS:
            errors.append(f"password: a string of 1 to {MAX_PASSWORD_CHARS} characters")
        unknown = sorted(set(body) - {"user", "password"})
        if unknown:
            errors.append(f"body: unknown keys {[k[:40] for k in unknown[:5]]}; expected user, password")
        if errors:
            raise _refuse(web.HTTPBadRequest, *errors)
        assert isinstance(user, str)
        assert isinstance(password, str)
        if not self.passwords.users():
            raise _refuse(web.HTTPForbidden, "password: none set for this site; run `greensite web password SITE`")
        ok = await asyncio.to_thread(self.passwords.check, user, password)
        if not ok:
            wait = self.limiter.failed(address)
            _log.warning("web login refused", extra={"user": user[:MAX_USER_CHARS], "address": address})
            extra = f"; wait {math.ceil(wait)} s before the next try" if wait > 0 else ""
            raise _refuse(web.HTTPUnauthorized, f"password: wrong user or password{extra}")
        self.limiter.succeeded(address)
        token, session = self.sessions.create(user)
        _log.info("web login", extra={"user": user, "address": address})
        response = web.json_response({"user": session.user, "csrf": session.csrf})
        response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/")
        return response

    async def _logout(self, request: web.Request) -> web.Response:
        self._check_origin(request)
        self._require(request, write=True)
        self.sessions.end(request.cookies.get(COOKIE))
        response = web.json_response({"logged_out": True})
        response.del_cookie(COOKIE, path="/")
        return response

    async def _session_json(self, request: web.Request) -> web.Response:
        session = self._require(request)
        offset = self.runtime.clock.local().utcoffset()
        return web.json_response({"user": session.user, "csrf": session.csrf, "site": self.runtime.site.site.name,
                                  "utc_offset_s": 0.0 if offset is None else offset.total_seconds()})  # fmt: skip

    # --- the dashboard's data ------------------------------------------------------------------------------

    async def _state_json(self, request: web.Request) -> web.Response:
        self._require(request)
        return web.json_response(dashboard_payload(self.runtime, self.tuning.version), dumps=_dumps)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        self._require(request)
        return await self.dashboard_hub.respond(request, dashboard_payload(self.runtime, self.tuning.version))

    async def _plan_json(self, request: web.Request) -> web.Response:
        self._require(request)
        return web.json_response({"plan": plan_chart(self.runtime)}, dumps=_dumps)

    async def _cached(self, key: str, compute: Callable[[], Any]) -> Any:
        hit = self._cache.get(key)
        if hit is not None and self._wall() - hit[0] < HISTORY_CACHE_S:
            return hit[1]
        async with self._store_lock:
            hit = self._cache.get(key)  # another request may have filled it while this one waited
            if hit is not None and self._wall() - hit[0] < HISTORY_CACHE_S:
                return hit[1]
            value = await asyncio.to_thread(compute)
        self._cache[key] = (self._wall(), value)
        return value

    def _store_or_404(self) -> Any:
        if self.runtime.store is None:
            raise _refuse(web.HTTPNotFound, "store: this run keeps no time series")
        return self.runtime.store

    async def _history_json(self, request: web.Request) -> web.Response:
        self._require(request)
        span = _one_of(request, "span", list(SPANS), "day")
        store = self._store_or_404()
        end_s = self.runtime.clock.local().timestamp()
        body = await self._cached(f"history:{span}", functools.partial(history, store, self.runtime.site, span, end_s))
        return web.json_response(body, dumps=_dumps)

    async def _bills_json(self, request: web.Request) -> web.Response:
        self._require(request)
        store = self._store_or_404()
        now = self.runtime.clock.local()
        body = await self._cached("bills", functools.partial(bills, store, self.runtime.site, now))
        lifetime = {"energy_cost_cny": round(self.runtime.counters.energy_cost_cny, 2)}
        return web.json_response({**body, "lifetime": lifetime}, dumps=_dumps)

    async def _export_csv(self, request: web.Request) -> web.StreamResponse:
        """The series as `ts_epoch_s,series,value` rows (as `greensite export`), streamed in chunks read in a
        worker thread; a day or a week at most per request."""
        self._require(request)
        span = _one_of(request, "span", list(EXPORT_SPANS), "day")
        series = request.query.get("series", "%")
        if not _SERIES_PATTERN.fullmatch(series):
            raise _refuse(web.HTTPBadRequest, "series: a series name or SQL LIKE pattern (a-z 0-9 _ . % -), at most 64")
        store = self._store_or_404()
        until = self.runtime.clock.local().timestamp()
        since = until - EXPORT_SPANS[span]
        response = web.StreamResponse(headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="{self.runtime.site.site.id}-{span}.csv"',
            "Cache-Control": "no-store", **SECURITY_HEADERS,
        })  # fmt: skip
        async with self._store_lock:
            rows = await asyncio.to_thread(store.rows, since, until, series)
            await response.prepare(request)
            await response.write(b"ts_epoch_s,series,value\r\n")
            while True:
                chunk = await asyncio.to_thread(_csv_chunk, rows)
                if not chunk:
                    break
                await response.write(chunk)
        await response.write_eof()
        return response

    # --- tuning ----------------------------------------------------------------------------------------------

    async def _tuning_json(self, request: web.Request) -> web.Response:
        self._require(request)
        return web.json_response(self.tuning.state(), dumps=_dumps)

    async def _tuning_patch(self, request: web.Request) -> web.Response:
        """A JSON merge patch of [tuning], as `config set` and the MQTT command take it: {"patch": {...},
        "base_version": N}. Refused with every error by field path (409 when the version moved)."""
        self._check_origin(request)
        session = self._require(request, write=True)
        body = await self._json_body(request)
        unknown = sorted(set(body) - {"patch", "base_version"})
        errors = []
        if unknown:
            errors.append(f"body: unknown keys {[k[:40] for k in unknown[:5]]}; expected patch, base_version")
        if "patch" not in body:
            errors.append("patch: missing; send the [tuning] fields to change as a JSON object")
        base_version = body.get("base_version")
        if base_version is not None and (not isinstance(base_version, int) or isinstance(base_version, bool)
                                         or base_version < 0):  # fmt: skip
            errors.append("base_version: a JSON integer, the version the form was loaded at")
        if errors:
            raise _refuse(web.HTTPBadRequest, *errors)
        async with self._apply_lock:
            applying = asyncio.ensure_future(asyncio.to_thread(functools.partial(
                self.tuning.apply, body["patch"], by=f"web:{session.user}", via="web", verified=True,
                base_version=base_version,
            )))  # fmt: skip
            try:
                result = await asyncio.shield(applying)
            except asyncio.CancelledError:
                applying.add_done_callback(self._adopt_late)  # the thread may still write the file
                raise
        if not result.accepted:
            stale = any(line.startswith("base_version:") for line in result.errors)
            status = 409 if stale else 422
            return web.json_response(result.to_json(), status=status, dumps=_dumps)
        self._adopt(result.site)
        return web.json_response(result.to_json(), dumps=_dumps)

    def _adopt(self, site: SiteConfig | None) -> None:
        if site is None:
            return
        self.runtime.request_site(site)
        if self.on_tuned is not None:
            self.on_tuned(site)

    def _adopt_late(self, applying: asyncio.Future[Any]) -> None:
        if applying.cancelled() or applying.exception() is not None:
            return
        result = applying.result()
        if result.accepted:
            self._adopt(result.site)


def _same(a: str, b: str) -> bool:
    import hmac  # noqa: PLC0415 - one use

    return hmac.compare_digest(a.encode(), b.encode())


def _dumps(body: Any) -> str:
    return json.dumps(body, separators=(",", ":"), allow_nan=False, default=str)


def _csv_chunk(rows: Any) -> bytes:
    lines = []
    for ts, name, value in rows:
        lines.append(f"{ts!r},{name},{value!r}\r\n")
        if len(lines) >= EXPORT_CHUNK_ROWS:
            break
    return "".join(lines).encode()
