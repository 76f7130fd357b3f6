"""A simulated site: the plant, simulated meters on ptys (or in-process links) speaking the real
protocols, and a recorder that judges the run by the plant's truth (not by what the controller believes)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from config import SiteConfig
from controller.breaches import BreachCount
from controller.interval_csv import IntervalSeries
from controller.plant import Plant, Sky, Weather, school_arrivals
from controller.safety import LIMIT_MARGIN_KW, Setpoints
from firmware_bridge.maps import load_map
from firmware_bridge.simulator import Line, SimulatedBus, SimulatedDevice
from firmware_bridge.transport import Link, SerialLink

__all__ = ["Recorder", "simulated_plant", "simulated_site"]


@dataclass
class Recorder:
    """Judges every tick's correction by the plant's truth: the mean grid flow over the interval that
    the last tick's setpoints governed, against each limit, and whether it was avoidable at all."""

    site: SiteConfig
    plant: Plant
    import_breaches: BreachCount = field(default_factory=BreachCount)
    export_breaches: BreachCount = field(default_factory=BreachCount)
    soc_out_of_bounds_ticks: int = 0
    # Every interval's mean grid flow, for tests that look at a window; off by default (a float a tick
    # is a leak in a month-long run).
    keep_grid: bool = False
    grid_kw: list[float] = field(default_factory=list)
    # Runs of avoidable breach ticks: (first second, ticks, worst grid kW), for the reports.
    long_breaches: list[tuple[float, int, float]] = field(default_factory=list)
    _avoidable_run: int = 0
    _last_s: float | None = None

    @property
    def breach_ticks(self) -> int:
        return self.import_breaches.ticks + self.export_breaches.ticks

    @property
    def avoidable_breach_ticks(self) -> int:
        return self.import_breaches.avoidable_ticks + self.export_breaches.avoidable_ticks

    @property
    def longest_breach_ticks(self) -> int:
        return max(self.import_breaches.longest_run_ticks, self.export_breaches.longest_run_ticks)

    def __call__(self, now_s: float, setpoints: Setpoints) -> None:
        last, self._last_s = self._last_s, now_s
        grid = self.plant.interval_grid_kw
        b = self.site.battery
        if b is not None and not b.soc_min - 1e-6 <= self.plant.soc <= b.soc_max + 1e-6:
            self.soc_out_of_bounds_ticks += 1
        if last is None or grid is None:
            return  # the first tick: no correction judged yet
        if self.keep_grid:
            self.grid_kw.append(grid)
        dt_s = now_s - last
        beyond_import = grid - self.site.import_limit_kw
        beyond_export = -grid - self.site.export_limit_kw
        import_avoidable, export_avoidable = self.plant.interval_import_avoidable, self.plant.interval_export_avoidable
        self.import_breaches.add(beyond_import, dt_s, unavoidable=not import_avoidable)
        self.export_breaches.add(beyond_export, dt_s, unavoidable=not export_avoidable)
        avoidable = (beyond_import > LIMIT_MARGIN_KW and import_avoidable) or (
            beyond_export > LIMIT_MARGIN_KW and export_avoidable
        )
        self._avoidable_run = self._avoidable_run + 1 if avoidable else 0
        if self._avoidable_run == 1:
            self.long_breaches.append((last, 1, grid))
        elif self._avoidable_run > 1:
            first, _, worst = self.long_breaches[-1]
            self.long_breaches[-1] = (first, self._avoidable_run, grid if abs(grid) > abs(worst) else worst)


def simulated_plant(
    site: SiteConfig,
    start: datetime,
    days: int,
    *,
    seed: int = 1,
    weather: Weather = "passing_clouds",
    variation: bool = False,
    skies: tuple[Sky, ...] = (),
    replay: IntervalSeries | None = None,
) -> Plant:
    """The plant of a simulated run: the school's staff cars for `days`, the battery half full (within
    its SoC bounds), the sky, load variation and recording asked for (Plant's fields)."""
    plant = Plant(site, start, seed=seed, arrivals=school_arrivals(site, start, days), weather=weather,
                  variation=variation, skies=skies, replay=replay)  # fmt: skip
    if site.battery is not None:
        plant.soc = max(site.tuning.battery.soc_min, min(site.tuning.battery.soc_max, 0.5))
    return plant


@contextlib.asynccontextmanager
async def simulated_site(
    site: SiteConfig,
    start: datetime,
    days: int,
    *,
    seed: int = 1,
    wire_time: bool = False,
    plant: Plant | None = None,
    link_dir: Path | None = None,
    line: Line = Line.PTY,
) -> AsyncIterator[tuple[Plant, dict[str, Link], dict[str, SimulatedBus]]]:
    """Plant and simulated buses for every bus of the site; yields the links the controller opens.
    `plant`: a plant built by the caller (weather, calendar, cars); default the school on a cloudy day.
    `link_dir`: where the ports appear (`<bus name>.tty`), for a controller in another process.
    `line`: ptys, or in-process links (the same bytes, codecs and timeouts, no pseudo-terminal; not for a
    controller in another process)."""
    if plant is None:
        plant = simulated_plant(site, start, days, seed=seed)
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
                        clock=lambda p=plant: p.now_s,  # type: ignore[misc]  # the devices live in plant time
                    )
                )
            simulated = SimulatedBus(bus, devices, wire_time=wire_time, seed=seed, link_dir=link_dir, line=line)
            sim = await stack.enter_async_context(simulated)
            sims[bus.name] = sim
            links[bus.name] = sim.memory_link if line is Line.MEMORY else SerialLink(bus, sim.port, virtual=True)
        yield plant, links, sims
