"""A simulated site: the plant, simulated meters on ptys speaking the real protocols, and a recorder
that judges the run by the plant's truth (not by what the controller believes)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime

from config import SiteConfig
from controller.plant import Plant, school_arrivals
from controller.safety import LIMIT_MARGIN_KW, Setpoints
from firmware_bridge.maps import load_map
from firmware_bridge.simulator import SimulatedBus, SimulatedDevice
from firmware_bridge.transport import Link, SerialLink

__all__ = ["Recorder", "simulated_site"]


@dataclass
class Recorder:
    """Checks every tick against the plant's truth after the tick's setpoints took effect."""

    site: SiteConfig
    plant: Plant
    breach_ticks: int = 0
    longest_breach_ticks: int = 0
    soc_out_of_bounds_ticks: int = 0
    _run: int = 0
    grid_kw: list[float] = field(default_factory=list)
    # Runs of more than one tick beyond a limit: (first second, ticks, worst grid kW), for the reports.
    long_breaches: list[tuple[float, int, float]] = field(default_factory=list)

    def __call__(self, now_s: float, setpoints: Setpoints) -> None:
        grid = self.plant.grid_kw
        self.grid_kw.append(grid)
        breach = (
            grid > self.site.import_limit_kw + LIMIT_MARGIN_KW or grid < -self.site.export_limit_kw - LIMIT_MARGIN_KW
        )
        self._run = self._run + 1 if breach else 0
        if self._run == 2:
            self.long_breaches.append((now_s - 1, 2, grid))
        elif self._run > 2:
            first, _, worst = self.long_breaches[-1]
            self.long_breaches[-1] = (first, self._run, grid if abs(grid) > abs(worst) else worst)
        self.breach_ticks += breach
        self.longest_breach_ticks = max(self.longest_breach_ticks, self._run)
        b = self.site.battery
        if b is not None and not b.soc_min - 1e-6 <= self.plant.soc <= b.soc_max + 1e-6:
            self.soc_out_of_bounds_ticks += 1


@contextlib.asynccontextmanager
async def simulated_site(
    site: SiteConfig,
    start: datetime,
    days: int,
    *,
    seed: int = 1,
    wire_time: bool = False,
    plant: Plant | None = None,
) -> AsyncIterator[tuple[Plant, dict[str, Link], dict[str, SimulatedBus]]]:
    """Plant and simulated buses for every bus of the site; yields the links the controller opens.
    `plant`: a plant built by the caller (weather, calendar, cars); default the school on a cloudy day."""
    if plant is None:
        plant = Plant(site, start, seed=seed, arrivals=school_arrivals(site, start, days))
        if site.battery is not None:
            plant.soc = max(site.tuning.battery.soc_min, min(site.tuning.battery.soc_max, 0.5))
    async with contextlib.AsyncExitStack() as stack:
        links: dict[str, Link] = {}
        sims: dict[str, SimulatedBus] = {}
        for bus in site.buses:
            devices = []
            for device in bus.devices:
                kind, name = device.kind, device.name
                devices.append(
                    SimulatedDevice(
                        name,
                        load_map(device.model),
                        device.address,
                        source=lambda kind=kind, name=name, p=plant: p.readings(kind, name),  # type: ignore[misc]
                        sink=lambda q, v, kind=kind, name=name, p=plant: p.write(kind, name, q, v),  # type: ignore[misc]
                        ct_ratio=device.ct_ratio,
                    )
                )
            sim = await stack.enter_async_context(SimulatedBus(bus, devices, wire_time=wire_time, seed=seed))
            sims[bus.name] = sim
            links[bus.name] = SerialLink(bus, sim.port, virtual=True)
        yield plant, links, sims
