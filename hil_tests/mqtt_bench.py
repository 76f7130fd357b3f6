"""`python -m hil_tests.mqtt_bench`: tick jitter of the controller with MQTT quiet, and while 1000
hostile payloads arrive on the command topic, in one run against a real Mosquitto.

The school runs at 20× (a tick every 50 ms of wall time, so lateness is measurable); the figures are
tick lateness in wall milliseconds, quiet window against the attack window, and their ratio.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import aiomqtt

from config import SiteConfig, load_site
from controller.clock import SimClock
from controller.logs import configure_logging
from controller.mqtt import Topics, site_services
from controller.runtime import Runtime
from controller.simulation import simulated_site
from controller.tuning import TuningStore
from hil_tests.broker import Mosquitto

SCHOOL = Path(__file__).parents[1] / "config" / "sites" / "zhongshan_school.toml"
SPEED = 20.0
WINDOW_TICKS = 400
PAYLOADS = 1000
PACE_S = 0.01  # about 100 payloads a second, so the attack spans a few hundred ticks


def _site(folder: Path, port: int) -> SiteConfig:
    data = load_site(SCHOOL, environment=False).model_dump()
    data["mqtt"].update({"broker": f"mqtt://127.0.0.1:{port}", "remote_tuning": True})
    data["storage"] = {"path": str(folder / "series.sqlite3")}
    return SiteConfig.model_validate(data)


def _hostile(rng: random.Random) -> bytes:
    shapes = [b"{", b"[]", b'{"patch": 5}', b'{"patch": {"grid": {"import_limit_kw": "x"}}}',
              b'{"patch": {"battery": {"soc_min": 2}}}', b"x" * 40_000, b'{"patch": {"nope": 1}}']  # fmt: skip
    return rng.choice(shapes) if rng.random() < 0.7 else rng.randbytes(rng.randint(0, 400))


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp))
        broker.start()
        try:
            site = _site(Path(tmp), broker.port)
            start = datetime(2026, 7, 6, 11, 0, tzinfo=ZoneInfo(site.site.timezone))
            async with simulated_site(site, start, 1) as (plant, links, _sims):
                runtime = Runtime(site, clock=SimClock(start, SPEED), links=links, line_timing=False,
                                  before_tick=plant.advance)  # fmt: skip
                async with site_services(runtime, TuningStore(site)) as service:
                    assert service is not None
                    task = asyncio.create_task(runtime.run(3 * WINDOW_TICKS + 200))
                    while runtime.stats.ticks < 100:
                        await asyncio.sleep(0.05)
                    quiet_from = runtime.stats.ticks
                    while runtime.stats.ticks < quiet_from + WINDOW_TICKS:
                        await asyncio.sleep(0.05)
                    attack_from = runtime.stats.ticks
                    sent = time.perf_counter()
                    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
                        for _ in range(PAYLOADS):
                            await client.publish(Topics(site.topic_prefix).config_set, _hostile(rng), qos=1)
                            await asyncio.sleep(PACE_S)
                    while service.commands_answered < PAYLOADS:
                        await asyncio.sleep(0.01)
                    answered_s = time.perf_counter() - sent
                    attack_to = max(runtime.stats.ticks, attack_from + 20)
                    await task
        finally:
            broker.kill()
    lateness = runtime.stats.tick_lateness_s
    quiet = [x / SPEED for x in lateness[quiet_from : quiet_from + WINDOW_TICKS]]
    attack = [x / SPEED for x in lateness[attack_from:attack_to]]
    out = sys.stdout
    out.write(f"tick every {1000 / SPEED:.0f} ms wall; lateness in wall ms\n")
    out.write(f"quiet:  {len(quiet)} ticks, p50 {_ms(quiet, 0.5):.2f}, p99 {_ms(quiet, 0.99):.2f},"
              f" mean {1000 * statistics.fmean(quiet):.2f}\n")  # fmt: skip
    out.write(f"attack: {len(attack)} ticks while {PAYLOADS} hostile payloads were answered in {answered_s:.2f} s,"
              f" p50 {_ms(attack, 0.5):.2f}, p99 {_ms(attack, 0.99):.2f}, mean {1000 * statistics.fmean(attack):.2f}\n")  # fmt: skip
    out.write(f"ratio attack/quiet: p99 {_ms(attack, 0.99) / max(_ms(quiet, 0.99), 1e-3):.2f}\n")
    out.write(f"refused {service.commands_answered} commands; tuning unchanged: {runtime.site.tuning == site.tuning};"
              f" safe-state ticks {runtime.stats.safe_state_ticks}\n")  # fmt: skip


if __name__ == "__main__":
    configure_logging("ERROR")
    asyncio.run(main())
