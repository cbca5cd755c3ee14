"""The service's configuration: every setting declared once, read from the environment, checked, documented.

Each ``Setting`` names its environment variable, its default, how its text is read and checked, and what it
means. ``load_config`` builds the app's ``Config`` from the settings that have a field there (defaults, then the
environment, then the caller's own mapping); ``load_server_settings`` reads gunicorn's (``gunicorn.conf.py``).
The README's configuration table is ``configuration_table()``, and a test holds the two together. As in
gunicorn's own ``config.py``, the declaration is the documentation.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from service.lock_service import TIMEOUT_S as LOCK_SERVICE_TIMEOUT_S
from service.modes import MODES

MAX_RACE_WINDOW_MS = 5_000
MAX_TICKETS = 1_000_000_000
MAX_LOCK_TIMEOUT_S = 20
MIN_LEASE_MS, MAX_LEASE_MS = 10, 10_000
MAX_BUCKETS = 1_000
FLUSH_AFTER_DEADLINE_S = 1.0  # the least a file store's flush may wait for its lock once the deadline passed
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# An event-loop worker (gevent, eventlet) would block all its requests in the file lock's kernel wait.
WORKER_CLASSES = ("sync", "gthread")


class ConfigError(ValueError):
    """A configuration value is unusable; the message names the variable and what it accepts."""


@dataclass(frozen=True)
class Config:
    """What the booking app needs to know at start: one field per app setting of ``SETTINGS``."""

    db_path: Path
    mode: str
    race_window_ms: int
    tickets: int
    event: str
    lock_timeout_s: float
    max_attempts: int
    admin_token: str | None  # never printed or logged (not in repr)
    allowed_hosts: tuple[str, ...]
    database_url: str | None  # may hold a password: see masked_database_url
    host_name: str
    database_timeout_s: float
    pool_size: int
    buckets: int
    redis_url: str | None  # the lock service the lease modes hold their lease in
    lease_ms: int

    def __repr__(self) -> str:
        secret = {"admin_token", "database_url", "redis_url"}
        shown = ", ".join(
            f"{spec.name}={getattr(self, spec.name)!r}" for spec in fields(self) if spec.name not in secret
        )
        return f"Config({shown})"

    @property
    def lock_path(self) -> Path:
        """The host's lock file, beside db.json whichever store keeps the data."""
        return self.db_path.with_name(f"{self.db_path.name}.lock")

    @property
    def masked_database_url(self) -> str:
        """The database URL with its password replaced by ***, for messages and logs."""
        return mask_password(self.database_url or "")

    @property
    def masked_redis_url(self) -> str:
        """The lock service's URL with its password replaced by ***, for messages and logs."""
        return mask_password(self.redis_url or "")


@dataclass(frozen=True)
class ServerSettings:
    """How gunicorn serves the app (``gunicorn.conf.py``): one field per server setting of ``SETTINGS``."""

    bind: str
    workers: int
    worker_class: str
    threads: int
    worker_timeout_s: int
    log_level: str
    access_log: str | None


# --- How a setting's text is read and checked ---------------------------------------------------------------


def text(value: str) -> str:
    """Any text that is not blank."""
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """A whole number from ``low`` (to ``high``)."""

    def read(value: str) -> int:
        if not value.strip().isdigit() or int(value) < low or (high is not None and int(value) > high):
            raise ValueError(f"must be a whole number from {low}" + (f" to {high}" if high is not None else " up"))
        return int(value)

    return read


def seconds(high: float) -> Callable[[str], float]:
    """A number of seconds, more than 0 and at most ``high``."""

    def read(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise ValueError("is not a number") from None
        if not 0 < number <= high:
            raise ValueError(f"must be more than 0 and at most {high:g} s")
        return number

    return read


def one_of(*choices: str) -> Callable[[str], str]:
    """One of ``choices``."""

    def read(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return read


_HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9_.-]*[a-z0-9])?")


