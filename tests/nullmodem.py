"""A virtual null-modem cable: two pty paths, bytes written to one come out of the other."""

from __future__ import annotations

import asyncio
import contextlib
import os
import termios
import tty
from types import TracebackType


class NullModem:
    """Both ends are pty slaves with paths, so two programs that open ports by name can talk."""

    def __init__(self) -> None:
        self._fds: list[tuple[int, int]] = []
        self.paths: tuple[str, str] = ("", "")

    async def __aenter__(self) -> NullModem:
        loop = asyncio.get_running_loop()
        for _ in range(2):
            master, slave = os.openpty()
            tty.setraw(slave, termios.TCSANOW)
            os.set_blocking(master, False)
            self._fds.append((master, slave))
        (m1, s1), (m2, s2) = self._fds
        self.paths = (os.ttyname(s1), os.ttyname(s2))
        loop.add_reader(m1, self._relay, m1, m2)
        loop.add_reader(m2, self._relay, m2, m1)
        return self

    @staticmethod
    def _relay(source: int, target: int) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            data = os.read(source, 4096)
            os.write(target, data)

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        loop = asyncio.get_running_loop()
        for master, slave in self._fds:
            loop.remove_reader(master)
            os.close(master)
            os.close(slave)
