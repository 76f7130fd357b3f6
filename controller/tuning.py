"""Remote tuning: JSON merge patches of the `[tuning]` section, validated by the site schema, bounded
by the ratings of the site file, persisted atomically and logged with who/when/what.

The site file stays the engineer's hand-written TOML: accepted patches live in an overrides file next
to the time series (`storage.tuning_path`), layered over the file's `[tuning]` (and over the
environment). A patch follows RFC 7396: objects merge, `null` drops an override (back to the site
file's value). The MQTT command topic and `greensite config set` both go through `TuningStore`, so
both validate, persist and log the same way.

No change is lost between writers: the overrides file carries a version, and every writer (the
controller's MQTT handler, a shell's `config set`, any later web page) applies its patch as a
compare-and-swap under an exclusive lock on `<overrides>.lock`, re-reading the file from disk under
the lock. A writer never writes back its own in-memory copy. A command may name the version it was
made against (`base_version`); a stale one is refused with the current version.

Types are strict wherever tuning comes from: numbers are JSON numbers (not "350", not true), booleans
are booleans, lists are lists. The schema alone would coerce; the strict check runs first.
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

from pydantic import BaseModel, ValidationError

from config import ConfigError, SiteConfig, Tuning, parse_site
from controller.file_lock import LockTimeout, exclusive_lock
from controller.storage.atomic import write_atomic
from controller.strict_json import JsonLimits, JsonRefused, decode_json, json_type_name, nesting_depth

__all__ = [
    "MAX_PATCH_DEPTH",
    "PatchResult",
    "TuningStore",
    "follow_file",
    "merge_patch",
    "patch_errors",
    "shell_identity",
    "strict_type_errors",
]

_log = logging.getLogger(__name__)

# A tuning patch is a handful of numbers: patch → section → relief-order list is 3 levels.
MAX_PATCH_DEPTH = 4
# 2: {"format": 2, "version": <revision>, ...}; 1 (no "format" key) was always written as version 1.
_FORMAT = 2
_FILE_KEYS = frozenset({"format", "version", "updated_at", "updated_by", "tuning"})
# An overrides file is a few hundred bytes; 64 kB is damage (or hostile), not tuning.
MAX_TUNING_FILE_BYTES = 65_536
FILE_LIMITS = JsonLimits(max_bytes=MAX_TUNING_FILE_BYTES)
# How often (wall time) a running controller looks for a change made by `greensite config set`.
TUNING_FILE_POLL_S = 2.0
# A writer holds the lock for one read, validation and fsync (~10 ms); 5 s means a writer is stuck.
LOCK_TIMEOUT_S = 5.0
# Strict-type refusals say what the field takes, by pydantic's error type.
_EXPECTED = {
    "float_type": "a JSON number (not a string, not true/false)",
    "int_type": "a JSON integer (not a string, not true/false)",
    "bool_type": "true or false",
    "string_type": "a JSON string",
    "list_type": "a JSON array",
    "model_type": "a JSON object",
    "dict_type": "a JSON object",
}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch: objects merge key by key, `null` removes, anything else replaces.
    Recursive: callers bound the depth of both documents first (MAX_PATCH_DEPTH, FILE_LIMITS)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pruned(value: dict[str, Any]) -> dict[str, Any]:
    """Overrides without empty sections: `{"grid": {"x": null}}` on no overrides leaves no override,
    so it writes nothing (RFC 7396 would keep the emptied object)."""
    out = {}
    for key, item in value.items():
        kept = _pruned(item) if isinstance(item, dict) else item
        if kept != {}:
            out[key] = kept
    return out


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def strict_type_errors(overrides: dict[str, Any]) -> list[str]:
    """Every field of `[tuning]` overrides whose JSON type is wrong, by path; the schema would coerce
    "350" or true into a number. Range and rating checks are the schema's, after this."""
    try:
        Tuning.model_validate(overrides, strict=True)
    except ValidationError as err:
        lines = []
        for item in err.errors(include_url=False):
            expected = _EXPECTED.get(item["type"])
            if expected is None:
                continue  # not a type error: the schema reports it with the ratings in view
            path = ".".join(["tuning", *(str(part) for part in item["loc"])])
            given = item.get("input")
            lines.append(f"{path}: must be {expected}, got {json_type_name(given)} {_short(given)}")
        return lines
    return []


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    return value


