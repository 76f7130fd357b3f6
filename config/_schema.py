"""The site file schema: hardware ratings, wiring, tariff, and the tunable parameters bounded by them."""

from __future__ import annotations

import re
from datetime import date, datetime, time, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

__all__ = [
    "Band",
    "BatteryRating",
    "BatteryTuning",
    "BusProtocol",
    "CalendarConfig",
    "ChargerRating",
    "CommissioningConfig",
    "ControlConfig",
    "DateRange",
    "DeviceConfig",
    "DeviceKind",
    "DisplayConfig",
    "ForecastConfig",
    "GridRating",
    "GridTuning",
    "MqttConfig",
    "Parity",
    "PvArray",
    "PvRating",
    "SafeState",
    "SerialBusConfig",
    "SimulationConfig",
    "SiteConfig",
    "SiteIdentity",
    "StorageConfig",
    "Tariff",
    "TariffPeriod",
    "TariffSeason",
    "TlsConfig",
    "Tuning",
    "WebConfig",
]


class _Model(BaseModel):
    # Unknown keys are refused: a typo in a site file must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveKw = Annotated[float, Field(gt=0.0, le=100_000.0)]
NonNegativeKw = Annotated[float, Field(ge=0.0, le=100_000.0)]
Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,39}$")]
# The safety layer aims 1 kW inside the import limit and counts a breach only 0.5 kW beyond it (meter
# accuracy): a lower limit leaves no room between the two.
MIN_IMPORT_LIMIT_KW = 2.0
# A battery tuned below this is a relief lever in name only (0.001 kW passed where 0 was refused).
MIN_LEVER_KW = 1.0
# A commissioning step smaller than this cannot be told from a building's own load moving while the meters
# settle: the step test's tolerance is at least 1 kW (controller/commissioning/step_test.py).
MIN_STEP_KW = 2.0


class SiteIdentity(_Model):
    id: Name = Field(description="Short identifier used in MQTT topics and file names")
    name: str = Field(min_length=1, max_length=200)
    timezone: str = Field(default="Asia/Shanghai", description="IANA zone name")
    latitude_deg: float = Field(ge=-90, le=90, description="For the clear-sky PV forecast")
    longitude_deg: float = Field(ge=-180, le=180)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as err:
            raise ValueError(f"unknown IANA time zone {value!r}") from err
        return value


class BusProtocol(StrEnum):
    MODBUS_RTU = "modbus_rtu"
    DLT645 = "dlt645"


class Parity(StrEnum):
    NONE = "N"
    EVEN = "E"
    ODD = "O"


class DeviceKind(StrEnum):
    GRID_METER = "grid_meter"
    PV_METER = "pv_meter"
    BATTERY_INVERTER = "battery_inverter"
    PV_INVERTER = "pv_inverter"
    EV_CHARGER = "ev_charger"


class DeviceConfig(_Model):
    name: Name
    kind: DeviceKind
    model: str = Field(
        pattern=r"^[a-z0-9_]+$", description="Register map name, e.g. eastron_sdm630 (see firmware_bridge/maps)"
    )
    address: int | str = Field(
        description="Modbus unit id 1..247, or the 12-digit DL/T 645 meter address",
    )
    poll_period_s: float = Field(default=1.0, gt=0.0, le=3600.0)
    ct_ratio: float = Field(
        default=1.0, gt=0.0, le=10_000.0, description="Current-transformer ratio applied to kW, kWh and A readings"
    )
    invert_sign: bool = Field(
        default=False,
        description="The device's CT is fitted the wrong way round: its power, current and power-factor readings"
        " are negated and its import and export energy swapped (setpoints are written as they are)",
    )
    rated_kw: float | None = Field(
        default=None,
        gt=0.0,
        le=100_000.0,
        description="A battery inverter's rated power: with several battery inverters each gets the share of the"
        " site's battery setpoint its rating is of their sum (required then)",
    )


