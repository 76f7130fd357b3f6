"""The web pages in a real headless browser (Debian's chromium driven by playwright) against a real simulated
run in this process: the numbers the controller holds, live updates, the stale banner, no console errors,
login and tuning end to end, and both pages' layout on the screens they are made for."""

from __future__ import annotations

import asyncio
import json
import math
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


def _min_font_px(distance_m: float, mm_per_px: float, arcmin: float) -> float:
    """The font size (CSS px) whose digits subtend `arcmin` at `distance_m`: a digit is ~0.7 of the font size."""
    return distance_m * 1000 * math.tan(math.radians(arcmin / 60)) / mm_per_px / 0.7


# Legibility (ISO 9241-303, ANSI/HFES 100): characters of at least 16 arcminutes, 20-22 preferred. Key figures at
# 20', their labels at 16'. The hall screens: a 55-inch 1080p panel (0.63 mm a pixel) read from 3 m, where 20' is
# 17.5 mm of digit: 40 px. The tablet: 0.19 mm a CSS px (9.7 inch, 768 px wide) held at 0.5 m: 22 px.
HALL = {"figure": _min_font_px(3.0, 0.63, 20), "label": _min_font_px(3.0, 0.63, 16)}
TABLET = {"figure": _min_font_px(0.5, 0.19, 20), "label": _min_font_px(0.5, 0.19, 16)}
# (name, width, height, minimum font sizes): the viewports of controller.web.bench's screenshots.
LAYOUTS = [("landscape", 1920, 1080, HALL), ("portrait", 1080, 1920, HALL), ("tablet", 768, 1024, TABLET)]

# What a visitor would notice, measured in the page: every problem as a line of text.
_DISPLAY_LAYOUT_JS = """([minFigure, minLabel]) => {
  const problems = [];
  const W = innerWidth, H = innerHeight, view = { left: 0, top: 0, right: W, bottom: H };
  const box = (el) => el.getBoundingClientRect();
  const inside = (r, o) => r.left >= o.left - 0.5 && r.top >= o.top - 0.5 && r.right <= o.right + 0.5
    && r.bottom <= o.bottom + 0.5;
  const meet = (a, b) => a.left < b.right - 0.5 && b.left < a.right - 0.5 && a.top < b.bottom - 0.5
    && b.top < a.bottom - 0.5;
  // An SVG text's font size is in the drawing's units: times the drawing's scale, it is what the eye gets.
  const px = (el) => parseFloat(getComputedStyle(el).fontSize) * (el instanceof SVGElement ? el.getScreenCTM().a : 1);
  const name = (el) => (el.id ? `#${el.id}` : `${el.tagName.toLowerCase()}.${el.getAttribute("class") || ""}`)
    + (el.closest(".node, .fig") && !el.id ? ` in ${el.closest(".node, .fig").getAttribute("class")}` : "");
  const shown = (el) => el.getClientRects().length > 0 && getComputedStyle(el).visibility !== "hidden";
  const wide = document.documentElement.scrollWidth;
  if (wide > W) problems.push(`scrollWidth ${wide} > ${W}`);
  if (scrollX || scrollY) problems.push(`scrolled to ${scrollX}, ${scrollY}`);
  const flow = document.getElementById("flow"), flowBox = box(flow);
  const check = (el, container, min) => {
    const r = box(el);
    if (!inside(r, view)) problems.push(`${name(el)} outside the viewport: ${JSON.stringify(r)}`);
    if (!inside(r, box(container))) problems.push(`${name(el)} cut off by ${name(container)}`);
    if (min && px(el) < min) problems.push(`${name(el)} ${px(el).toFixed(1)} px < ${min.toFixed(1)} px`);
  };
  for (const el of document.querySelectorAll(".fig .n > span")) check(el, el.closest(".fig"), minFigure);
  for (const el of document.querySelectorAll(".fig .n > small")) check(el, el.closest(".fig"), 0);
  for (const el of document.querySelectorAll(".fig .k")) check(el, el.closest(".fig"), minLabel);
  for (const el of flow.querySelectorAll("text.value")) check(el, flow, minFigure);
  for (const el of flow.querySelectorAll("text.label")) check(el, flow, minLabel);
  if (document.querySelectorAll(".fig .n > span").length !== 6 || flow.querySelectorAll("text.value").length !== 5)
    problems.push("key figures missing");
  // Nothing on the page over the diagram, and in the diagram no text over another node's text or a flow line.
  for (const el of document.body.querySelectorAll("*")) {
    if (flow.contains(el) || el.contains(flow) || !shown(el)) continue;
    if (meet(box(el), flowBox)) problems.push(`${name(el)} overlaps the energy flow`);
  }
  const texts = [...flow.querySelectorAll("text")];
  for (const [i, a] of texts.entries()) {
    for (const b of texts.slice(i + 1)) {
      if (a.closest(".node") !== b.closest(".node") && meet(box(a), box(b))) problems.push(`${name(a)} on ${name(b)}`);
    }
    for (const line of flow.querySelectorAll(".line")) {
      if (meet(box(a), box(line))) problems.push(`${name(a)} on ${name(line)}`);
    }
  }
  return problems;
}"""

_DASHBOARD_LAYOUT_JS = """() => {
  const problems = [], W = innerWidth;
  const wide = document.documentElement.scrollWidth;
  if (wide > W) problems.push(`scrollWidth ${wide} > ${W}`);
  // A card whose content is wider than the card (a table that does not fit) spills over its neighbour or the edge.
  for (const card of document.querySelectorAll("header, .card")) {
    const title = card.querySelector("h1, h2").firstChild.textContent.trim();
    if (card.scrollWidth > card.clientWidth + 1) problems.push(`${title}: content wider than the card`);
    if (card.getBoundingClientRect().right > W + 0.5) problems.push(`${title}: past the right edge`);
  }
  return problems;
}"""


async def _after_layout(page: Any) -> None:
    """Two animation frames: the resized page has been laid out and painted."""
    await page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


async def test_both_pages_fit_landscape_portrait_and_tablet(run: WebRun, browser: Any) -> None:
    problems: list[str] = []
    errors: list[str] = []
    for lang in ("zh", "en"):
        page = await _page(browser, errors)
        await page.goto(f"{run.url}/display?lang={lang}")
        await page.wait_for_selector("#v-battery:has-text('%')")
        for name, width, height, sizes in LAYOUTS:
            await page.set_viewport_size({"width": width, "height": height})
            await _after_layout(page)
            found = await page.evaluate(_DISPLAY_LAYOUT_JS, [sizes["figure"], sizes["label"]])
            problems += [f"display {lang} {name} {width}x{height}: {p}" for p in found]
        await page.close()
    page = await _page(browser, errors)
    await page.request.post(f"{run.url}/api/login", data={"user": "engineer", "password": PASSWORD})
    await page.goto(f"{run.url}/")
    await page.wait_for_selector("#now tbody tr:nth-child(5)")
    await page.wait_for_selector("#devices tbody tr")
    for name, width, height, _ in LAYOUTS:
        await page.set_viewport_size({"width": width, "height": height})
        await _after_layout(page)
        found = await page.evaluate(_DASHBOARD_LAYOUT_JS)
        problems += [f"dashboard {name} {width}x{height}: {p}" for p in found]
    assert not problems, "\n".join(problems)
    assert errors == []
