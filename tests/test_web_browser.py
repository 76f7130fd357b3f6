"""The web pages in a real headless browser (Debian's chromium driven by playwright) against a real simulated
run in this process: the numbers the controller holds, live updates, the stale banner, no console errors,
login and tuning end to end."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controller.web.sim_harness import WebRun, chromium_path, web_run
from firmware_bridge.simulator import Fault, FaultMode

playwright_api = pytest.importorskip("playwright.async_api")
CHROMIUM = chromium_path()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium: apt-get install chromium (scripts/test does)")

PASSWORD = "correct horse battery"
# The live-update goal: a change the controller holds is on the page within this long (wall time).
LIVE_S = 2.0


@pytest.fixture
async def run(tmp_path: Path) -> AsyncIterator[WebRun]:
    # Speed 5: a tick every 0.2 s of wall time, so the stale timeout (10 s simulated) passes in 2 s.
    async with web_run(tmp_path, speed=5.0, password=PASSWORD) as running:
        yield running


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as p:
        launched = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            await launched.close()


async def _page(browser: Any, errors: list[str], **options: Any) -> Any:
    page = await browser.new_page(**options)
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    return page


def _refused(errors: list[str], status: int) -> None:
    """The browser logs a refused request as a console error; a refusal the test asked for is taken off."""
    expected = f"Failed to load resource: the server responded with a status of {status}"
    assert errors
    assert all(expected in line for line in errors), errors
    errors.clear()


def _number(text: str) -> float:
    return float(re.sub(r"[^0-9.\-]", "", text))


async def _until(check: Any, timeout_s: float) -> float:
    """Polls `check()` (async, truthy when done) until it holds; returns the wall time it took."""
    began = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - began
        if time.monotonic() - began > timeout_s:
            raise AssertionError(f"not within {timeout_s} s")
        await asyncio.sleep(0.05)


async def test_display_shows_the_controllers_numbers_live_and_the_stale_banner(run: WebRun, browser: Any) -> None:
    errors: list[str] = []
    seen_pv: list[float] = []
    run.runtime.listeners.append(
        lambda r: seen_pv.append(round(abs(r.last_measured.pv_kw), 1)) if r.last_measured and r.last_measured.pv_kw
        is not None else None
    )  # fmt: skip
    page = await _page(browser, errors, viewport={"width": 1920, "height": 1080})
    await page.goto(f"{run.url}/display?lang=en")
    await page.wait_for_function("document.getElementById('v-pv').textContent.includes('kW')")
    # The PV power on the page is one the controller measured in the last ticks (it moves every tick).
    shown = _number(await page.text_content("#v-pv") or "")
    assert shown in seen_pv[-20:], (shown, seen_pv[-20:])
    assert not await page.is_visible("#stale")
    # A change of what the controller holds (its lifetime PV counter) is on the page within LIVE_S.
    before = await page.inner_text("#f-lifetime")
    run.runtime.counters.pv_kwh += 50_000.0

    async def changed() -> bool:
        unit: str = await page.inner_text("#u-lifetime")
        value: str = await page.inner_text("#f-lifetime")
        return unit == "MWh" and value != before

    took = await _until(changed, 5.0)
    assert took < LIVE_S, took
    # The grid meter falls silent: beyond the stale timeout the banner says so, with the time of the last reading.
    run.sims["rs485-2"].set_fault("grid-meter", Fault(FaultMode.SILENT))  # type: ignore[attr-defined]
    await page.wait_for_selector("#stale:not([hidden])", timeout=10_000)
    banner = await page.inner_text("#stale")
    assert "Data stopped updating" in banner
    assert re.search(r"\d\d:\d\d:\d\d", banner), banner
    assert errors == []


async def test_display_in_chinese_by_default_portrait_and_read_only(run: WebRun, browser: Any) -> None:
    errors: list[str] = []
    page = await _page(browser, errors, viewport={"width": 1080, "height": 1920})
    response = await page.goto(f"{run.url}/display")
    assert response.status == 200
    assert "今日发电" in await page.content()
    await page.wait_for_function("document.getElementById('f-today').textContent !== '—'")
    # The kiosk takes no writes: every method but GET is refused on its paths, and nothing it loads is a form.
    assert await page.locator("form, input, button").count() == 0
    assert errors == []
    for path in ("/display", "/api/display", "/api/display/stream"):
        for method in ("POST", "PUT", "DELETE"):
            response = await page.request.fetch(f"{run.url}{path}", method=method)
            assert response.status == 405, (path, method)


async def test_login_and_tuning_end_to_end(run: WebRun, browser: Any) -> None:
    errors: list[str] = []
    page = await _page(browser, errors, viewport={"width": 1400, "height": 1000})
    await page.goto(f"{run.url}/")
    assert page.url.endswith("/login")  # the dashboard is behind the login
    await page.fill("#password", "wrong password!")
    await page.click("#submit")
    await page.wait_for_selector("#error:has-text('wrong user or password')")
    _refused(errors, 401)
    await page.fill("#password", PASSWORD)
    await page.click("#submit")
    await page.wait_for_url(f"{run.url}/")
    await page.wait_for_function("document.querySelector('#now tbody').rows.length > 4")
    await page.wait_for_selector("#t-grid\\.import_limit_kw")
    # A refused change names the field, and changes nothing.
    await page.fill("#t-grid\\.import_limit_kw", "999")
    await page.click("#tuning-apply")
    await page.wait_for_selector("#tuning-result.error")
    assert "import_limit_kw" in await page.inner_text("#tuning-result")
    assert run.tuning.version == 0
    _refused(errors, 422)
    # An accepted one lands in the overrides (audited as web:engineer) and in the runtime at the next tick.
    await page.fill("#t-grid\\.import_limit_kw", "350")
    await page.click("#tuning-apply")
    await page.wait_for_selector("#tuning-result.accepted")
    assert run.tuning.version == 1
    assert run.tuning.site.import_limit_kw == 350.0
    audit = [json.loads(line) for line in run.tuning.audit_path.read_text().splitlines()]
    assert audit[-1]["by"] == "web:engineer"
    assert audit[-1]["via"] == "web"

    async def in_force() -> bool:
        return run.runtime.site.import_limit_kw == 350.0

    await _until(in_force, 5.0)
    await page.wait_for_selector("#now td:has-text('import ≤ 350 kW')", timeout=5_000)
    assert errors == []
    # A POST without the page's CSRF token is refused, whatever the cookie.
    status = await page.evaluate("""fetch('/api/tuning', {method: 'POST', headers: {'Content-Type': 'application/json'},
        body: JSON.stringify({patch: {grid: {import_limit_kw: 300}}})}).then(r => r.status)""")
    assert status == 403
    assert run.tuning.version == 1
    _refused(errors, 403)
