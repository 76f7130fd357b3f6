"""External forecasts: the documented shape is taken, hostile payloads are refused naming the field (and
index), the forecaster uses a fresh one and its own otherwise, and the MQTT handler never raises."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config import load_site
from controller.external_forecast import MAX_FORECAST_BYTES, MAX_POINTS, ForecastRefused, parse_forecast
from controller.forecast import Forecaster

SITE = load_site(Path(__file__).parents[1] / "config" / "sites" / "zhongshan_school.toml", environment=False)
ZONE = ZoneInfo("Asia/Shanghai")
NOW = datetime(2026, 7, 6, 5, 0, tzinfo=ZONE)
PEAK_KW = SITE.pv.peak_kw if SITE.pv else 0.0


def _body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"issued_at": "2026-07-06T05:00:00+08:00", "start": "2026-07-06T06:00:00+08:00",
                            "step_minutes": 30, "pv_kw": [0.0, 10.0, 20.0], "source": "solcast"}  # fmt: skip
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def _refusal(body: Any) -> list[str]:
    with pytest.raises(ForecastRefused) as caught:
        parse_forecast(json.dumps(body).encode(), now=NOW, pv_peak_kw=PEAK_KW)
    return caught.value.errors


def test_documented_shape_is_taken() -> None:
    forecast = parse_forecast(json.dumps(_body(load_kw=[50, 60, 70])).encode(), now=NOW, pv_peak_kw=PEAK_KW)
    assert forecast.value_at("pv_kw", datetime(2026, 7, 6, 6, 45, tzinfo=ZONE)) == 10.0
    assert forecast.value_at("load_kw", datetime(2026, 7, 6, 7, 0, tzinfo=ZONE)) == 70.0
    assert forecast.value_at("pv_kw", datetime(2026, 7, 6, 7, 30, tzinfo=ZONE)) is None  # past its end
    assert forecast.fresh(NOW + timedelta(hours=11), 12.0)
    assert not forecast.fresh(NOW + timedelta(hours=13), 12.0)


@pytest.mark.parametrize(
    ("changes", "phrase"),
    [
        ({"pv_kw": [0.0, -1.0, 2.0]}, "pv_kw[1]: -1.0 kW is outside"),
        ({"pv_kw": [0.0, 1.0, "2"]}, "pv_kw[2]: expected a number"),
        ({"pv_kw": [0.0, True]}, "pv_kw[1]: expected a number"),
        ({"pv_kw": [1e9]}, "pv_kw[0]"),
        ({"pv_kw": {"a": 1}}, "pv_kw: expected a list"),
        ({"pv_kw": []}, "pv_kw: 0 values"),
        ({"pv_kw": [0.0] * (MAX_POINTS + 1)}, f"1 to {MAX_POINTS}"),
        ({"pv_kw": None}, "pv_kw: missing"),
        ({"load_kw": [1.0]}, "load_kw: 1 values, pv_kw has 3"),
        ({"issued_at": "2026-07-06T05:00:00"}, "issued_at: '2026-07-06T05:00:00' has no UTC offset"),
        ({"issued_at": "tomorrow"}, "issued_at: 'tomorrow' is not an ISO 8601 time"),
        ({"issued_at": "2026-07-07T05:00:00+08:00"}, "issued_at: 2026-07-07T05:00:00+08:00 is after"),
        ({"start": 7}, "start: an ISO 8601 time"),
        ({"step_minutes": 7}, "step_minutes"),
        ({"step_minutes": 30.0}, "step_minutes"),
        ({"source": "x" * 41}, "source"),
        ({"extra": 1}, "unknown keys ['extra']"),
    ],
)
def test_hostile_fields_are_named(changes: dict[str, Any], phrase: str) -> None:
    errors = _refusal(_body(**changes))
    assert any(phrase in e for e in errors), errors


@pytest.mark.parametrize(
    ("raw", "phrase"),
    [
        (b"[1, 2]", "expected a JSON object"),
        (b'{"pv_kw": [NaN]}', "NaN"),
        (b'{"a": 1, "a": 2}', "duplicate"),
        (b"[" * 50 + b"]" * 50, "deep"),
        (b"{" + b" " * MAX_FORECAST_BYTES + b"}", "bytes"),
        (b"\xff\xfe{}", "byte order mark"),
    ],
)
def test_hostile_bytes_are_refused(raw: bytes, phrase: str) -> None:
    with pytest.raises(ForecastRefused) as caught:
        parse_forecast(raw, now=NOW, pv_peak_kw=PEAK_KW)
    assert any(phrase.lower() in e.lower() for e in caught.value.errors), caught.value.errors


def test_a_site_without_pv_refuses_a_pv_forecast() -> None:
    with pytest.raises(ForecastRefused, match="this site has no PV"):
        parse_forecast(json.dumps(_body()).encode(), now=NOW, pv_peak_kw=None)


_json = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["issued_at", "start", "step_minutes", "pv_kw", "load_kw", "source", "x"]),
                       _json, max_size=7))  # fmt: skip
def test_any_json_is_taken_or_refused_naming_a_field(body: dict[str, Any]) -> None:
    errors: list[str] = []
    try:
        parse_forecast(json.dumps(body).encode(), now=NOW, pv_peak_kw=PEAK_KW)
    except ForecastRefused as err:
        errors = err.errors or ["(empty)"]
    assert all(":" in e for e in errors)  # "field: why" / "field[i]: why"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_taken_or_refused(raw: bytes) -> None:
    errors = ["taken"]
    try:
        parse_forecast(raw, now=NOW, pv_peak_kw=PEAK_KW)
    except ForecastRefused as err:
        errors = err.errors
    assert errors


def test_forecaster_uses_a_fresh_external_forecast_and_its_own_otherwise() -> None:
    forecaster = Forecaster(SITE, 15)
    start = datetime(2026, 7, 6, 6, 0, tzinfo=ZONE)
    own = forecaster.pv_kw(start, 8, 15)
    forecaster.external = parse_forecast(json.dumps(_body(pv_kw=[1.0, 2.0, 3.0])).encode(), now=NOW,
                                         pv_peak_kw=PEAK_KW)  # fmt: skip
    # The external covers 06:00-07:30 (three 30-minute steps); the plan's later steps are the own forecast.
    assert forecaster.pv_kw(start, 8, 15, now=NOW) == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, own[6], own[7]]
    stale = NOW + timedelta(hours=SITE.forecast.external_max_age_h + 1)
    assert forecaster.pv_kw(start, 8, 15, now=stale) == own
