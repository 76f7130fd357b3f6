"""Review (issue 17): the "linear scan" of controller/strict_json.py is quadratic on unterminated strings.

EXPECTED TO FAIL until fixed. `_STRING.sub` retries the string pattern at every quote; when no quote
closes (every later quote escaped), each attempt scans to the end of the payload: O(n^2) in C with the
GIL held, on the event loop (MqttService._command calls decode_json before any other check, with
remote tuning on or off). 16 kB (the default max_payload_bytes) costs ~0.7 s on the 2-core box, 64 kB
(the overrides file cap, and a valid max_payload_bytes) ~11 s; the README says "under 1.5 ms for 16 kB".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.strict_json import JsonLimits, JsonRefused, decode_json
from tests.test_tuning_strict import _Controller, _controller

CAP = 16_384
HOSTILE = {
    "escaped quotes after an open quote": (b'"' + b'\\"' * CAP)[:CAP],
    "quote-backslash pairs": (b'"\\' * CAP)[:CAP],
    "inside a command": (b'{"correlation_id": "x", "patch": "' + b'\\"' * CAP)[:CAP],
}

# Found by review (2026-12-03): the string scan was quadratic on unterminated strings; fixed.


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_review_a_16kb_unterminated_string_scans_in_milliseconds(name: str) -> None:
    started = time.perf_counter()
    with pytest.raises(JsonRefused):
        decode_json(HOSTILE[name], JsonLimits(max_bytes=CAP))
    elapsed_ms = (time.perf_counter() - started) * 1000
    assert elapsed_ms < 50, f"{name}: {elapsed_ms:.0f} ms for {CAP} bytes (README: under 1.5 ms)"


@pytest.fixture
async def tuning_off(tmp_path: Path) -> AsyncIterator[_Controller]:
    async for c in _controller(tmp_path, remote_tuning=False):
        yield c


async def test_review_a_hostile_command_does_not_stall_the_event_loop(tuning_off: _Controller) -> None:
    """With remote tuning OFF, five such commands (80 kB on the wire) hold the event loop that runs the
    control tick: the largest gap seen by a 10 ms ticker beside them must stay well under a tick."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    for _ in range(5):
        reply = await tuning_off.service.handle_command(HOSTILE["inside a command"])
        assert reply["accepted"] is False
        await asyncio.sleep(0)
    done.set()
    await task
    assert max(gaps) < 0.2, f"event loop stalled {max(gaps) * 1000:.0f} ms by five 16 kB commands (about 0.4 s each)"