def _unknown_fields(patch: dict[str, Any]) -> list[str]:
    """Keys of a patch that name no `[tuning]` field (with `null` too: a typo must not pass as a reset)."""
    lines = []
    stack: list[tuple[dict[str, Any], type[BaseModel], str]] = [(patch, Tuning, "tuning")]
    while stack:
        body, model, prefix = stack.pop()
        for key, value in body.items():
            known = model.model_fields.get(key)
            if known is None:
                lines.append(f"{prefix}.{key[:40]}: not a field of [{prefix}]; fields: {', '.join(model.model_fields)}")
                continue
            section = known.annotation
            if isinstance(value, dict) and isinstance(section, type) and issubclass(section, BaseModel):
                stack.append((value, section, f"{prefix}.{key}"))
    return lines


def patch_errors(patch: dict[str, Any]) -> list[str]:
    """What is wrong with a patch on its own, before it meets the overrides: unknown fields and JSON
    types (`null` resets a field, so it is the one value every field takes)."""
    return _unknown_fields(patch) or strict_type_errors(_without_nulls(patch))


def shell_identity() -> str:
    """Who is at the shell (the OS account), for the audit log of `greensite config set`."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli:{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class PatchResult:
    """What a patch did: accepted with the changed fields (`changes`: path → [before, after]), or
    refused with every error by field path. A refused patch changed nothing. `version` is the
    overrides file's version after the patch (or, refused, as it stands)."""

    accepted: bool
    errors: list[str] = field(default_factory=list)
    changes: dict[str, list[Any]] = field(default_factory=dict)
    site: SiteConfig | None = None
    version: int | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"accepted": self.accepted}
        if self.accepted:
            body["changes"] = self.changes
            if self.site is not None:
                body["tuning"] = self.site.tuning.model_dump(mode="json")
        else:
            body["errors"] = self.errors
        if self.version is not None:
            body["version"] = self.version
        return body


@dataclass(frozen=True, slots=True)
class _Overrides:
    tuning: dict[str, Any]
    version: int


_NO_FILE = _Overrides({}, 0)