def host_names(value: str) -> tuple[str, ...]:
    """Host names or IP addresses, comma-separated, without ports (compared without case), or ``*`` for any."""
    names = tuple(name.strip().lower().removeprefix("[").removesuffix("]") for name in value.split(",") if name.strip())
    for name in names:
        if name != "*" and not _HOST_NAME.fullmatch(name) and not _is_ip_address(name):
            raise ValueError("must be host names or addresses separated by commas, without ports (or *)")
    return names


def _is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def database_url(value: str) -> str:
    """A database URL (``service/stores/__init__.py`` names the store each scheme opens)."""
    if not urlsplit(value).scheme:
        raise ValueError("must be a URL such as postgresql://user:password@host:5432/database")
    return value


def redis_url(value: str) -> str:
    """A Redis URL, ``redis://host:port/db`` (or ``unix:///path/to/socket``, as redis-py reads them)."""
    if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a URL such as redis://127.0.0.1:6379/0")
    return value


@dataclass(frozen=True)
class Setting:
    """One environment variable: its field, default, reader and meaning (a row of the README's table)."""

    variable: str
    field: str  # of Config, or of ServerSettings when ``server``
    default: Any  # a value, or a function giving it (evaluated when the configuration is loaded)
    read: Callable[[str], Any]
    meaning: str
    shown_default: str = ""  # how the README's table shows the default, if not the value itself
    server: bool = False

    def default_value(self) -> Any:
        """The default, computed now if it is a function (the machine's hostname)."""
        return self.default() if callable(self.default) else self.default

    def from_text(self, value: str) -> Any:
        """The value this text sets, or ConfigError naming the variable and what it takes."""
        try:
            return self.read(value)
        except ValueError as error:
            shown = mask_password(value) if self.field in ("database_url", "redis_url") else value
            raise ConfigError(f"{self.variable}={shown!r} {error}") from None


