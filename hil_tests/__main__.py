"""`python -m hil_tests --report DIR [--short] [--link memory|pty] [--only NAME ...]`: run the scenario
matrix, write DIR/report.md (a table of every scenario), DIR/<scenario>.png and DIR/<scenario>.csv
(the run minute by minute; DIR/<scenario>.optimum.csv the perfect-foresight plan). Exit 1 if any scenario
failed."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from controller.logs import configure_logging
from firmware_bridge.simulator import Line
from hil_tests.harness import run_sync
from hil_tests.report import markdown, write_csv, write_png
from hil_tests.scenario import load_scenarios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hil_tests", description=__doc__)
    parser.add_argument("--report", type=Path, required=True, metavar="DIR")
    parser.add_argument("--short", action="store_true", help="the shortened runs of the default test suite")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these scenarios")
    parser.add_argument("--link", type=Line, choices=list(Line), default=Line.MEMORY,
                        help="what carries the bus bytes to the simulated devices (default: in-process)")  # fmt: skip
    args = parser.parse_args(argv)
    configure_logging("ERROR")
    scenarios = [s for s in load_scenarios() if not args.only or s.name in args.only]
    results = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="greensite-hil-") as work:
        for scenario in scenarios:
            result = run_sync(scenario, Path(work) / scenario.name, short=args.short, line=args.link)
            results.append(result)
            write_png(result, args.report / f"{scenario.name}.png")
            write_csv(result, args.report)
            verdict = "PASS" if result.passed else "FAIL " + "; ".join(result.failures)
            length_h = result.simulated_s / 3600
            sys.stdout.write(f"{scenario.name}: {verdict} ({length_h:.1f} h in {result.wall_s:.0f} s)\n")
            sys.stdout.flush()
    args.report.mkdir(parents=True, exist_ok=True)
    (args.report / "report.md").write_text(markdown(results))
    failed = sum(not r.passed for r in results)
    sys.stdout.write(f"{len(results) - failed} passed, {failed} failed in {time.perf_counter() - started:.0f} s"
                     f" over {args.link} links\nreport: {args.report / 'report.md'}\n")  # fmt: skip
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
