"""The commissioning report: what each device read, what the site's readings say together, what the step
test did and saw, and the list of what to fix; as terminal text, markdown and JSON (written atomically)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

from controller.commissioning.readings import DeviceRead, DeviceStatus, Finding, Verdict, fmt_kw
from controller.commissioning.step_test import Outcome, StepTestReport
from controller.storage.atomic import write_atomic

__all__ = [
    "CommissioningReport",
    "Problem",
    "render_json",
    "render_markdown",
    "render_step_text",
    "render_text",
    "summary_text",
    "write_report",
]

REPORT_VERSION = 1


@dataclass(frozen=True, slots=True)
class Problem:
    """One line of the to-do list: who, what was seen, what to do."""

    subject: str
    what: str
    fix: str = ""


@dataclass
class CommissioningReport:
    site_id: str
    site_name: str
    site_file: str
    local: datetime
    devices: list[DeviceRead] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    step_test: StepTestReport | None = None
    step_test_note: str = ""  # why there is no step test ("" when one ran or none was asked for)

    def problems(self) -> list[Problem]:
        """What is wrong: a setpoint that could not be put back (first: it is left stepped on site), a device
        that is silent or erring, an implausible value or finding, a failed step, an interrupted step test."""
        test = self.step_test
        found: list[Problem] = []
        if test is not None:
            found += [
                Problem(r.device, f"{r.quantity} could not be put back to {r.value:g}: {r.error}",
                        f"set {r.device}'s {r.quantity} back to {r.value:g} by hand")
                for r in test.restores if not r.ok
            ]  # fmt: skip
        for device in self.devices:
            if device.status is not DeviceStatus.ANSWERED:
                detail = "; ".join(device.errors) or device.status.value
                found.append(Problem(device.name, f"{device.status.value}: {detail}", _status_fix(device)))
            for point in device.points:
                if point.verdict is Verdict.IMPLAUSIBLE:
                    where = "" if point.where in point.why else f" ({point.where})"
                    found.append(Problem(device.name, f"{point.quantity}{where}: {point.why}"))
        found += [Problem(f.subject, f.what, f.fix) for f in self.findings if f.verdict is Verdict.IMPLAUSIBLE]
        if test is not None:
            for step in test.steps:
                if step.outcome is Outcome.FAILED:
                    fixes = [f for f in step.findings if f.verdict is Verdict.IMPLAUSIBLE]
                    fix = "; ".join(f.fix for f in fixes) or "see the wiring diagnosis"
                    found.append(Problem(f"{step.kind.value} step", step.summary, fix))
            found += [Problem(f.subject, f.what, f.fix) for f in test.wiring if f.verdict is Verdict.IMPLAUSIBLE]
            if test.interrupted:
                found.append(Problem("step test", test.interrupted, "run it again to the end"))
        return found

    def questions(self) -> list[Problem]:
        """What may be wrong: suspicious values and findings (a look on site tells)."""
        found: list[Problem] = []
        for device in self.devices:
            found += [
                Problem(device.name, f"{p.quantity} = {_value(p.value, p.unit)}: {p.why}")
                for p in device.points if p.verdict is Verdict.SUSPICIOUS
            ]  # fmt: skip
        found += [Problem(f.subject, f.what, f.fix) for f in self.findings if f.verdict is Verdict.SUSPICIOUS]
        if self.step_test is not None:
            for step in self.step_test.steps:
                found += [Problem(f.subject, f.what, f.fix) for f in step.findings if f.verdict is Verdict.SUSPICIOUS]
            found += [
                Problem(f.subject, f.what, f.fix) for f in self.step_test.wiring if f.verdict is Verdict.SUSPICIOUS
            ]
        return found

    def passed(self) -> list[str]:
        """What was checked and is fine."""
        lines = [
            f"{d.name}: answered, every value plausible"
            for d in self.devices if d.status is DeviceStatus.ANSWERED and d.verdict is Verdict.OK
        ]  # fmt: skip
        lines += [f.what for f in self.findings if f.verdict is Verdict.OK]
        if self.step_test is not None:
            lines += [f"{s.kind.value} step: {s.summary}" for s in self.step_test.steps if s.outcome is Outcome.PASSED]
            lines += [f.what for f in self.step_test.wiring if f.verdict is Verdict.OK]
            lines += [f"{r.device} {r.quantity} put back to {r.value:g}" for r in self.step_test.restores if r.ok]
        return lines


def _status_fix(device: DeviceRead) -> str:
    if device.status is DeviceStatus.SILENT:
        return (
            f"check {device.name}'s address ({device.address}), baud rate and parity, its A/B wiring and its power;"
            " `greensite scan` lists what answers on the bus"
        )
    return "see the errors: a register the device does not have (the map's model?), or noise on the bus"


def _value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    text = f"{value:.3f}".rstrip("0").rstrip(".") if math.isfinite(value) else str(value)
    return f"{text} {unit}".rstrip()


# --- text for a terminal ------------------------------------------------------------------------------------


def render_text(report: CommissioningReport, *, step_test: bool = True) -> str:
    """The check as the engineer reads it on site; with `step_test`, the step test's part too."""
    out = [f"greensite check: {report.site_name} ({report.site_id}) at {report.local:%Y-%m-%d %H:%M %Z}\n"]
    for device in report.devices:
        out.append(
            f"\n{device.name}  ({device.kind.value}, {device.model}, bus {device.bus} address {device.address}):"
            f" {device.status.value}\n"
        )
        out += [f"  ! {line}\n" for line in device.errors]
        width = max((len(p.quantity) for p in device.points), default=0)
        for point in device.points:
            why = f"  {point.why}" if point.why else ""
            out.append(
                f"  {point.verdict.value:<11} {point.quantity:<{width}}  {_value(point.value, point.unit):>14}{why}\n"
            )
    out.append("\nsite\n")
    out += [_finding_line(f) for f in report.findings]
    if step_test and report.step_test is not None:
        out.append(render_step_text(report.step_test))
    elif step_test and report.step_test_note:
        out.append(f"\nstep test: {report.step_test_note}\n")
    return "".join(out)


