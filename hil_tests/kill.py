"""SIGKILL the controller mid-day: the devices, in another process, must fall back to safe on their own.

Two processes, as on a site: the plant with its simulated devices on ptys (`plant` below, in real time)
and `greensite run` against those ports as against real RS-485 adapters. The controller is killed at a
random moment; the plant's log then shows whether the devices' own watchdogs brought the grid back
within its limits within the fallback timeout, and the controller's database and state file are
opened to check they survived.

    python -m hil_tests.kill --kills 50         # the issue's count (about 25 minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import tomli_w

from config import SiteConfig, parse_site
from controller.plant import Plant, school_arrivals
from controller.safety import LIMIT_MARGIN_KW
from controller.simulation import simulated_site

__all__ = ["KillResult", "kill_once"]

SCHOOL = Path(__file__).parents[1] / "config" / "sites" / "zhongshan_school.toml"
# The devices fall back this long after the controller's last write (the site's control.device_watchdog_s).
WATCHDOG_S = 5.0
# The plant steps its physics and the devices check their watchdogs this often (wall s).
PLANT_STEP_S = 0.05
# A controller takes a few seconds to start (imports, the numba cache, the buses): the plant log says
# when it first wrote a setpoint; the kill comes this long or longer after that.
RUN_BEFORE_KILL_S = (3.0, 12.0)
# After the watchdog's timeout the fallbacks need a plant step and a tick's worth of flows to show.
SETTLE_S = 1.5
STARTUP_TIMEOUT_S = 60.0  # numba's cache load and the imports on a busy 2-core box


@dataclass
class KillResult:
    killed_at_s: float  # plant time
    run_s: float  # how long the controller had run
    battery_at_kill_kw: float  # the setpoint the battery was left with (charging: the dangerous case)
    breach_after_fallback_s: float  # plant seconds beyond a limit after the fallback had to act
    worst_grid_kw: float
    fallbacks_applied: bool
    database_ok: bool
    state_ok: bool


def _site_file(workdir: Path) -> Path:
    """The school as real hardware: its buses on the plant process's ports, the watchdog short."""
    data = tomllib.loads(SCHOOL.read_text())
    for bus in data["buses"]:
        bus["simulated"] = False
        bus["port"] = str(workdir / f"{bus['name']}.tty")
        bus["parity"] = "N"  # a pty refuses parity (EINVAL); a USB RS-485 adapter takes the meter's 8E1
    data["mqtt"] = {"enabled": False}
    data["storage"] = {"path": str(workdir / "controller.sqlite3")}
    data["control"]["device_watchdog_s"] = WATCHDOG_S
    path = workdir / "site.toml"
    path.write_text(tomli_w.dumps(data))
    return path


async def _run_plant(site: SiteConfig, workdir: Path, start: datetime) -> None:
    """The plant in real time with its devices on ptys in `workdir`; one JSON line a plant second."""
    plant = Plant(site, start, weather="sunny", arrivals=school_arrivals(site, start, 1))
    plant.soc = 0.5
    log = (workdir / "plant.jsonl").open("a", encoding="utf-8")
    async with simulated_site(site, start, 1, plant=plant, link_dir=workdir) as (_, _links, sims):
        (workdir / "ready").write_text("ready")
        loop = asyncio.get_running_loop()
        began = loop.time()
        next_log_s = 0.0
        while True:
            await asyncio.sleep(PLANT_STEP_S)
            plant.advance(loop.time() - began)
            tripped = [name for sim in sims.values() for name in sim.check_watchdogs()]
            if plant.now_s >= next_log_s or tripped:
                next_log_s = plant.now_s + 1.0
                row = {"t": round(plant.now_s, 3), "grid_kw": plant.grid_kw,
                       "battery_setpoint_kw": plant.battery_setpoint_kw, "pv_limit_pct": plant.pv_limit_pct,
                       "ev_a": [e.current_limit_a for e in plant.evs.values()], "tripped": tripped,
                       "requests": sum(sim.requests for sim in sims.values())}  # fmt: skip
                log.write(json.dumps(row) + "\n")
                log.flush()


