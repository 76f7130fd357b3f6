"""The simulated run's event loop: socket polls spaced while work is ready, never a lost event or a stalled wait."""

from __future__ import annotations

import asyncio
import selectors
import socket
import time

import pytest

from controller import sim_loop


def test_ready_work_polls_the_os_at_most_every_idle_poll_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    parent: type[selectors.BaseSelector] = sim_loop._SpacedPolls.__mro__[1]  # the platform's selector
    real = parent.select
    polls: list[float | None] = []

    def counted(self: selectors.BaseSelector, timeout: float | None = None) -> object:
        polls.append(timeout)
        return real(self, timeout)

    monkeypatch.setattr(parent, "select", counted)
    selector = sim_loop._SpacedPolls()
    try:
        began, turns = time.monotonic(), 0
        while time.monotonic() - began < 0.02:
            assert selector.select(0) == []  # nothing registered: nothing to report either way
            turns += 1
        assert turns > 100
        assert 1 <= len(polls) <= 0.02 / sim_loop.IDLE_POLL_S + 2
        selector.select(0.001)  # a wait is never skipped
        assert polls[-1] == 0.001
    finally:
        selector.close()


def test_socket_bytes_arrive_while_the_loop_is_busy_and_while_it_waits() -> None:
    async def main() -> tuple[bytes, bytes, int]:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        busy_turns = 0
        stop = asyncio.Event()

        async def busy() -> None:  # always ready: the loop never blocks while it runs
            nonlocal busy_turns
            while not stop.is_set():
                busy_turns += 1
                await asyncio.sleep(0)

        spinner = asyncio.create_task(busy())
        b.send(b"while busy")
        first = await asyncio.wait_for(loop.sock_recv(a, 100), 1.0)
        stop.set()
        await spinner
        loop.call_later(0.01, b.send, b"while idle")  # nothing ready: the loop blocks in the OS and wakes
        second = await asyncio.wait_for(loop.sock_recv(a, 100), 1.0)
        a.close()
        b.close()
        return first, second, busy_turns

    with asyncio.Runner(loop_factory=sim_loop.new_event_loop) as runner:
        first, second, turns = runner.run(main())
    assert (first, second) == (b"while busy", b"while idle")
    assert turns > 0
