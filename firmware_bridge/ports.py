"""Which serial ports this machine has, and which of a site's are missing: the start-up error names them."""

from __future__ import annotations

import glob
import os

from config import SiteConfig

__all__ = ["missing_ports", "serial_ports"]

# Where Linux puts serial ports: USB adapters (FTDI, CH340, CP210x as ttyUSB, CDC as ttyACM), their
# stable names by id and by path, on-board UARTs (ttyS, ttyAMA on a Raspberry Pi, ttymxc on i.MX boards).
PORT_PATTERNS = (
    "/dev/serial/by-id/*",
    "/dev/serial/by-path/*",
    "/dev/ttyUSB*",
    "/dev/ttyACM*",
    "/dev/ttyAMA*",
    "/dev/ttymxc*",
)


def serial_ports() -> list[str]:
    """The serial ports present now, stable names first. ttyS* are left out: a PC lists 32 legacy UARTs
    whether or not anything is wired to them."""
    found: list[str] = []
    for pattern in PORT_PATTERNS:
        found += sorted(glob.glob(pattern))
    return found


def missing_ports(site: SiteConfig) -> list[str]:
    """One line per real bus whose port does not exist: the port, what this machine has, and the scan
    that finds the devices on one of them."""
    problems: list[str] = []
    present = serial_ports()
    for index, bus in enumerate(site.buses):
        # A pyserial URL (socket://, rfc2217:// to a serial server) is no path to look for.
        if bus.simulated or "://" in bus.port or os.path.exists(bus.port):
            continue
        have = ", ".join(present) if present else "none (is the USB adapter plugged in? see `dmesg | tail`)"
        scan_port = present[0] if present else "PORT"
        problems.append(
            f"buses.{index}.port: bus {bus.name!r}: {bus.port} does not exist; serial ports here: {have}."
            f" Find the devices with: greensite scan --port {scan_port} --protocol {bus.protocol.value}"
            f" --baud {bus.baud_rate} --parity {bus.parity.value}"
        )
    return problems
