"""A commissioning rehearsal without hardware: the community centre's five devices served by an independent
peer (pymodbus over a socat pty cable, tests/plant_peer.py) until Ctrl-C, and a site file pointing at it.

    python -m tests.peer_bench --out /tmp/bench [--wiring correct|grid_reversed|swapped] [--car]

Then follow the README's "Commissioning a real site" with /tmp/bench/site.toml and the port it prints:
scan, check, check --step-test, run --observe, run. `--wiring` makes the mistakes a site has (the grid
meter's CT fitted backwards, the grid and PV meters swapped) for `check --step-test` to find.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

from config import load_site
from controller.commissioning.solar import is_night
from tests.plant_peer import Plant, PlantPeer, Wiring

EXAMPLE = Path(__file__).parents[1] / "config" / "sites" / "community_centre_export.toml"


def bench_site_text(port: str, out: Path) -> str:
    """The example site on the peer's port: a real (not simulated) bus, its storage in `out`."""
    text = EXAMPLE.read_text()
    text = text.replace('port = "/dev/ttyUSB0"', f'port = "{port}"', 1)
    text = text.replace("simulated = true", "simulated = false", 1)
    text = re.sub(r'(?m)^path = "var/[^"]*"$', f'path = "{out / "series.sqlite3"}"', text, count=1)
    return "# A rehearsal bench (python -m tests.peer_bench): the community centre on an independent peer.\n" + text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.peer_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("var/bench"), help="where site.toml is written")
    parser.add_argument("--wiring", choices=[w.value for w in Wiring], default=Wiring.CORRECT.value)
    parser.add_argument("--car", action="store_true", help="a car is connected at charger-1 (its step runs)")
    parser.add_argument("--pv-kw", type=float, help="PV the sun gives now (default: 60 kW by day, 0 at night)")
    args = parser.parse_args(argv)
    plant = Plant(wiring=Wiring(args.wiring), car_connected=args.car)
    site = load_site(EXAMPLE, environment=False).site
    if args.pv_kw is not None:
        plant.pv_available_kw = max(0.0, args.pv_kw)  # e.g. PV by night, to rehearse the PV step
    elif is_night(site.latitude_deg, site.longitude_deg, datetime.now(UTC)):
        plant.pv_available_kw = 0.0  # `check` knows when the sun is down at the site: so does the bench
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with PlantPeer(plant) as peer:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "site.toml"
        path.write_text(bench_site_text(peer.port, args.out.resolve()))
        sys.stdout.write(
            f"peer serving units 1, 2, 10, 20, 31 (wiring: {args.wiring}) on {peer.port}\n"
            f"PV now: {plant.pv_available_kw:.0f} kW (none while the sun is down at the site)\n"
            f"site file: {path}\n"
            f"  scripts/greensite scan --port {peer.port} --protocol modbus_rtu --units 1-40\n"
            f"  scripts/greensite check {path} --step-test --yes\n"
            f"  scripts/greensite run {path} --observe --no-mqtt --duration 1m\n"
            f"  scripts/greensite run {path} --no-mqtt --duration 1m\n"
            "Ctrl-C stops the peer.\n"
        )
        sys.stdout.flush()
        stop.wait()
    sys.stdout.write(f"the peer received {len(plant.writes)} write frames\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
