"""`greensite service install SITE [--user NAME] [--simulate] [--dry-run]`: run a site as a systemd service.

Writes /etc/systemd/system/greensite-<site id>.service (controller/service_unit.py says what is in it and
why), copies the site file to /etc/greensite/<site id>.toml, creates the service's system user when it
does not exist, and prints the systemctl commands that start it. --dry-run prints the unit and changes
nothing.
"""

from __future__ import annotations

import argparse
import grp
import importlib.util
import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path

from config import ConfigError, SiteConfig, load_site
from controller.cli._command import EXIT_BAD_INPUT, EXIT_OK, EXIT_RUNTIME, Command, refusal
from controller.service_unit import STATE_DIRECTORY_NAME, UnitSettings, render_unit, unit_name, watchdog_s_for
from controller.storage.atomic import write_atomic
from firmware_bridge.maps import check_site_devices

__all__ = ["COMMAND", "unreachable_for"]

SERIAL_GROUP = "dialout"
STATE_ROOT = Path("/var/lib") / STATE_DIRECTORY_NAME
# Directories that ProtectHome=yes hides from the service.
HOME_ROOTS = (Path("/home"), Path("/root"), Path("/run/user"))
USERADD_TIMEOUT_S = 30.0  # useradd only edits /etc/passwd and friends; longer means it waits on a lock


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="service_action", required=True, metavar="ACTION")
    install = actions.add_parser("install", help="write the systemd unit and copy the site file",
                                 description="write the systemd unit and copy the site file")  # fmt: skip
    install.add_argument("site", help="site TOML file")
    install.add_argument("--user", default="greensite", help="system user the service runs as (created if missing)")
    install.add_argument("--simulate", action="store_true", help="serve the buses from simulated meters (a demo)")
    install.add_argument("--dry-run", action="store_true", help="print the unit; write and create nothing")
    install.add_argument("--unit-dir", type=Path, default=Path("/etc/systemd/system"), help=argparse.SUPPRESS)
    install.add_argument("--config-dir", type=Path, default=Path("/etc/greensite"), help=argparse.SUPPRESS)


def _site_problems(args: argparse.Namespace) -> tuple[SiteConfig | None, list[str]]:
    """The site file alone (the service's environment is not this shell's), as `greensite run` takes it."""
    try:
        site = load_site(args.site, environment=False)
        problems = check_site_devices(site)
    except ConfigError as err:
        return None, err.errors
    simulated = [bus.name for bus in site.buses if bus.simulated]
    if simulated and not args.simulate:
        problems.append(f"buses {', '.join(simulated)} are simulated: add --simulate (a demo service)")
    tls = site.mqtt.tls
    for field in ("ca_file", "cert_file", "key_file"):
        name = None if tls is None else getattr(tls, field)
        if name is not None and not Path(name).is_absolute():
            problems.append(f"mqtt.tls.{field}: {name}: give an absolute path (the service runs in its state dir)")
    return site, problems


def _cli_command() -> tuple[str, ...]:
    """This installation's `greensite` (the venv's script next to its python; no symlink resolved, the
    venv is the symlink), or its python running the CLI module."""
    script = Path(sys.executable).absolute().parent / "greensite"
    if script.is_file() and os.access(script, os.X_OK):
        return (str(script),)
    return (str(Path(sys.executable).absolute()), "-m", "controller.cli")


def _code_paths() -> list[Path]:
    """What the service user must be able to read: the interpreter, our packages, numba."""
    paths = [Path(os.path.realpath(sys.executable)), Path(__file__).resolve().parents[1]]
    numba = importlib.util.find_spec("numba")
    if numba is not None and numba.origin is not None:
        paths.append(Path(numba.origin).resolve().parent)
    return paths


def _writable_paths(site: SiteConfig) -> tuple[str, ...]:
    """Directories of absolute storage paths outside the state directory (ProtectSystem=strict)."""
    folders: list[str] = []
    for name in (site.storage.path, site.storage.resolved_tuning_path):
        path = Path(name)
        if path.is_absolute() and not path.parent.is_relative_to(STATE_ROOT):
            folder = str(path.parent)
            if folder not in folders:
                folders.append(folder)
    return tuple(folders)


