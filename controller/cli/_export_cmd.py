"""`greensite export CONFIG --csv OUT`: the stored time series as CSV."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from config import ConfigError, load_site
from controller.cli._command import EXIT_BAD_INPUT, EXIT_OK, Command, refusal
from controller.storage.atomic import write_atomic
from controller.storage.timeseries import TimeSeriesStore


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="site TOML file (for storage.path)")
    parser.add_argument("--csv", required=True, help="output file, or - for standard output")
    parser.add_argument("--store", help="SQLite file (default: storage.path of the site)")
    parser.add_argument("--since", type=datetime.fromisoformat, help="ISO time, inclusive")
    parser.add_argument("--until", type=datetime.fromisoformat, help="ISO time, exclusive")
    parser.add_argument("--series", default="%", help="SQL LIKE pattern, e.g. 'measured.%%'")


def _run(args: argparse.Namespace) -> int:
    try:
        site = load_site(args.config)
    except ConfigError as err:
        sys.stderr.write(refusal(args.config, err.errors))
        return EXIT_BAD_INPUT
    path = Path(args.store or site.storage.path)
    if not path.exists():
        sys.stderr.write(f"no time series at {path}: run the site first\n")
        return EXIT_BAD_INPUT
    store = TimeSeriesStore(path, site.storage.retention_days)
    since = args.since.timestamp() if args.since else None
    until = args.until.timestamp() if args.until else None
    try:
        if args.csv == "-":
            count = store.export_csv(sys.stdout, since, until, args.series)
        else:
            import io  # noqa: PLC0415

            buffer = io.StringIO()
            count = store.export_csv(buffer, since, until, args.series)
            write_atomic(Path(args.csv), buffer.getvalue().encode())  # never a half-written CSV
    finally:
        store.close()
    sys.stderr.write(f"{count} rows\n")
    return EXIT_OK


COMMAND = Command("export", "export the stored time series as CSV", _add_arguments, _run)
