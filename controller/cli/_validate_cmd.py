"""`greensite validate FILE...`: check site files and list every problem by field path."""

from __future__ import annotations

import argparse
import sys

from config import ConfigError, load_site
from config._preflight import preflight
from controller.cli._command import EXIT_BAD_INPUT, EXIT_OK, Command
from firmware_bridge.maps import check_site_devices, device_questions


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="site TOML files")
    parser.add_argument("--no-env", action="store_true",
                        help="the file alone: ignore GREENSITE_* environment overrides, skip checks of this machine "
                             "(TLS files readable, storage writable)")  # fmt: skip


def _run(args: argparse.Namespace) -> int:
    failed = 0
    for name in args.files:
        try:
            site = load_site(name, environment=not args.no_env)
            # Register maps live in firmware_bridge; a model the bridge cannot drive is a site error.
            problems = check_site_devices(site)
            # What the site needs of this machine at start (TLS files, storage); the file alone with --no-env.
            problems += preflight(site, machine=not args.no_env)
        except ConfigError as err:
            problems = err.errors
        if problems:
            failed += 1
            sys.stdout.write(f"{name}: INVALID ({len(problems)} problem{'s' if len(problems) > 1 else ''})\n")
            for line in problems:
                sys.stdout.write(f"  - {line}\n")
        else:
            sys.stdout.write(f"{name}: ok ({site.site.id}, {len(site.devices())} devices)\n")
            # Valid, but perhaps not what the site is: asked, not refused (the exit status stays 0).
            for line in device_questions(site):
                sys.stdout.write(f"  ? {line}\n")
    return EXIT_BAD_INPUT if failed else EXIT_OK


COMMAND = Command("validate", "check site files; every error is listed by field path", _add_arguments, _run)
