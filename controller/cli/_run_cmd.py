"""`greensite run CONFIG [--simulate] [--speed N|max] [--duration 1d]`: run a site."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import shutil
import signal
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, cast, get_args
from zoneinfo import ZoneInfo

from config import SiteConfig
from controller.cli._command import EXIT_BAD_INPUT, EXIT_OK, Command, loaded_site
from controller.durations import parse_duration_s
from controller.interval_csv import IntervalCsvError, IntervalSeries, parse_interval_csv
from controller.plant import Sky, Weather
from controller.service_notify import SystemdNotifier
from controller.state_directory import storage_in_state_directory
from controller.storage.timeseries import TimeSeriesStore
from controller.tuning import TuningStore
from firmware_bridge.maps import device_questions
from firmware_bridge.ports import missing_ports

if TYPE_CHECKING:
    from controller.mqtt import MqttService
    from controller.runtime import Runtime


# The README's main job starts here: a summer Monday in term, so the day has sun, load and cars.
DEFAULT_SIMULATION_START = datetime(2026, 7, 6)


def duration_s(text: str) -> float:
    try:
        return parse_duration_s(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def speed(text: str) -> float | None:
    if text == "max":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'max'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("speed must be above 0")
    return value


def _skies(text: str) -> tuple[Sky, ...]:
    names = get_args(Sky)
    out: list[Sky] = []
    for index, item in enumerate(text.split(","), 1):
        name = item.strip()
        if name not in names:
            raise argparse.ArgumentTypeError(f"sky {index} {name!r} is not one of {', '.join(names)}")
        out.append(cast("Sky", name))
    return tuple(out)


def under_systemd() -> bool:
    """Started by systemd (its units get INVOCATION_ID): a missing port is waited for, not refused."""
    return bool(os.environ.get("INVOCATION_ID"))


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="site TOML file")
    parser.add_argument("--simulate", action="store_true", help="run against the simulated plant (no hardware)")
    parser.add_argument("--speed", type=speed, default=1.0, help="simulated seconds per second, or 'max'")
    parser.add_argument("--duration", type=duration_s, help="stop after this long (e.g. 1d); default: until Ctrl-C")
    parser.add_argument("--start", type=datetime.fromisoformat,
                        help="simulation start, local time (default Monday 2026-07-06 00:00, summer; with"
                             " --replay, where the recording starts)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1,
                        help="simulation random seed (clouds, the day's skies and load with --variation)")  # fmt: skip
    realism = parser.add_argument_group("the simulated plant (with --simulate)")
    realism.add_argument("--weather", choices=get_args(Weather), default="passing_clouds",
                         help="the sky: the same every day, or 'mixed': each day's drawn from the seed by"
                              " wet-season odds (default passing_clouds)")  # fmt: skip
    realism.add_argument("--skies", type=_skies, metavar="SKY,SKY,...",
                         help=f"with --weather mixed, these skies day by day (cycled) instead of drawn:"
                              f" {', '.join(get_args(Sky))}")  # fmt: skip
    realism.add_argument("--variation", action="store_true",
                         help="each day its own load: cooling by the day's temperature, occupancy noise, events")
    realism.add_argument("--replay", type=Path, metavar="CSV",
                         help="play recorded interval data (time,load_kw,pv_kw at 1-60 min; README: Replaying"
                              " recorded data) instead of the modelled load and/or PV")  # fmt: skip
    realism.add_argument("--replay-only", choices=("load", "pv"),
                         help="with --replay, play only this column of the recording (default: what it has)")
    parser.add_argument("--link", choices=("memory", "pty"),
                        help="with --simulate, what carries the bus bytes to the simulated devices: ptys, or an"
                             " in-process link (the same bytes, codecs and timeouts, no pseudo-terminal);"
                             " default memory at --speed max, pty otherwise")  # fmt: skip
    parser.add_argument("--store", help="SQLite time-series file (default: storage.path of the site; with "
                        "--simulate, a fresh var/simulation/<site id>/ each run)")  # fmt: skip
    parser.add_argument("--no-mqtt", action="store_true", help="do not publish or listen on MQTT")
    parser.add_argument("--no-web", action="store_true", help="no web server (display and dashboard)")
    parser.add_argument("--live", action=argparse.BooleanOptionalAction, default=None,
                        help="live terminal view (default: on a terminal, unless --speed max)")  # fmt: skip
    parser.add_argument("--report", type=Path, metavar="DIR", help="write a PNG per day and summary.md here")
    parser.add_argument("--observe", action="store_true",
                        help="shadow mode: read, plan and compute setpoints, publish them as 'would write', and"
                             " write nothing to any device")  # fmt: skip


def _run(args: argparse.Namespace) -> int:
    site = loaded_site(args.config)
    if site is None:
        return EXIT_BAD_INPUT
    if args.report is not None and importlib.util.find_spec("matplotlib") is None:
        sys.stderr.write("--report draws with matplotlib, which is not installed: scripts/bootstrap installs it"
                         " (or pip install 'greensite[plot]')\n")  # fmt: skip
        return EXIT_BAD_INPUT
    if args.report is not None and not args.simulate:
        sys.stderr.write("--report needs --simulate (it plots the simulated plant); a real run's series are in"
                         " its store: greensite export\n")  # fmt: skip
        return EXIT_BAD_INPUT
    if args.link is not None and not args.simulate:
        sys.stderr.write("--link chooses how simulated devices are reached: it needs --simulate\n")
        return EXIT_BAD_INPUT
    plant_options = [name for name, given in (("--weather", args.weather != "passing_clouds"),
                     ("--skies", args.skies), ("--variation", args.variation), ("--replay", args.replay),
                     ("--replay-only", args.replay_only), ("--start", args.start)) if given]  # fmt: skip
    if plant_options and not args.simulate:
        sys.stderr.write(f"{', '.join(plant_options)} shape the simulated plant: add --simulate\n")
        return EXIT_BAD_INPUT
    if args.skies and args.weather != "mixed":
        sys.stderr.write("--skies gives the skies day by day: it needs --weather mixed\n")
        return EXIT_BAD_INPUT
    if args.replay_only and args.replay is None:
        sys.stderr.write("--replay-only chooses a column of --replay's recording: give --replay CSV\n")
        return EXIT_BAD_INPUT
    replay: IntervalSeries | None = None
    if args.replay is not None:
        replay = _recording(args.replay, args.replay_only, ZoneInfo(site.site.timezone))
        if replay is None:
            return EXIT_BAD_INPUT
    if not args.simulate and any(bus.simulated for bus in site.buses):
        names = ", ".join(bus.name for bus in site.buses if bus.simulated)
        sys.stderr.write(f"buses {names} are simulated in {args.config}: add --simulate\n")
        return EXIT_BAD_INPUT
    if not args.simulate:
        missing = missing_ports(site)
        if missing and not under_systemd():
            sys.stderr.write(f"{args.config}: cannot start\n" + "".join(f"  - {line}\n" for line in missing))
            return EXIT_BAD_INPUT
        for line in missing:  # the service waits for them: an adapter may enumerate after the unit starts
            logging.getLogger("greensite").warning("serial port missing at start", extra={"problem": line})
    for line in device_questions(site):
        logging.getLogger("greensite").warning("site file question", extra={"question": line})
    if args.observe:
        sys.stdout.write("observing: plans and setpoints are computed and published as 'would write';"
                         " nothing is written to any device\n")  # fmt: skip
        sys.stdout.flush()
    if args.simulate and args.speed is None and args.link in (None, "memory"):
        from controller.sim_loop import new_event_loop  # noqa: PLC0415

        with asyncio.Runner(loop_factory=new_event_loop) as runner:  # socket polls spaced: see sim_loop
            return runner.run(_simulate(site, args, replay))
    return asyncio.run(_simulate(site, args, replay) if args.simulate else _hardware(site, args))


def _recording(path: Path, only: str | None, zone: ZoneInfo) -> IntervalSeries | None:
    """The recording to replay (only its `only` column if given); None after saying why it is refused."""
    try:
        series = parse_interval_csv(path.read_bytes(), zone)
    except OSError as err:
        sys.stderr.write(f"--replay {path}: {err.strerror or err}\n")
        return None
    except IntervalCsvError as err:
        sys.stderr.write(f"--replay {path}: {err}\n")
        return None
    if only == "load":
        if series.load_kw is None:
            sys.stderr.write(f"--replay {path}: the recording has no load_kw column to play\n")
            return None
        return IntervalSeries(series.start, series.step_s, series.load_kw, None)
    if only == "pv":
        if series.pv_kw is None:
            sys.stderr.write(f"--replay {path}: the recording has no pv_kw column to play\n")
            return None
        return IntervalSeries(series.start, series.step_s, None, series.pv_kw)
    return series


def _simulation_storage(site: SiteConfig, args: argparse.Namespace) -> SiteConfig:
    """A simulated run starts from nothing (no series, counters or tuning left by the previous run) in
    its own directory, unless --store names a file: then the caller keeps what is there."""
    if args.store:
        path = Path(args.store)
    else:
        folder = Path("var/simulation") / site.site.id
        if folder.exists():
            shutil.rmtree(folder)
        path = folder / "series.sqlite3"
    storage = site.storage.model_copy(update={"path": str(path), "tuning_path": None})
    return site.model_copy(update={"storage": storage})


def _web_users(site: SiteConfig) -> Path:
    from controller.web.auth import password_path  # noqa: PLC0415

    return password_path(site.storage.path)


def _store(site: SiteConfig, args: argparse.Namespace) -> TimeSeriesStore:
    # A simulation may outrun the disk at --speed max: its store waits for the writer instead of dropping.
    return TimeSeriesStore(args.store or site.storage.path, site.storage.retention_days,
                           wait_when_full=args.simulate)  # fmt: skip


def _wants_live(args: argparse.Namespace) -> bool:
    if args.live is not None:
        return bool(args.live)
    return sys.stdout.isatty() and not (args.simulate and args.speed is None)


async def _run_attached(
    runtime: Runtime, tuning: TuningStore, args: argparse.Namespace, duration_s: float | None, stop: asyncio.Event,
    *, web_users: Path | None = None,
) -> None:
    """One run with its tuning file followed, MQTT (its address on stdout), the web server (its URL on stdout)
    and the live view. `web_users`: the dashboard's password file (default: next to the run's storage)."""
    from controller.live import LiveView  # noqa: PLC0415
    from controller.mqtt import site_services  # noqa: PLC0415

    async with site_services(runtime, tuning, mqtt=not args.no_mqtt) as mqtt:
        address = None if mqtt is None else f"{mqtt.host}:{mqtt.port}, topics {mqtt.topics.prefix}/#"
        if address is not None:
            sys.stdout.write(f"MQTT: {address}\n")
            sys.stdout.flush()
        if runtime.site.web.enabled and not args.no_web:
            await _start_web(runtime, tuning, mqtt, web_users, args.config)
        if _wants_live(args):
            LiveView(runtime, mqtt=address).attach()
        elif runtime.observe:
            runtime.listeners.append(_ObserveLines())
        await runtime.run(duration_s, stop)


async def _start_web(runtime: Runtime, tuning: TuningStore, mqtt: MqttService | None, users: Path | None,
                     config: str) -> None:  # fmt: skip
    """Bind the web server now (its URL printed before the first tick) and leave it to the runtime's supervision."""
    from controller.web import WebService  # noqa: PLC0415 - aiohttp only for runs that serve pages

    def tuned(_site: SiteConfig) -> None:
        if mqtt is not None:
            mqtt.publish_config_state()

    web = WebService(runtime, tuning, on_tuned=tuned, users_path=users)
    try:
        url = await web.start()
    except OSError as err:  # the controller runs without its pages rather than not at all
        logging.getLogger("greensite").error("web server not started", extra={"error": str(err)})
        return
    web.attach()
    sys.stdout.write(f"web: {url}/display (visitors' display), {url}/ (dashboard)\n")
    if not web.passwords.users():
        sys.stdout.write(f"web: no dashboard password yet: greensite web password {config}\n")
    sys.stdout.flush()