class TuningStore:
    """The overrides file of one site. `base` is the site as loaded from its file (and environment).

    Thread-safe: the MQTT task applies patches in a worker thread so the event loop never waits on
    fsync, while the controller may re-read the file that a shell has just changed. Process-safe:
    writers serialise on `lock_path` and patch what is on disk.
    """

    def __init__(self, base: SiteConfig, path: str | Path | None = None) -> None:
        self.base = base
        self.path = Path(path) if path is not None else Path(base.storage.resolved_tuning_path)
        self.audit_path = self.path.with_name(self.path.stem + ".audit.jsonl")
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock = threading.Lock()
        self.overrides: dict[str, Any] = {}
        self.version = 0
        self.site = base
        self._loaded_stamp: tuple[int, int, int] | None = None
        self.load_errors: list[str] = []
        self._load()

    # --- reading --------------------------------------------------------------------------------------

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)  # a rename gives a new inode

    @staticmethod
    def _read(path: Path) -> _Overrides:
        """One overrides file, bounded and strict; ConfigError naming the file otherwise."""
        with path.open("rb") as handle:
            raw = handle.read(MAX_TUNING_FILE_BYTES + 1)
        try:
            body = decode_json(raw, FILE_LIMITS, what="file")
        except JsonRefused as err:
            raise ConfigError(str(path), err.errors) from None
        if not isinstance(body, dict) or not isinstance(body.get("tuning"), dict):
            raise ConfigError(str(path), ['expected {"format": 2, "version": N, "tuning": {...}}'])
        errors = []
        unknown = sorted(set(body) - _FILE_KEYS)
        if unknown:
            errors.append(f"unknown keys {[k[:40] for k in unknown[:5]]}; expected {sorted(_FILE_KEYS)}")
        version = body.get("version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            errors.append(f"version: must be a non-negative JSON integer, got {json_type_name(version)}")
        if body.get("format", 1) not in (1, _FORMAT) or isinstance(body.get("format"), bool):
            errors.append(f"format: {_short(body.get('format'))} is not a format this controller reads (1, 2)")
        if errors:
            raise ConfigError(str(path), errors)
        return _Overrides(body["tuning"], version)

    def _read_current(self) -> _Overrides:
        """The overrides file as it is on disk now: what a writer patches. Missing while its `.prev` is
        there (a cut between two renames of an older writer, a hand's `mv`), the `.prev` is what is in
        force (as `_load` reads it), so that is what is patched, and its version continues."""
        try:
            return self._read(self.path)
        except FileNotFoundError:
            try:
                return self._read(self.path.with_name(self.path.name + ".prev"))
            except FileNotFoundError:
                return _NO_FILE

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
                site = self._validated(overrides.tuning)
            except ConfigError as err:
                self.load_errors.extend(f"{candidate}: {line}" for line in err.errors)
                _log.error("tuning overrides refused", extra={"file": str(candidate), "errors": err.errors[:10]})
                continue
            except OSError as err:
                self.load_errors.append(f"{candidate}: cannot read: {err.strerror}")
                continue
            self.overrides, self.version, self.site = overrides.tuning, overrides.version, site
            return
        self.overrides, self.version, self.site = {}, 0, self.base

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
        """The site with these overrides: strict JSON types first, then the schema and the ratings."""
        errors = strict_type_errors(overrides)
        if errors:
            raise ConfigError("tuning", errors)
        base = self.base.model_dump(mode="python")
        base["tuning"] = merge_patch(base["tuning"], overrides)
        return parse_site(base, "tuning", environment=False)

    # --- patching -----------------------------------------------------------------------------------------

    def apply(
        self,
        patch: Any,
        *,
        by: str,
        via: str,
        verified: bool = False,
        requested_by: str | None = None,
        correlation_id: str | int | None = None,
        base_version: int | None = None,
    ) -> PatchResult:
        """Validate a patch of `[tuning]` against the overrides file as it is on disk; if it holds,
        persist it atomically (previous file kept as `.prev`) with the next version, append it to the
        audit log and return the new site. `by` is who the change is from as established by `via`
        (`verified`: by the broker's or the OS's authentication), `requested_by` the name the sender
        gave (self-declared). With `base_version`, the file must still be at that version."""
        errors = self._shape_errors(patch)
        if errors:
            return PatchResult(False, errors, version=self.version)
        with self._lock:
            try:
                with exclusive_lock(self.lock_path, LOCK_TIMEOUT_S):
                    return self._apply_locked(
                        patch, base_version,
                        {"by": by, "verified": verified, "via": via, "requested_by": requested_by,
                         "correlation_id": correlation_id},
                    )  # fmt: skip
            except LockTimeout as err:
                return PatchResult(False, [f"overrides file: {err}; nothing changed, try again"], version=self.version)
            except OSError as err:  # the lock file cannot be made or opened: nothing was read or written
                line = f"overrides file: cannot lock {self.lock_path}: {err.strerror}; nothing changed"
                return PatchResult(False, [line], version=self.version)

    def _apply_locked(self, patch: dict[str, Any], base_version: int | None, who: dict[str, Any]) -> PatchResult:
        try:
            disk = self._read_current()
        except ConfigError as err:
            # Writing over a file we cannot read would lose whatever it held: a person decides.
            lines = [f"overrides file {self.path} is refused ({line}); repair or remove it" for line in err.errors]
            return PatchResult(False, lines, version=self.version)
        except OSError as err:
            line = f"overrides file {self.path}: cannot read: {err.strerror}"
            return PatchResult(False, [line], version=self.version)
        if base_version is not None and base_version != disk.version:
            return PatchResult(False, [
                f"base_version: {base_version} is stale, the overrides are at version {disk.version}; "
                "read config/state again and send the patch against it"
            ], version=disk.version)  # fmt: skip
        overrides = _pruned(merge_patch(disk.tuning, patch))
        try:
            site = self._validated(overrides)
        except ConfigError as err:
            return PatchResult(False, err.errors, version=disk.version)
        try:
            before_site = self._validated(disk.tuning)
        except ConfigError:
            before_site = self.site  # the file no longer holds against the site: what was in force
        before = _flatten(before_site.tuning.model_dump(mode="json"))
        after = _flatten(site.tuning.model_dump(mode="json"))
        changes = {k: [before.get(k), v] for k, v in after.items() if before.get(k) != v}
        version = disk.version
        if overrides != disk.tuning:
            version += 1
            now = datetime.now(UTC).isoformat(timespec="seconds")
            body = {"format": _FORMAT, "version": version, "updated_at": now, "updated_by": who["by"],
                    "tuning": overrides}  # fmt: skip
            entry = {"at": now, **who, "base_version": base_version, "version": version, "patch": patch,
                     "changes": changes}  # fmt: skip
            try:
                self._write(body, entry)
            except OSError as err:
                line = f"overrides file {self.path}: cannot write: {err.strerror}; nothing changed"
                return PatchResult(False, [line], version=disk.version)
        self.overrides, self.version, self.site = overrides, version, site
        self._loaded_stamp = self._stamp()
        _log.warning("tuning changed", extra={**who, "version": version, "changes": changes})
        return PatchResult(True, changes=changes, site=site, version=version)

    @staticmethod
    def _shape_errors(patch: Any) -> list[str]:
        if not isinstance(patch, dict):
            return [f"patch: expected a JSON object of [tuning] fields, got {json_type_name(patch)}"]
        if not patch:
            return ["patch: empty; nothing to change"]
        if nesting_depth(patch, MAX_PATCH_DEPTH) > MAX_PATCH_DEPTH:
            return [f"patch: nested deeper than {MAX_PATCH_DEPTH} levels; [tuning] is not that deep"]
        return patch_errors(patch)

    def _write(self, body: dict[str, Any], entry: dict[str, Any]) -> None:
        """The overrides file, then its audit line. The audit log is opened first: a change it cannot
        record is not made. Both readable by all (0644): the controller and a shell may run as different
        accounts, and tuning is not secret. The audit line is fsynced: it survives the power cut the
        file does."""
        self.audit_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.audit_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            write_atomic(self.path, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode(), keep_previous=True)
        except BaseException:
            os.close(fd)
            raise
        # From here the change is made: a failure is logged loudly, not reported as "nothing changed".
        try:
            with contextlib.suppress(OSError):
                self.path.chmod(0o644)
            os.write(fd, (json.dumps(entry, sort_keys=True, default=str) + "\n").encode())
            os.fsync(fd)
        except OSError as err:
            _log.error("tuning changed but its audit line was not written",
                       extra={"file": str(self.audit_path), "error": err.strerror, "entry": entry})  # fmt: skip
        finally:
            os.close(fd)

    def state(self) -> dict[str, Any]:
        """What `config get` and the retained config topic show."""
        return {
            "tuning": self.site.tuning.model_dump(mode="json"),
            "overrides": self.overrides,
            "version": self.version,
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
        try:
            site = await asyncio.to_thread(store.reload_if_changed)
        except Exception:  # runs in the control loop's TaskGroup: logged, tried again, never the loop's end
            _log.exception("tuning file check failed", extra={"file": str(store.path)})
            continue
        if site is not None:
            _log.warning("tuning file changed, applying", extra={"file": str(store.path), "version": store.version})
            on_change(site)
