"""The service's configuration: defaults, then environment variables, then the caller's own mapping."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from service.modes import MODES

MAX_RACE_WINDOW_MS = 5_000
MAX_TICKETS = 1_000_000_000
MAX_LOCK_TIMEOUT_S = 20


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
    database_url: str | None = field(default=None, repr=False)  # may hold a password: see masked_database_url
    host_name: str = field(default_factory=socket.gethostname)
    database_timeout_s: float = 3.0
    pool_size: int = 4
    max_attempts: int = 20

    @property
    def lock_path(self) -> Path:
        """The host's lock file, beside db.json whichever store keeps the data."""
        return self.db_path.with_name(f"{self.db_path.name}.lock")

    @property
    def masked_database_url(self) -> str:
        """The database URL with its password replaced by ***, for messages and logs."""
        return mask_password(self.database_url or "")


# Each environment variable, the field it sets, and how its text becomes a value.
ENVIRONMENT: dict[str, tuple[str, Callable[[str], object]]] = {
    "TICKETLOCK_DB": ("db_path", Path),
    "TICKETLOCK_MODE": ("mode", str),
    "TICKETLOCK_RACE_WINDOW_MS": ("race_window_ms", int),
    "TICKETLOCK_TICKETS": ("tickets", int),
    "TICKETLOCK_EVENT": ("event", str),
    "TICKETLOCK_LOCK_TIMEOUT": ("lock_timeout_s", float),
    "TICKETLOCK_ADMIN_TOKEN": ("admin_token", str),
    "TICKETLOCK_DATABASE_URL": ("database_url", str),
    "TICKETLOCK_HOST_NAME": ("host_name", str),
    "TICKETLOCK_DATABASE_TIMEOUT": ("database_timeout_s", float),
    "TICKETLOCK_POOL_SIZE": ("pool_size", int),
    "TICKETLOCK_MAX_ATTEMPTS": ("max_attempts", int),
}


class ConfigError(ValueError):
    """A configuration value is unusable; the message names the variable and what it accepts."""


def load_config(overrides: Mapping[str, object] | None = None, environ: Mapping[str, str] = os.environ) -> Config:
    """Build a Config from the defaults, the TICKETLOCK_* environment variables, then ``overrides`` by field name."""
    values: dict[str, object] = {}
    for variable, (field_name, parse) in ENVIRONMENT.items():
        text = environ.get(variable, "").strip()
        if text:
            try:
                values[field_name] = parse(text)
            except ValueError:
                raise ConfigError(f"{variable}={text!r} is not a number") from None
    values.update(overrides or {})
    unknown = set(values) - {spec.name for spec in fields(Config)}
    if unknown:
        raise ConfigError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
    config = replace(Config(), **values)  # type: ignore[arg-type]
    _check(config)
    return config


def mask_password(url: str) -> str:
    """``postgresql://user:***@host/db`` for ``postgresql://user:secret@host/db``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _check(config: Config) -> None:
    if config.mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, not {config.mode!r} (TICKETLOCK_MODE)")
    if config.database_url is not None and urlsplit(config.database_url).scheme not in ("postgresql", "postgres"):
        raise ConfigError(
            f"TICKETLOCK_DATABASE_URL must start with postgresql://, not {mask_password(config.database_url)!r}"
        )
    if not 0 < config.database_timeout_s <= MAX_LOCK_TIMEOUT_S:
        raise ConfigError(f"database timeout must be more than 0 and at most {MAX_LOCK_TIMEOUT_S} s")
    if config.pool_size < 1:
        raise ConfigError("pool size must be at least 1 (TICKETLOCK_POOL_SIZE)")
    if config.max_attempts < 1:
        raise ConfigError("max attempts must be at least 1 (TICKETLOCK_MAX_ATTEMPTS)")
    if not config.host_name.strip():
        raise ConfigError("host name must not be empty (TICKETLOCK_HOST_NAME)")
    if not 0 <= config.race_window_ms <= MAX_RACE_WINDOW_MS:
        raise ConfigError(f"race window must be 0..{MAX_RACE_WINDOW_MS} ms (TICKETLOCK_RACE_WINDOW_MS)")
    if not 0 <= config.tickets <= MAX_TICKETS:
        raise ConfigError(f"tickets must be 0..{MAX_TICKETS} (TICKETLOCK_TICKETS)")
    if not 0 < config.lock_timeout_s <= MAX_LOCK_TIMEOUT_S:
        raise ConfigError(
            f"lock timeout must be more than 0 and at most {MAX_LOCK_TIMEOUT_S} s (TICKETLOCK_LOCK_TIMEOUT), "
            "so that a waiting buyer gets its 503 before gunicorn's 30 s worker timeout kills the worker"
        )
    if not config.event.strip():
        raise ConfigError("event name must not be empty (TICKETLOCK_EVENT)")
