"""The notify protocol against a real AF_UNIX datagram socket, read the way systemd reads it (with the
sender's credentials), and checked byte for byte against systemd's own client, `systemd-notify`."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller.service_notify import SystemdNotifier

RECEIVE_TIMEOUT_S = 5.0  # a datagram on the same machine arrives at once; this only bounds a failure
CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass
class Datagram:
    payload: bytes
    pid: int


class NotifyListener:
    """The receiving end of $NOTIFY_SOCKET, as systemd sets it up: SOCK_DGRAM with SO_PASSCRED."""

    def __init__(self, address: str | bytes) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.socket.bind(address)

    def receive(self, timeout_s: float = RECEIVE_TIMEOUT_S) -> Datagram:
        self.socket.settimeout(timeout_s)
        payload, ancillary, _flags, _address = self.socket.recvmsg(4096, socket.CMSG_SPACE(CREDENTIALS.size))
        pid = 0
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = CREDENTIALS.unpack(data[: CREDENTIALS.size])[0]
        return Datagram(payload, pid)

    def nothing_waiting(self) -> bool:
        self.socket.setblocking(False)
        try:
            self.socket.recv(4096)
        except BlockingIOError:
            return True
        return False

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def socket_path() -> Iterator[str]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    folder = tempfile.mkdtemp(prefix="gs-notify-")
    yield os.path.join(folder, "notify")
    shutil.rmtree(folder)


@pytest.fixture
def listener(socket_path: str) -> Iterator[NotifyListener]:
    peer = NotifyListener(socket_path)
    yield peer
    peer.close()


def test_ready_status_and_stopping_arrive_from_this_process(socket_path: str, listener: NotifyListener) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": socket_path})
    notifier.ready("opening buses")
    notifier.status("tick 12\ngrid 3.5 kW")
    notifier.stopping("leaving the devices safe")
    received = [listener.receive() for _ in range(3)]
    assert [item.payload for item in received] == [
        b"READY=1\nSTATUS=opening buses",
        b"STATUS=tick 12 grid 3.5 kW",  # one line: a newline would start a new (bogus) assignment
        b"STOPPING=1\nSTATUS=leaving the devices safe",
    ]
    assert {item.pid for item in received} == {os.getpid()}  # what NotifyAccess=main checks
    assert notifier.sent == 3
    notifier.close()


def test_an_abstract_socket_is_reached_by_its_name() -> None:
    name = f"greensite-test-{os.getpid()}-{time.monotonic_ns()}"
    peer = NotifyListener(b"\0" + name.encode())
    try:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": "@" + name})
        notifier.ready()
        assert peer.receive().payload == b"READY=1"
        notifier.close()
    finally:
        peer.close()


def test_watchdog_pings_at_most_every_half_period(socket_path: str, listener: NotifyListener) -> None:
    now_s = [100.0]
    env = {"NOTIFY_SOCKET": socket_path, "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}
    notifier = SystemdNotifier(env, monotonic_s=lambda: now_s[0])
    assert notifier.watchdog_period_s() == 10.0
    sent_at: list[float] = []
    for tick in range(25):  # 1 s ticks
        now_s[0] = 100.0 + tick
        if notifier.watchdog(f"tick {tick}"):
            sent_at.append(now_s[0])
    assert sent_at == [100.0, 105.0, 110.0, 115.0, 120.0]
    assert [listener.receive().payload for _ in sent_at] == [
        f"WATCHDOG=1\nSTATUS=tick {int(at - 100)}".encode() for at in sent_at
    ]
    assert listener.nothing_waiting()
    notifier.close()


def test_watchdog_is_for_the_main_process_only(socket_path: str) -> None:
    base = {"NOTIFY_SOCKET": socket_path, "WATCHDOG_USEC": "2500000"}
    assert SystemdNotifier(base).watchdog_period_s() == 2.5
    assert SystemdNotifier({**base, "WATCHDOG_PID": str(os.getpid())}).watchdog_period_s() == 2.5
    # A child that inherited the service's environment must not ping for it (sd_watchdog_enabled(3)).
    other = SystemdNotifier({**base, "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_period_s() is None
    assert other.watchdog() is False
    assert SystemdNotifier({"NOTIFY_SOCKET": socket_path, "WATCHDOG_USEC": "0"}).watchdog_period_s() is None
    assert SystemdNotifier({"NOTIFY_SOCKET": socket_path, "WATCHDOG_USEC": "ten"}).watchdog_period_s() is None


def test_outside_systemd_nothing_is_sent(listener: NotifyListener) -> None:
    notifier = SystemdNotifier({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_period_s() == 1.0
    notifier.ready("x")
    notifier.status("x")
    assert notifier.watchdog() is False
    notifier.stopping()
    assert notifier.sent == 0
    assert notifier.dropped == 0
    assert listener.nothing_waiting()


def test_a_manager_that_does_not_read_never_blocks_the_loop(
    socket_path: str, listener: NotifyListener, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": socket_path})
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="greensite.service"):
        for tick in range(2000):  # far beyond the kernel's queue of unread datagrams
            notifier.status(f"tick {tick}")
    assert time.monotonic() - started < RECEIVE_TIMEOUT_S
    assert notifier.dropped > 0
    assert notifier.sent + notifier.dropped == 2000
    assert [r.getMessage() for r in caplog.records] == ["systemd notification not sent"]  # once per episode
    caplog.clear()
    while not listener.nothing_waiting():  # the manager catches up
        pass
    with caplog.at_level(logging.WARNING, logger="greensite.service"):
        notifier.status("after")
    assert [r.getMessage() for r in caplog.records] == ["systemd notifications sent again"]
    notifier.close()


def test_a_missing_socket_is_counted_not_raised(tmp_path: Path) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    notifier.ready()
    notifier.stopping()
    assert (notifier.sent, notifier.dropped) == (0, 2)


def test_unsupported_addresses_are_ignored() -> None:
    assert not SystemdNotifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
    assert not SystemdNotifier({"NOTIFY_SOCKET": "relative/path"}).enabled


@pytest.mark.skipif(shutil.which("systemd-notify") is None, reason="systemd-notify not installed (scripts/test does)")
def test_we_send_what_systemds_own_client_sends(socket_path: str, listener: NotifyListener) -> None:
    env = {**os.environ, "NOTIFY_SOCKET": socket_path}
    # --no-block: do not wait for a manager to answer the barrier, which this listener does not play.
    subprocess.run(["systemd-notify", "--no-block", "--ready", "--status=tick 7 grid 2.0 kW"], env=env,
                   check=True, timeout=RECEIVE_TIMEOUT_S)  # fmt: skip
    theirs = listener.receive().payload
    notifier = SystemdNotifier({"NOTIFY_SOCKET": socket_path})
    notifier.ready("tick 7 grid 2.0 kW")
    assert listener.receive().payload == theirs == b"READY=1\nSTATUS=tick 7 grid 2.0 kW"
    notifier.close()