def unreachable_for(path: Path, uid: int, gids: set[int]) -> Path | None:
    """The first of `path` and its parents that user `uid` (in groups `gids`) may not enter or read."""
    if uid == 0:
        return None
    chain = [*reversed(path.parents), path]
    for index, item in enumerate(chain):
        try:
            info = item.stat()
        except OSError:
            return item
        if info.st_uid == uid:
            bits = (info.st_mode >> 6) & 7
        elif info.st_gid in gids:
            bits = (info.st_mode >> 3) & 7
        else:
            bits = info.st_mode & 7
        last = index == len(chain) - 1
        needed = 4 if last and not stat.S_ISDIR(info.st_mode) else 1  # read the file; enter a directory
        if bits & needed != needed:
            return item
    return None


def _settings(site: SiteConfig, args: argparse.Namespace) -> UnitSettings:
    under_home = any(path.is_relative_to(root) for path in _code_paths() for root in HOME_ROOTS)
    try:
        grp.getgrnam(SERIAL_GROUP)
        serial_group: str | None = SERIAL_GROUP
    except KeyError:
        serial_group = None
        sys.stderr.write(f"no group {SERIAL_GROUP} here: give the service user access to the serial ports\n")
    return UnitSettings(
        site_id=site.site.id,
        site_file=(args.config_dir / f"{site.site.id}.toml").absolute(),
        command=_cli_command(),
        user=args.user,
        watchdog_s=watchdog_s_for(site.control.tick_period_s),
        simulate=args.simulate,
        serial_group=serial_group,
        home_read_only=under_home,
        writable_paths=_writable_paths(site),
    )


def _ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    # A system account with its own group, no home and no login: it only runs the service.
    subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", "--comment", "greensite controller", name],
        check=True, timeout=USERADD_TIMEOUT_S,
    )  # fmt: skip
    sys.stdout.write(f"created system user {name}\n")
    return pwd.getpwnam(name)


def _install(site: SiteConfig, settings: UnitSettings, args: argparse.Namespace) -> int:
    user = _ensure_user(args.user)
    gids = {user.pw_gid, *(group.gr_gid for group in grp.getgrall() if args.user in group.gr_mem)}
    if settings.serial_group is not None:
        gids.add(grp.getgrnam(settings.serial_group).gr_gid)  # SupplementaryGroups= adds it at start
    blocked = [(path, where) for path in _code_paths() if (where := unreachable_for(path, user.pw_uid, gids))]
    if blocked:
        lines = [f"{path}: {args.user} cannot reach {where}" for path, where in blocked]
        lines.append("install greensite where the service user can read it (e.g. a venv of /usr/bin/python3 in /opt)")
        sys.stderr.write(refusal("service install", lines))
        return EXIT_RUNTIME
    site_copy = settings.site_file
    write_atomic(site_copy, Path(args.site).read_bytes())
    # The site file may hold a broker password: readable by the service's group, not by everyone.
    os.chmod(site_copy, 0o640)
    if os.geteuid() == 0:
        os.chown(site_copy, 0, user.pw_gid)
    unit_path = args.unit_dir / unit_name(site.site.id)
    write_atomic(unit_path, render_unit(settings).encode())
    os.chmod(unit_path, 0o644)
    name = unit_name(site.site.id)
    sys.stdout.write(
        f"site file: {site_copy}\nunit: {unit_path}\nnow run:\n"
        f"  systemctl daemon-reload\n  systemctl enable --now {name}\n"
        f"  systemctl status {name}        # state, and the controller's status line\n"
        f"  journalctl -u {name} -f -o cat # its log, one JSON object per line\n"
    )
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    site, problems = _site_problems(args)
    if site is None or problems:
        sys.stderr.write(refusal(args.site, problems))
        return EXIT_BAD_INPUT
    settings = _settings(site, args)
    if args.dry_run:
        sys.stdout.write(render_unit(settings))
        return EXIT_OK
    try:
        return _install(site, settings, args)
    except (OSError, subprocess.SubprocessError) as err:
        sys.stderr.write(f"service install: {err}\n")
        return EXIT_RUNTIME


COMMAND = Command("service", "install the site as a systemd service (greensite service install SITE)",
                  _add_arguments, _run)  # fmt: skip