def _rows(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / "plant.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def kill_once(workdir: Path, rnd: random.Random) -> KillResult:
    """One plant, one controller, one SIGKILL at a random moment; judged by the plant's log."""
    workdir.mkdir(parents=True, exist_ok=True)
    site_path = _site_file(workdir)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    plant_proc = subprocess.Popen([sys.executable, "-m", "hil_tests.kill", "plant", str(workdir)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=(workdir / "plant.log").open("w"))  # fmt: skip
    controller: subprocess.Popen[bytes] | None = None
    try:
        _wait((workdir / "ready").exists, STARTUP_TIMEOUT_S, "the plant process did not start")
        controller = subprocess.Popen([sys.executable, "-m", "controller.cli", "run", str(site_path), "--no-mqtt",
                                       "--no-live"], env=env, stdout=subprocess.DEVNULL,
                                      stderr=(workdir / "controller.log").open("w"))  # fmt: skip
        baseline = len(_rows(workdir))
        # Running: the devices are being asked (the controller has opened its ports and ticks).
        _wait(lambda: any(r["requests"] > 20 for r in _rows(workdir)[baseline:]), STARTUP_TIMEOUT_S,
              "the controller never talked to the devices")  # fmt: skip
        started_at = _rows(workdir)[-1]["t"]
        time.sleep(rnd.uniform(*RUN_BEFORE_KILL_S))
        controller.send_signal(signal.SIGKILL)
        controller.wait()
        killed_at = _rows(workdir)[-1]["t"]
        battery_at_kill = _rows(workdir)[-1]["battery_setpoint_kw"]
        time.sleep(WATCHDOG_S + 2 * SETTLE_S + 1.0)
        rows = [r for r in _rows(workdir) if r["t"] >= killed_at]
    finally:
        for proc in (controller, plant_proc):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    site = parse_site(tomllib.loads(site_path.read_text()), environment=False)
    after = [r for r in rows if r["t"] >= killed_at + WATCHDOG_S + SETTLE_S]
    beyond = [r for r in after if r["grid_kw"] > site.import_limit_kw + LIMIT_MARGIN_KW
              or r["grid_kw"] < -site.export_limit_kw - LIMIT_MARGIN_KW]  # fmt: skip
    last = rows[-1] if rows else {}
    fallbacks = bool(last) and last["battery_setpoint_kw"] == 0.0 and last["pv_limit_pct"] <= (
        100 * site.export_limit_kw / site.pv.peak_kw if site.pv else 100.0
    ) + 1e-6
    return KillResult(
        killed_at_s=killed_at,
        run_s=killed_at - started_at,
        battery_at_kill_kw=battery_at_kill,
        breach_after_fallback_s=float(len(beyond)),
        worst_grid_kw=min((r["grid_kw"] for r in after), default=0.0),
        fallbacks_applied=fallbacks,
        database_ok=_database_ok(workdir / "controller.sqlite3"),
        state_ok=_state_ok(workdir / "controller.state.json"),
    )


def _database_ok(path: Path) -> bool:
    if not path.exists():
        return True  # killed before its first batch: nothing to corrupt
    with contextlib.closing(sqlite3.connect(path)) as db:
        return bool(db.execute("PRAGMA integrity_check").fetchone()[0] == "ok")


def _state_ok(path: Path) -> bool:
    if not path.exists():
        return True  # killed before its first save
    try:
        json.loads(path.read_bytes())
    except ValueError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "plant":
        site = parse_site(tomllib.loads((Path(args[1]) / "site.toml").read_text()), environment=False)
        simulated = site.model_copy(update={"buses": [b.model_copy(update={"simulated": True}) for b in site.buses]})
        start = datetime(2026, 7, 7, 12, 0, tzinfo=ZoneInfo(site.site.timezone))
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_run_plant(simulated, Path(args[1]), start))
        return 0
    parser = argparse.ArgumentParser(prog="python -m hil_tests.kill", description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=Path("var/kill"))
    parser.add_argument("--seed", type=int, default=1)
    options = parser.parse_args(args)
    rnd = random.Random(options.seed)
    unsafe = 0
    for index in range(options.kills):
        result = kill_once(options.workdir / f"kill-{index:03d}", rnd)
        files_ok = result.database_ok and result.state_ok
        bad = bool(result.breach_after_fallback_s) or not result.fallbacks_applied or not files_ok
        unsafe += bool(bad)
        sys.stdout.write(f"kill {index + 1}: after {result.run_s:.1f} s of control, battery left at"
                         f" {result.battery_at_kill_kw:+.1f} kW; {'UNSAFE' if bad else 'safe'}:"
                         f" fallbacks {'applied' if result.fallbacks_applied else 'NOT applied'}, "
                         f"{result.breach_after_fallback_s:.0f} s beyond a limit after {WATCHDOG_S:.0f} s,"
                         f" database {'ok' if result.database_ok else 'CORRUPT'},"
                         f" state file {'ok' if result.state_ok else 'CORRUPT'}\n")  # fmt: skip
        sys.stdout.flush()
    sys.stdout.write(f"{unsafe} unsafe exits of {options.kills} SIGKILLs\n")
    return 1 if unsafe else 0


if __name__ == "__main__":
    raise SystemExit(main())
