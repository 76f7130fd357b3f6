"""Lost updates between writers of the overrides file: `greensite config set` in another process and
the controller's MQTT command handler, both changing tuning at once, each its own field.

    python -m hil_tests.tuning_race --changes 1000      # counts: accepted, versions, lost updates

A change is lost when a later version no longer holds it though no later change touched it. Every
accepted change is in the audit log with its version and each field's value before it; replaying the
patches in version order must give, at every version, the "before" the next change saw, and at the
end the file. Any stale write-back shows up as a mismatch, counted as a lost update.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config import load_site
from controller.logs import configure_logging
from controller.tuning import TuningStore, merge_patch

__all__ = ["RaceCounts", "race"]

SCHOOL = Path(__file__).parents[1] / "config" / "sites" / "zhongshan_school.toml"
# Defaults of the two fields the writers change (the school's file sets neither).
DEFAULTS = {"battery.reserve_soc": 0.2, "grid.import_limit_kw": None}


def cli_value(index: int) -> float:
    return round(0.21 + (index % 50) / 1000, 3)  # reserve_soc 0.210..0.259, within the school's window


def mqtt_value(index: int) -> int:
    return 150 + index % 200  # import_limit_kw 150..349, below the 400 kW rating


def _cli_worker(folder: Path, changes: int) -> None:
    """Runs in its own process: `greensite config set` `changes` times, through the CLI's own code."""
    import contextlib
    import io
    import os

    from controller.cli import main

    os.chdir(folder)  # the school's storage paths are relative: var/...
    main(["--log-level", "ERROR", "config", "get", str(SCHOOL)])  # imports done: the race starts now
    sys.stdout.write("\nready\n")
    sys.stdout.flush()
    failures = 0
    for index in range(changes):
        patch = json.dumps({"battery": {"reserve_soc": cli_value(index)}})
        with contextlib.redirect_stdout(io.StringIO()):
            failures += main(["--log-level", "ERROR", "config", "set", str(SCHOOL), patch, "--by", "race"]) != 0
    sys.stdout.write(json.dumps({"failures": failures}) + "\n")


@dataclass
class RaceCounts:
    changes: int = 0
    accepted_cli: int = 0
    accepted_mqtt: int = 0
    versions: int = 0
    alternations: int = 0  # how often consecutive versions came from different writers
    lost_updates: int = 0
    seconds: float = 0.0


def _get(state: dict[str, Any], dotted: str) -> Any:
    section, name = dotted.split(".")
    return state.get(section, {}).get(name, DEFAULTS[dotted])


def check_audit(audit: list[dict[str, Any]], final: dict[str, Any]) -> tuple[int, int]:
    """(lost updates, alternations) from the audit log and the final overrides."""
    lost = 0
    state: dict[str, Any] = {}
    audit = sorted(audit, key=lambda entry: int(entry["version"]))
    for expected, entry in enumerate(audit, start=1):
        lost += int(entry["version"]) != expected  # a version twice: one write was based on a stale file
        for dotted, (before, _after) in entry["changes"].items():
            lost += dotted in DEFAULTS and before != _get(state, dotted)
        state = merge_patch(state, entry["patch"])
    lost += sum(_get(state, d) != _get(final, d) for d in DEFAULTS)
    alternations = sum(a["via"] != b["via"] for a, b in itertools.pairwise(audit))
    return lost, alternations


async def race(changes: int, folder: Path) -> RaceCounts:
    """`changes` in all, half from a shell process, half through the MQTT command handler."""
    from controller.clock import SimClock
    from controller.mqtt import MqttService
    from controller.runtime import Runtime
    from controller.simulation import simulated_site
    from hil_tests.tuning_fuzz import START, school_site

    counts = RaceCounts(changes=changes)
    per_writer = changes // 2
    site_from_file = load_site(SCHOOL, environment=False)
    tuning_path = folder / site_from_file.storage.resolved_tuning_path
    site = school_site(folder, remote_tuning=True)
    started = time.perf_counter()
    async with simulated_site(site, START, 1) as (plant, links, _sims):
        runtime = Runtime(site, clock=SimClock(START, None), links=links, line_timing=False, before_tick=plant.advance)
        store = TuningStore(site, tuning_path)
        service = MqttService(site, runtime, store, host="127.0.0.1", port=1)
        shell = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hil_tests.tuning_race", "--cli-worker", str(per_writer), "--folder", str(folder),
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert shell.stdout is not None
        while (await shell.stdout.readline()).strip() not in (b"ready", b""):
            pass
        for index in range(per_writer):
            command = {"correlation_id": f"race-{index}", "patch": {"grid": {"import_limit_kw": mqtt_value(index)}}}
            reply = await service.handle_command(json.dumps(command).encode())
            counts.accepted_mqtt += bool(reply["accepted"])
            if index % 10 == 0:
                await asyncio.to_thread(store.reload_if_changed)  # the follower, now and then
            await asyncio.sleep(0.01)  # about the shell's pace, so the writers interleave
        out, _ = await shell.communicate()
    counts.seconds = time.perf_counter() - started
    counts.accepted_cli = per_writer - int(json.loads(out.decode().strip().splitlines()[-1])["failures"])
    audit = [json.loads(line) for line in store.audit_path.read_text().splitlines()]
    final = json.loads(tuning_path.read_text())
    counts.versions = int(final["version"])
    counts.lost_updates, counts.alternations = check_audit(audit, final["tuning"])
    if len(audit) != counts.accepted_cli + counts.accepted_mqtt:
        counts.lost_updates += abs(len(audit) - counts.accepted_cli - counts.accepted_mqtt)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hil_tests.tuning_race", description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=1000)
    parser.add_argument("--cli-worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cli_worker is not None:
        _cli_worker(args.folder, args.cli_worker)
        return 0
    configure_logging("ERROR")  # each change is logged at WARNING: thousands of lines
    with tempfile.TemporaryDirectory() as folder:
        counts = asyncio.run(race(args.changes, Path(folder)))
    sys.stdout.write(
        f"{counts.changes} changes in {counts.seconds:.1f} s: accepted {counts.accepted_cli} from the shell and "
        f"{counts.accepted_mqtt} over MQTT; file at version {counts.versions}; writers alternated "
        f"{counts.alternations} times; lost updates {counts.lost_updates}\n"
    )
    ok = counts.lost_updates == 0 and counts.versions == counts.accepted_cli + counts.accepted_mqtt == counts.changes
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
