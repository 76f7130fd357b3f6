"""Web benchmark: prints measured figures, asserts nothing.

    python -m controller.web.bench [--seconds 60] [--screenshots docs]

- page weight of the display and the dashboard (every byte the browser loads, uncompressed);
- first contentful paint of both pages in headless chromium (the Paint Timing API), fresh context each time;
- live latency: from a change of what the controller holds to the page showing it;
- the control loop's tick processing and lateness (p50/p99) at --speed 1 without web clients and with 100
  live-update clients (50 on the display's stream, 50 on the dashboard's), side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from controller.web.sim_harness import WebRun, chromium_path, web_run

PASSWORD = "bench password 1"


async def _login(session: aiohttp.ClientSession, url: str) -> None:
    async with session.post(f"{url}/api/login", json={"user": "engineer", "password": PASSWORD}) as response:
        response.raise_for_status()


async def _weights(run: WebRun) -> dict[str, int]:
    """Bytes of every resource each page loads, as the browser fetches them (uncompressed)."""
    pages = {"display": ["/display", "/static/display.css", "/static/display.js", "/static/favicon.svg"],
             "dashboard": ["/", "/static/dashboard.css", "/static/charts.js", "/static/dashboard.js",
                           "/static/favicon.svg"]}  # fmt: skip
    out = {}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        await _login(session, run.url)
        for page, paths in pages.items():
            total = 0
            for path in paths:
                async with session.get(run.url + path) as response:
                    total += len(await response.read())
            out[page] = total
    return out


async def _browser_figures(run: WebRun, repeats: int) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    figures: dict[str, Any] = {}
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            for name, path, login in (("display", "/display", False), ("dashboard", "/", True)):
                fcps = []
                for _ in range(repeats):
                    context = await browser.new_context(viewport={"width": 1920, "height": 1080})
                    if login:
                        await context.request.post(f"{run.url}/api/login",
                                                   data={"user": "engineer", "password": PASSWORD})  # fmt: skip
                    page = await context.new_page()
                    await page.goto(run.url + path)
                    fcp = await page.evaluate("""() => new Promise(done => {
                        const find = () => performance.getEntriesByName('first-contentful-paint')[0];
                        if (find()) return done(find().startTime);
                        new PerformanceObserver(() => find() && done(find().startTime)).observe({type: 'paint'});
                    })""")
                    fcps.append(float(fcp))
                    await context.close()
                figures[f"fcp_{name}_ms"] = fcps
            page = await browser.new_page(viewport={"width": 1920, "height": 1080})
            await page.goto(f"{run.url}/display")
            await page.wait_for_function("document.getElementById('f-today').textContent !== '—'")
            latencies = []
            for _ in range(repeats):
                before = await page.inner_text("#f-lifetime") + await page.inner_text("#u-lifetime")
                began = time.perf_counter()
                run.runtime.counters.pv_kwh += 1000.0
                await page.wait_for_function(
                    "b => document.getElementById('f-lifetime').textContent"
                    " + document.getElementById('u-lifetime').textContent !== b", arg=before, polling="raf")  # fmt: skip
                latencies.append(time.perf_counter() - began)
                await asyncio.sleep(0.3)
            figures["live_latency_s"] = latencies
        finally:
            await browser.close()
    return figures


async def _screenshot_run(folder: Path, screenshots: Path) -> None:
    """The README's pictures: the school from midnight at 720x until about noon, so the history has a morning."""
    from playwright.async_api import async_playwright

    start = datetime(2026, 7, 6, 0, 0)
    async with web_run(folder, speed=720.0, start=start, password=PASSWORD) as run:
        noon = asyncio.Event()
        run.runtime.listeners.append(lambda r: noon.set() if r.clock.local().hour >= 12 else None)
        await noon.wait()
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
            try:
                await _screenshots(browser, run, screenshots)
            finally:
                await browser.close()


# The screens the pages are made for: the hall's landscape and portrait 1080p screens and a 768 px tablet.
VIEWPORTS = {"": (1920, 1080), "-portrait": (1080, 1920), "-tablet": (768, 1024)}
SHOT_NAMES = [f"{page}{suffix}.png" for page in ("display", "dashboard") for suffix in VIEWPORTS] + ["display-en.png"]


async def _screenshots(browser: Any, run: WebRun, folder: Path) -> None:
    """SHOT_NAMES into `folder`: the display in each viewport (and in English on the landscape screen) and the
    dashboard in each viewport, the whole page."""
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    displays = [(suffix, size, "") for suffix, size in VIEWPORTS.items()] + [("-en", VIEWPORTS[""], "?lang=en")]
    for suffix, (width, height), query in displays:
        page = await browser.new_page(viewport={"width": width, "height": height})
        await page.goto(f"{run.url}/display{query}")
        await page.wait_for_selector("#v-pv:has-text('kW')")  # the first numbers are in
        await asyncio.sleep(1.0)
        await page.screenshot(path=str(folder / f"display{suffix}.png"))
        await page.close()
    for suffix, (width, height) in VIEWPORTS.items():
        context = await browser.new_context(viewport={"width": width, "height": height})
        await context.request.post(f"{run.url}/api/login", data={"user": "engineer", "password": PASSWORD})
        dash = await context.new_page()
        await dash.goto(f"{run.url}/")
        await dash.wait_for_selector("#now tbody tr:nth-child(5)")  # a selector: the CSP refuses a JS predicate's eval
        await dash.wait_for_selector("#plan-power polyline", timeout=20_000)
        await asyncio.sleep(2.0)
        await dash.screenshot(path=str(folder / f"dashboard{suffix}.png"), full_page=True)
        await context.close()
    for name in SHOT_NAMES:
        await asyncio.to_thread(_palette, folder / name)