class _ObserveLines:
    """Observing without the live view (no terminal, or --no-live): a line every OBSERVE_LINE_PERIOD_S of
    wall time with what would be written and what the site does, so shadow mode shows something."""

    def __init__(self) -> None:
        self._next_s = 0.0

    def __call__(self, runtime: Runtime) -> None:
        now_s = time.monotonic()
        measured, setpoints = runtime.last_measured, runtime.last_setpoints
        if now_s < self._next_s or measured is None or setpoints is None:
            return
        self._next_s = now_s + OBSERVE_LINE_PERIOD_S

        def kw(value: float | None) -> str:
            return "unknown" if value is None else f"{value:+.1f} kW"

        cars = "".join(f", {name} {amps:.1f} A" for name, amps in setpoints.ev_current_a.items())
        limit = "none" if setpoints.pv_limit_kw is None else f"{setpoints.pv_limit_kw:.1f} kW"
        why = f" ({'; '.join(setpoints.actions)})" if setpoints.actions else ""
        sys.stdout.write(
            f"{runtime.clock.local():%H:%M:%S} would write: battery {setpoints.battery_kw:+.1f} kW, PV limit {limit}"
            f"{cars} | grid {kw(measured.grid_kw)}, PV {kw(measured.pv_kw)}, battery {kw(measured.battery_kw)}{why}\n"
        )
        sys.stdout.flush()


