"""`greensite plan SCENARIO.json [--json] [--plot out.png]`: plan a scenario file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from controller.cli._command import EXIT_BAD_INPUT, EXIT_OK, EXIT_RUNTIME, Command, refusal


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", type=Path, help="scenario JSON (see config/scenarios/)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="draw the plan (needs matplotlib: the 'plot' extra)")


def _run(args: argparse.Namespace) -> int:
    # Imported here so that `greensite validate` does not load numba.
    from optimiser import ScenarioError, load_scenario, solve  # noqa: PLC0415

    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as err:
        sys.stderr.write(refusal(err.source, err.errors))
        return EXIT_BAD_INPUT
    plan = solve(scenario)
    if args.json:
        sys.stdout.write(json.dumps(plan.to_json(), indent=1) + "\n")
    else:
        from controller.plan_view import plan_table  # noqa: PLC0415

        sys.stdout.write(plan_table(scenario, plan))
    if args.plot is not None:
        try:
            from controller.plan_view import plot_plan  # noqa: PLC0415

            plot_plan(scenario, plan, args.plot)
        except ImportError as err:
            sys.stderr.write(f"--plot needs matplotlib (pip install 'greensite[plot]'): {err}\n")
            return EXIT_RUNTIME
    return EXIT_OK


COMMAND = Command("plan", "plan battery, EV charging and curtailment for a scenario file", _add_arguments, _run)
