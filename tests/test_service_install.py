"""`greensite service install`: the unit it writes (checked by systemd's own analyzer), what it refuses,
what it copies, and where the service's relative storage ends up."""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from config import load_site
from controller.cli import main
from controller.cli._service_cmd import unreachable_for
from controller.service_unit import UnitSettings, render_unit, unit_name, watchdog_s_for
from controller.state_directory import state_directory, storage_in_state_directory

SITES = Path(__file__).parents[1] / "config" / "sites"
SCHOOL = SITES / "zhongshan_school.toml"  # every bus simulated
SERIAL = SITES / "community_centre_serial.toml"  # real ports, absolute storage path
ANALYZE_TIMEOUT_S = 60.0  # systemd-analyze loads the unit offline: seconds at most


def _settings(**changes: Any) -> UnitSettings:
    base = UnitSettings(
        site_id="zhongshan-school", site_file=Path("/etc/greensite/zhongshan-school.toml"),
        command=(sys.executable, "-m", "controller.cli"), user="greensite", watchdog_s=10,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


def _directives(unit: str) -> list[tuple[str, str]]:
    pairs = []
    for line in unit.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            pairs.append((key, value))
    return pairs


def test_dry_run_prints_the_unit_and_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["service", "install", str(SCHOOL), "--simulate", "--dry-run",
            "--unit-dir", str(tmp_path / "units"), "--config-dir", str(tmp_path / "etc")]  # fmt: skip
    assert main(args) == 0
    unit = capsys.readouterr().out
    directives = dict(_directives(unit))
    assert directives["Type"] == "notify"
    assert directives["NotifyAccess"] == "main"
    assert directives["WatchdogSec"] == "10s"  # ten 1 s ticks
    assert directives["Restart"] == "on-failure"
    assert directives["RestartPreventExitStatus"] == "2"
    assert directives["User"] == "greensite"
    assert directives["StateDirectory"] == "greensite"
    assert directives["CacheDirectory"] == "greensite"
    assert directives["WorkingDirectory"] == "%S/greensite"
    environment = [value for key, value in _directives(unit) if key == "Environment"]
    assert "NUMBA_CACHE_DIR=%C/greensite/numba" in environment
    assert "PYTHONFAULTHANDLER=1" in environment
    assert directives["ExecStart"].endswith(f"run {tmp_path / 'etc' / 'zhongshan-school.toml'} --simulate")
    assert "--log-json" in directives["ExecStart"]
    # Nothing that hides or fences off the serial ports.
    assert "PrivateDevices" not in directives
    assert "DevicePolicy" not in directives
    assert "DeviceAllow" not in directives
    assert "ProtectClock" not in directives
    assert "MemoryDenyWriteExecute" not in directives  # numba writes machine code it then runs
    try:
        grp.getgrnam("dialout")
        assert directives["SupplementaryGroups"] == "dialout"
    except KeyError:
        assert "SupplementaryGroups" not in directives
    assert not (tmp_path / "units").exists()
    assert not (tmp_path / "etc").exists()


def test_a_simulated_site_needs_simulate_and_a_bad_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["service", "install", str(SCHOOL), "--dry-run"]) == 2
    assert "are simulated: add --simulate" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text(SCHOOL.read_text().replace('id = "zhongshan-school"', 'id = "zhongshan-school"\ncolour = 1', 1))
    assert main(["service", "install", str(bad), "--simulate", "--dry-run"]) == 2
    assert "colour" in capsys.readouterr().err


def test_relative_tls_files_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "site.toml"
    site.write_text(SERIAL.read_text().replace('ca_file = "/etc/greensite/ca.pem"', 'ca_file = "certs/ca.pem"'))
    assert main(["service", "install", str(site), "--dry-run"]) == 2
    assert "mqtt.tls.ca_file: certs/ca.pem: give an absolute path" in capsys.readouterr().err


def test_storage_outside_the_state_directory_is_made_writable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["service", "install", str(SERIAL), "--dry-run"]) == 0
    assert "ReadWritePaths" not in capsys.readouterr().out  # /var/lib/greensite/… is the state directory
    site = tmp_path / "site.toml"
    site.write_text(SERIAL.read_text().replace("/var/lib/greensite/community-centre", "/srv/data/cc"))
    assert main(["service", "install", str(site), "--dry-run"]) == 0
    assert ("ReadWritePaths", "/srv/data") in _directives(capsys.readouterr().out)


