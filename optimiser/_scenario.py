"""The planning problem as a validated scenario (the `greensite plan` JSON contract)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from config import ConfigError, format_validation_error

__all__ = ["BatterySpec", "EvSession", "GridSpec", "Scenario", "ScenarioError", "load_scenario"]

# A horizon longer than a fortnight of 1-minute steps is a mistake, and would cost memory.
MAX_STEPS = 20_160
MAX_EV_SESSIONS = 64


class ScenarioError(ConfigError):
    """A scenario was refused; `errors` lists every problem by field path."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Kw = Annotated[float, Field(ge=0.0, le=1e6)]
Price = Annotated[float, Field(ge=-100.0, le=100.0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class GridSpec(_Model):
    import_limit_kw: Annotated[float, Field(gt=0.0, le=1e6)] = 1e6
    export_limit_kw: Kw = Field(default=1e6, description="0 means zero export")
    demand_charge_cny_per_kw: Annotated[float, Field(ge=0.0, le=1e4)] = 0.0
    peak_import_so_far_kw: Kw = 0.0


class BatterySpec(_Model):
    capacity_kwh: Annotated[float, Field(gt=0.0, le=1e6)]
    max_charge_kw: Kw
    max_discharge_kw: Kw
    charge_efficiency: Annotated[float, Field(gt=0.5, le=1.0)] = 0.95
    discharge_efficiency: Annotated[float, Field(gt=0.5, le=1.0)] = 0.95
    soc_min: Fraction = 0.0
    soc_max: Fraction = 1.0
    soc_initial: Fraction = 0.5
    soc_final_min: Fraction = 0.0
    wear_cost_cny_per_kwh: Annotated[float, Field(ge=0.0, le=100.0)] = 0.0

    @model_validator(mode="after")
    def _order(self) -> Self:
        if self.soc_min >= self.soc_max:
            raise ValueError(f"soc_min ({self.soc_min}) must be below soc_max ({self.soc_max})")
        return self


class EvSession(_Model):
    charger: Annotated[str, Field(min_length=1, max_length=40)]
    arrival_step: Annotated[int, Field(ge=0)]
    departure_step: Annotated[int, Field(ge=1, description="Exclusive")]
    energy_kwh: Annotated[float, Field(ge=0.0, le=1e4)]
    min_kw: Kw = Field(default=0.0, description="When > 0: off, or at least this")
    max_kw: Annotated[float, Field(gt=0.0, le=1e4)]

    @model_validator(mode="after")
    def _order(self) -> Self:
        if self.departure_step <= self.arrival_step:
            raise ValueError("departure_step must be after arrival_step")
        if self.min_kw > self.max_kw:
            raise ValueError(f"min_kw ({self.min_kw}) must not exceed max_kw ({self.max_kw})")
        return self


class Scenario(_Model):
    step_minutes: Annotated[float, Field(gt=0.0, le=1440.0)]
    price_import_cny_per_kwh: list[Price] = Field(min_length=1, max_length=MAX_STEPS)
    price_export_cny_per_kwh: list[Price] | Price = 0.0
    pv_kw: list[Kw]
    load_kw: list[Kw]
    grid: GridSpec = GridSpec()
    battery: BatterySpec | None = None
    ev_sessions: list[EvSession] = Field(default_factory=list, max_length=MAX_EV_SESSIONS)
    carbon_kg_per_kwh: Annotated[float, Field(ge=0.0, le=5.0)] = 0.0
    pv_curtailable: bool = Field(default=True, description="The PV inverter accepts a power limit")

    @model_validator(mode="after")
    def _lengths(self) -> Self:
        steps = len(self.price_import_cny_per_kwh)
        for name in ("pv_kw", "load_kw", "price_export_cny_per_kwh"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != steps:
                raise ValueError(f"{name} has {len(value)} values, price_import_cny_per_kwh has {steps}")
        for index, session in enumerate(self.ev_sessions):
            if session.departure_step > steps:
                raise ValueError(
                    f"ev_sessions.{index}.departure_step ({session.departure_step}) is past the horizon ({steps})"
                )
        for index, session in enumerate(self.ev_sessions):
            for other in self.ev_sessions[:index]:
                overlap = session.arrival_step < other.departure_step and other.arrival_step < session.departure_step
                if other.charger == session.charger and overlap:
                    raise ValueError(f"ev_sessions.{index}: charger {session.charger!r} already has a car then")
        return self

    @property
    def steps(self) -> int:
        return len(self.price_import_cny_per_kwh)

    @property
    def dt_h(self) -> float:
        return self.step_minutes / 60.0

    def export_prices(self) -> list[float]:
        value = self.price_export_cny_per_kwh
        return list(value) if isinstance(value, list) else [float(value)] * self.steps


def parse_scenario(data: Any, source: str = "<scenario>") -> Scenario:
    try:
        return Scenario.model_validate(data)
    except ValidationError as err:
        raise ScenarioError(source, format_validation_error(err)) from None


def load_scenario(scenario: str | Path | dict[str, Any] | Scenario) -> Scenario:
    """A Scenario from a model, a dict, or a JSON file path; ScenarioError listing every problem."""
    if isinstance(scenario, Scenario):
        return scenario
    if isinstance(scenario, dict):
        return parse_scenario(scenario)
    path = Path(scenario)
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ScenarioError(str(path), [f"cannot read file: {err}"]) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ScenarioError(str(path), [f"JSON syntax: line {err.lineno}, column {err.colno}: {err.msg}"]) from None
    return parse_scenario(data, str(path))
