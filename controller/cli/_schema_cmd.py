"""`greensite schema`: the JSON Schema of the site file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from config import SiteConfig
from controller.cli._command import EXIT_OK, Command
from controller.storage.atomic import write_atomic

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config" / "site.schema.json"


def site_schema_text() -> str:
    schema = SiteConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "greensite site file"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--write",
        type=Path,
        nargs="?",
        const=SCHEMA_PATH,
        default=None,
        help=f"also write it to a file (default {SCHEMA_PATH.name} in config/)",
    )


def _run(args: argparse.Namespace) -> int:
    text = site_schema_text()
    sys.stdout.write(text)
    if args.write is not None:
        write_atomic(args.write, text.encode())
    return EXIT_OK


COMMAND = Command("schema", "print the JSON Schema of the site file", _add_arguments, _run)
