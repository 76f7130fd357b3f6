"""`greensite scan`: who answers on a serial bus, which register map fits each, and the site-file lines."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import sys
from typing import Any

from config import BusProtocol, DeviceKind, Parity
from controller.cli._command import EXIT_BAD_INPUT, EXIT_OK, EXIT_RUNTIME, Command
from firmware_bridge.maps import load_map
from firmware_bridge.scan import (
    DLT645_REPLY_TIMEOUT_S,
    MODBUS_REPLY_TIMEOUT_S,
    Answer,
    FoundDevice,
    Presence,
    ScanError,
    ScanResult,
    ScanSettings,
    WorstCase,
    check_port,
    parse_addresses,
    parse_units,
    scan,
)

BAUD_RATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)
# What each protocol's devices ship with: Modbus meters and inverters 9600 8N1, DL/T 645 meters 2400 8E1.
DEFAULT_LINE = {BusProtocol.MODBUS_RTU: (9600, Parity.NONE), BusProtocol.DLT645: (2400, Parity.EVEN)}
DEFAULT_TIMEOUT_S = {BusProtocol.MODBUS_RTU: MODBUS_REPLY_TIMEOUT_S, BusProtocol.DLT645: DLT645_REPLY_TIMEOUT_S}
MAX_TIMEOUT_S = 10.0  # the schema's bound on response_timeout_s
# The readings shown per device, most telling first.
SHOWN_QUANTITIES = ("power_kw", "voltage_l1_v", "frequency_hz", "soc_pct", "state_code", "current_limit_a",
                    "power_limit_pct", "import_energy_kwh")  # fmt: skip
SHOWN_PER_DEVICE = 4
UNIT_SUFFIXES = {"_kw": "kW", "_kwh": "kWh", "_v": "V", "_a": "A", "_hz": "Hz", "_pct": "%"}


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", required=True, help="serial port, e.g. /dev/ttyUSB0 or /dev/serial/by-id/...")
    parser.add_argument("--protocol", required=True, choices=[p.value for p in BusProtocol])
    parser.add_argument("--baud", type=int, choices=BAUD_RATES, help="default 9600 (Modbus), 2400 (DL/T 645)")
    parser.add_argument("--parity", choices=[p.value for p in Parity], help="default N (Modbus), E (DL/T 645)")
    parser.add_argument("--stop-bits", type=int, choices=[1, 2], default=1)
    parser.add_argument("--units", help="Modbus unit ids to probe: 1-247 (default), 5, 1-10,20,31")
    parser.add_argument("--addresses", help="DL/T 645: 12-digit meter addresses to probe, comma separated;"
                        " without it one broadcast read-address finds a single meter")  # fmt: skip
    parser.add_argument(
        "--timeout-s",
        type=float,
        help=f"reply timeout per address (default {MODBUS_REPLY_TIMEOUT_S} s Modbus, {DLT645_REPLY_TIMEOUT_S} s"
        " DL/T 645); every silent address costs it once",
    )
    parser.add_argument("--adapter-echo", action="store_true", help="the RS-485 adapter echoes what it sends")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout (progress stays on stderr)")


def _settings(args: argparse.Namespace) -> tuple[ScanSettings, list[int], list[str]]:
    protocol = BusProtocol(args.protocol)
    baud_rate, parity = DEFAULT_LINE[protocol]
    timeout_s = DEFAULT_TIMEOUT_S[protocol] if args.timeout_s is None else args.timeout_s
    if not (math.isfinite(timeout_s) and 0 < timeout_s <= MAX_TIMEOUT_S):
        raise ScanError(f"--timeout-s {args.timeout_s}: give a time above 0 and at most {MAX_TIMEOUT_S:g} s")
    units: list[int] = []
    addresses: list[str] = []
    if protocol is BusProtocol.MODBUS_RTU:
        if args.addresses is not None:
            raise ScanError("--addresses is for DL/T 645 meters; Modbus takes --units")
        units = parse_units(args.units or "1-247")
    else:
        if args.units is not None:
            raise ScanError("--units is for Modbus; DL/T 645 meters take --addresses (12 digits each)")
        addresses = parse_addresses(args.addresses) if args.addresses is not None else []
    settings = ScanSettings(
        port=args.port,
        protocol=protocol,
        baud_rate=args.baud or baud_rate,
        parity=Parity(args.parity) if args.parity else parity,
        stop_bits=args.stop_bits,
        timeout_s=timeout_s,
        adapter_echo=args.adapter_echo,
    )
    return settings, units, addresses


def _err(line: str) -> None:
    sys.stderr.write(line + "\n")


def _line(settings: ScanSettings) -> str:
    return f"{settings.baud_rate} 8{settings.parity.value}{settings.stop_bits}"


def _span(units: list[int]) -> str:
    """1-40 for a run, 1-5,10 otherwise."""
    parts: list[str] = []
    start = previous = units[0]
    for unit in [*units[1:], None]:
        if unit is not None and unit == previous + 1:
            previous = unit
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if unit is not None:
            start = previous = unit
    return ",".join(parts)


def _announce(settings: ScanSettings, what: str) -> Any:
    def announce(worst: WorstCase) -> None:
        _err(f"scanning {settings.port}: {settings.protocol.value} {_line(settings)}, {what},"
             f" {settings.timeout_s:g} s reply timeout")  # fmt: skip
        maps = f"{worst.maps} register map{'s' if worst.maps != 1 else ''}, {worst.reads_per_answering} reads"
        if worst.addresses == 1:
            _err(f"worst case {worst.if_all_answer_s:.1f} s ({worst.if_none_answers_s:.1f} s if nothing answers;"
                 f" {maps} tried on what answers)")  # fmt: skip
            return
        _err(
            f"worst case {worst.if_none_answers_s:.1f} s if nothing answers; each address that answers adds up to"
            f" {worst.per_answering_s:.1f} s ({maps}); {worst.if_all_answer_s:.0f} s if all {worst.addresses} answer"
        )

    return announce


def _run(args: argparse.Namespace) -> int:
    try:
        settings, units, addresses = _settings(args)
        check_port(settings.port)
    except ScanError as err:
        _err(f"greensite scan: {err}")
        return EXIT_BAD_INPUT
    if settings.protocol is BusProtocol.MODBUS_RTU:
        what = f"units {_span(units)}"
    else:
        what = f"addresses {', '.join(addresses)}" if addresses else "broadcast read-address"
    try:
        result = asyncio.run(
            scan(settings, units=units, addresses=addresses, progress=_err, announce=_announce(settings, what))
        )
    except ScanError as err:
        _err(f"greensite scan: {err}")
        return EXIT_BAD_INPUT
    snippet = site_snippet(result)
    if args.json:
        sys.stdout.write(json.dumps(_json(result, snippet), indent=2) + "\n")
    else:
        sys.stdout.write(_report(result, snippet))
    if not result.present:
        _err(
            "greensite scan: no device answered. Check the line settings (--baud, --parity), the wiring (A and B"
            " swapped?), that the devices are powered, and that no other program (greensite run) uses the port"
        )
        return EXIT_RUNTIME
    return EXIT_OK


# --- what is printed -------------------------------------------------------------------------------


def _values_text(device: FoundDevice) -> str:
    fit = device.best_fit
    if fit is None:
        return ""
    values = fit.values
    shown = [q for q in SHOWN_QUANTITIES if q in values][:SHOWN_PER_DEVICE]
    return ", ".join(_quantity_text(q, values[q]) for q in shown)


def _quantity_text(quantity: str, value: float) -> str:
    if quantity.endswith("_code"):
        return f"state {value:g}"
    unit = next((u for suffix, u in UNIT_SUFFIXES.items() if quantity.endswith(suffix)), "")
    return f"{value:.4g} {unit}".rstrip() if abs(value) < 1e4 else f"{value:.0f} {unit}".rstrip()


def _answer_text(device: FoundDevice, protocol: BusProtocol) -> str:
    probe = device.probe
    if probe.answer is Answer.REFUSED and probe.code is not None:
        return f"{'exception' if protocol is BusProtocol.MODBUS_RTU else 'error'} 0x{probe.code:02X}"
    return probe.answer.value


def _report(result: ScanResult, snippet: str) -> str:
    lines: list[str] = []
    if result.broadcast is not None:
        lines.append(f"broadcast read-address: {result.broadcast.why}")
    modbus = result.settings.protocol is BusProtocol.MODBUS_RTU
    header = "unit" if modbus else "address"
    width = 4 if modbus else 12
    if result.found:
        lines.append(f"{header:>{width}}  {'answer':<15} {'map':<26} {'confidence':<10}  values")
        for device in result.found:
            ident = device.identification
            best = ident.best if ident is not None and ident.best is not None else "-"
            if ident is not None and len(ident.tied) > 1:
                best = " or ".join(ident.tied)
            confidence = ident.confidence.value if ident is not None and ident.confidence is not None else "-"
            answer = _answer_text(device, result.settings.protocol)
            row = f"{device.address!s:>{width}}  {answer:<15} {best:<26} {confidence:<10}  {_values_text(device)}"
            lines.append(row.rstrip())
            why = ident.why if ident is not None else device.why
            lines.append(f"{'':>{width}}  {why}")
    if not result.addresses:
        scanned = "broadcast read-address"
    else:
        count = len(result.addresses)
        noun = ("unit" if modbus else "address") + ("" if count == 1 else "s" if modbus else "es")
        scanned = f"{count} {noun} scanned"
    unidentified = len(result.found) - len(result.present)
    lines.append(
        f"{scanned} in {result.elapsed_s:.1f} s: {len(result.present)} found"
        + (f", {unidentified} heard but not counted (see above)" if unidentified else "")
        + (f", {len(result.silent)} silent" if result.addresses else "")
    )
    if snippet:
        lines += ["", snippet.rstrip()]
    return "\n".join(lines) + "\n"


def _finite(values: dict[str, float]) -> dict[str, float | str]:
    # NaN and infinities are not JSON: given as text.
    return {k: v if math.isfinite(v) else str(v) for k, v in values.items()}


def _json(result: ScanResult, snippet: str) -> dict[str, Any]:
    settings = result.settings
    devices: list[dict[str, Any]] = []
    for device in result.found:
        ident = device.identification
        best = device.best_fit
        devices.append({
            "address": device.address,
            "presence": device.presence.value,
            "answer": device.probe.answer.value,
            "code": device.probe.code,
            "why": device.why,
            "reply_ms": round(device.probe.elapsed_s * 1000, 1),
            "best_map": ident.best if ident is not None else None,
            "confidence": ident.confidence.value if ident is not None and ident.confidence is not None else None,
            "why_map": ident.why if ident is not None else None,
            "also_fits": list(ident.also_fits) if ident is not None else [],
            "tied": list(ident.tied) if ident is not None else [],
            "values": _finite(best.values) if best is not None else {},
            "maps": [
                {"map": f.map_name, "fit": f.fit.value, "score": f.score, "reads": f.reads,
                 "reads_answered": f.reads_answered, "why": f.why}
                for f in device.fits
            ],
        })  # fmt: skip
    worst = result.worst_case
    body: dict[str, Any] = {
        "port": settings.port,
        "protocol": settings.protocol.value,
        "baud_rate": settings.baud_rate,
        "parity": settings.parity.value,
        "stop_bits": settings.stop_bits,
        "timeout_s": settings.timeout_s,
        "probed": list(result.addresses),
        "worst_case_s": {
            "if_none_answers": round(worst.if_none_answers_s, 2),
            "per_answering": round(worst.per_answering_s, 2),
            "if_all_answer": round(worst.if_all_answer_s, 2),
        },
        "elapsed_s": round(result.elapsed_s, 2),
        "devices": devices,
        "silent": list(result.silent),
        "snippet": snippet,
    }
    if result.broadcast is not None:
        broadcast = result.broadcast
        body["broadcast"] = {"address": broadcast.address, "single": broadcast.single, "why": broadcast.why}
    return body


# --- the site-file lines ---------------------------------------------------------------------------


def _toml(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a TOML basic string


def _bus_name(port: str) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", os.path.basename(port.rstrip("/")).lower()).strip("-_")
    return f"rs485-{slug}"[:40].rstrip("-_") if slug else "rs485"


def _kind(model: str, meters_before: int) -> tuple[DeviceKind, str]:
    """The kind to write for a device of `model`, and a comment when the scan cannot know it."""
    kinds = load_map(model).kinds
    if DeviceKind.GRID_METER in kinds:
        # A meter reads the same wherever it is wired: guess the first is the grid meter, the rest PV meters.
        if meters_before == 0 or DeviceKind.PV_METER not in kinds:
            return DeviceKind.GRID_METER, "or pv_meter: a scan cannot tell where a meter is wired"
        return DeviceKind.PV_METER, "or grid_meter: a scan cannot tell where a meter is wired"
    others = [k.value for k in kinds[1:]]
    return kinds[0], f"or {' / '.join(others)}" if others else ""


def site_snippet(result: ScanResult) -> str:
    """`[[buses]]` with a `[[buses.devices]]` per device found, ready to paste into a site file."""
    present = [d for d in result.found if d.presence is Presence.PRESENT]
    if not present:
        return ""
    settings = result.settings
    lines = [
        "# Paste into the site file, then check each kind and name.",
        "[[buses]]",
        f"name = {_toml(_bus_name(settings.port))}",
        f"port = {_toml(settings.port)}",
        f"protocol = {_toml(settings.protocol.value)}",
        f"baud_rate = {settings.baud_rate}",
        f"parity = {_toml(settings.parity.value)}",
    ]
    if settings.stop_bits != 1:
        lines.append(f"stop_bits = {settings.stop_bits}")
    if settings.adapter_echo:
        lines.append("adapter_echo = true")
    meters = 0
    for device in present:
        ident = device.identification
        lines.append("")
        if ident is None or ident.best is None:
            lines.append(f"# {device.address} answered, but no register map fits: write one (firmware_bridge/maps)")
            continue
        kind, kind_note = _kind(ident.best, meters)
        meters += kind in (DeviceKind.GRID_METER, DeviceKind.PV_METER)
        address = str(device.address) if isinstance(device.address, int) else _toml(device.address)
        model_note = ""
        if len(ident.tied) > 1:
            others = " or ".join(t for t in ident.tied if t != ident.best)
            model_note = f"  # or {others}: they read alike here, see the nameplate"
        elif ident.confidence is not None and ident.confidence.value != "high":
            model_note = f"  # confidence {ident.confidence.value}: see the nameplate"
        name = f"{kind.value.replace('_', '-')}-{device.address}"
        lines += [
            "[[buses.devices]]",
            f"name = {_toml(name)}",
            f"kind = {_toml(kind.value)}" + (f"  # {kind_note}" if kind_note else ""),
            f"model = {_toml(ident.best)}{model_note}",
            f"address = {address}",
        ]
    return "\n".join(lines) + "\n"


COMMAND = Command(
    "scan", "probe a serial bus: who answers, which register map fits, the site-file lines", _add_arguments, _run
)
