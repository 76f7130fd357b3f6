"""`greensite config get|set SITE`: read or change the remote-tunable parameters from a shell.

`set` goes through the same validation, persistence and audit log as the MQTT command topic; a
running controller picks the change up from the overrides file within a few seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from config import ConfigError, load_site
from controller.cli._command import EXIT_BAD_INPUT, EXIT_OK, Command, refusal
from controller.state_directory import storage_in_state_directory
from controller.strict_json import JsonLimits, JsonRefused, decode_json
from controller.tuning import TuningStore, shell_identity

# A patch is a few hundred bytes; a huge one is a mistake. Same bounds as an MQTT command's.
PATCH_LIMITS = JsonLimits(max_bytes=65_536)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    get = sub.add_parser("get", help="print the effective [tuning] (site file + accepted patches) as JSON")
    get.add_argument("config", help="site TOML file")
    put = sub.add_parser("set", help="apply a JSON merge patch to [tuning]; null resets a field to the site file")
    put.add_argument("config", help="site TOML file")
    put.add_argument("patch", help='JSON, e.g. \'{"grid": {"import_limit_kw": 200}}\', or @FILE')
    put.add_argument("--by", default=None, help="on whose behalf, for the audit log (recorded as self-declared, "
                     "beside the OS account that ran the command)")  # fmt: skip
    put.add_argument("--base-version", type=int, default=None, metavar="N",
                     help="refuse unless the overrides are still at version N (from `config get`)")  # fmt: skip


def _patch(text: str) -> Any:
    """The patch argument (or @FILE), decoded with the same bounds and strictness as an MQTT command."""
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            with path.open("rb") as handle:
                raw = handle.read(PATCH_LIMITS.max_bytes + 1)
        except OSError as err:
            raise ConfigError(str(path), [f"cannot read file: {err.strerror}"]) from None
        source = str(path)
    else:
        # argv holds undecodable bytes as surrogates: back to the bytes, so UTF-8 is checked as for a file.
        raw, source = os.fsencode(text), "patch"
    try:
        return decode_json(raw, PATCH_LIMITS, what="patch")
    except JsonRefused as err:
        raise ConfigError(source, err.errors) from None


def _run(args: argparse.Namespace) -> int:
    try:
        # Under systemd (or with $STATE_DIRECTORY set as the service has it) relative storage resolves where
        # the service keeps it, so a shell's change reaches the running controller's overrides file.
        store = TuningStore(storage_in_state_directory(load_site(args.config)))
        if args.action == "get":
            sys.stdout.write(json.dumps(store.state(), indent=2) + "\n")
            return EXIT_OK
        result = store.apply(
            _patch(args.patch), by=shell_identity(), via="cli", verified=True,
            requested_by=args.by, base_version=args.base_version,
        )  # fmt: skip
    except ConfigError as err:
        sys.stderr.write(refusal(err.source, err.errors))
        return EXIT_BAD_INPUT
    if not result.accepted:
        sys.stderr.write(refusal("patch", [*result.errors, f"overrides version: {result.version}"]))
        return EXIT_BAD_INPUT
    sys.stdout.write(json.dumps({"saved_to": str(store.path), **result.to_json()}, indent=2) + "\n")
    return EXIT_OK


COMMAND = Command(
    "config", "read or change the tunable parameters (validated, persisted, logged)", _add_arguments, _run
)
