"""The runtime speaks systemd's notify protocol: READY once its buses are open, a watchdog ping from the
loop after every tick, STOPPING on the way out; a hung tick stops the pings."""

from __future__ import annotations

import socket
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from config import load_site
from controller.clock import SimClock
from controller.runtime import Runtime
from controller.service_notify import SystemdNotifier
from controller.simulation import simulated_site

SCHOOL = Path(__file__).parents[1] / "config" / "sites" / "zhongshan_school.toml"


async def test_ready_watchdog_and_stopping_are_sent_from_the_loop(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    site = load_site(SCHOOL, environment=False)
    path = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # 2 s: a ping at most every second
    start = datetime(2026, 7, 7, 12, 0, tzinfo=ZoneInfo(site.site.timezone))
    notifier = SystemdNotifier()
    async with simulated_site(site, start, 1) as (plant, links, _sims):
        runtime = Runtime(site, clock=SimClock(start, 20.0), links=links, line_timing=False,
                          before_tick=plant.advance, notifier=notifier)  # fmt: skip
        await runtime.run(60)  # 3 s of wall time
    notifier.close()
    messages = []
    while True:
        try:
            messages.append(receiver.recv(4096).decode())
        except BlockingIOError:
            break
    receiver.close()
    assert messages[0].startswith("READY=1")
    pings = [m for m in messages if "WATCHDOG=1" in m]
    assert 2 <= len(pings) <= 6  # rate-limited to half the watchdog period, from the ticking loop
    assert any("STATUS=running, grid" in m for m in pings)
    assert messages[-1].startswith("STOPPING=1")