# Shadow mode's progress line, wall time: often enough to watch, rare enough to read.
OBSERVE_LINE_PERIOD_S = 5.0


def _tuned(site: SiteConfig) -> TuningStore:
    """The site with its remote-tuning overrides; a refused overrides file is reported, not fatal."""
    tuning = TuningStore(site)
    for line in tuning.load_errors:
        sys.stderr.write(f"tuning overrides ignored: {line}\n")
    return tuning


def _stop_on_signals() -> asyncio.Event:
    """SIGINT/SIGTERM end the run at the next tick; the runtime then leaves the devices safe."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUP too: a closed terminal or a lost SSH session stops the run through the safe state like
    # Ctrl-C, instead of killing it where it stands (the devices' watchdogs would then take over).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _hardware(site: SiteConfig, args: argparse.Namespace) -> int:
    from controller.clock import RealClock  # noqa: PLC0415
    from controller.runtime import Runtime  # noqa: PLC0415
    from firmware_bridge.transport import Link, SerialLink  # noqa: PLC0415

    stop = _stop_on_signals()
    links: dict[str, Link] = {bus.name: SerialLink(bus) for bus in site.buses}
    site = storage_in_state_directory(site)  # under systemd: relative storage in its StateDirectory
    tuning = _tuned(site)
    site = tuning.site
    store = _store(site, args)
    clock = RealClock(datetime.now(ZoneInfo(site.site.timezone)))
    notifier = SystemdNotifier()
    runtime = Runtime(site, clock=clock, links=links, store=store, state_path=site.storage.state_path,
                      notifier=notifier, observe=args.observe)  # fmt: skip
    try:
        await _run_attached(runtime, tuning, args, args.duration, stop)
    finally:
        store.close()
        notifier.close()
    sys.stdout.write("".join(f"{key}: {value}\n" for key, value in runtime.summary_stats().items()))
    return EXIT_OK


async def _simulate(site: SiteConfig, args: argparse.Namespace, replay: IntervalSeries | None) -> int:
    from controller.clock import SimClock  # noqa: PLC0415 - keeps `greensite validate` free of numba
    from controller.runtime import Runtime  # noqa: PLC0415
    from controller.simulation import Recorder, simulated_plant, simulated_site  # noqa: PLC0415
    from controller.summary import summary_text  # noqa: PLC0415
    from firmware_bridge.simulator import Line  # noqa: PLC0415

    zone = ZoneInfo(site.site.timezone)
    given = args.start or (replay.start if replay is not None else DEFAULT_SIMULATION_START)
    start = given.replace(tzinfo=zone) if given.tzinfo is None else given.astimezone(zone)
    duration = args.duration if args.duration is not None else 86400.0
    if replay is not None and (start < replay.start or start + timedelta(seconds=duration) >
                               replay.start + timedelta(seconds=replay.duration_s)):  # fmt: skip
        logging.getLogger("greensite").warning("the run is not inside the recording: it is played around again",
                                               extra={"recording_start": replay.start.isoformat(),
                                                      "recording_s": replay.duration_s})  # fmt: skip
    stop = _stop_on_signals()
    wall = time.perf_counter()
    # The dashboard's password is the site's (`greensite web password SITE`), not the fresh simulation folder's.
    web_users = None if args.store else _web_users(storage_in_state_directory(site))
    site = storage_in_state_directory(_simulation_storage(site, args))
    tuning = _tuned(site)
    site = tuning.site
    # At --speed max the ptys' system calls were most of a tick; a paced run keeps the OS's serial path.
    line = Line(args.link) if args.link is not None else Line.MEMORY if args.speed is None else Line.PTY
    days = int(duration // 86400) + 1
    plant = simulated_plant(site, start, days, seed=args.seed, weather=args.weather, variation=args.variation,
                            skies=args.skies or (), replay=replay)  # fmt: skip
    async with simulated_site(site, start, days, seed=args.seed, line=line, plant=plant) as (plant, links, _sims):
        recorder = Recorder(site, plant)
        store = _store(site, args)
        notifier = SystemdNotifier()  # the demo as a service: READY and the watchdog as on hardware
        runtime = Runtime(
            site, clock=SimClock(start, args.speed), links=links, line_timing=False,
            before_tick=plant.advance, on_tick=recorder, store=store, state_path=site.storage.state_path,
            notifier=notifier, observe=args.observe,
        )  # fmt: skip
        try:
            await _run_attached(runtime, tuning, args, duration, stop, web_users=web_users)
            summary = summary_text(
                site, plant, recorder, runtime, wall_s=time.perf_counter() - wall, interrupted=stop.is_set()
            )
            sys.stdout.write(summary)
            if args.report is not None:
                from controller.report import write_report  # noqa: PLC0415 - matplotlib is an optional extra

                end = start + timedelta(seconds=plant.now_s)
                for path in write_report(site, store, args.report, start=start, end=end, summary=summary):
                    sys.stdout.write(f"  report: {path}\n")
        finally:
            store.close()
            notifier.close()
    return EXIT_OK


COMMAND = Command("run", "run a site (or the simulated site with --simulate) and summarise", _add_arguments, _run)
