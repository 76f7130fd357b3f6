"""The error a refused site file, patch or scenario raises, and pydantic's errors as readable lines.

Kept apart from the loader and the schema: the planner reports scenario errors with these, and
importing it must not build the whole site schema or load pydantic-settings (first-plan latency).
"""

from __future__ import annotations

from pydantic import ValidationError

__all__ = ["ConfigError", "format_validation_error"]


class ConfigError(ValueError):
    """A site file or config patch was refused; `errors` lists every problem by field path."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: " + "; ".join(errors))


def format_validation_error(error: ValidationError) -> list[str]:
    """One line per problem: `field.path: message (got value)`."""
    lines: list[str] = []
    for item in error.errors(include_url=False):
        path = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        given = item.get("input")
        if item["type"] not in {"missing", "value_error"} and not isinstance(given, dict | list):
            message = f"{message} (got {given!r})"
        lines.append(f"{path}: {message}")
    return lines
