"""Counting ticks beyond a grid limit: in total, the longest run, the energy beyond it, and how much of
it no setting of the levers could have prevented."""

from __future__ import annotations

from dataclasses import dataclass

from controller.safety import LIMIT_MARGIN_KW

__all__ = ["BreachCount"]


@dataclass
class BreachCount:
    """Ticks whose measured grid flow was beyond a limit (by more than the meters' margin) after the
    previous tick's correction, split by whether the safety layer had every lever at its end."""

    ticks: int = 0
    longest_run_ticks: int = 0
    energy_kwh: float = 0.0  # beyond the limit
    unavoidable_ticks: int = 0
    unavoidable_energy_kwh: float = 0.0
    _run: int = 0

    def add(self, beyond_kw: float, dt_s: float, *, unavoidable: bool) -> None:
        if beyond_kw <= LIMIT_MARGIN_KW:
            self._run = 0
            return
        self.ticks += 1
        self._run += 1
        self.longest_run_ticks = max(self.longest_run_ticks, self._run)
        self.energy_kwh += beyond_kw * dt_s / 3600
        if unavoidable:
            self.unavoidable_ticks += 1
            self.unavoidable_energy_kwh += beyond_kw * dt_s / 3600

    @property
    def avoidable_ticks(self) -> int:
        return self.ticks - self.unavoidable_ticks

    def to_json(self) -> dict[str, float]:
        return {
            "ticks": self.ticks,
            "avoidable_ticks": self.avoidable_ticks,
            "unavoidable_ticks": self.unavoidable_ticks,
            "longest_run_ticks": self.longest_run_ticks,
            "energy_kwh": round(self.energy_kwh, 4),
            "unavoidable_energy_kwh": round(self.unavoidable_energy_kwh, 4),
        }
