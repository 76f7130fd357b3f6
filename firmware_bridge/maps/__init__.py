"""Device register maps: data files (TOML) describing where each quantity lives and how it is encoded."""

from __future__ import annotations

import math
import tomllib
from enum import StrEnum
from functools import cache
from importlib import resources
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from config import BusProtocol, DeviceKind, SiteConfig, format_validation_error

__all__ = [
    "REQUIRED_POINTS",
    "Access",
    "DeviceMap",
    "Dlt645Point",
    "MapError",
    "ModbusPoint",
    "RegisterType",
    "Watchdog",
    "WatchdogFallback",
    "all_maps",
    "check_site_devices",
    "load_map",
]


class MapError(ValueError):
    """A register map file is malformed or missing (a permanent configuration error, never retried)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Access(StrEnum):
    READ = "read"
    WRITE = "write"
    READ_WRITE = "read_write"


class RegisterType(StrEnum):
    UINT16 = "uint16"
    INT16 = "int16"
    UINT32 = "uint32"
    INT32 = "int32"
    FLOAT32 = "float32"

    @property
    def words(self) -> int:
        return _WORDS[self]


_WORDS = {
    RegisterType.UINT16: 1,
    RegisterType.INT16: 1,
    RegisterType.UINT32: 2,
    RegisterType.INT32: 2,
    RegisterType.FLOAT32: 2,
}


Quantity = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*_(kw|kwh|v|a|hz|pct|fraction|pf|code|s)$")]


# Why a plausible range of its own rather than `minimum`/`maximum`: those bound what the controller
# may *write* (the device's accepted setpoint range), and only writable points have them. A plausible
# range bounds what a *reading* can physically be (a SoC of 0..100 %, a grid frequency of 45..65 Hz, a
# power within what the device class can carry), and every readable point needs one. The two differ
# even on one point: a setpoint register may accept the full int16 range while the device never
# reports more than its class carries. Mixing them would either loosen the read check to the register
# range (0x7FFF would pass) or narrow writes to a read bound chosen for garbage detection.
#
# Units: the range is in the point's unit after scale and sign. For quantities a current transformer
# scales (kW, kWh, A) the range is per unit of CT ratio, i.e. what the meter itself can report at its
# own terminals; the driver multiplies it by the device's `ct_ratio`. A DL/T 645 meter that reports
# XX.XXXX kW (at most 79.9999) therefore gets +-80 kW in its map and +-800 kW behind a 10:1 CT, and
# a 1e9 kW reading is implausible whatever the ratio. NaN and infinities are never plausible.
class _Plausible(_Model):
    plausible_min: float | None = Field(default=None, description="Lowest plausible reading (unit of name)")
    plausible_max: float | None = Field(default=None, description="Highest plausible reading (unit of name)")

    def _check_plausible(self, readable: bool) -> None:
        low, high = self.plausible_min, self.plausible_max
        if readable:
            if low is None or high is None:
                raise ValueError("a readable point needs plausible_min and plausible_max")
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"plausible range {low}..{high} must be finite and increasing")
        elif (low, high) != (None, None):
            raise ValueError("a write-only point is never read: it takes no plausible range")


class ModbusPoint(_Plausible):
    """One quantity in Modbus registers: value = raw * scale * sign, written as value / scale / sign."""

    name: Quantity
    function: Literal[3, 4] = Field(description="Read function: 3 holding, 4 input registers")
    address: Annotated[int, Field(ge=0, le=0xFFFF)]
    type: RegisterType
    word_order: Literal["big", "little"] = "big"
    scale: float = Field(default=1.0, description="Multiplier from the raw register value to the unit in name")
    sign: Literal[1, -1] = Field(default=1, description="-1 when the device counts the other way round")
    access: Access = Access.READ
    minimum: float | None = Field(default=None, description="Lowest value a write may send")
    maximum: float | None = Field(default=None, description="Highest value a write may send")

    @model_validator(mode="after")
    def _ranges(self) -> Self:
        self._check_plausible(readable=self.access is not Access.WRITE)
        if self.access is Access.READ and (self.minimum, self.maximum) != (None, None):
            raise ValueError("minimum/maximum bound writes; a read-only point takes plausible_min/plausible_max")
        return self


class Dlt645Point(_Plausible):
    """One quantity behind a DL/T 645 data identifier (value = BCD * 10^-decimals * scale * sign)."""

    name: Quantity
    di: Annotated[str, Field(pattern=r"^[0-9A-F]{8}$")]
    scale: float = 1.0
    sign: Literal[1, -1] = 1
    access: Literal[Access.READ] = Access.READ
    # Each DL/T 645 read is ~200 ms at 2400 baud: slow-changing points are read every Nth poll.
    every_n_polls: int = Field(default=1, ge=1, le=3600)

    @model_validator(mode="after")
    def _ranges(self) -> Self:
        self._check_plausible(readable=True)
        return self


class WatchdogFallback(_Model):
    """What a device applies to one setpoint when its communication watchdog runs out."""

    point: Quantity | None = Field(
        default=None, description="Writable point holding the fallback value, set by the controller at start"
    )
    value: float | None = Field(
        default=None, description="The firmware's fallback (with `point`: what it applies until one is written)"
    )

    @model_validator(mode="after")
    def _something(self) -> Self:
        if self.point is None and self.value is None:
            raise ValueError("a fallback needs a point that holds it, a fixed value, or both")
        return self


class Watchdog(_Model):
    """A device-side communication watchdog: when no valid write arrives within the timeout, the device
    applies its fallbacks by itself (the controller crashed, was killed, or the bus is cut).

    Any successful write to the device counts as alive (a setpoint, the heartbeat, the configuration);
    reads do not, so a SCADA or a logger polling the device cannot keep a dead controller's setpoints
    alive. A timeout of 0 leaves the watchdog off, as the devices ship.
    """

    timeout_point: Quantity = Field(description="Writable point: seconds without a valid write before fallback")
    heartbeat_point: Quantity | None = Field(
        default=None, description="Writable point whose only purpose is to say the controller is alive"
    )
    fallback: dict[str, WatchdogFallback] = Field(min_length=1, description="Setpoint -> its fallback")


class DeviceMap(_Model):
    name: str = Field(pattern=r"^[a-z0-9_]+$")
    description: str
    protocol: BusProtocol
    kinds: list[DeviceKind] = Field(min_length=1)
    default_baud_rate: int
    # Modbus only: registers per read request; some devices refuse long reads.
    max_registers_per_read: int = Field(default=100, ge=1, le=125)
    points: list[ModbusPoint | Dlt645Point] = Field(min_length=1)
    watchdog: Watchdog | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        names = [p.name for p in self.points]
        if len(set(names)) != len(names):
            raise ValueError("point names must be unique")
        want = ModbusPoint if self.protocol is BusProtocol.MODBUS_RTU else Dlt645Point
        for index, point in enumerate(self.points):
            if not isinstance(point, want):
                raise ValueError(f"points.{index}: a {self.protocol.value} map takes {want.__name__} entries")
        for kind in self.kinds:
            missing = [n for n in REQUIRED_POINTS[kind] if n not in names]
            if missing:
                raise ValueError(f"kind {kind.value} needs points {missing}")
        if self.watchdog is not None:
            self._check_watchdog(self.watchdog)
        return self

    def _check_watchdog(self, watchdog: Watchdog) -> None:
        writable = {p.name for p in self.points if p.access is not Access.READ and isinstance(p, ModbusPoint)}
        named = [("watchdog.timeout_point", watchdog.timeout_point)]
        if watchdog.heartbeat_point is not None:
            named.append(("watchdog.heartbeat_point", watchdog.heartbeat_point))
        for setpoint, fallback in watchdog.fallback.items():
            named.append((f"watchdog.fallback.{setpoint}", setpoint))
            if fallback.point is not None:
                named.append((f"watchdog.fallback.{setpoint}.point", fallback.point))
        for where, name in named:
            if name not in writable:
                raise ValueError(f"{where}: {name!r} is not a writable Modbus point of this map")

    def point(self, name: str) -> ModbusPoint | Dlt645Point:
        for point in self.points:
            if point.name == name:
                return point
        raise KeyError(f"{self.name} has no point {name!r}")

    @property
    def readable(self) -> list[ModbusPoint | Dlt645Point]:
        return [p for p in self.points if p.access is not Access.WRITE]


# What the controller needs from each kind of device. Sign conventions, whatever the vendor does:
# grid power_kw > 0 imports; pv power_kw > 0 generates; battery power_kw > 0 charges (AC side);
# ev power_kw > 0 charges.
REQUIRED_POINTS: dict[DeviceKind, tuple[str, ...]] = {
    DeviceKind.GRID_METER: ("power_kw",),
    DeviceKind.PV_METER: ("power_kw",),
    DeviceKind.BATTERY_INVERTER: ("power_kw", "soc_pct", "power_setpoint_kw"),
    DeviceKind.PV_INVERTER: ("power_kw", "power_limit_pct"),
    DeviceKind.EV_CHARGER: ("power_kw", "state_code", "current_limit_a"),
}


def _parse(text: str, source: str) -> DeviceMap:
    try:
        return DeviceMap.model_validate(tomllib.loads(text))
    except tomllib.TOMLDecodeError as err:
        raise MapError(f"{source}: TOML syntax: {err}") from None
    except ValidationError as err:
        raise MapError(f"{source}: " + "; ".join(format_validation_error(err))) from None


@cache
def all_maps() -> dict[str, DeviceMap]:
    """Every shipped map, by name; a malformed shipped map is a packaging bug and raises MapError."""
    maps: dict[str, DeviceMap] = {}
    for entry in sorted(resources.files(__name__).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            device_map = _parse(entry.read_text("utf-8"), entry.name)
            if entry.name != f"{device_map.name}.toml":
                raise MapError(f"{entry.name}: file name must be {device_map.name}.toml")
            maps[device_map.name] = device_map
    return maps


def load_map(name: str) -> DeviceMap:
    maps = all_maps()
    if name not in maps:
        raise MapError(f"no register map {name!r}; known: {', '.join(sorted(maps))}")
    return maps[name]


def check_site_devices(site: SiteConfig) -> list[str]:
    """Problems with the devices of a site that only the register maps can see, by field path."""
    problems: list[str] = []
    maps = all_maps()
    for b, bus in enumerate(site.buses):
        for d, device in enumerate(bus.devices):
            where = f"buses.{b}.devices.{d}.model"
            device_map = maps.get(device.model)
            if device_map is None:
                problems.append(f"{where}: no register map {device.model!r}; known: {', '.join(sorted(maps))}")
            elif device_map.protocol is not bus.protocol:
                speaks = device_map.protocol.value
                problems.append(f"{where}: {device.model} speaks {speaks}, bus {bus.name} is {bus.protocol.value}")
            elif device.kind not in device_map.kinds:
                kinds = ", ".join(k.value for k in device_map.kinds)
                problems.append(f"{where}: {device.model} cannot act as {device.kind.value} (it is {kinds})")
    return problems


def device_questions(site: SiteConfig) -> list[str]:
    """What a valid site file may have wrong about its devices, asked rather than refused: a DL/T 645
    meter (the utility's revenue meter, as a rule) named as the PV meter, and several PV meters (summed:
    each must meter its own array, or a part is counted twice)."""
    questions: list[str] = []
    pv_meters: list[str] = []
    for b, bus in enumerate(site.buses):
        for d, device in enumerate(bus.devices):
            if device.kind is not DeviceKind.PV_METER:
                continue
            pv_meters.append(device.name)
            if bus.protocol is BusProtocol.DLT645:
                questions.append(
                    f"buses.{b}.devices.{d}: {device.name} is a DL/T 645 meter configured as the PV meter; a DL/T 645"
                    " meter is usually the utility's revenue meter at the grid connection (kind = \"grid_meter\")."
                    " Is it really on the PV feeder? `greensite check --step-test` tells"
                )
    if len(pv_meters) > 1:
        questions.append(
            f"{len(pv_meters)} PV meters ({', '.join(pv_meters)}) are summed as the site's PV: each must meter its own"
            " array (a meter of the whole roof with one of a part counts the part twice)"
        )
    return questions
