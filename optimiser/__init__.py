"""Dispatch planner: Numba kernels behind a validated API."""

from optimiser._scenario import BatterySpec, EvSession, GridSpec, Scenario, ScenarioError, load_scenario
from optimiser._solve import EvShortfall, Plan, solve, solve_scenario

__all__ = [
    "BatterySpec",
    "EvSession",
    "EvShortfall",
    "GridSpec",
    "Plan",
    "Scenario",
    "ScenarioError",
    "load_scenario",
    "solve",
    "solve_scenario",
]
