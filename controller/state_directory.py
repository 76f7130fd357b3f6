"""Where a site's relative storage paths live when systemd gives the service a state directory.

A site file says `storage.path = "var/school.sqlite3"`: relative to the working directory from a shell,
and relative to $STATE_DIRECTORY (systemd's `StateDirectory=`, /var/lib/greensite) under systemd, where
the working directory is not the service's to choose. Absolute paths are left as they are.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from config import SiteConfig

__all__ = ["state_directory", "storage_in_state_directory"]


def state_directory(environ: Mapping[str, str] | None = None) -> Path | None:
    """$STATE_DIRECTORY, or None when unset; with several directories systemd joins them with ':', the
    first is ours (the unit names one)."""
    env = os.environ if environ is None else environ
    first = env.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(first) if first and Path(first).is_absolute() else None


def storage_in_state_directory(site: SiteConfig, environ: Mapping[str, str] | None = None) -> SiteConfig:
    """The site with relative `storage.path` and `storage.tuning_path` under $STATE_DIRECTORY when set."""
    base = state_directory(environ)
    if base is None:
        return site
    update: dict[str, str] = {}
    if not Path(site.storage.path).is_absolute():
        update["path"] = str(base / site.storage.path)
    tuning = site.storage.tuning_path
    if tuning is not None and not Path(tuning).is_absolute():
        update["tuning_path"] = str(base / tuning)
    if not update:
        return site
    return site.model_copy(update={"storage": site.storage.model_copy(update=update)})
