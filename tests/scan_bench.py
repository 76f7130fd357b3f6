"""Wall time of `greensite scan` over units 1-40 at 9600 baud with the default timeout, against the
community centre's five devices (pymodbus over a socat pty pair): `python -m tests.scan_bench`.

A pty moves bytes at once, so the run also counts the bytes the peer received and sent and adds the
time they take on a real 9600 baud line (10 bits a character, 8N1): an upper estimate for a real bus
(a silent unit's wait already budgets the wire time of its probe, which is counted again here).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from config import BusProtocol, Parity
from firmware_bridge.scan import MODBUS_REPLY_TIMEOUT_S, ScanSettings, WorstCase, scan
from tests.nullmodem import SocatNullModem
from tests.scan_peers import COMMUNITY_CENTRE, pymodbus_bus

BAUD_RATE = 9600
GOAL_S = 30.0  # issue #18: scanning 1-40 within half a minute


async def _run(units: range, timeout_s: float) -> None:
    worst: list[WorstCase] = []
    devices = {unit: registers for unit, (_, registers) in COMMUNITY_CENTRE.items()}
    async with SocatNullModem() as cable, pymodbus_bus(cable.paths[0], devices, baud_rate=BAUD_RATE) as wire:
        settings = ScanSettings(cable.paths[1], BusProtocol.MODBUS_RTU, BAUD_RATE, Parity.NONE, 1, timeout_s)
        started = time.monotonic()
        result = await scan(settings, units=units, announce=worst.append)
        wall_s = time.monotonic() - started
    found = {d.address: d.identification.best if d.identification else None for d in result.present}
    right = all(found.get(unit) == model for unit, (model, _) in COMMUNITY_CENTRE.items())
    line_s = wire.wire_s(BAUD_RATE)
    estimate_s = wall_s + line_s
    out = sys.stdout.write
    out(f"units {units.start}-{units.stop - 1} at {BAUD_RATE} baud 8N1, {timeout_s:g} s reply timeout\n")
    out(f"found {sorted(found)} ({'every map right' if right else f'maps: {found}'}), {len(result.silent)} silent\n")
    out(f"wall time over the pty: {wall_s:.2f} s (scan's own count {result.elapsed_s:.2f} s)\n")
    out(f"bytes on the line: {wire.received} requests + {wire.sent} replies = {line_s:.2f} s at {BAUD_RATE} baud\n")
    out(f"on a real {BAUD_RATE} baud line: at most {estimate_s:.2f} s (goal < {GOAL_S:g} s)"
        f"; announced worst case {worst[0].if_none_answers_s:.1f} s if nothing answers,"
        f" {worst[0].per_answering_s:.1f} s more per unit that answers\n")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--last-unit", type=int, default=40)
    parser.add_argument("--timeout-s", type=float, default=MODBUS_REPLY_TIMEOUT_S)
    args = parser.parse_args()
    asyncio.run(_run(range(1, args.last_unit + 1), args.timeout_s))


if __name__ == "__main__":
    main()
