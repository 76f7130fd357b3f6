"""Who may use the engineer's dashboard: passwords (scrypt, salted, in a file of mode 0600 next to the
storage), server-side sessions behind an HttpOnly SameSite=Strict cookie, a CSRF token per session, and a
login back-off per client address. Pure bookkeeping: the HTTP handlers are in `app`."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.storage.atomic import write_atomic

__all__ = [
    "DEFAULT_USER",
    "LoginLimiter",
    "PasswordFile",
    "Session",
    "SessionStore",
    "hash_password",
    "password_path",
    "verify_password",
]

_log = logging.getLogger(__name__)

DEFAULT_USER = "engineer"
# scrypt at n=2**14, r=8: 16 MiB and ~50 ms on the 2-core box per guess, in a worker thread. RFC 7914's
# interactive-login parameters; a stolen file costs an attacker as much per guess.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_KEY_BYTES = 32
# A stored hash asking for more memory than this per check (4x ours) is refused, not computed.
MAX_SCRYPT_BYTES = 64 * 1024 * 1024
SALT_BYTES = 16
MIN_PASSWORD_CHARS = 10  # a password for a box on a school LAN; shorter ones are refused by the CLI
MAX_PASSWORD_CHARS = 1024  # scrypt hashes anything, but a megabyte "password" is an attack, not a login
MAX_USER_CHARS = 64
_FILE_FORMAT = 1
_MAX_FILE_BYTES = 65_536
# A session ends after this long without a request, and after SESSION_MAX_S whatever: an engineer's
# working day; a laptop left logged in overnight is logged out.
SESSION_IDLE_S = 2 * 3600.0
SESSION_MAX_S = 12 * 3600.0
# Sessions at once; the oldest goes first (a script logging in in a loop cannot grow the table).
MAX_SESSIONS = 64
# Login back-off per client address: the first few mistakes are free (typos), then each further failure
# doubles the wait, up to a quarter of an hour (a guesser gets ~100 tries a day; an engineer who mistyped
# waits seconds).
FREE_FAILURES = 5
BACKOFF_FIRST_S = 2.0
BACKOFF_MAX_S = 900.0
# Addresses remembered; beyond this the oldest entry is forgotten (spoofed-address floods stay bounded).
MAX_TRACKED_ADDRESSES = 10_000
# A client whose failures stopped this long ago starts afresh.
FAILURES_FORGOTTEN_S = 3600.0


def password_path(storage_path: str) -> Path:
    """`<storage stem>.web-users.json`, beside the time series and the MQTT accounts."""
    base = Path(storage_path)
    return base.with_name(base.stem + ".web-users.json")


def hash_password(password: str, *, salt: bytes | None = None) -> dict[str, Any]:
    """The stored form of a password: scrypt with its parameters and a random salt, all in hex."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    key = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=SCRYPT_KEY_BYTES)
    return {"scheme": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "salt": salt.hex(), "key": key.hex()}


def verify_password(stored: dict[str, Any], password: str) -> bool:
    """Constant-time comparison against a stored hash; False for anything malformed."""
    if len(password) > MAX_PASSWORD_CHARS:
        return False
    try:
        if stored["scheme"] != "scrypt":
            return False
        n, r, p = int(stored["n"]), int(stored["r"]), int(stored["p"])
        salt, key = bytes.fromhex(stored["salt"]), bytes.fromhex(stored["key"])
        memory = 128 * r * n  # what scrypt needs, in bytes
        if not (n >= 2 and r >= 1 and 1 <= p <= 16 and memory <= MAX_SCRYPT_BYTES and len(key) == SCRYPT_KEY_BYTES):
            return False  # a file edited to ask for gigabytes of memory per login is not followed
        got = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=memory + 1024 * 1024,
                             dklen=len(key))  # fmt: skip
    except (KeyError, TypeError, ValueError):
        return False
    return hmac.compare_digest(got, key)


