"""Virtual null-modem cables: two pty paths, bytes written to one come out of the other."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
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


# socat prints this (at -d -d) after it has opened both ptys and made their links: the cable is ready.
_SOCAT_READY = b"starting data transfer loop"
# socat starts in milliseconds; this only bounds a broken install, it is not waited for otherwise.
SOCAT_START_TIMEOUT_S = 5.0


class SocatNullModem:
    """The same cable made by socat, as on a bench: `socat pty,raw,echo=0,link=A pty,raw,echo=0,link=B`.

    An independent relay (not our event loop) between two ptys; the paths are symlinks in a temporary
    directory. socat is killed and the directory removed on exit. Ptys refuse even parity on this kernel:
    open both ends with parity N.
    """

    def __init__(self) -> None:
        self.paths: tuple[str, str] = ("", "")
        self._process: asyncio.subprocess.Process | None = None
        self._directory: tempfile.TemporaryDirectory[str] | None = None
        self._drain: asyncio.Task[bytes] | None = None

    async def __aenter__(self) -> SocatNullModem:
        socat = shutil.which("socat")
        if socat is None:
            raise RuntimeError("socat is not installed (scripts/test installs it: apt-get install socat)")
        self._directory = tempfile.TemporaryDirectory(prefix="greensite-socat-")
        ends = (os.path.join(self._directory.name, "a"), os.path.join(self._directory.name, "b"))
        self._process = await asyncio.create_subprocess_exec(
            socat, "-d", "-d", *(f"pty,raw,echo=0,link={end}" for end in ends),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self._process.stderr is not None
        log = b""
        try:
            async with asyncio.timeout(SOCAT_START_TIMEOUT_S):
                while _SOCAT_READY not in log:
                    line = await self._process.stderr.readline()
                    if not line:
                        raise RuntimeError(f"socat exited before the cable was ready: {log.decode(errors='replace')}")
                    log += line
        except BaseException:
            await self._stop()
            raise
        # socat logs again on exit (and on errors): keep reading so a full pipe never blocks it.
        self._drain = asyncio.create_task(self._process.stderr.read(), name="socat-stderr")
        self.paths = ends
        return self

    async def _stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout=2.0)
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._drain is not None:
            await self._drain
            self._drain = None
        if self._directory is not None:
            self._directory.cleanup()
            self._directory = None

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stop()
