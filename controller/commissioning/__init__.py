"""Commissioning a site: every device read once and judged (`greensite check`), and the step test that moves
one setpoint at a time to see which meter follows (`--step-test`)."""

from __future__ import annotations

from controller.commissioning.probe import DeviceIO, SiteDevices, battery_trend, read_device
from controller.commissioning.readings import (
    BatteryTrend,
    DeviceRead,
    DeviceStatus,
    Finding,
    Verdict,
    judge_device,
    judge_site,
)
from controller.commissioning.report import CommissioningReport, render_text, summary_text, write_report
from controller.commissioning.step_test import Outcome, StepTest, StepTestReport, step_sizes

__all__ = [
    "BatteryTrend",
    "CommissioningReport",
    "DeviceIO",
    "DeviceRead",
    "DeviceStatus",
    "Finding",
    "Outcome",
    "SiteDevices",
    "StepTest",
    "StepTestReport",
    "Verdict",
    "battery_trend",
    "judge_device",
    "judge_site",
    "read_device",
    "render_text",
    "step_sizes",
    "summary_text",
    "write_report",
]
