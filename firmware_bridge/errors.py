"""One error tree for everything below the controller."""

from __future__ import annotations

__all__ = [
    "BridgeError",
    "DeviceException",
    "DeviceLost",
    "DeviceTimeout",
    "FrameError",
    "PortError",
]


class BridgeError(Exception):
    """Base of every error raised by firmware_bridge."""


class FrameError(BridgeError):
    """Bytes that are not a valid frame; `offset` is where in the input the problem was found."""

    def __init__(self, offset: int, reason: str) -> None:
        self.offset = offset
        self.reason = reason
        super().__init__(f"byte {offset}: {reason}")


class DeviceTimeout(BridgeError, TimeoutError):
    """The device did not answer in time (after the retries the bus allowed)."""


class DeviceLost(BridgeError):
    """The device is lost and its next attempt is not due: it was not asked (no bus time spent)."""


class DeviceException(BridgeError):
    """The device answered, and said no (Modbus exception, DL/T 645 error reply). Not retried."""

    def __init__(self, device: str, code: int, meaning: str) -> None:
        self.device = device
        self.code = code
        self.meaning = meaning
        super().__init__(f"{device} refused: {meaning} (code 0x{code:02X})")


class PortError(BridgeError, OSError):
    """The serial port could not be opened, vanished, or failed to write."""