class SerialBusConfig(_Model):
    name: Name
    port: str = Field(min_length=1, description="Device path, e.g. /dev/ttyUSB0; ignored when simulated")
    simulated: bool = Field(default=False, description="Serve this bus from simulated meters on a pty pair")
    protocol: BusProtocol
    baud_rate: Literal[1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200] = 9600
    parity: Parity = Parity.NONE
    stop_bits: Literal[1, 2] = 1
    # DL/T 645 meters may take up to 500 ms before replying (Td); Modbus meters usually < 100 ms.
    response_timeout_s: float = Field(default=0.5, gt=0.0, le=10.0)
    retries: int = Field(default=1, ge=0, le=5)
    adapter_echo: bool = Field(default=False, description="The RS-485 adapter echoes what we transmit")
    devices: list[DeviceConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _addresses_fit_protocol(self) -> Self:
        seen: set[str] = set()
        for index, device in enumerate(self.devices):
            where = f"devices.{index}.address"
            if self.protocol is BusProtocol.MODBUS_RTU:
                if not isinstance(device.address, int) or not 1 <= device.address <= 247:
                    raise ValueError(f"{where}: a Modbus unit id is an integer 1..247, got {device.address!r}")
            elif not isinstance(device.address, str) or not re.fullmatch(r"[0-9]{12}", device.address):
                raise ValueError(f"{where}: a DL/T 645 address is a 12-digit string, got {device.address!r}")
            key = str(device.address)
            if key in seen:
                raise ValueError(f"{where}: address {key} is used twice on bus {self.name}")
            seen.add(key)
        return self


class BatteryRating(_Model):
    """Nameplate of the battery system; never changed remotely."""

    capacity_kwh: Annotated[float, Field(gt=0.0, le=100_000.0)]
    max_charge_kw: PositiveKw
    max_discharge_kw: PositiveKw
    charge_efficiency: Annotated[float, Field(gt=0.5, le=1.0)] = 0.95
    discharge_efficiency: Annotated[float, Field(gt=0.5, le=1.0)] = 0.95
    soc_min: Fraction = Field(default=0.05, description="BMS lower bound, fraction of capacity")
    soc_max: Fraction = Field(default=1.0, description="BMS upper bound, fraction of capacity")
    ramp_kw_per_s: PositiveKw = Field(default=50.0, description="Fastest setpoint change the inverter accepts")

    @model_validator(mode="after")
    def _soc_order(self) -> Self:
        if self.soc_min >= self.soc_max:
            raise ValueError(f"soc_min ({self.soc_min}) must be below soc_max ({self.soc_max})")
        return self


class PvArray(_Model):
    """One plane of modules: its share of the peak and which way it faces."""

    name: Name
    peak_kw: PositiveKw
    tilt_deg: float = Field(ge=0.0, le=90.0, description="0: flat, 90: a facade")
    azimuth_deg: float = Field(ge=0.0, lt=360.0, description="Compass bearing the modules face: 180 south, 90 east")


# The arrays' peaks must add up to pv.peak_kw within this share (rounding on a datasheet).
ARRAYS_PEAK_TOLERANCE = 0.01


class PvRating(_Model):
    peak_kw: PositiveKw
    curtailable: bool = Field(description="The PV inverter accepts an active-power limit")
    arrays: list[PvArray] = Field(
        default_factory=list, max_length=32,
        description="Planes of modules for the clear-sky curve from the sun's position (site latitude and"
        " longitude); empty: the fixed southern-China curve of earlier versions",
    )  # fmt: skip

    @model_validator(mode="after")
    def _arrays_add_up(self) -> Self:
        if self.arrays:
            total = sum(a.peak_kw for a in self.arrays)
            if abs(total - self.peak_kw) > ARRAYS_PEAK_TOLERANCE * self.peak_kw:
                raise ValueError(f"arrays: their peak_kw add up to {total:g} kW, pv.peak_kw is {self.peak_kw:g} kW")
            if len({a.name for a in self.arrays}) != len(self.arrays):
                raise ValueError("arrays: names must be unique")
        return self


class DateRange(_Model):
    start: date
    end: date = Field(description="Inclusive")
    name: str = Field(default="", max_length=100)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.end < self.start:
            raise ValueError(f"end ({self.end}) is before start ({self.start})")
        return self


class CalendarConfig(_Model):
    """Which kind of day each date is: the forecaster learns each kind apart, the simulated plant follows it."""

    china_holidays: bool = Field(
        default=True,
        description="China's public holidays and make-up working days (调休) from the chinesecalendar package;"
        " a year it does not know falls back to Monday-Friday plus the lists below",
    )
    holidays: list[date] = Field(
        default_factory=list, max_length=400,
        description="Days off beyond the library's: a year not yet published, a local holiday",
    )  # fmt: skip
    workdays: list[date] = Field(
        default_factory=list, max_length=400,
        description="Working days beyond the library's: make-up working days of a year it does not know",
    )  # fmt: skip
    school_terms: list[DateRange] = Field(
        default_factory=list, max_length=100,
        description="Working days outside every term are vacation days; empty: every working day is a school day",
    )  # fmt: skip

    @model_validator(mode="after")
    def _not_both(self) -> Self:
        both = sorted(set(self.holidays) & set(self.workdays))
        if both:
            raise ValueError(f"holidays and workdays both list {both[0]}")
        return self


class ForecastConfig(_Model):
    """External forecasts (PV, optionally load) that replace the controller's own while they are fresh."""

    external_file: str | None = Field(
        default=None, description="A JSON forecast file (see the README), read again whenever it changes"
    )
    external_mqtt: bool = Field(default=True, description="Accept forecasts on <prefix>/forecast/set")
    external_max_age_h: float = Field(
        default=12.0, gt=0.0, le=72.0, description="An external forecast older than this is not used"
    )


class ChargerRating(_Model):
    name: Name
    device: Name = Field(description="Name of the ev_charger device that drives this charger")
    phases: Literal[1, 3] = 3
    voltage_v: float = Field(default=230.0, gt=100.0, le=400.0, description="Phase-to-neutral voltage")
    min_current_a: float = Field(default=6.0, ge=0.0, le=80.0, description="IEC 61851 minimum is 6 A")
    max_current_a: float = Field(default=32.0, gt=0.0, le=80.0)

    @model_validator(mode="after")
    def _current_order(self) -> Self:
        if self.min_current_a > self.max_current_a:
            raise ValueError(
                f"min_current_a ({self.min_current_a}) must not exceed max_current_a ({self.max_current_a})"
            )
        return self

    @property
    def min_kw(self) -> float:
        return self.phases * self.voltage_v * self.min_current_a / 1000.0

    @property
    def max_kw(self) -> float:
        return self.phases * self.voltage_v * self.max_current_a / 1000.0


class GridRating(_Model):
    """What the grid connection and the utility agreement allow; tuning may only tighten it."""

    import_limit_kw: PositiveKw
    export_limit_kw: NonNegativeKw = Field(description="0 means zero export")


class Band(StrEnum):
    VALLEY = "valley"
    FLAT = "flat"
    PEAK = "peak"
    CRITICAL_PEAK = "critical_peak"


def _parse_clock(value: object) -> object:
    if isinstance(value, str) and value == "24:00":
        return time.max
    return value


class TariffPeriod(_Model):
    start: time
    end: time = Field(description='Exclusive; "24:00" for midnight at the end of the day')
    band: Band

    _end_24 = field_validator("end", mode="before")(_parse_clock)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.end <= self.start:
            raise ValueError(f"period {self.start:%H:%M}-{self.end:%H:%M} ends before it starts; split it at 24:00")
        return self

    @property
    def start_minute(self) -> int:
        return self.start.hour * 60 + self.start.minute

    @property
    def end_minute(self) -> int:
        return 1440 if self.end == time.max else self.end.hour * 60 + self.end.minute


class TariffSeason(_Model):
    name: Name
    months: list[Annotated[int, Field(ge=1, le=12)]] = Field(min_length=1)
    prices_cny_per_kwh: dict[Band, Annotated[float, Field(ge=-10.0, le=100.0)]]
    periods: list[TariffPeriod] = Field(min_length=1)

    @model_validator(mode="after")
    def _cover_day_once(self) -> Self:
        ordered = sorted(enumerate(self.periods), key=lambda item: item[1].start_minute)
        cursor = 0
        for index, period in ordered:
            if period.start_minute < cursor:
                raise ValueError(
                    f"periods.{index} ({period.start:%H:%M}-{_fmt_minute(period.end_minute)}) "
                    f"overlaps the period ending at {_fmt_minute(cursor)}"
                )
            if period.start_minute > cursor:
                raise ValueError(f"periods leave {_fmt_minute(cursor)}-{period.start:%H:%M} without a band")
            if period.band not in self.prices_cny_per_kwh:
                raise ValueError(f"periods.{index} uses band {period.band.value!r} which has no price")
            cursor = period.end_minute
        if cursor != 1440:
            raise ValueError(f"periods leave {_fmt_minute(cursor)}-24:00 without a band")
        return self

    def band_at_minute(self, minute_of_day: int) -> Band:
        for period in self.periods:
            if period.start_minute <= minute_of_day < period.end_minute:
                return period.band
        raise ValueError(f"minute {minute_of_day} outside 0..1439")


def _fmt_minute(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


class Tariff(_Model):
    seasons: list[TariffSeason] = Field(min_length=1)
    export_price_cny_per_kwh: float = Field(default=0.0, ge=-10.0, le=100.0)
    demand_charge_cny_per_kw_month: float = Field(default=0.0, ge=0.0, le=1000.0)

    @model_validator(mode="after")
    def _months_once(self) -> Self:
        owner: dict[int, str] = {}
        for season in self.seasons:
            for month in season.months:
                if month in owner:
                    raise ValueError(f"month {month} is in both season {owner[month]} and {season.name}")
                owner[month] = season.name
        missing = sorted(set(range(1, 13)) - owner.keys())
        if missing:
            raise ValueError(f"months {missing} belong to no season")
        return self

    def season_for(self, month: int) -> TariffSeason:
        for season in self.seasons:
            if month in season.months:
                return season
        raise ValueError(f"month {month} belongs to no season")

    def band_at(self, local: datetime) -> tuple[Band, float]:
        """The band and import price in force at a local wall-clock time."""
        season = self.season_for(local.month)
        band = season.band_at_minute(local.hour * 60 + local.minute)
        return band, season.prices_cny_per_kwh[band]

    def cheapest_with_dearer_ahead(self, local: datetime) -> bool:
        """`local` is in the day's cheapest band and a dearer one lies ahead the same day: energy bought now
        is cheaper than stored energy spent now would be later."""
        season = self.season_for(local.month)
        minute = local.hour * 60 + local.minute
        prices = season.prices_cny_per_kwh
        now_price = prices[season.band_at_minute(minute)]
        cheapest = min(prices[p.band] for p in season.periods)
        # Ahead: the rest of today and tomorrow up to this time (a valley written as 23:00-24:00 plus
        # 00:00-07:00 is one night, with the morning's dear hours ahead of its first hour too).
        tomorrow = self.season_for((local + timedelta(days=1)).month)
        ahead = [prices[p.band] for p in season.periods if p.end_minute > minute]
        ahead += [tomorrow.prices_cny_per_kwh[p.band] for p in tomorrow.periods if p.start_minute < minute]
        return now_price <= cheapest and max(ahead, default=now_price) > now_price


class SafeState(_Model):
    """What the loop commands when it cannot trust its measurements."""

    battery: Literal["idle"] = "idle"
    ev_chargers: Literal["minimum", "off"] = "minimum"
    pv: Literal["zero_export_limit", "off", "unrestricted"] = Field(
        default="zero_export_limit",
        description="zero_export_limit: limit the PV inverter to the last trusted site load",
    )


class ControlConfig(_Model):
    tick_period_s: float = Field(default=1.0, ge=0.05, le=60.0)
    replan_period_s: float = Field(default=900.0, ge=10.0, le=86_400.0)
    horizon_h: float = Field(default=24.0, gt=0.0, le=168.0)
    step_minutes: Literal[1, 5, 10, 15, 30, 60] = 15
    # Beyond this age a measurement is not trusted; a few missed polls must not trip the safe state.
    stale_data_timeout_s: float = Field(default=10.0, gt=0.0, le=600.0)
    safe_state: SafeState = SafeState()
    device_watchdog_s: float = Field(
        default=10.0, ge=0.0, le=3600.0,
        description="Devices whose map declares a communication watchdog fall back to the safe state on their"
        " own when the controller has written nothing for this long (0: watchdogs off)",
    )  # fmt: skip

    @model_validator(mode="after")
    def _periods_consistent(self) -> Self:
        if self.replan_period_s < self.tick_period_s:
            raise ValueError("replan_period_s must not be shorter than tick_period_s")
        if self.horizon_h * 60 < self.step_minutes:
            raise ValueError("horizon_h must hold at least one step of step_minutes")
        if self.stale_data_timeout_s < 2 * self.tick_period_s:
            raise ValueError("stale_data_timeout_s must be at least two ticks")
        if 0 < self.device_watchdog_s < 3 * self.tick_period_s:
            raise ValueError("device_watchdog_s must be at least three ticks (it is kept alive every third of it)")
        return self


class BatteryTuning(_Model):
    soc_min: Fraction = 0.1
    soc_max: Fraction = 0.95
    reserve_soc: Fraction = Field(default=0.2, description="Planner keeps this for outages and next morning")
    max_charge_kw: NonNegativeKw | None = Field(default=None, description="Defaults to the rating")
    max_discharge_kw: NonNegativeKw | None = None
    wear_cost_cny_per_kwh: float = Field(default=0.05, ge=0.0, le=10.0)


class GridTuning(_Model):
    import_limit_kw: NonNegativeKw | None = Field(default=None, description="Defaults to the rating")
    export_limit_kw: NonNegativeKw | None = None
    import_relief_order: list[Literal["battery", "ev"]] = ["battery", "ev"]
    export_relief_order: list[Literal["battery", "ev", "pv"]] = ["battery", "ev", "pv"]

    @field_validator("import_relief_order", "export_relief_order")
    @classmethod
    def _no_repeats(cls, order: list[str]) -> list[str]:
        if len(set(order)) != len(order) or not order:
            raise ValueError("each relief lever is listed once, and at least one is listed")
        return order


class Tuning(_Model):
    """Parameters a site engineer may change remotely; bounded by the ratings in SiteConfig."""

    battery: BatteryTuning = BatteryTuning()
    grid: GridTuning = GridTuning()
    replan_period_s: float | None = Field(default=None, ge=10.0, le=86_400.0)


class TlsConfig(_Model):
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @model_validator(mode="after")
    def _cert_pair(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class MqttConfig(_Model):
    enabled: bool = True
    broker: str = Field(default="embedded", description='"embedded", or mqtt://host:port / mqtts://host:port')
    username: str | None = None
    password: SecretStr | None = None
    tls: TlsConfig | None = None
    topic_prefix: str | None = Field(default=None, description="Default greensite/<site id>")
    ha_discovery: bool = True
    ha_discovery_prefix: str = "homeassistant"
    remote_tuning: bool = Field(default=False, description="Accept config patches on the command topic")
    max_payload_bytes: int = Field(default=16_384, ge=256, le=1_048_576)
    embedded_port: int = Field(
        default=1883, ge=0, le=65_535, description="Port of the embedded broker on 127.0.0.1 (0: any free port)"
    )
    status_max_rate_hz: float = Field(
        default=10.0, gt=0.0, le=1000.0, description="Status messages per second at most (accelerated runs sample)"
    )
    outbox_messages: int = Field(
        default=20_000, ge=100, le=1_000_000, description="Status kept while the broker is away; oldest dropped"
    )

    @field_validator("broker")
    @classmethod
    def _broker_form(cls, value: str) -> str:
        if value != "embedded" and not re.fullmatch(r"mqtts?://[A-Za-z0-9.\-\[\]:]+(:\d{1,5})?/?", value):
            raise ValueError('broker is "embedded" or mqtt://host[:port] or mqtts://host[:port]')
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _topic_form(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c in value for c in "#+\0") or value.endswith("/")):
            raise ValueError("topic_prefix has no wildcards, no NUL and no trailing /")
        return value


class StorageConfig(_Model):
    path: str = Field(default="var/greensite.sqlite3", description="SQLite file for the time series")
    retention_days: int = Field(default=400, ge=1, le=3650)
    tuning_path: str | None = Field(
        default=None, description="Remote-tuning overrides (JSON); default: next to path, <stem>.tuning.json"
    )

    def _sibling(self, suffix: str) -> str:
        base = Path(self.path)
        return str(base.with_name(base.stem + suffix))

    @property
    def resolved_tuning_path(self) -> str:
        return self.tuning_path or self._sibling(".tuning.json")

    @property
    def state_path(self) -> str:
        """Controller state kept across restarts (counters, month peak, sessions)."""
        return self._sibling(".state.json")


class CommissioningConfig(_Model):
    """What `greensite check --step-test` may do to the site: one small step at a time, each held until the
    meters settle (or for step_hold_s at most), then put back."""

    step_battery_kw: float | None = Field(
        default=None, ge=0.0, le=100_000.0,
        description="How far the battery setpoint is stepped; default min(10 kW, half the smaller of the battery's"
        " charge and discharge ratings), never above either",
    )  # fmt: skip
    step_pv_kw: float | None = Field(
        default=None, ge=0.0, le=100_000.0,
        description="How far below its output PV is limited; default min(10 kW, 10 % of pv.peak_kw)",
    )  # fmt: skip
    step_charger_a: float = Field(
        default=10.0, ge=1.0, le=80.0,
        description="How far the current offered to a charger with a car is changed (10 A: 6.9 kW on three phases)",
    )  # fmt: skip
    step_hold_s: float = Field(
        default=20.0, ge=1.0, le=600.0,
        description="Longest wait for the meters to settle after a step (a car may take 5 s to follow, an inverter"
        " ramps, a meter averages over a second or more)",
    )  # fmt: skip


class WebConfig(_Model):
    """The embedded web server: the visitors' display (/display) and the engineer's dashboard (/)."""

    enabled: bool = True
    listen: str = Field(
        default="127.0.0.1:8080",
        description="host:port to listen on (port 0: any free port; a busy port is replaced by a free one, which"
        " the run prints); 0.0.0.0:8080 lets the hall screen and the LAN reach it",
    )
    stream_max_rate_hz: float = Field(
        default=4.0, gt=0.0, le=50.0, description="Live updates per second to each page at most (fast runs sample)"
    )
    max_stream_clients: int = Field(
        default=200, ge=1, le=10_000, description="Live-update connections at once; more are refused (503)"
    )

    @field_validator("listen")
    @classmethod
    def _listen_form(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65_535:
            raise ValueError(f"listen is host:port, e.g. 127.0.0.1:8080 or 0.0.0.0:8080, got {value!r}")
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


# Standard coal per kWh of thermal power supplied, China 2022 (CEC statistics); CO2 a tree takes up per year
# (US EPA equivalencies: 0.060 t over a seedling's first ten years). Sites replace them with their own.
DEFAULT_COAL_KGCE_PER_KWH = 0.3007
DEFAULT_CO2_KG_PER_TREE_YEAR = 6.0


class DisplayConfig(_Model):
    """What the visitors' display converts PV energy into, each factor with where it comes from (shown in
    small print under the figures)."""

    co2_kg_per_kwh: float | None = Field(
        default=None, ge=0.0, le=2.0,
        description="CO2 avoided per kWh of PV (the grid's emission factor); default: carbon_kg_per_kwh",
    )  # fmt: skip
    co2_source: str = Field(
        default="", max_length=200, description="Where co2_kg_per_kwh comes from (grid, province, year, publisher)"
    )
    coal_kgce_per_kwh: float = Field(
        default=DEFAULT_COAL_KGCE_PER_KWH, ge=0.0, le=1.0,
        description="Standard coal (kgce) a kWh of grid power burns; China 2022: 300.7 gce/kWh",
    )  # fmt: skip
    coal_source: str = Field(
        default="China Electricity Council, 2022: coal per kWh supplied by thermal plants >= 6 MW, 300.7 gce/kWh",
        max_length=200,
    )
    co2_kg_per_tree_year: float = Field(default=DEFAULT_CO2_KG_PER_TREE_YEAR, gt=0.0, le=1000.0)
    tree_source: str = Field(
        default="US EPA GHG equivalencies: 0.060 t CO2 per urban tree over its first 10 years", max_length=200
    )


class SimulationConfig(_Model):
    """What the simulated plant does when the site runs with --simulate; ignored on real hardware."""

    load_profile: Literal["school", "community_centre"] = Field(
        default="school", description="school: 45 kW + 120 kW in school hours; community_centre: open 08-21 daily"
    )
    load_scale: float = Field(default=1.0, gt=0.0, le=100.0, description="Multiplies the profile's kW")
    battery_response_kw_per_s: float | None = Field(
        default=None, gt=0.0, le=100_000.0,
        description="How fast the simulated battery moves to its setpoint; unset: at once",
    )  # fmt: skip


class SiteConfig(_Model):
    site: SiteIdentity
    buses: list[SerialBusConfig] = Field(default_factory=list)
    battery: BatteryRating | None = None
    pv: PvRating | None = None
    ev_chargers: list[ChargerRating] = Field(default_factory=list)
    grid: GridRating
    tariff: Tariff
    carbon_kg_per_kwh: float = Field(default=0.57, ge=0.0, le=2.0, description="Grid emission factor")
    control: ControlConfig = ControlConfig()
    tuning: Tuning = Tuning()
    mqtt: MqttConfig = MqttConfig()
    storage: StorageConfig = StorageConfig()
    simulation: SimulationConfig = SimulationConfig()
    calendar: CalendarConfig = CalendarConfig()
    forecast: ForecastConfig = ForecastConfig()
    commissioning: CommissioningConfig = CommissioningConfig()
    web: WebConfig = WebConfig()
    display: DisplayConfig = DisplayConfig()

    @model_validator(mode="after")
    def _commissioning_steps_fit(self) -> Self:
        """A step the site cannot make, or one too small to tell from the building's own load, is refused."""
        steps = self.commissioning
        for field, value, rating, what in (
            ("step_battery_kw", steps.step_battery_kw,
             None if self.battery is None else min(self.battery.max_charge_kw, self.battery.max_discharge_kw),
             "the battery's smaller rating"),
            ("step_pv_kw", steps.step_pv_kw, None if self.pv is None else self.pv.peak_kw, "pv.peak_kw"),
        ):  # fmt: skip
            if value is None:
                continue
            if rating is None:
                raise ValueError(f"commissioning.{field}: the site has nothing to step ({field} is set without it)")
            if value < MIN_STEP_KW:
                raise ValueError(
                    f"commissioning.{field} ({value} kW) is below {MIN_STEP_KW} kW: a smaller step cannot be told from"
                    " the building's own load moving while the meters settle"
                )
            if value > rating:
                raise ValueError(f"commissioning.{field} ({value} kW) exceeds {what} ({rating} kW)")
        largest_a = max((c.max_current_a for c in self.ev_chargers), default=None)
        if largest_a is not None and steps.step_charger_a > largest_a:
            raise ValueError(
                f"commissioning.step_charger_a ({steps.step_charger_a} A) exceeds every charger's max_current_a"
                f" ({largest_a} A)"
            )
        return self

    @model_validator(mode="after")
    def _wiring_and_bounds(self) -> Self:
        names: dict[str, DeviceConfig] = {}
        for bus in self.buses:
            for device in bus.devices:
                if device.name in names:
                    raise ValueError(f"device name {device.name!r} is used twice")
                names[device.name] = device
        for index, charger in enumerate(self.ev_chargers):
            driver = names.get(charger.device)
            if driver is None or driver.kind is not DeviceKind.EV_CHARGER:
                raise ValueError(f"ev_chargers.{index}.device: no ev_charger device named {charger.device!r}")
        if len({c.name for c in self.ev_chargers}) != len(self.ev_chargers):
            raise ValueError("ev_chargers: names must be unique")
        kinds = {d.kind for d in names.values()}
        if self.buses and DeviceKind.GRID_METER not in kinds:
            raise ValueError("buses: a site needs a grid_meter to enforce its grid limits")
        if self.battery is not None and self.buses and DeviceKind.BATTERY_INVERTER not in kinds:
            raise ValueError("battery: a battery needs a battery_inverter device to command it")
        if self.pv is not None and self.pv.curtailable and self.buses and DeviceKind.PV_INVERTER not in kinds:
            raise ValueError("pv.curtailable: curtailment needs a pv_inverter device")
        inverters = [(b, d) for b, bus in enumerate(self.buses) for d, device in enumerate(bus.devices)
                     if device.kind is DeviceKind.BATTERY_INVERTER]  # fmt: skip
        for b, d in inverters:
            if len(inverters) > 1 and self.buses[b].devices[d].rated_kw is None:
                raise ValueError(
                    f"buses.{b}.devices.{d}.rated_kw: with {len(inverters)} battery inverters each needs its rated"
                    " power, which sets its share of the battery setpoint"
                )
        for b, bus in enumerate(self.buses):
            for d, device in enumerate(bus.devices):
                if device.rated_kw is not None and device.kind is not DeviceKind.BATTERY_INVERTER:
                    raise ValueError(f"buses.{b}.devices.{d}.rated_kw: only a battery inverter takes a share")
        rated = [self.buses[b].devices[d].rated_kw for b, d in inverters]
        if self.battery is not None and inverters and all(kw is not None for kw in rated):
            total_kw = sum(kw for kw in rated if kw is not None)
            needed_kw = max(self.battery.max_charge_kw, self.battery.max_discharge_kw)
            if total_kw < needed_kw:
                b, d = inverters[0]
                raise ValueError(
                    f"buses.{b}.devices.{d}.rated_kw: the battery inverters are rated {total_kw:g} kW together, less"
                    f" than the battery's {needed_kw:g} kW: each would be asked beyond its rating"
                )
        self._check_tuning_within_ratings()
        return self

    def _check_tuning_within_ratings(self) -> None:
        bt = self.tuning.battery
        if bt.soc_min >= bt.soc_max:
            raise ValueError(f"tuning.battery.soc_min ({bt.soc_min}) must be below soc_max ({bt.soc_max})")
        if not bt.soc_min <= bt.reserve_soc <= bt.soc_max:
            raise ValueError("tuning.battery.reserve_soc must lie between soc_min and soc_max")
        if self.battery is not None:
            rating = self.battery
            if bt.soc_min < rating.soc_min:
                raise ValueError(f"tuning.battery.soc_min ({bt.soc_min}) is below the rating {rating.soc_min}")
            if bt.soc_max > rating.soc_max:
                raise ValueError(f"tuning.battery.soc_max ({bt.soc_max}) is above the rating {rating.soc_max}")
            for field, limit in (
                ("max_charge_kw", rating.max_charge_kw),
                ("max_discharge_kw", rating.max_discharge_kw),
            ):
                value = getattr(bt, field)
                if value is not None and value > limit:
                    raise ValueError(f"tuning.battery.{field} ({value}) exceeds the rating {limit}")
        gt = self.tuning.grid
        for field, limit in (
            ("import_limit_kw", self.grid.import_limit_kw),
            ("export_limit_kw", self.grid.export_limit_kw),
        ):
            value = getattr(gt, field)
            if value is not None and value > limit:
                raise ValueError(f"tuning.grid.{field} ({value}) exceeds the grid rating {limit}")
        if self.tuning.replan_period_s is not None and self.tuning.replan_period_s < self.control.tick_period_s:
            raise ValueError("tuning.replan_period_s must not be shorter than control.tick_period_s")
        self._check_limits_enforceable()

    def _check_limits_enforceable(self) -> None:
        """Refuse a configuration (site file or remote patch alike) under which the loop could not hold a
        grid limit: every lever the site has is listed in each relief order (the order is the priority,
        not a choice of levers), no lever is tuned to 0 kW, and the import limit leaves room to aim."""
        tuned = self.tuning.grid.import_limit_kw is not None
        field = "tuning.grid.import_limit_kw" if tuned else "grid.import_limit_kw"
        if self.import_limit_kw < MIN_IMPORT_LIMIT_KW:
            raise ValueError(
                f"{field} ({self.import_limit_kw} kW) is below {MIN_IMPORT_LIMIT_KW} kW: the loop aims 1 kW inside"
                " the import limit and meters are trusted to 0.5 kW, so any load would breach it"
            )
        levers: dict[str, str] = {}
        if self.battery is not None:
            levers["battery"] = "the site has a battery"
            for name in ("max_charge_kw", "max_discharge_kw"):
                value = getattr(self.tuning.battery, name)
                if value is not None and value < MIN_LEVER_KW:
                    raise ValueError(
                        f"tuning.battery.{name} is {value} kW, under {MIN_LEVER_KW} kW: the battery is a relief lever"
                        " of both grid limits and could barely move; leave it unset (the rating) or give it a power"
                    )
        if self.ev_chargers:
            levers["ev"] = "the site has EV chargers"
        orders = (("import_relief_order", ("battery", "ev")), ("export_relief_order", ("battery", "ev", "pv")))
        for order_name, needed in orders:
            order = getattr(self.tuning.grid, order_name)
            wanted = dict(levers)
            if order_name == "export_relief_order" and self.pv is not None and self.pv.curtailable:
                wanted["pv"] = "the site's PV is curtailable"
            for lever in needed:
                if lever in wanted and lever not in order:
                    raise ValueError(
                        f"tuning.grid.{order_name} leaves out {lever!r} though {wanted[lever]}: with the other"
                        " levers at their end the limit would be left unenforced (the order sets priority; list"
                        " every lever)"
                    )
        if self.pv is not None and self.pv.peak_kw > self.export_limit_kw:
            if not self.pv.curtailable and self.battery is None and not self.ev_chargers:
                raise ValueError(
                    f"pv.curtailable is false and the site has no battery and no chargers: nothing can hold the"
                    f" export limit ({self.export_limit_kw} kW) below the PV peak ({self.pv.peak_kw} kW)"
                )
            if self.pv.curtailable and self.control.safe_state.pv == "unrestricted":
                raise ValueError(
                    f"control.safe_state.pv is 'unrestricted': blind, PV would export up to {self.pv.peak_kw} kW"
                    f" against an export limit of {self.export_limit_kw} kW; use 'zero_export_limit' or 'off'"
                )

    # Effective limits: what the loop enforces, the tighter of rating and tuning.
    @property
    def import_limit_kw(self) -> float:
        value = self.tuning.grid.import_limit_kw
        return self.grid.import_limit_kw if value is None else value

    @property
    def export_limit_kw(self) -> float:
        value = self.tuning.grid.export_limit_kw
        return self.grid.export_limit_kw if value is None else value

    @property
    def battery_max_charge_kw(self) -> float:
        if self.battery is None:
            return 0.0
        value = self.tuning.battery.max_charge_kw
        return self.battery.max_charge_kw if value is None else value

    @property
    def battery_max_discharge_kw(self) -> float:
        if self.battery is None:
            return 0.0
        value = self.tuning.battery.max_discharge_kw
        return self.battery.max_discharge_kw if value is None else value

    @property
    def replan_period_s(self) -> float:
        value = self.tuning.replan_period_s
        return self.control.replan_period_s if value is None else value

    @property
    def display_co2_kg_per_kwh(self) -> float:
        """The display's CO2 factor: its own, or the site's grid emission factor."""
        value = self.display.co2_kg_per_kwh
        return self.carbon_kg_per_kwh if value is None else value

    @property
    def topic_prefix(self) -> str:
        return self.mqtt.topic_prefix or f"greensite/{self.site.id}"

    def devices(self) -> list[tuple[SerialBusConfig, DeviceConfig]]:
        return [(bus, device) for bus in self.buses for device in bus.devices]

    def battery_shares(self) -> dict[str, float]:
        """Each battery inverter's share of the site's battery setpoint (and of its power): its rating over
        their sum; 1.0 for a single inverter."""
        inverters = [d for _, d in self.devices() if d.kind is DeviceKind.BATTERY_INVERTER]
        if len(inverters) == 1:
            return {inverters[0].name: 1.0}
        rated = {d.name: d.rated_kw for d in inverters if d.rated_kw is not None}
        if len(rated) != len(inverters):  # the validator requires them; a model_copy may not have been validated
            raise ValueError("several battery inverters, not every one with rated_kw")
        total_kw = sum(rated.values())
        return {name: kw / total_kw for name, kw in rated.items()}