def _finding_line(finding: Finding) -> str:
    fix = f"\n      -> {finding.fix}" if finding.fix else ""
    return f"  {finding.verdict.value:<11} {finding.what}{fix}\n"


def render_step_text(test: StepTestReport) -> str:
    """The step test's part of the terminal text (a setpoint left stepped first)."""
    out = ["\nstep test\n"]
    out += [f"  NOT PUT BACK: {r.device} {r.quantity} = {r.value:g}: {r.error}\n" for r in test.restores if not r.ok]
    for step in test.steps:
        out.append(f"  {step.kind.value}: {step.outcome.value}: {step.summary}\n")
        if step.setpoint:
            settle = "settled" if step.settled else "not settled"
            out.append(f"      {step.setpoint}; {settle} after {step.waited_s:.0f} s\n")
        out += [f"    {_finding_line(f).strip()}\n" for f in step.findings]
    for restore in test.restores:
        state = "ok" if restore.ok else f"FAILED: {restore.error}"
        out.append(f"  restored {restore.device} {restore.quantity} = {restore.value:g}: {state}\n")
    out.append("  wiring\n")
    out += [f"  {_finding_line(f)}" for f in test.wiring]
    if test.interrupted:
        out.append(f"  {test.interrupted}\n")
    return "".join(out)


def summary_text(report: CommissioningReport) -> str:
    """The verdict and the to-do list, last on the terminal."""
    problems, questions = report.problems(), report.questions()
    out = [f"\n{'FAIL' if problems else 'OK'}: {len(problems)} to fix, {len(questions)} to look at\n"]
    for problem in problems:
        out.append(
            f"  fix  {problem.subject}: {problem.what}\n" + (f"       -> {problem.fix}\n" if problem.fix else "")
        )
    for question in questions:
        out.append(
            f"  look {question.subject}: {question.what}\n" + (f"       -> {question.fix}\n" if question.fix else "")
        )
    return "".join(out)


