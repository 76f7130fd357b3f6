"""Structured logging: key=value (or JSON lines) with the `extra` fields of each record.

Under systemd (stderr is the journal: $JOURNAL_STREAM names it) each record is one line with no
timestamp (journald stamps it) and a `<N>` syslog priority prefix (journald files it as the entry's
PRIORITY, so `journalctl -p warning` works); a traceback stays in the record's line as a field.
GREENSITE_LOG_JOURNAL=1 or 0 forces this on or off.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["configure_logging", "stderr_is_journal"]

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


# sd-daemon(3) priority prefixes, by logging level (anything between levels takes the level below it).
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_DEBUG_PRIORITY = 7


def _priority_prefix(record: logging.LogRecord) -> str:
    for level, priority in _PRIORITY:
        if record.levelno >= level:
            return f"<{priority}>"
    return f"<{_DEBUG_PRIORITY}>"


class KeyValueFormatter(logging.Formatter):
    def __init__(self, *, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if self.journal:
            parts = [f"{_priority_prefix(record)}{record.levelname} {record.name}: {_one_line(message)}"]
        else:
            parts = [f"{self.formatTime(record)} {record.levelname} {record.name}: {message}"]
        parts.extend(f"{key}={value!r}" for key, value in _fields(record).items())
        text = " ".join(parts)
        if record.exc_info:
            exc = self.formatException(record.exc_info)
            text += f" exc={exc!r}" if self.journal else "\n" + exc
        return text


class JsonFormatter(logging.Formatter):
    def __init__(self, *, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {} if self.journal else {"ts": record.created}
        body |= {"level": record.levelname, "logger": record.name, "msg": record.getMessage(), **_fields(record)}
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        text = json.dumps(body, default=str)  # escapes newlines: one line whatever the message holds
        return _priority_prefix(record) + text if self.journal else text


def _one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def stderr_is_journal(environ: Mapping[str, str] | None = None, stderr_fd: int = 2) -> bool:
    """Whether log lines go to systemd's journal: GREENSITE_LOG_JOURNAL=1/0 if set, else whether
    $JOURNAL_STREAM ("device:inode", set by systemd) is the stream stderr is (systemd.exec(5))."""
    env = os.environ if environ is None else environ
    forced = env.get("GREENSITE_LOG_JOURNAL")
    if forced is not None:
        return forced.strip().lower() in {"1", "true", "yes", "on"}
    stream = env.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    try:
        stat = os.fstat(stderr_fd)
        return (stat.st_dev, stat.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):
        return False


def configure_logging(level: str = "WARNING", *, json_lines: bool = False, journal: bool | None = None) -> None:
    """Log to stderr; `journal` None: one line per record without timestamps when stderr is the journal."""
    on_journal = stderr_is_journal() if journal is None else journal
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(journal=on_journal) if json_lines else KeyValueFormatter(journal=on_journal))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
