"""Site files: the examples validate, broken ones are refused with the field named."""

from __future__ import annotations

import copy
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from config import Band, ConfigError, load_site, parse_site
from controller.cli import main
from controller.cli._schema_cmd import SCHEMA_PATH, site_schema_text

SITES = sorted((Path(__file__).parents[1] / "config" / "sites").glob("*.toml"))
SCHOOL = Path(__file__).parents[1] / "config" / "sites" / "zhongshan_school.toml"


def school() -> dict[str, Any]:
    return tomllib.loads(SCHOOL.read_text())


def refused(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_site(data, environment=False)
    return info.value.errors


@pytest.mark.parametrize("path", SITES, ids=lambda p: p.name)
def test_every_example_site_validates(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--no-env", str(path)]) == 0
    assert ": ok (" in capsys.readouterr().out


def test_school_site_matches_the_brief() -> None:
    site = load_site(SCHOOL, environment=False)
    assert site.pv is not None
    assert site.pv.peak_kw == pytest.approx(300)
    assert site.battery is not None
    assert site.battery.capacity_kwh == 200
    assert site.battery.max_discharge_kw == 100
    assert [round(c.max_kw) for c in site.ev_chargers] == [22, 22]
    assert site.export_limit_kw == 0.0
    assert all(bus.simulated for bus in site.buses)


def test_tariff_bands_follow_guangdong_summer_critical_peak() -> None:
    tariff = load_site(SCHOOL, environment=False).tariff
    assert tariff.band_at(datetime(2026, 8, 3, 11, 30))[0] is Band.CRITICAL_PEAK
    assert tariff.band_at(datetime(2026, 11, 3, 11, 30))[0] is Band.PEAK
    band, price_cny_per_kwh = tariff.band_at(datetime(2026, 11, 3, 3, 0))
    assert band is Band.VALLEY
    assert price_cny_per_kwh == pytest.approx(0.2506)
    assert tariff.band_at(datetime(2026, 11, 3, 23, 59))[0] is Band.FLAT


def test_wrong_type_is_named() -> None:
    data = school()
    data["battery"]["capacity_kwh"] = "lots"
    assert any(e.startswith("battery.capacity_kwh:") and "'lots'" in e for e in refused(data))


def test_unknown_key_is_named() -> None:
    data = school()
    data["grid"]["export_limit_kwh"] = 0
    assert any(e.startswith("grid.export_limit_kwh:") and "Extra inputs" in e for e in refused(data))


def test_negative_export_limit_is_named() -> None:
    data = school()
    data["grid"]["export_limit_kw"] = -5
    assert any(e.startswith("grid.export_limit_kw:") for e in refused(data))


def test_soc_min_above_max_is_named() -> None:
    data = school()
    data["battery"]["soc_min"], data["battery"]["soc_max"] = 0.9, 0.3
    assert any(e.startswith("battery:") and "soc_min" in e for e in refused(data))


def test_overlapping_tou_periods_are_named() -> None:
    data = school()
    data["tariff"]["seasons"][1]["periods"][0]["end"] = "09:00"
    errors = refused(data)
    assert any(e.startswith("tariff.seasons.1:") and "overlaps" in e for e in errors), errors


def test_tou_gap_and_missing_month_are_named() -> None:
    data = school()
    del data["tariff"]["seasons"][1]["periods"][-1]
    assert any("19:00-24:00 without a band" in e for e in refused(data))
    data = school()
    data["tariff"]["seasons"][0]["months"] = [7, 8]
    assert any(e.startswith("tariff:") and "months [9] belong to no season" in e for e in refused(data))


def test_every_error_is_listed_not_just_the_first() -> None:
    data = school()
    data["grid"]["export_limit_kw"] = -1
    data["site"]["timezone"] = "Mars/Olympus"
    data["battery"]["charge_efficiency"] = 2
    assert len(refused(data)) == 3


def test_tuning_cannot_exceed_ratings() -> None:
    data = school()
    data["tuning"]["grid"] = {"export_limit_kw": 5.0}
    assert any("export_limit_kw (5.0) exceeds the grid rating 0.0" in e for e in refused(data))
    data = school()
    data["tuning"]["battery"]["max_charge_kw"] = 150
    assert any("max_charge_kw (150.0) exceeds the rating 100.0" in e for e in refused(data))


def test_modbus_address_range_and_duplicates() -> None:
    data = school()
    data["buses"][0]["devices"][1]["address"] = 2
    assert any("address 2 is used twice" in e for e in refused(data))
    data = school()
    data["buses"][1]["devices"][0]["address"] = 5
    assert any(e.startswith("buses.1:") and "12-digit" in e for e in refused(data))


def test_unknown_register_map_fails_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = SCHOOL.read_text().replace('model = "eastron_sdm630"', 'model = "eastron_sdm999"')
    bad = tmp_path / "site.toml"
    bad.write_text(text)
    assert main(["validate", "--no-env", str(bad)]) == 2
    assert "buses.0.devices.0.model: no register map 'eastron_sdm999'" in capsys.readouterr().out


def test_toml_syntax_error_gives_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "site.toml"
    bad.write_text("[site]\nid = \n")
    assert main(["validate", str(bad)]) == 2
    assert "line 2" in capsys.readouterr().out


def test_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GREENSITE_MQTT__PASSWORD", "s3cret")
    monkeypatch.setenv("GREENSITE_CONTROL__TICK_PERIOD_S", "0.5")
    site = load_site(SCHOOL)
    assert site.mqtt.password is not None
    assert site.mqtt.password.get_secret_value() == "s3cret"
    assert site.control.tick_period_s == 0.5
    assert site.battery is not None
    assert site.battery.capacity_kwh == 200


def test_bad_environment_override_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GREENSITE_GRID__EXPORT_LIMIT_KW", "-3")
    with pytest.raises(ConfigError) as info:
        load_site(SCHOOL)
    assert any(e.startswith("grid.export_limit_kw:") for e in info.value.errors)


def test_checked_in_schema_is_current() -> None:
    assert SCHEMA_PATH.read_text() == site_schema_text(), "run `greensite schema --write`"


def test_schema_command_prints_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    out = capsys.readouterr().out
    assert '"title": "greensite site file"' in out
    assert '"import_limit_kw"' in out


def test_valid_patch_is_a_deep_copy_away() -> None:
    # A tuning change is validated as a whole site; a good one goes through.
    data = copy.deepcopy(school())
    data["tuning"]["grid"]["import_limit_kw"] = 300.0
    assert parse_site(data, environment=False).import_limit_kw == 300.0


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        (lambda d: d["tuning"]["grid"].update(export_relief_order=["battery", "ev"]),
         "tuning.grid.export_relief_order leaves out 'pv'"),
        (lambda d: d["tuning"]["grid"].update(import_relief_order=["battery"]),
         "tuning.grid.import_relief_order leaves out 'ev'"),
        (lambda d: d["tuning"]["grid"].update(import_limit_kw=0.0), "tuning.grid.import_limit_kw (0.0 kW) is below"),
        (lambda d: d["grid"].update(import_limit_kw=1.0), "grid.import_limit_kw (1.0 kW) is below"),
        (lambda d: d["tuning"]["battery"].update(max_charge_kw=0.0),
         "tuning.battery.max_charge_kw is 0.0 kW, under 1.0 kW"),
        (lambda d: d["tuning"]["battery"].update(max_discharge_kw=0.0),
         "tuning.battery.max_discharge_kw is 0.0 kW, under 1.0 kW"),
        (lambda d: d["control"]["safe_state"].update(pv="unrestricted"), "control.safe_state.pv is 'unrestricted'"),
    ],
    ids=["export-order-without-pv", "import-order-without-ev", "tuned-import-0", "rated-import-1",
         "charge-0", "discharge-0", "blind-pv-unrestricted"],
)  # fmt: skip
def test_a_limit_that_could_not_be_enforced_is_refused(change: Any, phrase: str) -> None:
    """The issue's patches (a relief order that leaves PV out, a zero import limit, a 0 kW battery) are
    refused with the field named and why, in the site file as over MQTT (the same schema)."""
    data = school()
    change(data)
    errors = refused(data)
    assert any(phrase in e for e in errors), errors


def test_uncurtailable_pv_needs_some_lever() -> None:
    data = school()
    data["pv"]["curtailable"] = False
    data["buses"][0]["devices"] = [d for d in data["buses"][0]["devices"]
                                   if d["kind"] not in {"pv_inverter", "battery_inverter", "ev_charger"}]  # fmt: skip
    del data["battery"]
    data["ev_chargers"] = []
    data["tuning"]["grid"] = {}
    errors = refused(data)
    assert any("nothing can hold the export limit" in e for e in errors), errors
    data["ev_chargers"] = []
    data["grid"]["export_limit_kw"] = 400.0  # above the PV peak: nothing to hold
    assert parse_site(data, environment=False).export_limit_kw == 400.0
