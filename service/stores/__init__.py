"""The stores: where the booking data lives. ``open_store`` is the one place that picks one."""

from __future__ import annotations

from service.config import Config
from service.stores.base import Feed, IdempotentRequest, Inventory, Order, PurchaseSettings, Store
from service.stores.file import FileStore
from service.stores.postgres import PostgresStore

__all__ = ["Feed", "IdempotentRequest", "Inventory", "Order", "PurchaseSettings", "Store", "open_store"]


def open_store(config: Config) -> Store:
    """The PostgreSQL store when ``TICKETLOCK_DATABASE_URL`` is set, else the db.json file store.

    Opening connects nothing: a store reaches its files or its database on first use, in the worker.
    """
    if config.database_url:
        return PostgresStore(config)
    return FileStore(config)
