"""What a valid site file still needs from the machine it starts on: TLS files that exist, are readable
and load; TLS settings that match the broker's scheme; storage directories the controller can write.

The schema checks the file; this checks the file against the machine (`greensite validate`), so a
missing CA file is named by its field before the start, not found as "MQTT connection lost".
"""

from __future__ import annotations

import ssl
import tempfile
from pathlib import Path

from config._schema import SiteConfig

__all__ = ["preflight"]


def _readable_file(field: str, name: str) -> list[str]:
    path = Path(name)
    if not path.exists():
        return [f"{field}: {name}: no such file"]
    if not path.is_file():
        return [f"{field}: {name}: not a regular file"]
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as err:
        return [f"{field}: {name}: cannot read: {err.strerror}"]
    return []


def _tls_scheme_errors(site: SiteConfig) -> list[str]:
    mqtt = site.mqtt
    if mqtt.tls is None or mqtt.broker.startswith("mqtts://"):
        return []
    where = "the embedded broker" if mqtt.broker == "embedded" else f"an mqtt:// broker ({mqtt.broker})"
    return [f"mqtt.tls: TLS settings under {where} would be ignored; use mqtts://host:port or remove [mqtt.tls]"]


def _tls_file_errors(site: SiteConfig) -> list[str]:
    tls = site.mqtt.tls
    if tls is None or not site.mqtt.broker.startswith("mqtts://"):
        return []
    errors: list[str] = []
    for field in ("ca_file", "cert_file", "key_file"):
        name = getattr(tls, field)
        if name is not None:
            errors += _readable_file(f"mqtt.tls.{field}", name)
    if errors:
        return errors
    context = ssl.create_default_context()
    if tls.ca_file is not None:
        try:
            context.load_verify_locations(cafile=tls.ca_file)
        except (ssl.SSLError, ValueError) as err:
            errors.append(f"mqtt.tls.ca_file: {tls.ca_file}: not a PEM CA certificate ({err})")
    if tls.cert_file is not None and tls.key_file is not None:
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        except ssl.SSLError as err:
            errors.append(f"mqtt.tls.cert_file: {tls.cert_file} with key_file {tls.key_file}: do not load ({err})")
    return errors


def _writable_directory(field: str, file_name: str) -> list[str]:
    """The directory of `file_name` is writable, or can be created (its nearest existing parent is)."""
    directory = Path(file_name).parent.absolute()
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return [f"{field}: {file_name}: {existing} is not a directory"]
    try:  # a real write: os.access says yes to root on a read-only file system
        with tempfile.TemporaryFile(dir=existing, prefix=".greensite-validate-"):
            pass
    except OSError as err:
        verb = "write in" if existing == directory else f"create {directory} in"
        return [f"{field}: {file_name}: cannot {verb} {existing} ({err.strerror})"]
    return []


def preflight(site: SiteConfig, *, machine: bool = True) -> list[str]:
    """Every problem this site would meet at start, by field path; [] when none. With `machine` off,
    only what the file alone says (TLS settings against the broker's scheme)."""
    errors: list[str] = []
    if site.mqtt.enabled:
        errors += _tls_scheme_errors(site)
        if machine:
            errors += _tls_file_errors(site)
    if machine:
        errors += _writable_directory("storage.path", site.storage.path)
        tuning = site.storage.resolved_tuning_path
        if Path(tuning).parent.absolute() != Path(site.storage.path).parent.absolute():
            errors += _writable_directory("storage.tuning_path", tuning)
    return errors
