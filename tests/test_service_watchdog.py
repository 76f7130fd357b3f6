"""A stuck loop gets restarted: a control loop that stops pinging is aborted (with its stack in its log)
and started again, while one that keeps pinging is left alone.

systemd's part is played by this test (`ServiceManagerStandIn`), so it runs on every machine;
`test_service_systemd.py` shows the same with a real systemd where root and namespaces allow. The
stand-in does what systemd does for our unit's settings (Type=notify, NotifyAccess=main,
WatchdogSec=, WatchdogSignal=SIGABRT, Restart=on-failure; service.c arms the watchdog at READY=1),
over a real notify socket, with real processes running the real notifier.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid

WATCHDOG_S = 1.0  # WatchdogSec= of the test service: short, so the test takes seconds
RESTART_S = 0.2  # RestartSec=
START_TIMEOUT_S = 30.0  # TimeoutStartSec=: a Python start on a loaded 2-core machine, with a wide margin
ABORT_TIMEOUT_S = 10.0  # TimeoutAbortSec=: faulthandler writes a few stacks, then the process dies
STOP_TIMEOUT_S = 10.0  # TimeoutStopSec=
TICK_S = 0.05  # the child's control-loop period

# The service: a control loop that calls the notifier every tick, as the runtime does. HANG_AT_TICK
# makes that tick deadlock (a lock taken twice), as a loop stuck on a lock or a blocking call would.
CHILD = f"""
import os, signal, sys, threading, time
sys.path.insert(0, {str(ROOT)!r})
from controller.service_notify import SystemdNotifier

notifier = SystemdNotifier()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
hang_at = int(os.environ["HANG_AT_TICK"])

def tick_that_never_ends():
    lock = threading.Lock()
    lock.acquire()
    lock.acquire()

notifier.ready("ticking")
tick = 0
while not stop.is_set():
    tick += 1
    if tick == hang_at:
        tick_that_never_ends()
    notifier.watchdog(f"tick {{tick}}")
    stop.wait({TICK_S})
