"""What every store offers, whatever keeps the data: the inventory, the settings, the orders, and transactions.

A store is one module behind this interface (``file.py`` for db.json, ``postgres.py`` for PostgreSQL). It
declares which choices of the modes table it can run (``features``); nothing outside it opens its files or
its connections. ``Transaction`` is where a mode's read and write happen, inside the guard the store holds
for that mode.
"""

from __future__ import annotations

import hashlib
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from service.config import Config, ConfigError
from service.modes import MODES, TABLE, Guard, Isolation, Mode, Read, Write

Order = dict[str, Any]
Feature = Guard | Read | Write | Isolation


@dataclass(frozen=True)
class Inventory:
    """How many tickets the event has and how many are left; ``version`` changes with every write and reset."""

    event: str
    total: int
    remaining: int
    version: int = 0

    @classmethod
    def full(cls, event: str, total: int, version: int = 0) -> Inventory:
        """An inventory with every ticket still for sale."""
        return cls(event=event, total=total, remaining=total, version=version)

    @property
    def sold(self) -> int:
        """Tickets the count says are gone (the recorded orders may disagree after an unsafe mode)."""
        return self.total - self.remaining


@dataclass(frozen=True)
class PurchaseSettings:
    """How purchases run, switchable at run time: the mode and the simulated work between read and write."""

    mode: str
    race_window_ms: int

    @classmethod
    def configured(cls, config: Config) -> PurchaseSettings:
        """The settings the configuration starts a new store with."""
        return cls(mode=config.mode, race_window_ms=config.race_window_ms)


def settings_with(current: PurchaseSettings, change: Mapping[str, Any]) -> PurchaseSettings:
    """``current`` with the fields of a ``PUT /mode`` body applied."""
    return replace(current, **change)


@dataclass(frozen=True)
class IdempotentRequest:
    """A purchase that carried an Idempotency-Key: the key and a fingerprint of the body it came with."""

    key: str
    fingerprint: str

    @property
    def digest(self) -> str:
        """Keys are client text: stores file and index them by this hash, never by the key itself."""
        return hashlib.sha256(self.key.encode()).hexdigest()


@dataclass(frozen=True)
class Feed:
    """A slice of the orders for a live view: the orders after a cursor, and the cursor to ask from next.

    ``reset`` is true when the store was reset since the cursor was handed out: ``orders`` then start over.
    """

    cursor: str
    reset: bool
    orders: list[Order]


def stamp_written(order: Order) -> None:
    """Note in ``order`` that its count was written just now: the end of the read -> write a timeline draws."""
    order["timing"]["wrote_at"] = time.time()


class Conflict(Exception):
    """The write found the inventory changed since the read; the purchase starts again (never sent to a client)."""


class Transaction(ABC):
    """Where one purchase reads and writes, inside the guard its store holds for the purchase's mode."""

    def __init__(self, store_identity: str) -> None:
        self.store_identity = store_identity

    @abstractmethod
    def find_replay(self, request: IdempotentRequest) -> Order | None:
        """The order an earlier request with this Idempotency-Key produced, or None (IdempotencyKeyReused if the
        key came with another body)."""

    def read(self, how: Read) -> Inventory:
        """Step 1: the count as ``how`` reads it."""
        if how is Read.MEMORY:
            return _worker_copy(self.store_identity, self.read_stored(Read.PLAIN))
        return self.read_stored(how)

    def write(self, how: Write, before: Inventory, order: Order, request: IdempotentRequest | None) -> Order:
        """Step 4: write the sale as ``how`` writes it and record ``order``; the order as recorded comes back."""
        if how is Write.MEMORY:
            _spend_worker_copy(self.store_identity, before, order["quantity"])
        return self.write_stored(how, before, order, request)

    @abstractmethod
    def read_stored(self, how: Read) -> Inventory:
        """Read the store's own count (``Read.PLAIN`` or ``Read.FOR_UPDATE``)."""

    @abstractmethod
    def write_stored(self, how: Write, before: Inventory, order: Order, request: IdempotentRequest | None) -> Order:
        """Write the count (or, for ``Write.MEMORY``, only record the order); raise Conflict or SoldOut."""