def _palette(path: Path) -> None:
    """256 colours: a flat UI loses nothing visible, and the README's pictures stay well under 300 kB."""
    from PIL import Image

    with Image.open(path) as image:
        image.convert("RGB").quantize(256).save(path, optimize=True)


async def _reader(session: aiohttp.ClientSession, url: str, counts: list[int], index: int) -> None:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=None)) as response:
        async for _ in response.content.iter_any():
            counts[index] += 1


async def _load(url: str, clients: int, seconds: float) -> dict[str, float]:
    """`clients` live-update readers (half on the display's stream, half logged in on the dashboard's) for
    `seconds`; run in a process of its own, so that the clients' work is not counted in the controller's."""
    counts = [0] * clients
    jar = aiohttp.CookieJar(unsafe=True)  # the session cookie of a server addressed by IP
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), cookie_jar=jar) as session:
        await _login(session, url)
        tasks = [asyncio.create_task(_reader(session, url + ("/api/display/stream" if i % 2 == 0 else "/api/stream"),
                                             counts, i)) for i in range(clients)]  # fmt: skip
        await asyncio.sleep(seconds)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await task
    return {"reads_per_client_min": float(min(counts, default=0))}


async def _loop_phase(folder: Path, seconds: float, clients: int) -> dict[str, float]:
    """A --speed 1 run for `seconds` with `clients` live-update clients (another process) reading all along."""
    pauses: list[float] = []
    began: list[float] = []

    def timed(phase: str, _info: dict[str, int]) -> None:  # the collector's pauses, wherever they land
        if phase == "start":
            began.append(time.perf_counter())
        elif began:
            pauses.append(time.perf_counter() - began.pop())

    gc.callbacks.append(timed)
    try:
        return await _timed_loop_phase(folder, seconds, clients, pauses)
    finally:
        gc.callbacks.remove(timed)


async def _timed_loop_phase(folder: Path, seconds: float, clients: int, pauses: list[float]) -> dict[str, float]:
    async with web_run(folder, speed=1.0, password=PASSWORD) as run:
        load = None
        if clients:
            load = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "controller.web.bench", "--load", run.url, "--clients", str(clients),
                "--seconds", str(seconds + 5), stdout=asyncio.subprocess.PIPE)  # fmt: skip
        await asyncio.sleep(seconds)
        stats = run.runtime.stats
        result = {
            "ticks": float(stats.ticks),
            "processing_p50_ms": stats.tick_processing_s.percentile_ms(0.5),
            "processing_p99_ms": stats.tick_processing_s.percentile_ms(0.99),
            "lateness_p50_ms": stats.tick_lateness_s.percentile_ms(0.5),
            "lateness_p99_ms": stats.tick_lateness_s.percentile_ms(0.99),
            "clients_connected": float(run.web.display_hub.clients + run.web.dashboard_hub.clients),
            "clients_dropped": float(run.web.display_hub.dropped + run.web.dashboard_hub.dropped),
            "reads_per_client_min": 0.0,
            "gc_collections": float(len(pauses)),
            "gc_pause_max_ms": max(pauses, default=0.0) * 1000,
        }
        if load is not None:
            out, _ = await load.communicate()
            result.update(json.loads(out.decode().strip().splitlines()[-1]))
    return result


async def main(seconds: float, repeats: int, screenshots: Path | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with web_run(Path(tmp) / "pages", speed=1.0, password=PASSWORD) as run:
            await asyncio.sleep(3.0)  # a plan and a few ticks on the pages
            weights = await _weights(run)
            figures = await _browser_figures(run, repeats)
        for page, size in weights.items():
            print(f"page weight {page}: {size / 1024:.1f} kB (goal < 300 kB)")
        for page in ("display", "dashboard"):
            fcp = figures[f"fcp_{page}_ms"]
            print(f"first contentful paint {page}: median {statistics.median(fcp):.0f} ms, max {max(fcp):.0f} ms"
                  f" over {len(fcp)} fresh loads (goal < 1000 ms)")
        lat = figures["live_latency_s"]
        print(f"live latency (controller change -> display DOM): median {statistics.median(lat) * 1000:.0f} ms,"
              f" max {max(lat) * 1000:.0f} ms over {len(lat)} changes (goal < 2000 ms)")
        if screenshots is not None:
            await _screenshot_run(Path(tmp) / "shots", screenshots)
            print(f"screenshots in {screenshots}: {', '.join(SHOT_NAMES)}")
        without = await _loop_phase(Path(tmp) / "without", seconds, 0)
        with_clients = await _loop_phase(Path(tmp) / "with", seconds, 100)
    print(f"control loop at --speed 1 for {seconds:.0f} s each:   without clients | with 100 stream clients")
    for key in ("ticks", "processing_p50_ms", "processing_p99_ms", "lateness_p50_ms", "lateness_p99_ms",
                "clients_connected", "clients_dropped", "reads_per_client_min", "gc_collections",
                "gc_pause_max_ms"):  # fmt: skip
        print(f"  {key:<22} {without[key]:>14.3f} | {with_clients[key]:>14.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each control-loop phase (wall s)")
    parser.add_argument("--repeats", type=int, default=5, help="page loads and changes measured per figure")
    parser.add_argument("--screenshots", type=Path, help="write the pages' screenshots here (display.png,"
                        " display-portrait.png, display-tablet.png, dashboard*.png ...)")
    parser.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)  # the client process of the loop phase
    parser.add_argument("--clients", type=int, default=100, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        print(json.dumps(asyncio.run(_load(args.load, args.clients, args.seconds))))
    else:
        asyncio.run(main(args.seconds, args.repeats, args.screenshots))