def test_install_copies_the_site_and_writes_the_unit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    me = pwd.getpwuid(os.getuid()).pw_name  # an existing user: no account is created by this test
    units, etc = tmp_path / "units", tmp_path / "etc"
    args = ["service", "install", str(SCHOOL), "--simulate", "--user", me,
            "--unit-dir", str(units), "--config-dir", str(etc)]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    copy = etc / "zhongshan-school.toml"
    assert copy.read_bytes() == SCHOOL.read_bytes()
    assert copy.stat().st_mode & 0o777 == 0o640  # it may hold a broker password
    unit = (units / unit_name("zhongshan-school")).read_text()
    assert ("User", me) in _directives(unit)
    assert f"run {copy} --simulate" in dict(_directives(unit))["ExecStart"]
    assert "systemctl daemon-reload" in out
    assert "systemctl enable --now greensite-zhongshan-school.service" in out


def test_exec_start_quotes_paths_and_escapes_specifiers() -> None:
    unit = render_unit(_settings(site_file=Path("/etc/green site/100%.toml"), command=("/opt/$x/greensite",)))
    assert dict(_directives(unit))["ExecStart"] == (
        "'/opt/$$x/greensite' --log-level INFO --log-json run '/etc/green site/100%%.toml'"
    )


def test_the_watchdog_period_follows_the_tick() -> None:
    assert watchdog_s_for(1.0) == 10
    assert watchdog_s_for(0.2) == 10
    assert watchdog_s_for(2.5) == 25
    assert watchdog_s_for(60.0) == 600


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd not installed (scripts/test installs it)")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    """systemd's own parser, offline: any directive it does not know or cannot parse is reported."""

    def complaints(text: str) -> str:
        path = tmp_path / "greensite-check.service"
        path.write_text(text)
        result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)],
                                check=False, capture_output=True, text=True, timeout=ANALYZE_TIMEOUT_S)  # fmt: skip
        return result.stderr.strip()

    for settings in (_settings(), _settings(simulate=True, home_read_only=True, writable_paths=("/srv/data",))):
        assert complaints(render_unit(settings)) == ""
    # The check can fail: a typo in a directive is reported.
    assert "WatchdogSecs" in complaints(render_unit(_settings()).replace("WatchdogSec=", "WatchdogSecs="))


def test_unreachable_paths_are_named() -> None:
    nobody, groups = 65534, {65534}
    base = Path(tempfile.mkdtemp(prefix="gs-reach-"))  # in /tmp, whose parents anyone may enter
    try:
        code = base / "opt" / "venv" / "bin"
        code.mkdir(parents=True)
        interpreter = code / "python"
        interpreter.write_text("")
        for folder in (base, base / "opt", base / "opt" / "venv", code):
            folder.chmod(0o755)
        interpreter.chmod(0o755)
        assert unreachable_for(interpreter, nobody, groups) is None
        (base / "opt" / "venv").chmod(0o700)
        assert unreachable_for(interpreter, nobody, groups) == base / "opt" / "venv"
        (base / "opt" / "venv").chmod(0o750)
        owner_group = (base / "opt" / "venv").stat().st_gid
        assert unreachable_for(interpreter, nobody, {owner_group}) is None  # the group may enter
        (base / "opt" / "venv").chmod(0o755)
        interpreter.chmod(0o750)
        assert unreachable_for(interpreter, nobody, groups) == interpreter
        assert unreachable_for(interpreter, 0, set()) is None  # root reaches everything
        assert unreachable_for(base / "missing", nobody, groups) == base / "missing"
    finally:
        shutil.rmtree(base)


def test_relative_storage_lives_in_the_state_directory() -> None:
    school = load_site(SCHOOL, environment=False)
    assert storage_in_state_directory(school, {}) is school
    moved = storage_in_state_directory(school, {"STATE_DIRECTORY": "/var/lib/greensite"})
    assert moved.storage.path == "/var/lib/greensite/" + school.storage.path
    assert moved.storage.state_path.startswith("/var/lib/greensite/")
    assert moved.storage.resolved_tuning_path.startswith("/var/lib/greensite/")
    tuned = school.model_copy(update={"storage": school.storage.model_copy(update={"tuning_path": "t.json"})})
    assert storage_in_state_directory(tuned, {"STATE_DIRECTORY": "/s"}).storage.tuning_path == "/s/t.json"
    serial = load_site(SERIAL, environment=False)  # absolute: left where it is
    assert storage_in_state_directory(serial, {"STATE_DIRECTORY": "/s"}) is serial
    assert state_directory({"STATE_DIRECTORY": "/var/lib/a:/var/lib/b"}) == Path("/var/lib/a")
    assert state_directory({"STATE_DIRECTORY": "relative"}) is None
