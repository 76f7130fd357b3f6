"""Recorded interval data: the documented format is read, every bad file is refused with its line and column,
and no input of any shape makes the parser raise anything else."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.interval_csv import MAX_CSV_BYTES, IntervalCsvError, parse_interval_csv

ZONE = ZoneInfo("Asia/Shanghai")
GOOD = b"""# exported from the meter portal
time,load_kw,pv_kw
2026-07-06T00:00:00+08:00,52.1,0.0
2026-07-06T00:15:00+08:00,50.8,0
2026-07-06 00:30,49,0.5
"""


def test_documented_format_is_read() -> None:
    series = parse_interval_csv(GOOD, ZONE)
    assert series.start == datetime(2026, 7, 6, tzinfo=ZONE)
    assert series.step_s == 900
    assert series.load_kw == (52.1, 50.8, 49.0)
    assert series.pv_kw == (0.0, 0.0, 0.5)
    # A run longer than the recording wraps around it.
    assert series.index_at(datetime(2026, 7, 6, 0, 50, tzinfo=ZONE)) == 0


def test_energy_columns_become_mean_power_and_a_bom_is_skipped() -> None:
    raw = b"\xef\xbb\xbftime,pv_kwh\n2026-07-06T10:00:00,5\n2026-07-06T10:30:00,6\n"
    series = parse_interval_csv(raw, ZONE)
    assert series.pv_kw == (10.0, 12.0)
    assert series.load_kw is None
    assert series.start.tzinfo is ZONE  # no offset: the site's local time


@pytest.mark.parametrize(
    ("raw", "line", "column", "phrase"),
    [
        (b"when,load_kw\n", 1, 1, "starts with time"),
        (b"time,load_kw,temp_c\n", 1, 3, "unknown column 'temp_c'"),
        (b"time,load_kw,load_kwh\n", 1, 3, "load is given twice"),
        (b"time,load_kw\n2026-07-06T00:00,1\n2026-07-06T00:15,x\n", 3, 2, "'x' is not a number"),
        (b"time,load_kw\n2026-07-06T00:00,1\n2026-07-06T00:15,-2\n", 3, 2, "outside 0"),
        (b"time,load_kw\n2026-07-06T00:00,1\n2026-07-06T00:15,nan\n", 3, 2, "outside 0"),
        (b"time,load_kw\n2026-07-06T00:00,1\nyesterday,2\n", 3, 1, "not an ISO 8601 time"),
        (b"time,load_kw\n2026-07-06T00:00,1\n2026-07-06T00:07,2\n", 3, 1, "interval of 7 min"),
        (b"time,load_kw\n2026-07-06T00:00,1\n2026-07-06T00:15,2\n2026-07-06T00:45,2\n", 4, 1, "30 min after"),
        (b"time,load_kw\n2026-07-06T00:00,1\n2026-07-06T00:15,2,3\n", 3, 3, "3 fields"),
        (b"time,load_kw\n2026-07-06T00:00;1\n", 2, 1, "semicolons"),
        (b"time,load_kw\n2026-07-06T00:00,1\n\xff\n", 3, 0, "not UTF-8"),
        (b"time,load_kw\n2026-07-06T00:00,1\n", 0, 0, "one interval only"),
        (b"# nothing\n", 0, 0, "no data"),
    ],
)
def test_bad_files_are_refused_with_line_and_column(raw: bytes, line: int, column: int, phrase: str) -> None:
    with pytest.raises(IntervalCsvError) as caught:
        parse_interval_csv(raw, ZONE)
    assert (caught.value.line, caught.value.column) == (line, column), str(caught.value)
    assert phrase in str(caught.value)


def test_oversized_file_is_refused_before_reading_it() -> None:
    with pytest.raises(IntervalCsvError, match="at most"):
        parse_interval_csv(b"x" * (MAX_CSV_BYTES + 1), ZONE)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_parse_or_are_refused(raw: bytes) -> None:
    where = (0, 0)
    try:
        parse_interval_csv(raw, ZONE)
    except IntervalCsvError as err:
        where = (err.line, err.column)
    assert min(where) >= 0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(min_value=0, max_value=1e4, allow_nan=False), min_size=2, max_size=30),
    st.sampled_from([1, 5, 15, 30, 60]),
    st.integers(min_value=0, max_value=29),
    st.sampled_from(["abc", "-1", "inf", "", "1e999"]),
)
def test_one_bad_value_is_named_where_it_is(values: list[float], minutes: int, bad_at: int, bad: str) -> None:
    start = datetime(2026, 7, 6, tzinfo=ZONE)
    rows = [f"{(start + timedelta(minutes=i * minutes)).isoformat()},{v!r}" for i, v in enumerate(values)]
    assert parse_interval_csv(("time,load_kw\n" + "\n".join(rows)).encode(), ZONE).load_kw == tuple(values)
    index = bad_at % len(values)
    rows[index] = rows[index].split(",")[0] + "," + bad
    with pytest.raises(IntervalCsvError) as caught:
        parse_interval_csv(("time,load_kw\n" + "\n".join(rows)).encode(), ZONE)
    assert (caught.value.line, caught.value.column) == (index + 2, 2)
