"""`greensite web password SITE [--user NAME] [--password-stdin]`: set a password for the dashboard.

The hash (scrypt, salted) goes to `<storage stem>.web-users.json` (mode 0600) next to the time series; a
running controller reads the file again when it changes, so no restart is needed.
"""

from __future__ import annotations

import argparse
import getpass
import re
import sys

from config import ConfigError, load_site
from controller.cli._command import EXIT_BAD_INPUT, EXIT_OK, Command, refusal
from controller.state_directory import storage_in_state_directory
from controller.web.auth import DEFAULT_USER, MAX_PASSWORD_CHARS, MIN_PASSWORD_CHARS, PasswordFile, password_path

_USER = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    password = sub.add_parser("password", help="set (or change) a dashboard password; prompts twice")
    password.add_argument("config", help="site TOML file")
    password.add_argument("--user", default=DEFAULT_USER, help=f"account name (default {DEFAULT_USER})")
    password.add_argument("--password-stdin", action="store_true",
                          help="read the password from the first line of standard input (no prompt)")  # fmt: skip


def _read_password(args: argparse.Namespace) -> str | None:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass(f"new password for {args.user}: ")
    if getpass.getpass("again: ") != first:
        sys.stderr.write("the two passwords differ; nothing changed\n")
        return None
    return first


def _run(args: argparse.Namespace) -> int:
    try:
        site = storage_in_state_directory(load_site(args.config))
    except ConfigError as err:
        sys.stderr.write(refusal(err.source, err.errors))
        return EXIT_BAD_INPUT
    if not _USER.fullmatch(args.user):
        sys.stderr.write("--user: 1 to 64 of A-Z a-z 0-9 _ . @ -\n")
        return EXIT_BAD_INPUT
    password = _read_password(args)
    if password is None:
        return EXIT_BAD_INPUT
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        sys.stderr.write(f"password: {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters; nothing changed\n")
        return EXIT_BAD_INPUT
    path = password_path(site.storage.path)
    try:
        PasswordFile(path).set_password(args.user, password)
    except OSError as err:
        sys.stderr.write(f"{path}: cannot write: {err.strerror}; nothing changed\n")
        return 1
    sys.stdout.write(f"password for {args.user} saved to {path} (mode 0600)\n")
    return EXIT_OK


COMMAND = Command("web", "the web dashboard: set its password", _add_arguments, _run)
