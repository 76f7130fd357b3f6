"""The systemd unit that runs a site: text from settings, nothing else (written by `greensite service install`)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

__all__ = ["STATE_DIRECTORY_NAME", "UnitSettings", "render_unit", "unit_name", "watchdog_s_for"]

STATE_DIRECTORY_NAME = "greensite"  # /var/lib/greensite and /var/cache/greensite

# systemd restarts a loop that has not pinged for this long. Ten 1 s ticks: long enough that a slow
# SD-card write or a GC pause never costs a restart, short against the devices' own fallback
# timeouts (the second line of defence, tens of seconds), which keep the site safe meanwhile.
WATCHDOG_MIN_S = 10.0
WATCHDOG_TICKS = 10


def watchdog_s_for(tick_period_s: float) -> int:
    """WatchdogSec= for a site ticking every `tick_period_s`: ten ticks, at least 10 s."""
    return int(max(WATCHDOG_MIN_S, WATCHDOG_TICKS * tick_period_s) + 0.999)


def unit_name(site_id: str) -> str:
    return f"greensite-{site_id}.service"


@dataclass(frozen=True, slots=True)
class UnitSettings:
    site_id: str
    site_file: Path  # absolute: the copy the service reads
    command: tuple[str, ...]  # how to start the CLI: the venv's `greensite`, or python -m controller.cli
    user: str
    watchdog_s: int
    simulate: bool = False
    serial_group: str | None = "dialout"  # owns /dev/ttyS*, ttyUSB*, ttyACM* on Debian
    home_read_only: bool = False  # the code lives under /home or /root: ProtectHome=yes would hide it
    writable_paths: tuple[str, ...] = ()  # absolute storage directories outside the state directory
    directory_name: str = STATE_DIRECTORY_NAME  # of the state and cache directories


def _exec_start(settings: UnitSettings) -> str:
    argv = [*settings.command, "--log-level", "INFO", "--log-json", "run", str(settings.site_file)]
    if settings.simulate:
        argv.append("--simulate")
    # systemd splits ExecStart= like a shell for quoting, but expands '%' specifiers and '$' variables.
    return " ".join(shlex.quote(arg).replace("%", "%%").replace("$", "$$") for arg in argv)


def render_unit(settings: UnitSettings) -> str:
    """The unit file's text. Each choice carries its reason: a site engineer reads this file."""
    groups = "" if settings.serial_group is None else f"SupplementaryGroups={settings.serial_group}\n"
    writable = "".join(f"ReadWritePaths={path}\n" for path in settings.writable_paths)
    home = "read-only" if settings.home_read_only else "yes"
    name = settings.directory_name
    return f"""\
# greensite controller for site {settings.site_id}, written by `greensite service install`.
# Change the site file ({settings.site_file}) and run the install again rather than editing this file.
[Unit]
Description=greensite edge controller ({settings.site_id})
# Ordered after the network so MQTT can say "offline" before it goes at shutdown; the control loop does
# not wait for the network (no network-online.target): the site is controlled without MQTT.
After=network.target
# Never give up restarting: the devices hold their fallbacks meanwhile, and a controller that comes
# back (an adapter replugged, a disk freed) is worth more than a failed unit.
StartLimitIntervalSec=0

[Service]
Type=notify
# Only the controller's own process may say READY=1 / WATCHDOG=1.
NotifyAccess=main
ExecStart={_exec_start(settings)}
User={settings.user}
Group={settings.user}
{groups}# The control loop pings every tick; no ping for this long and systemd sends SIGABRT (faulthandler prints
# every thread's stack to the journal: where the loop was stuck), then restarts the service.
WatchdogSec={settings.watchdog_s}s
Restart=on-failure
RestartSec=5s
# Exit status 2 is a refused site file: restarting cannot fix it.
RestartPreventExitStatus=2
# The first start after an install or upgrade compiles the planner's kernels before READY=1 (13 s on
# the 2-core dev machine; allow for a slower board); later starts load them from the cache in < 1 s.
TimeoutStartSec=300s
# On SIGTERM the controller writes the safe setpoints and flushes its storage before exiting.
TimeoutStopSec=30s
# SIGTERM to the controller alone; anything it started is killed only if still there at the timeout.
KillMode=mixed
StateDirectory={name}
StateDirectoryMode=0750
CacheDirectory={name}
# Relative storage paths of the site file live in the state directory.
WorkingDirectory=%S/{name}
# numba caches compiled kernels next to their source by default, which this user may not write
# ("cannot cache function ...: no locator available"): the cache lives in the cache directory.
Environment=NUMBA_CACHE_DIR=%C/{name}/numba
Environment=PYTHONFAULTHANDLER=1
Environment=PYTHONUNBUFFERED=1
# A core dump of a process holding LLVM is hundreds of MB on an SD card; faulthandler's stack is enough.
LimitCORE=0
UMask=0027

# Hardening that leaves the serial ports alone:
#   PrivateDevices= would hide /dev/ttyUSB*; DevicePolicy=/DeviceAllow= resolve char-ttyUSB when the
#   unit starts, so an adapter whose driver loads later would be refused; ProtectClock= implies a
#   DeviceAllow= list that shuts out every other device on some systemd releases (systemd issue 18142);
#   MemoryDenyWriteExecute= forbids what numba does (load machine code into memory it wrote);
#   ProcSubset=pid hides /proc/cpuinfo, where LLVM looks up the CPU it compiles for on ARM boards.
NoNewPrivileges=yes
CapabilityBoundingSet=
ProtectSystem=strict
ProtectHome={home}
{writable}PrivateTmp=yes
PrivateMounts=yes
ProtectProc=invisible
RemoveIPC=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""
