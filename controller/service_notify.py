"""systemd's notify protocol: readiness, watchdog pings, status text and stopping, over $NOTIFY_SOCKET.

Written here rather than taken from a library: the protocol is one datagram of `KEY=VALUE` lines to
the AF_UNIX socket named in $NOTIFY_SOCKET ('@' = Linux abstract namespace), the systemd project calls
it a stable interface to re-implement rather than link libsystemd for (sd_notify(3), NOTES), and the
candidates do not fit a control loop: `sdnotify` (last release 2017) is untyped, blocks when the
manager's queue is full and hides every error; `systemd-python` is a C extension built against
libsystemd-dev. What the control loop needs on top is here too: sends never block (a full queue
drops the datagram and counts it), and `watchdog()` is cheap to call every tick because it sends at
most once per half watchdog period.

Not under systemd (no $NOTIFY_SOCKET) every method does nothing, so the same code runs from a shell.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

__all__ = ["SystemdNotifier"]

_log = logging.getLogger("greensite.service")

# Status is one line in `systemctl status`; longer text is cut well below what systemd reads of one
# datagram (4096 bytes), so a status can never push the state line out.
STATUS_MAX_CHARS = 200

# Pings go at twice the rate systemd needs (sd_watchdog_enabled(3) recommends half the period), so
# one late tick does not cost a restart.
PING_FRACTION_OF_PERIOD = 0.5


def _address(value: str) -> str | bytes | None:
    """The socket address of $NOTIFY_SOCKET: a path, or an abstract name ('@' becomes a NUL byte)."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock:… (systemd in a VM) and relative paths are not supported


class SystemdNotifier:
    """Tells systemd how the service is; every method is a no-op when not started by systemd."""

    def __init__(
        self, environ: Mapping[str, str] | None = None, *, monotonic_s: Callable[[], float] = time.monotonic
    ) -> None:
        """`environ`: where $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID are read (default os.environ);
        `monotonic_s`: the clock that paces watchdog pings (injected by tests)."""
        env = os.environ if environ is None else environ
        self._monotonic_s = monotonic_s
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = _address(raw) if raw else None
        if raw and self.address is None:
            _log.warning("NOTIFY_SOCKET not supported, systemd will not hear from us", extra={"notify_socket": raw})
        self._period_s = _watchdog_period_s(env)
        self._socket: socket.socket | None = None
        self._last_ping_s: float | None = None
        self._failing = False
        self.sent = 0
        self.dropped = 0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def watchdog_period_s(self) -> float | None:
        """WatchdogSec= of the unit, or None when systemd does not watch this process."""
        return self._period_s

    def ready(self, status: str | None = None) -> None:
        """Start-up is done: a Type=notify unit becomes active and systemd's watchdog is armed from now."""
        self._send("READY=1", status)

    def status(self, text: str) -> None:
        """One line shown by `systemctl status`."""
        self._send(None, text)

    def stopping(self, status: str | None = None) -> None:
        """The service is shutting down on its own account (leaving the devices safe)."""
        self._send("STOPPING=1", status)

    def watchdog(self, status: str | None = None) -> bool:
        """Call every tick: pings systemd's watchdog at most once per half period. True when a ping went.

        `status`, when given, rides along with the ping (so it is refreshed at the ping rate, not per tick)."""
        if self._period_s is None or self.address is None:
            return False
        now_s = self._monotonic_s()
        if self._last_ping_s is not None and now_s - self._last_ping_s < self._period_s * PING_FRACTION_OF_PERIOD:
            return False
        self._last_ping_s = now_s
        return self._send("WATCHDOG=1", status)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _send(self, state: str | None, status: str | None) -> bool:
        if self.address is None:
            return False
        lines = [] if state is None else [state]
        if status is not None:
            lines.append("STATUS=" + " ".join(status.split())[:STATUS_MAX_CHARS])
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # A manager that does not read (busy, hung) must never stall the control loop.
                self._socket.setblocking(False)
            self._socket.sendto("\n".join(lines).encode(), self.address)
        except OSError as err:
            self.dropped += 1
            if not self._failing:
                self._failing = True
                _log.warning("systemd notification not sent", extra={"message_state": lines[0], "error": str(err)})
            return False
        if self._failing:
            self._failing = False
            _log.warning("systemd notifications sent again", extra={"dropped_total": self.dropped})
        self.sent += 1
        return True


def _watchdog_period_s(env: Mapping[str, str]) -> float | None:
    """$WATCHDOG_USEC as seconds, if it is meant for this process (sd_watchdog_enabled(3))."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    # systemd names the main process; a child that inherited the environment must not ping for it.
    if pid is not None and pid != str(os.getpid()):
        return None
    return usec / 1e6
