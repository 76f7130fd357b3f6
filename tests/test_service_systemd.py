"""A real systemd runs our unit and restarts a stuck loop.

systemd here is PID 1 of a private PID and mount namespace (the way containers run it: `container=`
set, /run and the cgroup tree private, only the name=systemd tracking hierarchy mounted, so no
resource controller of the machine is touched). It loads the unit `render_unit` writes, with three
changes: ExecStart runs a small loop instead of `greensite run` (which does not send READY=1 yet);
User=root (no account is created on the test machine); and output goes to a file instead of the
journal. The loop uses the real notifier, pings every tick, and deadlocks on its first start. Needs
root, util-linux's unshare/nsenter and systemd installed; otherwise skipped, and
`test_service_watchdog.py` plays systemd's part instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller.service_unit import UnitSettings, render_unit

ROOT = Path(__file__).parents[1]
SYSTEMD = Path("/lib/systemd/systemd")
NAME = f"greensite-test-{os.getpid()}"
UNIT = f"{NAME}.service"
WATCHDOG_S = 2  # WatchdogSec= of the test unit: short, so the test takes seconds
BOOT_TIMEOUT_S = 30.0  # systemd in a namespace answers systemctl within a second or two
COMMAND_TIMEOUT_S = 30.0  # one systemctl call
# The unit's RestartSec=5s, the watchdog, a Python start on a loaded machine, with a wide margin.
RESTART_TIMEOUT_S = 60.0
POLL_S = 0.1  # how often the manager's state is read: it offers no event to wait on from outside

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not SYSTEMD.exists() or not shutil.which("unshare") or not shutil.which("nsenter"),
    reason="needs root, systemd and util-linux to run systemd in a private namespace",
)

CHILD = f"""
import os, signal, sys, threading
sys.path.insert(0, {str(ROOT)!r})
from controller.service_notify import SystemdNotifier

notifier = SystemdNotifier()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
marker = os.path.join(os.environ["STATE_DIRECTORY"], "hung-once")
first = not os.path.exists(marker)
print("start", os.getpid(), "watchdog", notifier.watchdog_period_s(), "cwd", os.getcwd(),
      "numba", os.environ.get("NUMBA_CACHE_DIR"), flush=True)

def tick_that_never_ends():
    lock = threading.Lock()
    lock.acquire()
    lock.acquire()

notifier.ready("ticking")
tick = 0
while not stop.is_set():
    tick += 1
    if first and tick == 20:
        open(marker, "w").close()
        print("hanging", flush=True)
        tick_that_never_ends()
    notifier.watchdog(f"tick {{tick}}")
    stop.wait(0.1)
notifier.stopping()
print("stopped", flush=True)
"""

BOOT = """#!/bin/sh
set -e
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/systemd/system
cp -r {units}/. /run/systemd/system/
mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup
mkdir /sys/fs/cgroup/systemd
mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
mount -t proc proc /proc
exec env -i container=greensite-test PATH=/usr/sbin:/usr/bin:/sbin:/bin {systemd} --system \\
    --unit={name}.target --log-target=console --show-status=no