class PasswordFile:
    """The dashboard's accounts: `{"format": 1, "users": {name: scrypt hash}}`, mode 0600, written atomically.
    Read again when it changes on disk, so `greensite web password` takes effect without a restart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, dict[str, Any]] = {}

    def users(self) -> dict[str, dict[str, Any]]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._users = None, {}
            return {}
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._stamp, self._users = stamp, self._read()
        return self._users

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            with self.path.open("rb") as handle:
                raw = handle.read(_MAX_FILE_BYTES + 1)
            body = json.loads(raw) if len(raw) <= _MAX_FILE_BYTES else None
        except (OSError, ValueError) as err:
            _log.error("web password file unreadable; nobody can log in", extra={"file": str(self.path),
                                                                                 "error": str(err)})  # fmt: skip
            return {}
        users = body.get("users") if isinstance(body, dict) else None
        if not isinstance(users, dict) or not all(isinstance(v, dict) for v in users.values()):
            _log.error("web password file malformed; nobody can log in", extra={"file": str(self.path)})
            return {}
        return {str(k): v for k, v in users.items()}

    def set_password(self, user: str, password: str) -> None:
        """Add or replace one account (atomic, mode 0600); the others are kept."""
        users = dict(self.users())
        users[user] = hash_password(password)
        data = (json.dumps({"format": _FILE_FORMAT, "users": users}, indent=2, sort_keys=True) + "\n").encode()
        write_atomic(self.path, data)  # its temp file is made 0600, and the rename keeps that mode
        os.chmod(self.path, 0o600)

    def check(self, user: str, password: str) -> bool:
        """Slow by design (scrypt): call it from a worker thread."""
        stored = self.users().get(user)
        if stored is None:
            # The same work for an unknown user, so timing does not tell which names exist.
            verify_password(_DUMMY, password)
            return False
        return verify_password(stored, password)


_DUMMY = hash_password("not a password", salt=b"\0" * SALT_BYTES)


@dataclass
class Session:
    user: str
    csrf: str
    created_s: float
    seen_s: float


class SessionStore:
    """Server-side sessions: the cookie holds only a random token; what it grants lives here."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def create(self, user: str) -> tuple[str, Session]:
        now = self._clock()
        self.sweep()
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.popitem(last=False)
        token = secrets.token_urlsafe(32)
        session = Session(user, secrets.token_urlsafe(32), now, now)
        self._sessions[token] = session
        return token, session

    def get(self, token: str | None) -> Session | None:
        """The live session of a cookie, touched; None when unknown or expired."""
        if not token or len(token) > 100:
            return None
        session = self._sessions.get(token)
        if session is None:
            return None
        now = self._clock()
        if now - session.seen_s > SESSION_IDLE_S or now - session.created_s > SESSION_MAX_S:
            del self._sessions[token]
            return None
        session.seen_s = now
        return session

    def end(self, token: str | None) -> None:
        if token:
            self._sessions.pop(token, None)

    def sweep(self) -> None:
        now = self._clock()
        for token, s in list(self._sessions.items()):
            if now - s.seen_s > SESSION_IDLE_S or now - s.created_s > SESSION_MAX_S:
                del self._sessions[token]

    def __len__(self) -> int:
        return len(self._sessions)


@dataclass
class _Failures:
    count: int
    last_s: float
    blocked_until_s: float


class LoginLimiter:
    """Failed logins per client address, with an exponential back-off after FREE_FAILURES."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._by_address: OrderedDict[str, _Failures] = OrderedDict()

    def wait_s(self, address: str) -> float:
        """How long this address must wait before its next attempt (0: it may try now)."""
        entry = self._by_address.get(address)
        if entry is None:
            return 0.0
        now = self._clock()
        if now - entry.last_s > FAILURES_FORGOTTEN_S:
            del self._by_address[address]
            return 0.0
        return max(0.0, entry.blocked_until_s - now)

    def failed(self, address: str) -> float:
        """Count a failure; returns the wait it now imposes."""
        now = self._clock()
        entry = self._by_address.pop(address, None)
        if entry is None or now - entry.last_s > FAILURES_FORGOTTEN_S:
            entry = _Failures(0, now, now)
        entry.count += 1
        entry.last_s = now
        if entry.count >= FREE_FAILURES:
            entry.blocked_until_s = now + min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (entry.count - FREE_FAILURES))
        self._by_address[address] = entry
        while len(self._by_address) > MAX_TRACKED_ADDRESSES:
            self._by_address.popitem(last=False)
        return max(0.0, entry.blocked_until_s - now)

    def succeeded(self, address: str) -> None:
        self._by_address.pop(address, None)
