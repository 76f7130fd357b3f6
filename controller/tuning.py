"""Remote tuning: JSON merge patches of the `[tuning]` section, validated by the site schema, bounded
by the ratings of the site file, persisted atomically and logged with who/when/what.

The site file stays the engineer's hand-written TOML: accepted patches live in an overrides file next
to the time series (`storage.tuning_path`), layered over the file's `[tuning]` (and over the
environment). A patch follows RFC 7396: objects merge, `null` drops an override (back to the site
file's value). The MQTT command topic and `greensite config set` both go through `TuningStore`, so
both validate, persist and log the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from config import ConfigError, SiteConfig, parse_site
from controller.storage.atomic import write_atomic

__all__ = ["PatchResult", "TuningStore", "follow_file", "merge_patch", "shell_identity"]

_log = logging.getLogger(__name__)

# A tuning patch is a handful of numbers; deeper nesting than the schema has is refused before merging.
MAX_PATCH_DEPTH = 4
_FORMAT_VERSION = 1
# An overrides file is a few hundred bytes; a megabyte is damage (or hostile), not tuning.
MAX_TUNING_FILE_BYTES = 1_048_576
# How often (wall time) a running controller looks for a change made by `greensite config set`.
TUNING_FILE_POLL_S = 2.0


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch: objects merge key by key, `null` removes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def shell_identity() -> str:
    """Who is at the shell, for the audit log of `greensite config set`."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli:{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class PatchResult:
    """What a patch did: accepted with the changed fields (`changes`: path → [before, after]), or
    refused with every error by field path. A refused patch changed nothing."""

    accepted: bool
    errors: list[str] = field(default_factory=list)
    changes: dict[str, list[Any]] = field(default_factory=dict)
    site: SiteConfig | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"accepted": self.accepted}
        if self.accepted:
            body["changes"] = self.changes
            if self.site is not None:
                body["tuning"] = self.site.tuning.model_dump(mode="json")
        else:
            body["errors"] = self.errors
        return body


