"""Read a site file: TOML, then GREENSITE_* environment overrides, then validation with readable errors."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from config._errors import ConfigError, format_validation_error
from config._schema import SiteConfig

__all__ = ["ConfigError", "format_validation_error", "load_site", "parse_site"]

# A site file is a few kB; anything far larger is a mistake (or hostile), not a site.
MAX_SITE_FILE_BYTES = 1_048_576


class _SiteSettings(SiteConfig, BaseSettings):
    """SiteConfig with GREENSITE_SECTION__FIELD environment variables layered over the file."""

    model_config = SettingsConfigDict(env_prefix="GREENSITE_", env_nested_delimiter="__", extra="forbid", frozen=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file, so secrets (mqtt password) need not live in the site file.
        return (env_settings, init_settings)


def parse_site(data: Mapping[str, Any], source: str = "<site>", *, environment: bool = True) -> SiteConfig:
    """Validate a site mapping; raise ConfigError listing every problem."""
    try:
        if environment:
            merged = _SiteSettings(**data)
            return SiteConfig.model_validate(merged.model_dump())
        return SiteConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(source, format_validation_error(err)) from None


def load_site(path: str | Path, *, environment: bool = True) -> SiteConfig:
    """Load and validate a TOML site file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(str(path), [f"cannot read file: {err.strerror}"]) from None
    if len(raw) > MAX_SITE_FILE_BYTES:
        raise ConfigError(str(path), [f"file is {len(raw)} bytes, more than {MAX_SITE_FILE_BYTES}"])
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(str(path), [f"byte offset {err.start}: not UTF-8"]) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(str(path), [f"TOML syntax: {err}"]) from None
    return parse_site(data, str(path), environment=environment)
