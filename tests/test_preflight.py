"""`greensite validate` checks what a site needs of the machine at start (issue 17): TLS files exist,
are readable and load, TLS settings match the broker's scheme, storage is writable; by field path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from config import SiteConfig, load_site
from config._preflight import preflight
from tests.test_mqtt import SCHOOL, _test_pki


def _site(tmp_path: Path, storage: dict[str, Any] | None = None, **mqtt: Any) -> SiteConfig:
    data = load_site(SCHOOL, environment=False).model_dump()
    data["mqtt"].update(mqtt)
    data["storage"] = storage or {"path": str(tmp_path / "var" / "series.sqlite3")}
    return SiteConfig.model_validate(data)


def test_a_good_site_passes(tmp_path: Path) -> None:
    assert preflight(_site(tmp_path)) == []


def test_tls_under_a_plain_broker_is_an_error_even_for_the_file_alone(tmp_path: Path) -> None:
    plain = _site(tmp_path, broker="mqtt://broker.example:1883", tls={"ca_file": "/nonexistent/ca.pem"})
    errors = preflight(plain, machine=False)
    assert errors == [
        "mqtt.tls: TLS settings under an mqtt:// broker (mqtt://broker.example:1883) would be ignored; "
        "use mqtts://host:port or remove [mqtt.tls]"
    ]
    embedded = _site(tmp_path, tls={"ca_file": "/nonexistent/ca.pem"})
    assert preflight(embedded)[0].startswith("mqtt.tls: TLS settings under the embedded broker")


def test_tls_files_must_exist_be_readable_and_load(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    _test_pki(pki)
    tls = {"ca_file": str(pki / "ca.pem"), "cert_file": str(pki / "client.pem"), "key_file": str(pki / "client.key")}
    broker = "mqtts://127.0.0.1:8883"
    assert preflight(_site(tmp_path, broker=broker, tls=tls)) == []
    missing = preflight(_site(tmp_path, broker=broker, tls={**tls, "ca_file": str(pki / "nope.pem")}))
    assert missing == [f"mqtt.tls.ca_file: {pki / 'nope.pem'}: no such file"]
    assert preflight(_site(tmp_path, broker=broker, tls={**tls, "ca_file": str(pki)})) == [
        f"mqtt.tls.ca_file: {pki}: not a regular file"
    ]
    (pki / "junk.pem").write_text("not a certificate\n")
    junk = preflight(_site(tmp_path, broker=broker, tls={**tls, "ca_file": str(pki / "junk.pem")}))
    assert len(junk) == 1
    assert junk[0].startswith(f"mqtt.tls.ca_file: {pki / 'junk.pem'}: not a PEM CA certificate")
    crossed = preflight(_site(tmp_path, broker=broker, tls={**tls, "key_file": str(pki / "server.key")}))
    assert len(crossed) == 1
    assert crossed[0].startswith("mqtt.tls.cert_file:")
    assert "do not load" in crossed[0]
    assert preflight(_site(tmp_path, broker=broker, tls={**tls, "ca_file": str(pki / "nope.pem")}), machine=False) == []


def test_storage_must_be_writable(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    inside_a_file = tmp_path / "a-file" / "series.sqlite3"
    errors = preflight(_site(tmp_path, storage={"path": str(inside_a_file)}))
    assert errors == [f"storage.path: {inside_a_file}: {tmp_path / 'a-file'} is not a directory"]
    # /proc takes no files, whoever we are (root passes os.access checks).
    unwritable = preflight(_site(tmp_path, storage={"path": "/proc/greensite-test/series.sqlite3"}))
    assert len(unwritable) == 1
    assert unwritable[0].startswith("storage.path: /proc/greensite-test/series.sqlite3: cannot create")
    elsewhere = _site(tmp_path, storage={"path": str(tmp_path / "series.sqlite3"),
                                         "tuning_path": "/proc/greensite-test/t.json"})  # fmt: skip
    assert preflight(elsewhere)[0].startswith("storage.tuning_path: /proc/greensite-test/t.json: cannot create")


def test_validate_names_the_missing_ca_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from controller.cli import main

    monkeypatch.chdir(tmp_path)  # the school's storage is relative: var/...
    site_file = tmp_path / "site.toml"
    text = SCHOOL.read_text().replace('broker = "embedded"', 'broker = "mqtts://127.0.0.1:8883"')
    assert text != SCHOOL.read_text()
    site_file.write_text(text + f'\n[mqtt.tls]\nca_file = "{tmp_path / "ca.pem"}"\n')
    assert main(["validate", str(site_file)]) == 2
    assert f"mqtt.tls.ca_file: {tmp_path / 'ca.pem'}: no such file" in capsys.readouterr().out
    assert main(["validate", "--no-env", str(site_file)]) == 0  # the file alone is fine
