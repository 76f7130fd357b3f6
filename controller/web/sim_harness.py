"""A simulated site with its web server, in this process: for the browser tests, the web bench and the
README's screenshots. The controller is the real one (runtime, simulated meters over ptys, store, tuning)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from config import SiteConfig, load_site
from controller.clock import SimClock
from controller.plant import Plant
from controller.runtime import Runtime
from controller.simulation import simulated_site
from controller.storage.timeseries import TimeSeriesStore
from controller.tuning import TuningStore
from controller.web.app import WebService
from controller.web.auth import PasswordFile

__all__ = ["SCHOOL", "WebRun", "chromium_path", "web_run"]

SCHOOL = Path(__file__).parents[2] / "config" / "sites" / "zhongshan_school.toml"
# Debian's chromium (`apt-get install chromium`): playwright drives it, no browser download.
_CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/lib/chromium/chromium", "/usr/bin/chromium-browser")


def chromium_path() -> str | None:
    """The browser to drive: $GREENSITE_CHROMIUM, else Debian's chromium; None when there is none."""
    wanted = os.environ.get("GREENSITE_CHROMIUM")
    if wanted:
        return wanted if Path(wanted).exists() else None
    for candidate in _CHROMIUM_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return shutil.which("chromium")


@dataclass
class WebRun:
    site: SiteConfig
    runtime: Runtime
    web: WebService
    tuning: TuningStore
    plant: Plant
    sims: dict[str, object]
    url: str
    task: asyncio.Task[None]
    stop: asyncio.Event


@contextlib.asynccontextmanager
async def web_run(
    folder: Path,
    *,
    speed: float | None,
    start: datetime | None = None,
    password: str | None = None,
    site: SiteConfig | None = None,
    web: bool = True,
) -> AsyncIterator[WebRun]:
    """The school (or `site`) simulated at `speed`, storage in `folder`, the web server on a free port on
    127.0.0.1 (`web=False`: none; the runtime still runs), a dashboard password for `engineer` if given."""
    base = site or load_site(SCHOOL, environment=False)
    storage = base.storage.model_copy(update={"path": str(folder / "series.sqlite3"), "tuning_path": None})
    site = base.model_copy(update={"storage": storage, "web": base.web.model_copy(update={"listen": "127.0.0.1:0"})})
    when = start or datetime(2026, 7, 6, 10, 0)
    when = when.replace(tzinfo=ZoneInfo(site.site.timezone)) if when.tzinfo is None else when
    if password is not None:
        from controller.web.auth import password_path  # noqa: PLC0415

        PasswordFile(password_path(site.storage.path)).set_password("engineer", password)
    tuning = TuningStore(site)
    async with simulated_site(site, when, 2) as (plant, links, sims):
        store = TimeSeriesStore(site.storage.path, site.storage.retention_days)
        runtime = Runtime(site, clock=SimClock(when, speed), links=links, line_timing=False,
                          before_tick=plant.advance, store=store, state_path=site.storage.state_path)  # fmt: skip
        service = WebService(runtime, tuning, on_tuned=None)
        url = ""
        if web:
            url = await service.start()
            service.attach()
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(runtime.run(None, stop), name="runtime")
        try:
            yield WebRun(site, runtime, service, tuning, plant, dict(sims), url, task, stop)
        finally:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 30)
            await service.stop()
            store.close()