SETTINGS = (
    Setting(
        "TICKETLOCK_DATABASE_URL",
        "database_url",
        None,
        database_url,
        "`postgresql://user:password@host:port/database`: keep everything in PostgreSQL, shared by every host "
        "([several hosts](docs/several-hosts.md)); the URL's scheme picks the store",
        "unset: the file store",
    ),
    Setting(
        "TICKETLOCK_DB",
        "db_path",
        Path("db.json"),
        Path,
        "the inventory file; its sidecars go beside it: `.orders` (journal), `.orders.flushed` (how much of it is "
        "on disk), `.settings`, `.keys/`, `.lock` (the host's lock file, used by the `locked` mode with either "
        "store), `.filelock` (the `filelock` mode's), `.settings.lock`",
        "`db.json` (in the current folder)",
    ),
    Setting(
        "TICKETLOCK_HOST_NAME",
        "host_name",
        socket.gethostname,
        text,
        "the `host` that `GET /tickets` and every order name",
        "the machine's hostname",
    ),
    Setting(
        "TICKETLOCK_MODE",
        "mode",
        "locked",
        one_of(*MODES),
        "the purchase mode a new store starts in (the file store applies it at every start; PostgreSQL when its "
        "settings row is created)",
    ),
    Setting(
        "TICKETLOCK_RACE_WINDOW_MS",
        "race_window_ms",
        20,
        whole_number(0, MAX_RACE_WINDOW_MS),
        f"the work between read and write, 0..{MAX_RACE_WINDOW_MS} ms (applied like the mode)",
    ),
    Setting(
        "TICKETLOCK_TICKETS",
        "tickets",
        10,
        whole_number(0, MAX_TICKETS),
        "tickets of a newly created store, and of a file store's reset whose `db.json` is unreadable",
    ),
    Setting("TICKETLOCK_EVENT", "event", "ticketlock demo night", text, "event name of a newly created store"),
    Setting(
        "TICKETLOCK_LOCK_TIMEOUT",
        "lock_timeout_s",
        5.0,
        seconds(MAX_LOCK_TIMEOUT_S),
        "a purchase's one deadline: its waits for locks (the file's, the thread's, the database's, the lease) and "
        "its attempts (a purchase starts again after a conflicting write, a superseded lease token or a mode "
        "switch) together end this many seconds after it "
        f"began, else 503 `lock_timeout` or `too_many_conflicts` with `Retry-After`, nothing sold (at most "
        f"{MAX_LOCK_TIMEOUT_S})",
        "`5`",
    ),
    Setting(
        "TICKETLOCK_MAX_ATTEMPTS",
        "max_attempts",
        20,
        whole_number(1),
        "attempts of a purchase that starts again after a collision (optimistic, repeatable-read, fenced-lease) "
        "before it answers 503 `too_many_conflicts` (one that starts again after a mode switch is bounded by the lock "
        "timeout)",
    ),
    Setting(
        "TICKETLOCK_DATABASE_TIMEOUT",
        "database_timeout_s",
        3.0,
        seconds(MAX_LOCK_TIMEOUT_S),
        "seconds the database may take to hand out or make a connection, and to answer each call (a call that "
        "waits for one of its locks may also take the time the purchase may still wait): past it 503 "
        f"`store_unavailable`, the connection cut and discarded, nothing sold (at most {MAX_LOCK_TIMEOUT_S})",
        "`3`",
    ),
    Setting(
        "TICKETLOCK_POOL_SIZE",
        "pool_size",
        4,
        whole_number(1),
        "most database connections per worker process (a sync worker uses one; `gthread` one per thread)",
    ),
    Setting(
        "TICKETLOCK_BUCKETS",
        "buckets",
        8,
        whole_number(1, MAX_BUCKETS),
        f"the buckets the `buckets` mode splits the tickets into, 1..{MAX_BUCKETS} (PostgreSQL): that many buyers "
        "can hold one at once; a reset or a switch to the mode spreads the tickets over them",
    ),
    Setting(
        "TICKETLOCK_REDIS_URL",
        "redis_url",
        None,
        redis_url,
        "`redis://host:port/db`: the lock service the `lease` and `fenced-lease` modes hold their lease in "
        "([leases](docs/leases.md)); without it those modes are not available",
        "unset: no lease modes",
    ),
    Setting(
        "TICKETLOCK_LEASE_MS",
        "lease_ms",
        500,
        whole_number(MIN_LEASE_MS, MAX_LEASE_MS),
        f"how long a lease lasts unless its holder lets go first, {MIN_LEASE_MS}..{MAX_LEASE_MS} ms: a holder that "
        "works longer (a pause, a long race window) is no longer protected by it",
    ),
    Setting(
        "TICKETLOCK_ADMIN_TOKEN",
        "admin_token",
        None,
        text,
        "bearer token required by `PUT /mode` and `POST /reset`",
        "unset (no auth)",
    ),
    Setting(
        "TICKETLOCK_ALLOWED_HOSTS",
        "allowed_hosts",
        (),
        host_names,
        "the names, besides `localhost` and the loopback addresses, that requests may give in their `Host` header "
        "(comma-separated, without ports; `*` for any): any other gets 400 `host_not_allowed`, so that a web page "
        "whose name was rebound to 127.0.0.1 cannot drive the service",
        "unset (loopback only)",
    ),
    Setting("TICKETLOCK_BIND", "bind", "127.0.0.1:8000", text, "where gunicorn listens", server=True),
    Setting("TICKETLOCK_WORKERS", "workers", 4, whole_number(1), "gunicorn worker processes", server=True),
    Setting(
        "TICKETLOCK_WORKER_CLASS",
        "worker_class",
        "sync",
        one_of(*WORKER_CLASSES),
        "`sync` or `gthread` (an event-loop worker would block all its requests in the file lock's wait)",
        server=True,
    ),
    Setting("TICKETLOCK_THREADS", "threads", 1, whole_number(1), "threads per worker with `gthread`", server=True),
    Setting(
        "TICKETLOCK_WORKER_TIMEOUT",
        "worker_timeout_s",
        30,
        whole_number(1),
        "seconds before gunicorn replaces a silent worker: it must exceed the longest purchase, which the start "
        f"checks (the lock timeout + {MAX_RACE_WINDOW_MS // 1000} s, + {FLUSH_AFTER_DEADLINE_S:g} s for the file "
        "store's flush or the database timeout, twice with a lock service, + "
        f"{2 * LOCK_SERVICE_TIMEOUT_S:g} s with a lock service)",
        server=True,
    ),
    Setting("TICKETLOCK_LOG_LEVEL", "log_level", "info", one_of(*LOG_LEVELS), "gunicorn's log level", server=True),
    Setting(
        "TICKETLOCK_ACCESS_LOG",
        "access_log",
        None,
        text,
        "`-` for an access log on stdout, or a file path",
        "unset (off)",
        server=True,
    ),
)


