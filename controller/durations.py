"""Durations as people type them: 90s, 15m, 2h, 1d (the CLI and the HIL scenario files)."""

from __future__ import annotations

import re

__all__ = ["parse_duration_s"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration_s(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration like 90s, 15m, 2h or 1d")
    return float(match.group(1)) * _UNITS[match.group(2)]