class TuningStore:
    """The overrides file of one site. `base` is the site as loaded from its file (and environment).

    Thread-safe: the MQTT task applies patches in a worker thread so the event loop never waits on
    fsync, while the controller may re-read the file that a shell has just changed.
    """

    def __init__(self, base: SiteConfig, path: str | Path | None = None) -> None:
        self.base = base
        self.path = Path(path) if path is not None else Path(base.storage.resolved_tuning_path)
        self.audit_path = self.path.with_name(self.path.stem + ".audit.jsonl")
        self._lock = threading.Lock()
        self.overrides: dict[str, Any] = {}
        self.site = base
        self._loaded_stamp: tuple[int, int] | None = None
        self.load_errors: list[str] = []
        self._load()

    # --- reading --------------------------------------------------------------------------------------

    def _stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    def _read(self, path: Path) -> dict[str, Any]:
        raw = path.read_bytes()
        if len(raw) > MAX_TUNING_FILE_BYTES:
            raise ConfigError(str(path), [f"file is {len(raw)} bytes; a tuning file is a few hundred"])
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(str(path), [f"not JSON: {err}"]) from None
        if not isinstance(body, dict) or not isinstance(body.get("tuning"), dict):
            raise ConfigError(str(path), ['expected {"version": 1, "tuning": {...}}'])
        tuning: dict[str, Any] = body["tuning"]
        return tuning

    def _load(self) -> None:
        """Read the overrides; a damaged or no longer valid file falls back to `.prev`, then to the site
        file alone, loudly: the controller must start, and the engineer must hear about it."""
        self._loaded_stamp = self._stamp()
        self.load_errors = []
        for candidate in (self.path, self.path.with_name(self.path.name + ".prev")):
            if not candidate.exists():
                continue
            try:
                overrides = self._read(candidate)
                site = self._validated(overrides)
            except ConfigError as err:
                self.load_errors.extend(f"{candidate}: {line}" for line in err.errors)
                _log.error("tuning overrides refused", extra={"file": str(candidate), "errors": err.errors})
                continue
            except OSError as err:
                self.load_errors.append(f"{candidate}: cannot read: {err.strerror}")
                continue
            self.overrides, self.site = overrides, site
            return
        self.overrides, self.site = {}, self.base

    def reload_if_changed(self) -> SiteConfig | None:
        """If another process (`greensite config set`) changed the file, re-read it; returns the new
        site when the effective tuning changed."""
        with self._lock:
            if self._stamp() == self._loaded_stamp:
                return None
            before = self.site.tuning
            self._load()
            return self.site if self.site.tuning != before else None

    def _validated(self, overrides: dict[str, Any]) -> SiteConfig:
        base = self.base.model_dump(mode="python")
        base["tuning"] = merge_patch(base["tuning"], overrides)
        return parse_site(base, "tuning", environment=False)

    # --- patching -----------------------------------------------------------------------------------------

    def apply(self, patch: Any, *, by: str, via: str) -> PatchResult:
        """Validate a patch of `[tuning]`; if it holds, persist it atomically (previous file kept as
        `.prev`), append it to the audit log and return the new site."""
        errors = self._shape_errors(patch)
        if errors:
            return PatchResult(False, errors)
        with self._lock:
            overrides = merge_patch(self.overrides, patch)
            try:
                site = self._validated(overrides)
            except ConfigError as err:
                return PatchResult(False, err.errors)
            before = _flatten(self.site.tuning.model_dump(mode="json"))
            after = _flatten(site.tuning.model_dump(mode="json"))
            changes = {k: [before.get(k), v] for k, v in after.items() if before.get(k) != v}
            now = datetime.now(UTC).isoformat(timespec="seconds")
            body = {"version": _FORMAT_VERSION, "updated_at": now, "updated_by": by, "tuning": overrides}
            write_atomic(self.path, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode(), keep_previous=True)
            self._append_audit({"at": now, "by": by, "via": via, "patch": patch, "changes": changes})
            self.overrides, self.site = overrides, site
            self._loaded_stamp = self._stamp()
        _log.warning("tuning changed", extra={"by": by, "via": via, "changes": changes})
        return PatchResult(True, changes=changes, site=site)

    @staticmethod
    def _shape_errors(patch: Any) -> list[str]:
        if not isinstance(patch, dict):
            return [f"patch: expected a JSON object of [tuning] fields, got {type(patch).__name__}"]
        if not patch:
            return ["patch: empty; nothing to change"]
        if _depth(patch) > MAX_PATCH_DEPTH:
            return [f"patch: nested deeper than {MAX_PATCH_DEPTH} levels; [tuning] is not that deep"]
        return []

    def _append_audit(self, entry: dict[str, Any]) -> None:
        """One JSON line per accepted change, fsynced: the log survives the power cut the file does."""
        self.audit_path.parent.mkdir(parents=True, exist_ok=True)
        with self.audit_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, sort_keys=True, default=str) + "\n")
            handle.flush()
            with contextlib.suppress(OSError):
                os.fsync(handle.fileno())

    def state(self) -> dict[str, Any]:
        """What `config get` and the retained config topic show."""
        return {
            "tuning": self.site.tuning.model_dump(mode="json"),
            "overrides": self.overrides,
            "overrides_file": str(self.path),
            "load_errors": self.load_errors,
        }


async def follow_file(
    store: TuningStore, on_change: Callable[[SiteConfig], None], period_s: float = TUNING_FILE_POLL_S
) -> None:
    """Runs beside the controller: a change written by another process (a shell) is validated again and
    handed to `on_change` (which applies it at the next tick boundary)."""
    while True:
        await asyncio.sleep(period_s)
        site = await asyncio.to_thread(store.reload_if_changed)
        if site is not None:
            _log.warning("tuning file changed, applying", extra={"file": str(store.path)})
            on_change(site)