def load_config(overrides: Mapping[str, object] | None = None, environ: Mapping[str, str] = os.environ) -> Config:
    """The app's Config: the defaults, the TICKETLOCK_* environment variables, then ``overrides`` by field name
    (checked as the same value given as text would be)."""
    settings = {setting.field: setting for setting in SETTINGS if not setting.server}
    values = _values(list(settings.values()), environ)
    unknown = set(overrides or {}) - set(values)
    if unknown:
        raise ConfigError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
    for field, value in (overrides or {}).items():
        values[field] = None if value is None else settings[field].from_text(str(value))
    return Config(**values)


def load_server_settings(environ: Mapping[str, str] = os.environ) -> ServerSettings:
    """gunicorn's settings, checked against the app's: a waiting buyer must get its 503 before the worker dies."""
    server = ServerSettings(**_values([setting for setting in SETTINGS if setting.server], environ))
    longest_wait_s, parts = longest_purchase_s(load_config(environ=environ))
    if longest_wait_s >= server.worker_timeout_s:
        raise ConfigError(
            f"TICKETLOCK_WORKER_TIMEOUT={server.worker_timeout_s} must exceed {parts} ({longest_wait_s:g} s), or "
            "gunicorn would kill a worker whose buyer is still waiting"
        )
    return server


def longest_purchase_s(config: Config) -> tuple[float, str]:
    """How long a purchase can take at the most, and what that is made of.

    Its waits end at its deadline (the lock timeout), and its work (the race window) may start just before. After
    the deadline, a file store's flush may still wait FLUSH_AFTER_DEADLINE_S for its lock; with a database, each
    of the write's round trips (two under a fenced lease: a new transaction, then the write) has the database
    timeout; with a lock service, each of its calls (the grant under way, the release) LOCK_SERVICE_TIMEOUT_S.
    """
    parts = [("the lock timeout", config.lock_timeout_s), ("the longest race window", MAX_RACE_WINDOW_MS / 1000)]
    if config.database_url:
        if config.redis_url:
            parts.append(("2 database timeouts", 2 * config.database_timeout_s))
        else:
            parts.append(("the database timeout", config.database_timeout_s))
    else:
        parts.append(("the journal's flush", FLUSH_AFTER_DEADLINE_S))
    if config.redis_url:
        parts.append(("2 lock service timeouts", 2 * LOCK_SERVICE_TIMEOUT_S))
    return sum(seconds for _, seconds in parts), " plus ".join(name for name, _ in parts)


def _values(settings: list[Setting], environ: Mapping[str, str]) -> dict[str, Any]:
    values = {}
    for setting in settings:
        given = environ.get(setting.variable, "").strip()
        values[setting.field] = setting.from_text(given) if given else setting.default_value()
    return values


def configuration_table() -> str:
    """The README's configuration table, made from ``SETTINGS``."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for setting in SETTINGS:
        default = setting.shown_default or f"`{setting.default}`"
        rows.append(f"| `{setting.variable}` | {default} | {setting.meaning} |")
    return "\n".join(rows)


def mask_password(url: str) -> str:
    """``postgresql://user:***@host/db`` for ``postgresql://user:secret@host/db``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
