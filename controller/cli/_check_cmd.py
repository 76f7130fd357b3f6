"""`greensite check SITE [--step-test [--yes]] [--report DIR] [--strict]`: commission a site's wiring.

Reads every point of every device once over the site's real ports and judges each value, each device
and the readings together; with --step-test, steps the battery, a charger and the PV limit one at a time
to see which meter follows, and puts every setpoint back. Exit 0 when nothing is wrong, 1 when something
is (or, with --strict, looks it), 2 when the site file or the arguments are refused or the step test is
not confirmed, 130 when interrupted (the setpoints are put back first).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from config import DeviceKind, SiteConfig
from controller.cli._command import EXIT_BAD_INPUT, EXIT_OK, EXIT_RUNTIME, Command, loaded_site
from controller.commissioning.probe import SiteDevices, battery_trend, read_device
from controller.commissioning.readings import DeviceStatus, judge_device, judge_site
from controller.commissioning.report import (
    CommissioningReport,
    render_step_text,
    render_text,
    summary_text,
    write_report,
)
from controller.commissioning.step_test import StepTest, StepTestReport, battery_step, step_sizes
from firmware_bridge.ports import missing_ports
from firmware_bridge.transport import Link, SerialLink

EXIT_INTERRUPTED = 130  # as a shell reports a process ended by SIGINT


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="site TOML file")
    parser.add_argument("--step-test", action="store_true",
                        help="then step the battery, a charger with a car and the PV limit, one at a time, and check"
                             " that the meters follow ([commissioning] in the site file sets the steps)")  # fmt: skip
    parser.add_argument("--yes", action="store_true", help="start the step test without asking")
    parser.add_argument("--report", type=Path, metavar="DIR",
                        help="write report.md and report.json here (with --step-test default:"
                             " ./commissioning-<site id>-<date>-<time>)")  # fmt: skip
    parser.add_argument("--strict", action="store_true", help="exit 1 for suspicious values too")


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _run(args: argparse.Namespace) -> int:
    site = loaded_site(args.config)
    if site is None:
        return EXIT_BAD_INPUT
    simulated = [bus.name for bus in site.buses if bus.simulated]
    if simulated:
        sys.stderr.write(f"buses {', '.join(simulated)} are simulated in {args.config}: check talks to real"
                         " devices; set simulated = false on the buses to commission\n")  # fmt: skip
        return EXIT_BAD_INPUT
    missing = missing_ports(site)
    if missing:
        sys.stderr.write(f"{args.config}: cannot check\n" + "".join(f"  - {line}\n" for line in missing))
        return EXIT_BAD_INPUT
    report = asyncio.run(_check(site, args.config))
    sys.stdout.write(render_text(report, step_test=False))
    code = EXIT_OK
    if args.step_test:
        if args.yes or _confirmed(site):
            code = _step_test(site, report)
        else:
            report.step_test_note = "not run: not confirmed"
            sys.stdout.write("step test not run (not confirmed)\n")
            code = EXIT_BAD_INPUT
    directory = args.report
    if directory is None and args.step_test:
        directory = Path(f"commissioning-{site.site.id}-{report.local:%Y%m%d-%H%M%S}")
    sys.stdout.write(summary_text(report))
    if directory is not None:
        try:
            for path in write_report(directory, report):
                sys.stdout.write(f"  report: {path}\n")
        except OSError as err:
            sys.stderr.write(f"report not written to {directory}: {err.strerror or err}\n")
            code = code or EXIT_RUNTIME
    if code != EXIT_OK:
        return code
    wrong = report.problems() or (args.strict and report.questions())
    return EXIT_RUNTIME if wrong else EXIT_OK


def local_now(site: SiteConfig) -> datetime:
    """The site's wall-clock time (tests put the site at a chosen hour of the day here)."""
    return datetime.now(ZoneInfo(site.site.timezone))


def _links(site: SiteConfig) -> dict[str, Link]:
    return {bus.name: SerialLink(bus) for bus in site.buses}


async def _check(site: SiteConfig, source: str, links: dict[str, Link] | None = None) -> CommissioningReport:
    local = local_now(site)
    report = CommissioningReport(site.site.id, site.site.name, source, local)
    async with SiteDevices(site, links or _links(site)) as devices:
        for name in devices.configs:
            report.devices.append(judge_device(await read_device(devices, name), site))
        batteries = [d.name for d in report.devices
                     if d.kind is DeviceKind.BATTERY_INVERTER and d.status is not DeviceStatus.SILENT]  # fmt: skip
        trend = await battery_trend(devices, batteries[0], site) if batteries else None
    report.findings = judge_site(report.devices, site, local, trend)
    return report


def _confirmed(site: SiteConfig) -> bool:
    """Asked on a terminal only: moving a real battery is not something a script says yes to by accident."""
    if not sys.stdin.isatty():
        sys.stderr.write("--step-test moves real setpoints: confirm on a terminal, or pass --yes\n")
        return False
    sizes = step_sizes(site)
    battery = battery_step(site, sizes)
    stepped = "" if battery is None else f"the battery ({battery.inverter}) by {battery.step_kw:g} kW, "
    sys.stdout.write(
        "\nThe step test moves real setpoints, one at a time, everything else held:\n"
        f"  {stepped}a charger with a car by {sizes.charger_a:g} A,"
        f" the PV limit to {sizes.pv_kw:g} kW below PV's output;\n"
        f"  each for up to {sizes.hold_s:g} s, then put back (also on Ctrl-C). Stop `greensite run` first.\n"
        "Type yes to start: "
    )
    sys.stdout.flush()
    return sys.stdin.readline().strip().lower() == "yes"


def _step_test(site: SiteConfig, report: CommissioningReport, links: dict[str, Link] | None = None) -> int:
    """Run the step test into `report`; EXIT_INTERRUPTED if it was interrupted (its setpoints put back)."""
    holder: list[StepTestReport] = []
    try:
        asyncio.run(_step_test_async(site, holder, links))
    except (KeyboardInterrupt, asyncio.CancelledError):
        # The process's edge: the test's own `finally` has put the setpoints back; what is left is to say so.
        report.step_test = holder[0] if holder else StepTestReport(interrupted="interrupted before it began")
        report.step_test.interrupted = report.step_test.interrupted or "interrupted"
        sys.stdout.write(render_step_text(report.step_test))
        return EXIT_INTERRUPTED
    report.step_test = holder[0]
    sys.stdout.write(render_step_text(report.step_test))
    return EXIT_OK


async def _step_test_async(site: SiteConfig, holder: list[StepTestReport], links: dict[str, Link] | None) -> None:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        # Every Ctrl-C, a terminal closed and a service stop cancel this task, so that the step test's
        # `finally` puts the setpoints back instead of the process dying where it is. SIGINT too, although
        # asyncio.run cancels on the first one: on the second it raises KeyboardInterrupt out of the loop
        # and then cancels every task, the step test's shielded restore with them.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, task.cancel)
    _say("\nstep test: running")
    async with SiteDevices(site, links or _links(site)) as devices:
        test = StepTest(site, devices, progress=lambda line: _say(f"  {line}"))
        holder.append(test.report)
        await test.run()


COMMAND = Command(
    "check",
    "read every device of a site once and judge its wiring; --step-test moves setpoints to see which meter follows",
    _add_arguments,
    _run,
)
