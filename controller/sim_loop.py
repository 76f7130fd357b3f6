"""The event loop of a simulated run at full speed: the OS is asked for socket events at most every
IDLE_POLL_S while there is work ready, instead of on every loop turn.

At `--speed max` over the in-process link a loop turn takes a few microseconds (a reply from a simulated
device is one turn) and asyncio asks epoll for socket events on every one: some 9 system calls a
simulated second, ~8 % of the run. Nothing the simulation does waits on a socket (the link's replies,
the timers and the tasks are the loop's own), so only MQTT and the web pages see the difference: their
bytes are noticed up to IDLE_POLL_S later. A loop with nothing ready still blocks in epoll as usual, and
every turn is still a turn (the buses interleave as before).
"""

from __future__ import annotations

import asyncio
import selectors
import time

__all__ = ["IDLE_POLL_S", "new_event_loop"]

# How stale socket events may be while the simulation has work ready: far below anything a person or an
# MQTT client notices, far above a loop turn.
IDLE_POLL_S = 0.001


class _SpacedPolls(selectors.DefaultSelector):
    """A selector whose non-blocking polls (timeout 0: the loop has work ready) are spaced IDLE_POLL_S apart."""

    def __init__(self) -> None:
        super().__init__()
        self._next_poll = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:
            now = time.monotonic()
            if now < self._next_poll:
                return []
            self._next_poll = now + IDLE_POLL_S
        return super().select(timeout)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """An asyncio loop for a simulated run at full speed over the in-process link (see the module)."""
    return asyncio.SelectorEventLoop(_SpacedPolls())
