"""`greensite` command line: one module per subcommand, registered in COMMANDS."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from controller.cli import (
    _check_cmd,
    _config_cmd,
    _export_cmd,
    _frame_cmd,
    _plan_cmd,
    _run_cmd,
    _scan_cmd,
    _schema_cmd,
    _service_cmd,
    _validate_cmd,
    _web_cmd,
)
from controller.cli._command import Command
from controller.logs import configure_logging

__all__ = ["COMMANDS", "main"]

# Add a subcommand by writing a module with a `COMMAND` and listing it here.
COMMANDS: tuple[Command, ...] = (
    _validate_cmd.COMMAND,
    _schema_cmd.COMMAND,
    _frame_cmd.COMMAND,
    _plan_cmd.COMMAND,
    _run_cmd.COMMAND,
    _export_cmd.COMMAND,
    _config_cmd.COMMAND,
    _service_cmd.COMMAND,
    _check_cmd.COMMAND,
    _scan_cmd.COMMAND,
    _web_cmd.COMMAND,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="greensite", description="Edge controller for green-building sites")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command_parser = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(command_parser)
        command_parser.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, json_lines=args.log_json)
    try:
        code: int = args._run(args)
    except KeyboardInterrupt:
        logging.getLogger("greensite").warning("interrupted")
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
