"""`greensite config get|set SITE`: read or change the remote-tunable parameters from a shell.

`set` goes through the same validation, persistence and audit log as the MQTT command topic; a
running controller picks the change up from the overrides file within a few seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from config import ConfigError, load_site
from controller.cli._command import EXIT_BAD_INPUT, EXIT_OK, Command, refusal
from controller.tuning import TuningStore, shell_identity

# A patch from a file is a few hundred bytes; a huge file is a mistake.
MAX_PATCH_FILE_BYTES = 65_536


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    get = sub.add_parser("get", help="print the effective [tuning] (site file + accepted patches) as JSON")
    get.add_argument("config", help="site TOML file")
    put = sub.add_parser("set", help="apply a JSON merge patch to [tuning]; null resets a field to the site file")
    put.add_argument("config", help="site TOML file")
    put.add_argument("patch", help='JSON, e.g. \'{"grid": {"import_limit_kw": 200}}\', or @FILE')
    put.add_argument("--by", default=None, help="who is changing it, for the audit log (default cli:user@host)")


def _patch(text: str) -> Any:
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise ConfigError(str(path), [f"cannot read file: {err.strerror}"]) from None
        if len(raw) > MAX_PATCH_FILE_BYTES:
            raise ConfigError(str(path), [f"file is {len(raw)} bytes, more than {MAX_PATCH_FILE_BYTES}"])
        text, source = raw.decode("utf-8", errors="replace"), str(path)
    else:
        source = "patch"
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(source, [f"not JSON at byte offset {err.pos}: {err.msg}"]) from None


def _run(args: argparse.Namespace) -> int:
    try:
        store = TuningStore(load_site(args.config))
        if args.action == "get":
            sys.stdout.write(json.dumps(store.state(), indent=2) + "\n")
            return EXIT_OK
        result = store.apply(_patch(args.patch), by=f"cli:{args.by}" if args.by else shell_identity(), via="cli")
    except ConfigError as err:
        sys.stderr.write(refusal(err.source, err.errors))
        return EXIT_BAD_INPUT
    if not result.accepted:
        sys.stderr.write(refusal("patch", result.errors))
        return EXIT_BAD_INPUT
    sys.stdout.write(json.dumps({"saved_to": str(store.path), **result.to_json()}, indent=2) + "\n")
    return EXIT_OK


COMMAND = Command(
    "config", "read or change the tunable parameters (validated, persisted, logged)", _add_arguments, _run
)