class Store(ABC):
    """The booking data of one service, behind the same operations whatever keeps it."""

    kind: ClassVar[str]
    features: ClassVar[frozenset[Feature]]

    def __init__(self, config: Config) -> None:
        self.config = config
        if not self.supports(MODES[config.mode]):
            names = ", ".join(mode.name for mode in self.modes())
            raise ConfigError(
                f"the {self.kind} store cannot run the {config.mode!r} mode (TICKETLOCK_MODE): use {names}"
            )

    @classmethod
    def supports(cls, mode: Mode) -> bool:
        """Whether this store can run ``mode``: its guard, read, write and isolation are all features."""
        return mode.parts() <= cls.features

    @classmethod
    def modes(cls) -> list[Mode]:
        """The modes this store can run, in the table's order."""
        return [mode for mode in TABLE if cls.supports(mode)]

    # --- Life cycle --------------------------------------------------------------------------------------------

    @abstractmethod
    def prepare(self) -> None:
        """Once, before any worker starts: create whatever is missing and apply the configured settings."""

    @abstractmethod
    def check(self) -> None:
        """Raise StoreUnavailable if the store cannot be reached right now (``GET /health``)."""

    # --- Settings ----------------------------------------------------------------------------------------------

    @abstractmethod
    def read_settings(self) -> PurchaseSettings:
        """The mode and race window every worker of every host sells with."""

    @abstractmethod
    def change_settings(self, change: Mapping[str, Any]) -> PurchaseSettings:
        """Apply ``{"mode"?, "race_window_ms"?}`` for every worker; a purchase never undoes it."""

    # --- Inventory and orders ----------------------------------------------------------------------------------

    @abstractmethod
    def read_inventory(self) -> Inventory:
        """The inventory now (``GET /tickets``)."""

    @abstractmethod
    def reset(self, tickets: int | None, event: str | None) -> Inventory:
        """With no purchase in flight, clear every order and restore the count (None: keep the current one)."""

    @abstractmethod
    def orders_page(self, limit: int, offset: int) -> tuple[int, list[Order]]:
        """How many orders are recorded, and ``limit`` of them from ``offset``, oldest first."""

    @abstractmethod
    def feed(self, cursor: str, limit: int) -> Feed:
        """Up to ``limit`` orders recorded after ``cursor`` ("" for the first), at a cost that does not grow with
        the orders before it."""

    @abstractmethod
    def find_order(self, order_id: str) -> Order | None:
        """The order with this id, or None."""

    # --- Purchases ---------------------------------------------------------------------------------------------

    @abstractmethod
    def transaction(self, mode: Mode) -> AbstractContextManager[Transaction]:
        """Hold ``mode``'s guard (and the store's own hold against resets and mode switches) around a purchase.

        Raises LockTimeout when the guard stays busy past the lock timeout, Conflict when the mode changed before
        the guard was held, StoreUnavailable when the store cannot be reached.
        """

    def make_durable(self, order: Order, request: IdempotentRequest | None) -> None:  # noqa: B027 - optional hook
        """Make a recorded order survive a crash before its buyer is told (a store that commits needs nothing)."""


# --- The memory mode: each worker process's own copy of the count ----------------------------------------------

_copies: dict[str, Inventory] = {}  # store identity -> this process's copy; module state is per worker process


def _worker_copy(store_identity: str, stored: Inventory) -> Inventory:
    """This process's copy of the count, loaded again only when the store was reset (its version moved)."""
    copy = _copies.get(store_identity)
    if copy is None or copy.version != stored.version:
        copy = _copies[store_identity] = stored
    return copy


def _spend_worker_copy(store_identity: str, before: Inventory, quantity: int) -> None:
    _copies[store_identity] = replace(before, remaining=before.remaining - quantity)
