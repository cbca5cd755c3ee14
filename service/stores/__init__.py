"""The stores: where the booking data lives. ``open_store`` is the one place that picks one, by the URL's scheme."""

from __future__ import annotations

from urllib.parse import urlsplit

from service.config import Config, ConfigError
from service.guards import SERVICES
from service.modes import Mode
from service.stores.base import Feed, IdempotentRequest, Inventory, Order, RuntimeSettings, Store
from service.stores.file import FileStore
from service.stores.postgres import PostgresStore

__all__ = [
    "BY_SCHEME",
    "DEFAULT_STORE",
    "STORES",
    "Feed",
    "IdempotentRequest",
    "Inventory",
    "Order",
    "RuntimeSettings",
    "Store",
    "open_store",
    "what_mode_needs",
]

DEFAULT_STORE: type[Store] = FileStore  # without TICKETLOCK_DATABASE_URL: db.json on this host
BY_SCHEME: dict[str, type[Store]] = {"postgresql": PostgresStore, "postgres": PostgresStore}
STORES: tuple[type[Store], ...] = (FileStore, PostgresStore)  # every store, in the order the docs list them


def open_store(config: Config) -> Store:
    """The store ``TICKETLOCK_DATABASE_URL``'s scheme names (``postgresql://``), or the file store without one.

    Opening connects nothing: a store reaches its files or its database on first use, in the worker.
    """
    if not config.database_url:
        return DEFAULT_STORE(config)
    scheme = urlsplit(config.database_url).scheme
    store = BY_SCHEME.get(scheme)
    if store is None:
        known = ", ".join(f"{name}://" for name in BY_SCHEME)
        raise ConfigError(
            f"TICKETLOCK_DATABASE_URL={config.masked_database_url!r}: no store opens {scheme}:// URLs; use {known}"
        )
    return store(config)


def what_mode_needs(store: Store, mode: Mode) -> str:
    """What this service lacks to run ``mode``, named by the setting that gives it ("" if nothing)."""
    lacking = []
    if not mode.needs() <= store.features | SERVICES:
        kinds = " or ".join(kind.kind for kind in STORES if kind.supports(mode, SERVICES))
        lacking.append(f"the {kinds} store (TICKETLOCK_DATABASE_URL)")
    if mode.needs() & SERVICES - store.services:
        lacking.append("a lock service (TICKETLOCK_REDIS_URL)")
    return " and ".join(lacking)