"""


@dataclass
class PrivateSystemd:
    pid: int  # systemd's pid as this test sees it
    log: Path  # the service's stdout and stderr

    def systemctl(self, *args: str) -> str:
        result = subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-p", "systemctl", *args],
                                capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)  # fmt: skip
        return result.stdout

    def show(self, *properties: str) -> dict[str, str]:
        text = self.systemctl("show", UNIT, *(f"--property={name}" for name in properties))
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _wait_for(check: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(POLL_S)
    return False


def _unit_text() -> str:
    interpreter = Path(os.path.realpath(sys.executable))
    settings = UnitSettings(
        site_id="watchdog-test", site_file=Path("/nonexistent.toml"), command=(sys.executable,), user="root",
        watchdog_s=WATCHDOG_S, directory_name=NAME,
        # as `service install` decides: a Python under /root or /home needs ProtectHome=read-only
        home_read_only=any(interpreter.is_relative_to(home) for home in (Path("/root"), Path("/home"))),
    )  # fmt: skip
    exec_start = f"ExecStart={sys.executable} /var/lib/{NAME}/child.py"
    lines = [exec_start if line.startswith("ExecStart=") else line for line in render_unit(settings).splitlines()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def systemd() -> Iterator[PrivateSystemd]:
    work = Path(tempfile.mkdtemp(prefix="gs-systemd-"))
    state, cache = Path("/var/lib") / NAME, Path("/var/cache") / NAME
    units = work / "units"
    (units / f"{UNIT}.d").mkdir(parents=True)
    (units / UNIT).write_text(_unit_text())
    log = work / "service.log"
    (units / f"{UNIT}.d" / "test.conf").write_text(
        f"[Unit]\nDefaultDependencies=no\n[Service]\nStandardOutput=append:{log}\nStandardError=append:{log}\n"
    )
    (units / f"{NAME}.target").write_text(f"[Unit]\nDefaultDependencies=no\nWants={UNIT}\n")
    state.mkdir()  # the child lives in the state directory: PrivateTmp= hides the test's /tmp from it
    (state / "child.py").write_text(CHILD)
    boot = work / "boot.sh"
    boot.write_text(BOOT.format(units=units, systemd=SYSTEMD, name=NAME))
    boot.chmod(0o755)
    console = (work / "console.log").open("wb")
    unshare = subprocess.Popen(["unshare", "--pid", "--fork", "--mount", "--uts", "--cgroup",
                                "--propagation", "private", str(boot)], stdout=console, stderr=console)  # fmt: skip
    manager: PrivateSystemd | None = None
    try:
        children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children")
        _wait_for(lambda: unshare.poll() is not None or bool(children.read_text().split()), BOOT_TIMEOUT_S)
        if unshare.poll() is not None:
            pytest.skip(f"systemd did not start here: {(work / 'console.log').read_text()[-500:]}")
        manager = PrivateSystemd(int(children.read_text().split()[0]), log)
        probe = manager  # a name the closure can hold as non-optional
        if not _wait_for(lambda: "Version=" in probe.systemctl("show", "--property=Version"), BOOT_TIMEOUT_S):
            pytest.skip(f"systemd did not answer here: {(work / 'console.log').read_text()[-500:]}")
        yield manager
    finally:
        if manager is not None:
            manager.systemctl("exit", "0")  # a manager in a container may be asked to exit
        try:
            unshare.wait(COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            if manager is not None:
                os.kill(manager.pid, 9)  # the namespace's init: its end ends every process in it
            unshare.kill()
            unshare.wait()
        console.close()
        for folder in (work, state, cache):
            shutil.rmtree(folder, ignore_errors=True)


def test_systemd_restarts_a_stuck_loop_and_stops_a_healthy_one(systemd: PrivateSystemd) -> None:
    def restarted() -> bool:
        state = systemd.show("NRestarts", "ActiveState", "StatusText")
        return state.get("NRestarts") == "1" and state.get("ActiveState") == "active" and "tick" in state["StatusText"]

    assert _wait_for(restarted, RESTART_TIMEOUT_S), systemd.log.read_text()
    log = systemd.log.read_text()
    starts = [line.split() for line in log.splitlines() if line.startswith("start ")]
    assert len(starts) == 2
    assert starts[0][1] != starts[1][1]  # a new process
    # The unit's environment reached the process: the watchdog period, the state and cache directories.
    assert starts[1][2:] == ["watchdog", str(float(WATCHDOG_S)), "cwd", f"/var/lib/{NAME}",
                             "numba", f"/var/cache/{NAME}/numba"]  # fmt: skip
    assert "hanging" in log
    assert "Fatal Python error: Aborted" in log  # WatchdogSignal=SIGABRT met PYTHONFAULTHANDLER=1
    assert "tick_that_never_ends" in log  # where the loop was stuck

    # Healthy now: pinging keeps it running through several watchdog periods.
    before = systemd.show("MainPID")["MainPID"]
    assert not _wait_for(lambda: systemd.show("NRestarts")["NRestarts"] != "1", 3 * WATCHDOG_S)
    assert systemd.show("MainPID")["MainPID"] == before

    systemd.systemctl("stop", UNIT)
    state = systemd.show("Result", "ActiveState", "ExecMainStatus", "NRestarts")
    assert state == {"Result": "success", "ActiveState": "inactive", "ExecMainStatus": "0", "NRestarts": "1"}
    assert systemd.log.read_text().rstrip().endswith("stopped")
