"""HIL scenarios are data: a TOML file per scenario in `hil_tests/scenarios/`.

    name = "grid-meter-silent"
    description = "..."
    site = "zhongshan_school"          # config/sites/<site>.toml
    start = 2026-07-06T11:00:00        # local time of the site
    duration = "6h"                    # full length (-m long_hil, python -m hil_tests)
    short_duration = "20m"             # the default test run
    weather = "sunny"                  # sunny | overcast | passing_clouds | mixed (each day's sky drawn)
    skies = ["cloudy", "rain"]         # mixed: these skies day by day (cycled) instead of drawn
    variation = false                  # each day its own load (temperature, occupancy, events)
    replay_csv = "week.csv"            # hil_tests/data/<file>: recorded load and/or PV (controller.interval_csv)
    replay = "both"                    # load | pv | both: what of the recording is played
    site_overrides = {}                # deep-merged into the site file (e.g. pv.arrays, calendar)
    [external_forecast]                # a day-ahead PV (and load) forecast as a provider sends it
    pv_error = 0.15                    # its error: a per-day factor and per-step noise of this spread
    calendar = "weekday"               # weekday | weekend | holiday (the start date is a holiday)
    cars = "school"                    # school | none
    mqtt = false                       # start a Mosquitto for this scenario
    history_days = 0                   # days the controller already ran the site before `start`
    battery_response_kw_per_s = 10.0   # the simulated inverter is this slow (default: the site's [simulation])
    [[faults]]                         # at/for are offsets from the start; keep them inside short_duration
    at = "5m"
    for = "30s"
    kind = "silent"                    # see FaultKind
    device = "grid-meter"
    [expect]
    safe_state = "enters_and_leaves"   # never | enters_and_leaves | any
"""

from __future__ import annotations

import tomllib
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from config import ConfigError, format_validation_error
from controller.durations import parse_duration_s

__all__ = [
    "DATA_DIR",
    "SCENARIO_DIR",
    "Expect",
    "ExternalForecastSim",
    "Fault",
    "FaultKind",
    "HilScenario",
    "load_scenarios",
    "seconds",
]

SCENARIO_DIR = Path(__file__).parent / "scenarios"
DATA_DIR = Path(__file__).parent / "data"


def seconds(text: Any) -> float:
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    return parse_duration_s(str(text))


Seconds = Annotated[float, BeforeValidator(seconds), Field(ge=0.0)]


class FaultKind(StrEnum):
    SILENT = "silent"  # the device does not answer
    BAD_CRC = "bad_crc"  # replies with a broken CRC/checksum, with `probability`
    EXCEPTION = "exception"  # Modbus exception / DL/T 645 error reply to everything
    REFUSE_SETPOINTS = "refuse_setpoints"  # exception replies to writes only
    UNPLUG = "unplug"  # the bus's serial adapter vanishes for `for`, then returns
    NOISE = "noise"  # garbage bytes on the bus every second for `for`
    BROKER_RESTART = "broker_restart"  # the MQTT broker is killed, restarted after `for`
    PATCH = "patch"  # a remote config patch (`payload`) arrives over MQTT
    RESTART = "restart"  # the controller process stops cleanly and starts again after `for`


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Fault(_Model):
    at: Seconds
    for_: Seconds = Field(default=0.0, alias="for")
    kind: FaultKind
    device: str | None = None
    bus: str | None = None
    probability: float = Field(default=1.0, gt=0.0, le=1.0)
    payload: str | None = None  # PATCH: the raw MQTT payload
    expect_accepted: bool = False  # PATCH: whether the controller should take it
    expect_error: str | None = None  # PATCH: a phrase the refusal must contain

    @model_validator(mode="after")
    def _targets(self) -> Self:
        needs_device = {FaultKind.SILENT, FaultKind.BAD_CRC, FaultKind.EXCEPTION, FaultKind.REFUSE_SETPOINTS}
        if self.kind in needs_device and self.device is None:
            raise ValueError(f"a {self.kind} fault names its device")
        if self.kind in {FaultKind.UNPLUG, FaultKind.NOISE} and self.bus is None:
            raise ValueError(f"a {self.kind} fault names its bus")
        if self.kind is FaultKind.PATCH and self.payload is None:
            raise ValueError("a patch fault carries its payload")
        return self

    @property
    def until(self) -> float:
        return self.at + self.for_


