"""The shape of a subcommand."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["EXIT_BAD_INPUT", "EXIT_OK", "EXIT_RUNTIME", "Command", "refusal"]

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_BAD_INPUT = 2  # the user's file, frame or arguments were refused; nothing was started


def refusal(source: str, errors: list[str]) -> str:
    """The message for a refused file: its name, then every problem on its own line."""
    return f"{source}: INVALID\n" + "".join(f"  - {line}\n" for line in errors)


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
