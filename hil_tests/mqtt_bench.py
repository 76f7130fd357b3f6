"""`python -m hil_tests.mqtt_bench [--payloads N]`: tick rate and jitter of the controller with MQTT
quiet, and while N hostile payloads (the fuzzer's, hil_tests/tuning_fuzz.py) arrive on the command
topic, in one run against a real Mosquitto.

The school runs at 20× (a tick every 50 ms of wall time, so lateness is measurable); the figures are
ticks per wall second and tick lateness in wall milliseconds, quiet window against the attack window.
"""

from __future__ import annotations

import argparse
import asyncio
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
from hil_tests.tuning_fuzz import generate

SCHOOL = Path(__file__).parents[1] / "config" / "sites" / "zhongshan_school.toml"
SPEED = 20.0
WINDOW_TICKS = 400
PACE_S = 0.005  # about 200 payloads a second: the attack spans many ticks


def _site(folder: Path, port: int) -> SiteConfig:
    data = load_site(SCHOOL, environment=False).model_dump()
    data["mqtt"].update({"broker": f"mqtt://127.0.0.1:{port}", "remote_tuning": True})
    data["storage"] = {"path": str(folder / "series.sqlite3")}
    return SiteConfig.model_validate(data)


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(payloads: int) -> None:
    # The site has remote tuning on: the fuzzer's tuning-off kind is left out. Retained ones are sent
    # retained; the controller speaks MQTT 5 to Mosquitto, so it sees the flag on live messages too.
    items = [i for i in generate(payloads) if i.remote_tuning]
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp))
        broker.start()
        try:
            site = _site(Path(tmp), broker.port)
            start = datetime(2026, 7, 6, 11, 0, tzinfo=ZoneInfo(site.site.timezone))
            async with simulated_site(site, start, 1) as (plant, links, _sims):
                runtime = Runtime(site, clock=SimClock(start, SPEED), links=links, line_timing=False,
                                  before_tick=plant.advance)  # fmt: skip
                stop = asyncio.Event()
                async with site_services(runtime, TuningStore(site)) as service:
                    assert service is not None
                    task = asyncio.create_task(runtime.run(None, stop))
                    while runtime.stats.ticks < 100:
                        await asyncio.sleep(0.05)
                    quiet_from, quiet_wall = runtime.stats.ticks, time.perf_counter()
                    while runtime.stats.ticks < quiet_from + WINDOW_TICKS:
                        await asyncio.sleep(0.05)
                    quiet_rate = (runtime.stats.ticks - quiet_from) / (time.perf_counter() - quiet_wall)
                    attack_from, sent = runtime.stats.ticks, time.perf_counter()
                    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
                        for item in items:
                            topic = Topics(site.topic_prefix).config_set
                            await client.publish(topic, item.payload, qos=1, retain=item.retained)
                            await asyncio.sleep(PACE_S)
                    while service.commands.received < len(items):
                        await asyncio.sleep(0.01)
                    answered_s = time.perf_counter() - sent
                    attack_to = max(runtime.stats.ticks, attack_from + 20)
                    attack_rate = (attack_to - attack_from) / answered_s
                    stop.set()
                    await task
        finally:
            broker.kill()
    lateness = runtime.stats.tick_lateness_s
    quiet = [x / SPEED for x in lateness.window(quiet_from, quiet_from + WINDOW_TICKS)]
    attack = [x / SPEED for x in lateness.window(attack_from, attack_to)]
    counts = service.commands
    out = sys.stdout
    out.write(f"tick every {1000 / SPEED:.0f} ms wall; lateness in wall ms\n")
    out.write(f"quiet:  {len(quiet)} ticks, {quiet_rate:.2f} ticks/s, p50 {_ms(quiet, 0.5):.2f}, "
              f"p99 {_ms(quiet, 0.99):.2f}, mean {1000 * statistics.fmean(quiet):.2f}\n")  # fmt: skip
    out.write(f"attack: {len(attack)} ticks, {attack_rate:.2f} ticks/s, while {len(items)} hostile payloads were answered in {answered_s:.2f} s,"
              f" p50 {_ms(attack, 0.5):.2f}, p99 {_ms(attack, 0.99):.2f}, mean {1000 * statistics.fmean(attack):.2f}\n")  # fmt: skip
    out.write(f"tick rate kept: {100 * attack_rate / quiet_rate:.1f} %; ratio attack/quiet: p99 {_ms(attack, 0.99) / max(_ms(quiet, 0.99), 1e-3):.2f}\n")
    out.write(f"commands: received {counts.received}, refused {counts.refused}, accepted {counts.accepted}, failed {counts.failed}, "
              f"retained ignored {counts.retained_ignored} of {sum(i.retained for i in items)} sent retained; tuning unchanged: {runtime.site.tuning == site.tuning};"
              f" safe-state ticks {runtime.stats.safe_state_ticks}\n")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m hil_tests.mqtt_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--payloads", type=int, default=1000, help="hostile payloads in the attack window")
    configure_logging("ERROR")
    asyncio.run(main(parser.parse_args().payloads))