class Expect(_Model):
    safe_state: Literal["never", "enters_and_leaves", "any"] = "never"
    # The goal of issue 7 on the week: realised bill below the self-consumption baseline's and within
    # this share of the perfect-foresight optimum (checked on full-length runs only).
    max_gap_to_optimum: float | None = None
    beats_self_consumption: bool = False
    # The battery never covers import in the day's cheapest band while a dearer one lies ahead (unless a
    # grid limit needs it): more than half a kWh of it fails the run.
    no_valley_cover: bool = False
    # Every full week of a longer run: its bill below self-consumption's in that week.
    weekly_beats_self_consumption: bool = False


class ExternalForecastSim(_Model):
    """A forecast provider: from the plant's truth with an error, issued at these hours for `horizon_h`."""

    pv_error: float = Field(default=0.15, ge=0.0, le=1.0)
    load_error: float | None = Field(default=None, ge=0.0, le=1.0, description="None: PV only")
    issue_hours: list[int] = Field(default_factory=lambda: [5, 17], min_length=1)
    horizon_h: int = Field(default=48, ge=1, le=168)
    step_minutes: int = 30


class HilScenario(_Model):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,60}$")
    description: str
    site: str = "zhongshan_school"
    start: datetime
    duration: Seconds
    short_duration: Seconds
    weather: Literal["sunny", "overcast", "passing_clouds", "mixed"] = "sunny"
    skies: list[Literal["sunny", "cloudy", "overcast", "rain"]] = Field(default_factory=list)
    variation: bool = False
    replay_csv: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*\.csv$")
    replay: Literal["load", "pv", "both"] = "both"
    site_overrides: dict[str, Any] = Field(default_factory=dict)
    external_forecast: ExternalForecastSim | None = None
    calendar: Literal["weekday", "weekend", "holiday"] = "weekday"
    cars: Literal["school", "none"] = "school"
    mqtt: bool = False
    speed: float | None = Field(default=None, gt=0.0, description="simulated s per wall s; None: as fast as possible")
    seed: int = 1
    # The controller ran the site this many days before `start`: its state file holds the load profile
    # and PV yield it learned from its meters then (as a site's does every week but its first).
    history_days: int = Field(default=0, ge=0, le=28)
    # The simulated battery inverter moves this fast (kW/s), whatever its site file rates it at: a real
    # inverter slower than its configured ramp. None: the site's [simulation] setting.
    battery_response_kw_per_s: float | None = Field(default=None, gt=0.0)
    faults: list[Fault] = Field(default_factory=list)
    expect: Expect = Expect()

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if not 0 < self.short_duration <= self.duration:
            raise ValueError("short_duration must be above 0 and at most duration")
        weekend = self.start.weekday() >= 5
        if self.calendar == "weekend" and not weekend:
            raise ValueError(f"calendar is weekend but {self.start.date()} is a weekday")
        if self.calendar in {"weekday", "holiday"} and weekend:
            raise ValueError(f"calendar is {self.calendar} but {self.start.date()} is a weekend day")
        if self.skies and self.weather != "mixed":
            raise ValueError("skies are given day by day with weather = \"mixed\"")
        for index, fault in enumerate(self.faults):
            if fault.until > self.short_duration:
                raise ValueError(f"faults.{index}: ends after short_duration; the short run must see it")
            if fault.kind in {FaultKind.BROKER_RESTART, FaultKind.PATCH} and not self.mqtt:
                raise ValueError(f"faults.{index}: a {fault.kind} fault needs mqtt = true")
        return self


def load_scenario(path: Path) -> HilScenario:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(str(path), [str(err)]) from None
    try:
        return HilScenario.model_validate(data)
    except ValidationError as err:
        raise ConfigError(str(path), format_validation_error(err)) from None


def load_scenarios(folder: Path = SCENARIO_DIR) -> list[HilScenario]:
    scenarios = [load_scenario(path) for path in sorted(folder.glob("*.toml"))]
    names = [s.name for s in scenarios]
    if len(set(names)) != len(names):
        raise ConfigError(str(folder), ["scenario names must be unique"])
    return scenarios
