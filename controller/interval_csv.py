"""Recorded interval data (load and PV, 1 to 60 minutes, as a utility portal or a meter exports it) for the
simulated plant to replay. Pure: bytes in, series out; a bad file is refused with its line and column.

    # lines starting with # are comments
    time,load_kw,pv_kw
    2026-07-06T00:00:00+08:00,52.1,0.0
    2026-07-06T00:15:00+08:00,50.8,0.0

- `time`: the interval's start, ISO 8601 (`2026-07-06 00:15` too); without an offset it is the site's
  local time. Strictly increasing by one fixed interval of 1 to 60 minutes that divides an hour; no gaps.
- Data columns, any of: `load_kw`, `pv_kw` (mean power over the interval) or `load_kwh`, `pv_kwh` (energy
  in the interval, turned into mean power); one of each quantity at most. Values from 0 to 100000 kW.
- UTF-8 (a byte order mark is skipped), comma-separated, at most 10 MB.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo

__all__ = ["MAX_CSV_BYTES", "IntervalCsvError", "IntervalSeries", "parse_interval_csv"]

MAX_CSV_BYTES = 10 * 1024 * 1024
MAX_KW = 100_000.0
MAX_FIELD_CHARS = 64
COLUMNS = {"load_kw": ("load", False), "pv_kw": ("pv", False), "load_kwh": ("load", True), "pv_kwh": ("pv", True)}


class IntervalCsvError(ValueError):
    """The file is refused: `line` and `column` (1-based; 0 when it is about the whole file) say where."""

    def __init__(self, line: int, column: int, message: str) -> None:
        self.line, self.column, self.message = line, column, message
        where = f"line {line}" + (f", column {column}" if column else "")
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True, slots=True)
class IntervalSeries:
    start: datetime  # aware
    step_s: float
    load_kw: tuple[float, ...] | None
    pv_kw: tuple[float, ...] | None

    @property
    def length(self) -> int:
        return len(self.load_kw or self.pv_kw or ())

    @property
    def duration_s(self) -> float:
        return self.length * self.step_s

    def index_at(self, when: datetime) -> int:
        """The interval holding `when`; a run longer than the recording wraps around it."""
        seconds = (when - self.start).total_seconds()
        return int(seconds // self.step_s) % self.length


def _time(text: str, zone: tzinfo, line: int) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        what = f"time: {text[:40]!r} is not an ISO 8601 time (2026-07-06T00:15:00+08:00)"
        raise IntervalCsvError(line, 1, what) from None
    return when.replace(tzinfo=zone) if when.tzinfo is None else when


def parse_interval_csv(raw: bytes, zone: tzinfo) -> IntervalSeries:
    """Decode a recording; raises IntervalCsvError naming the line and column at fault."""
    if len(raw) > MAX_CSV_BYTES:
        raise IntervalCsvError(0, 0, f"{len(raw)} bytes; at most {MAX_CSV_BYTES} are read")
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise IntervalCsvError(raw[: err.start].count(b"\n") + 1, 0, "not UTF-8 text") from None
    header: list[str] | None = None
    kinds: list[tuple[str, bool]] = []
    times: list[datetime] = []
    columns: dict[str, list[float]] = {}
    step: timedelta | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in line.split(",")]
        if header is None:
            header = [f.lower() for f in fields]
            if header[0] != "time":
                what = f"the first column is {fields[0][:40]!r}; the header starts with time"
                raise IntervalCsvError(number, 1, what)
            seen: set[str] = set()
            for column, name in enumerate(header[1:], start=2):
                if name not in COLUMNS:
                    what = f"unknown column {name[:40]!r}; expected {', '.join(COLUMNS)}"
                    raise IntervalCsvError(number, column, what)
                quantity = COLUMNS[name][0]
                if quantity in seen:
                    raise IntervalCsvError(number, column, f"{quantity} is given twice")
                seen.add(quantity)
                kinds.append(COLUMNS[name])
                columns[quantity] = []
            if not kinds:
                raise IntervalCsvError(number, 0, "no data column; give load_kw, pv_kw (or _kwh) after time")
            continue
        if len(fields) != len(header):
            hint = " (semicolons? the file is comma-separated)" if ";" in line and len(fields) == 1 else ""
            raise IntervalCsvError(number, min(len(fields), len(header)) + (len(fields) > len(header)),
                                   f"{len(fields)} fields, the header has {len(header)}{hint}")  # fmt: skip
        for column, value in enumerate(fields, start=1):
            if len(value) > MAX_FIELD_CHARS:
                raise IntervalCsvError(number, column, f"a field of {len(value)} characters")
        when = _time(fields[0], zone, number)
        if times:
            gap = when - times[-1]
            if step is None:
                step = gap
                minutes = step.total_seconds() / 60
                if not (1 <= minutes <= 60 and minutes == int(minutes) and 60 % int(minutes) == 0):
                    raise IntervalCsvError(number, 1, f"interval of {minutes:g} min; 1 to 60 min, dividing an hour")
            elif gap != step:
                what = (f"{when.isoformat()} is {gap.total_seconds() / 60:g} min after the line before; the file's"
                        f" interval is {step.total_seconds() / 60:g} min")  # fmt: skip
                raise IntervalCsvError(number, 1, what)
        times.append(when)
        for column, ((quantity, _), value) in enumerate(zip(kinds, fields[1:], strict=True), start=2):
            try:
                number_value = float(value)
            except ValueError:
                what = f"{header[column - 1]}: {value[:40]!r} is not a number"
                raise IntervalCsvError(number, column, what) from None
            columns[quantity].append(number_value)
            if not 0.0 <= number_value <= MAX_KW:  # NaN fails both comparisons
                what = f"{header[column - 1]}: {value[:40]} is outside 0 to {MAX_KW:g}"
                raise IntervalCsvError(number, column, what)
    if header is None or not times:
        raise IntervalCsvError(0, 0, "no data: a header line (time,load_kw,pv_kw) and at least two intervals")
    if step is None:
        raise IntervalCsvError(0, 0, "one interval only: the interval length cannot be told")
    step_h = step.total_seconds() / 3600
    out: dict[str, tuple[float, ...]] = {}
    for quantity, energy in kinds:
        values = columns[quantity]
        out[quantity] = tuple(v / step_h for v in values) if energy else tuple(values)
    return IntervalSeries(times[0], step.total_seconds(), out.get("load"), out.get("pv"))
