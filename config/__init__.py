"""Site configuration: schema, loader and example sites."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from config._errors import ConfigError, format_validation_error

if TYPE_CHECKING:
    from config._loader import load_site, parse_site
    from config._schema import (
        Band,
        BatteryRating,
        BatteryTuning,
        BusProtocol,
        CalendarConfig,
        ChargerRating,
        CommissioningConfig,
        ControlConfig,
        DateRange,
        DeviceConfig,
        DeviceKind,
        DisplayConfig,
        ForecastConfig,
        GridRating,
        GridTuning,
        MqttConfig,
        Parity,
        PvArray,
        PvRating,
        SafeState,
        SerialBusConfig,
        SimulationConfig,
        SiteConfig,
        SiteIdentity,
        StorageConfig,
        Tariff,
        TariffPeriod,
        TariffSeason,
        TlsConfig,
        Tuning,
        WebConfig,
    )

__all__ = [
    "Band",
    "BatteryRating",
    "BatteryTuning",
    "BusProtocol",
    "CalendarConfig",
    "ChargerRating",
    "CommissioningConfig",
    "ConfigError",
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
    "format_validation_error",
    "load_site",
    "parse_site",
]

# The schema and the loader (pydantic-settings) load on first use: `from config import ConfigError`
# (the planner's scenario errors) must not pay for building the whole site schema.
_LAZY = dict.fromkeys(__all__, "config._schema") | {
    "ConfigError": "config._errors",
    "format_validation_error": "config._errors",
    "load_site": "config._loader",
    "parse_site": "config._loader",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'config' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