notifier.stopping()
"""


@dataclass
class Run:
    """One start of the service, as the stand-in saw it."""

    process: subprocess.Popen[bytes]
    log: Path
    ready_after_s: float | None = None
    pings: int = 0
    statuses: list[str] = field(default_factory=list)
    stopping: bool = False
    ended_by: str = ""  # "watchdog", "exit"
    returncode: int | None = None


class ServiceManagerStandIn:
    """systemd's role for one Type=notify service with WatchdogSec=, played by the test."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.address = str(folder / "notify")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.socket.bind(self.address)
        self.runs: list[Run] = []

    def start(self, hang_at_tick: int) -> Run:
        log = self.folder / f"run{len(self.runs) + 1}.log"
        env = {
            **os.environ,
            "NOTIFY_SOCKET": self.address,
            "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6)),
            "PYTHONFAULTHANDLER": "1",  # as the unit sets it
            "HANG_AT_TICK": str(hang_at_tick),
        }
        # systemd sets WATCHDOG_PID to the main process's pid; exec keeps the shell's pid.
        argv = ["sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", sys.executable, "-c", CHILD]
        with log.open("wb") as stderr:
            process = subprocess.Popen(argv, env=env, stderr=stderr)
        run = Run(process, log)
        self.runs.append(run)
        return run

    def _receive(self, run: Run, timeout_s: float) -> str | None:
        """One notification from the main process within `timeout_s` (others are dropped: NotifyAccess=main)."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = max(0.0, deadline - time.monotonic())
            if not select.select([self.socket], [], [], left)[0]:
                return None
            payload, ancillary, _flags, _address = self.socket.recvmsg(4096, socket.CMSG_SPACE(CREDENTIALS.size))
            pid = next(
                CREDENTIALS.unpack(data[: CREDENTIALS.size])[0]
                for level, kind, data in ancillary
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
            )
            if pid == run.process.pid:
                return payload.decode()

    def _note(self, run: Run, message: str) -> None:
        for line in message.split("\n"):
            key, _, value = line.partition("=")
            if key == "WATCHDOG" and value == "1":
                run.pings += 1
            elif key == "STATUS":
                run.statuses.append(value)
            elif key == "STOPPING" and value == "1":
                run.stopping = True

    def wait_ready(self, run: Run) -> None:
        started = time.monotonic()
        deadline = started + START_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            message = self._receive(run, left)
            if message is None:
                break
            self._note(run, message)
            if "READY=1" in message.split("\n"):
                run.ready_after_s = time.monotonic() - started
                return
        pytest.fail(f"no READY=1 within {START_TIMEOUT_S} s: {run.log.read_text()}")

    def watch(self, run: Run, for_s: float) -> None:
        """Keep the service for `for_s` s, or until its watchdog fires (then abort it, as systemd does)."""
        end = time.monotonic() + for_s
        last_ping = time.monotonic()  # armed at READY=1
        while (now := time.monotonic()) < end:
            if run.process.poll() is not None:
                run.ended_by, run.returncode = "exit", run.process.returncode
                return
            message = self._receive(run, min(end, last_ping + WATCHDOG_S) - now)
            if message is not None:
                self._note(run, message)
                if "WATCHDOG=1" in message.split("\n"):
                    last_ping = time.monotonic()
            elif time.monotonic() >= last_ping + WATCHDOG_S:
                run.ended_by = "watchdog"
                run.process.send_signal(signal.SIGABRT)  # WatchdogSignal= default
                try:
                    run.returncode = run.process.wait(ABORT_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    run.process.kill()
                    run.returncode = run.process.wait()
                return

    def stop(self, run: Run) -> None:
        run.process.send_signal(signal.SIGTERM)
        try:
            run.returncode = run.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            run.process.kill()
            run.returncode = run.process.wait()
        while (message := self._receive(run, 0.0)) is not None:
            self._note(run, message)
        run.ended_by = "stop"

    @staticmethod
    def restarts(run: Run) -> bool:
        """Restart=on-failure: an unclean exit code, a signal other than the clean ones, or a watchdog."""
        clean = run.returncode in {0, -signal.SIGTERM, -signal.SIGHUP, -signal.SIGINT, -signal.SIGPIPE}
        return run.ended_by == "watchdog" or not clean

    def close(self) -> None:
        for run in self.runs:
            if run.process.poll() is None:
                run.process.kill()
                run.process.wait()
        self.socket.close()


@pytest.fixture
def manager() -> Iterator[ServiceManagerStandIn]:
    folder = Path(tempfile.mkdtemp(prefix="gs-wd-"))  # AF_UNIX paths are limited to 108 bytes
    stand_in = ServiceManagerStandIn(folder)
    yield stand_in
    stand_in.close()
    shutil.rmtree(folder)


def test_a_stuck_loop_is_aborted_with_its_stack_and_restarted(manager: ServiceManagerStandIn) -> None:
    first = manager.start(hang_at_tick=20)  # one second of ticks, then stuck
    manager.wait_ready(first)
    manager.watch(first, for_s=START_TIMEOUT_S)
    assert first.ended_by == "watchdog"
    assert first.pings >= 2  # it was alive, pinging, before it got stuck
    assert first.statuses[-1].startswith("tick ")
    assert first.returncode == -signal.SIGABRT  # SIGABRT did it; no SIGKILL was needed
    log = first.log.read_text()
    assert "Fatal Python error: Aborted" in log
    assert "tick_that_never_ends" in log  # where the loop was stuck, in the journal

    assert manager.restarts(first)
    time.sleep(RESTART_S)  # RestartSec= (the stand-in's delay, not a wait for an event)
    second = manager.start(hang_at_tick=0)
    manager.wait_ready(second)
    manager.watch(second, for_s=3 * WATCHDOG_S)  # three watchdog periods: pings keep it alive
    assert second.ended_by == ""
    assert second.pings >= 3
    manager.stop(second)
    assert second.returncode == 0
    assert second.stopping
    assert not manager.restarts(second)


def test_a_loop_that_keeps_ticking_is_never_restarted(manager: ServiceManagerStandIn) -> None:
    run = manager.start(hang_at_tick=0)
    manager.wait_ready(run)
    manager.watch(run, for_s=4 * WATCHDOG_S)
    assert run.ended_by == ""
    # Paced at half the period: about two pings a period, not one per 50 ms tick.
    assert 6 <= run.pings <= 10
    manager.stop(run)
    assert run.returncode == 0
    assert run.stopping