# --- markdown -----------------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: CommissioningReport) -> str:
    problems, questions = report.problems(), report.questions()
    out = [
        f"# Commissioning report: {report.site_name}\n\n",
        f"Site `{report.site_id}` ({report.site_file}), {report.local:%Y-%m-%d %H:%M %Z}.\n\n",
        f"**{'FAIL' if problems else 'OK'}**: {len(problems)} to fix, {len(questions)} to look at.\n\n",
        "## To fix\n\n",
    ]
    out += [f"- **{_cell(p.subject)}**: {_cell(p.what)}" + (f" — *{_cell(p.fix)}*" if p.fix else "") + "\n"
            for p in problems] or ["Nothing.\n"]  # fmt: skip
    out.append("\n## To look at\n\n")
    out += [f"- **{_cell(q.subject)}**: {_cell(q.what)}" + (f" — *{_cell(q.fix)}*" if q.fix else "") + "\n"
            for q in questions] or ["Nothing.\n"]  # fmt: skip
    out.append("\n## Passed\n\n")
    out += [f"- {_cell(line)}\n" for line in report.passed()] or ["Nothing yet.\n"]
    out.append("\n## Devices\n")
    for device in report.devices:
        out.append(
            f"\n### {device.name}: {device.status.value}\n\n{device.kind.value}, `{device.model}`, bus {device.bus}"
            f" address {device.address}.\n\n"
        )
        out += [f"- error: {_cell(line)}\n" for line in device.errors]
        if device.errors:
            out.append("\n")
        if device.points:
            out.append("| quantity | value | verdict | where | raw | why |\n|---|---:|---|---|---|---|\n")
            out += [
                f"| {p.quantity} | {_value(p.value, p.unit)} | {p.verdict.value} | {p.where} | `{p.raw}`"
                f" | {_cell(p.why)} |\n"
                for p in device.points
            ]
    out.append("\n## Site\n\n")
    out += [f"- {f.verdict.value}: {_cell(f.what)}" + (f" — *{_cell(f.fix)}*" if f.fix else "") + "\n"
            for f in report.findings]  # fmt: skip
    test = report.step_test
    if test is None:
        if report.step_test_note:
            out.append(f"\n## Step test\n\n{report.step_test_note}\n")
        return "".join(out)
    out.append("\n## Step test\n\n")
    for step in test.steps:
        out.append(f"### {step.kind.value}: {step.outcome.value}\n\n{_cell(step.summary)}\n\n")
        if step.setpoint:
            settle = "settled" if step.settled else "had not settled"
            out.append(f"Setpoint: {step.setpoint}; the meters {settle} after {step.waited_s:.0f} s.\n\n")
        if step.moves:
            out.append(
                "| device | role | before | after | moved | expected | back |\n|---|---|---:|---:|---:|---:|---:|\n"
            )
            for move in step.moves:
                expected = "-" if move.expected_kw is None else fmt_kw(move.expected_kw)
                out.append(
                    f"| {move.device} | {move.role} | {_value(move.before_kw, 'kW')} | {_value(move.after_kw, 'kW')}"
                    f" | {'-' if move.delta_kw is None else fmt_kw(move.delta_kw)} | {expected}"
                    f" | {_value(move.back_kw, 'kW')} |\n"
                )
            out.append("\n")
        out += [f"- {f.verdict.value}: {_cell(f.what)}" + (f" — *{_cell(f.fix)}*" if f.fix else "") + "\n"
                for f in step.findings]  # fmt: skip
    out.append("### Wiring\n\n")
    out += [f"- {f.verdict.value}: {_cell(f.what)}" + (f" — *{_cell(f.fix)}*" if f.fix else "") + "\n"
            for f in test.wiring]  # fmt: skip
    out.append("\n### Setpoints put back\n\n")
    out += [f"- {r.device} {r.quantity} = {r.value:g}: {'ok' if r.ok else 'FAILED: ' + _cell(r.error)}\n"
            for r in test.restores] or ["Nothing was changed.\n"]  # fmt: skip
    if test.interrupted:
        out.append(f"\n**{test.interrupted}**\n")
    return "".join(out)


# --- JSON ---------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Dataclasses, enums and datetimes as JSON values; NaN and infinities (a device's garbage) as null."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {name: _plain(getattr(value, name)) for name in value.__dataclass_fields__}
    return value


def render_json(report: CommissioningReport) -> dict[str, Any]:
    problems, questions = report.problems(), report.questions()
    body: dict[str, Any] = {
        "version": REPORT_VERSION,
        "site_id": report.site_id,
        "site_name": report.site_name,
        "site_file": report.site_file,
        "local_time": report.local.isoformat(),
        "ok": not problems,
        "to_fix": _plain(problems),
        "to_look_at": _plain(questions),
        "passed": report.passed(),
        "devices": _plain(report.devices),
        "findings": _plain(report.findings),
        "step_test": None,
    }
    if report.step_test is not None:
        test = report.step_test
        body["step_test"] = {
            "steps": [
                {**_plain(step), "moves": [{**_plain(m), "delta_kw": _plain(m.delta_kw)} for m in step.moves]}
                for step in test.steps
            ],
            "restores": _plain(test.restores),
            "wiring": _plain(test.wiring),
            "interrupted": test.interrupted,
        }
    elif report.step_test_note:
        body["step_test"] = {"not_run": report.step_test_note}
    return body


def write_report(directory: Path, report: CommissioningReport) -> list[Path]:
    """report.md and report.json in `directory` (made if missing), each written atomically."""
    markdown, data = directory / "report.md", directory / "report.json"
    write_atomic(markdown, render_markdown(report).encode("utf-8"))
    write_atomic(data, (json.dumps(render_json(report), indent=2, allow_nan=False) + "\n").encode("utf-8"))
    return [markdown, data]
