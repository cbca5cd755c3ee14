"""The service's configuration: defaults, then environment variables, then the caller's own mapping."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

MODES = ("locked", "unlocked")
MAX_RACE_WINDOW_MS = 5_000
MAX_TICKETS = 1_000_000_000


@dataclass(frozen=True)
class Config:
    """Everything the booking app needs to know at start. The README's configuration table lists each field."""

    db_path: Path = Path("db.json")
    mode: str = "locked"
    race_window_ms: int = 20
    tickets: int = 10
    event: str = "ticketlock demo night"
    lock_timeout_s: float = 5.0
    admin_token: str | None = field(default=None, repr=False)  # never printed or logged


ENVIRONMENT = {
    "TICKETLOCK_DB": "db_path",
    "TICKETLOCK_MODE": "mode",
    "TICKETLOCK_RACE_WINDOW_MS": "race_window_ms",
    "TICKETLOCK_TICKETS": "tickets",
    "TICKETLOCK_EVENT": "event",
    "TICKETLOCK_LOCK_TIMEOUT": "lock_timeout_s",
    "TICKETLOCK_ADMIN_TOKEN": "admin_token",
}


class ConfigError(ValueError):
    """A configuration value is unusable; the message names the variable and what it accepts."""


def load_config(overrides: Mapping[str, object] | None = None, environ: Mapping[str, str] = os.environ) -> Config:
    """Build a Config from the defaults, the TICKETLOCK_* environment variables, then ``overrides`` by field name."""
    values: dict[str, object] = {}
    for variable, field_name in ENVIRONMENT.items():
        text = environ.get(variable, "").strip()
        if text:
            values[field_name] = _parse(field_name, text, variable)
    values.update(overrides or {})
    unknown = set(values) - {spec.name for spec in fields(Config)}
    if unknown:
        raise ConfigError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
    config = replace(Config(), **values)  # type: ignore[arg-type]
    _check(config)
    return config


def _parse(field_name: str, text: str, variable: str) -> object:
    kind = {spec.name: spec.type for spec in fields(Config)}[field_name]
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise ConfigError(f"{variable}={text!r} is not a number") from None
    if kind == "Path":
        return Path(text)
    return text


def _check(config: Config) -> None:
    if config.mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, not {config.mode!r} (TICKETLOCK_MODE)")
    if not 0 <= config.race_window_ms <= MAX_RACE_WINDOW_MS:
        raise ConfigError(f"race window must be 0..{MAX_RACE_WINDOW_MS} ms (TICKETLOCK_RACE_WINDOW_MS)")
    if not 0 <= config.tickets <= MAX_TICKETS:
        raise ConfigError(f"tickets must be 0..{MAX_TICKETS} (TICKETLOCK_TICKETS)")
    if not 0 < config.lock_timeout_s <= 60:
        raise ConfigError("lock timeout must be more than 0 and at most 60 seconds (TICKETLOCK_LOCK_TIMEOUT)")
    if not config.event.strip():
        raise ConfigError("event name must not be empty (TICKETLOCK_EVENT)")
