"""Who may talk to the embedded broker when remote tuning is on: the generated accounts. The ACL that
lets each person publish commands only on their own topic (so the topic tells who sent a command)
is in `_broker_plugins`, which only amqtt imports.

Two accounts are generated at first start and kept in `<storage stem>.mqtt-users.json` (mode 0600):
`greensite` (the controller itself: everything under its prefix and the discovery prefix) and
`engineer` (reads everything, publishes only on `<prefix>/config/set/engineer`). More people: add
`"name": "password"` lines to the file; each gets the engineer's rights on `config/set/<name>`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

__all__ = ["CONTROLLER_USER", "ENGINEER_USER", "broker_users", "users_path"]

_log = logging.getLogger(__name__)

CONTROLLER_USER = "greensite"
ENGINEER_USER = "engineer"
_PASSWORD_BYTES = 18  # 24 URL-safe characters, 144 bits
_MAX_USERS_FILE_BYTES = 65_536


def users_path(storage_path: str) -> Path:
    base = Path(storage_path)
    return base.with_name(base.stem + ".mqtt-users.json")


def broker_users(path: Path) -> dict[str, str]:
    """The accounts (user → password), generated with mode 0600 on first use; the engineer's password
    is logged once, when it is made. A file that is unreadable or malformed is an error, not replaced
    (replacing it would lock out whoever holds the old passwords without telling them)."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(_MAX_USERS_FILE_BYTES + 1)
    except FileNotFoundError:
        users = {name: secrets.token_urlsafe(_PASSWORD_BYTES) for name in (CONTROLLER_USER, ENGINEER_USER)}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(users, indent=2) + "\n")
        _log.warning(
            "embedded MQTT broker: accounts generated (shown once; kept in the file, mode 0600)",
            extra={"file": str(path), "user": ENGINEER_USER, "password": users[ENGINEER_USER],
                   "command_topic": f"<prefix>/config/set/{ENGINEER_USER}"},
        )  # fmt: skip
        return users
    if path.stat().st_mode & 0o077:
        _log.warning("embedded MQTT broker: accounts file readable by others; chmod 600", extra={"file": str(path)})
    body: Any = None
    if len(raw) <= _MAX_USERS_FILE_BYTES:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
    if not isinstance(body, dict) or CONTROLLER_USER not in body or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in body.items()
    ):
        raise ValueError(f"{path}: expected a JSON object of user → password, with {CONTROLLER_USER!r}")
    return {str(k): str(v) for k, v in body.items()}
