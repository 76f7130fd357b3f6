"""The shape of a subcommand."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from config import ConfigError, SiteConfig, load_site
from firmware_bridge.maps import check_site_devices

__all__ = ["EXIT_BAD_INPUT", "EXIT_OK", "EXIT_RUNTIME", "Command", "loaded_site", "refusal"]

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_BAD_INPUT = 2  # the user's file, frame or arguments were refused; nothing was started


def refusal(source: str, errors: list[str]) -> str:
    """The message for a refused file: its name, then every problem on its own line."""
    return f"{source}: INVALID\n" + "".join(f"  - {line}\n" for line in errors)


def loaded_site(path: str) -> SiteConfig | None:
    """The site file with its devices checked against the register maps; None after writing the refusal
    (every problem by field path) to stderr."""
    try:
        site = load_site(path)
        problems = check_site_devices(site)
    except ConfigError as err:
        problems = err.errors
    if problems:
        sys.stderr.write(refusal(path, problems))
        return None
    return site


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
