"""What every store offers, whatever keeps the data: the inventory, the settings, the orders, and sales.

A store is one module behind this interface (``file/`` for db.json, ``postgres.py`` for PostgreSQL). As a
Django database backend does, it declares what it can do (``features``: abilities its guards may ask for, and
the modes' reads, writes and isolations), and runs every mode that needs nothing more; nothing outside it opens
its files or its connections. A ``Sale`` is one purchase in progress: where a mode's read and write happen, and
what the mode's guard asks of the store.
"""

from __future__ import annotations

import hashlib
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from service.config import Config, ConfigError
from service.deadline import Deadline
from service.errors import Conflict
from service.guards import SERVICES, Ability, GuardedSale, Holding
from service.lock_service import LockService, lock_service_for
from service.modes import MODES, TABLE, Feature, Mode, Read, Write

Order = dict[str, Any]


@dataclass(frozen=True)
class Inventory:
    """How many tickets the event has and how many are left; ``version`` changes with every write and reset.

    ``buckets``: what each bucket holds, where the count is split into buckets (the ``buckets`` mode); ``remaining``
    is then their sum.
    """

    event: str
    total: int
    remaining: int
    version: int = 0
    buckets: tuple[int, ...] = ()

    @classmethod
    def full(cls, event: str, total: int, version: int = 0) -> Inventory:
        """An inventory with every ticket still for sale."""
        return cls(event=event, total=total, remaining=total, version=version)

    @property
    def sold(self) -> int:
        """Tickets the count says are gone (the recorded orders may disagree after an unsafe mode)."""
        return self.total - self.remaining


@dataclass(frozen=True)
class RuntimeSettings:
    """What every worker of every host sells with, switchable at run time: the mode and the race window."""

    mode: str
    race_window_ms: int

    @classmethod
    def configured(cls, config: Config) -> RuntimeSettings:
        """The settings the configuration starts a new store with."""
        return cls(mode=config.mode, race_window_ms=config.race_window_ms)


class SettingsChanged(Conflict):
    """A switch came before the sale's hold: the settings in force are not the ones the sale began with, and it
    wrote nothing. The purchase starts again at once with ``in_force``."""

    def __init__(self, in_force: RuntimeSettings) -> None:
        super().__init__(f"the settings changed to {in_force}")
        self.in_force = in_force


def settings_with(current: RuntimeSettings, change: Mapping[str, Any]) -> RuntimeSettings:
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


class Sale(GuardedSale, ABC):
    """One purchase in progress in a store: its read and write, and what its guard may ask of the store.

    A store offers only the abilities it declares: the others raise NotImplementedError, and ``Store.supports``
    keeps the modes that would ask for them away.
    """

    def __init__(self, store: Store, settings: RuntimeSettings, quantity: int, deadline: Deadline) -> None:
        self.store = store
        self.settings = settings  # what the sale began with, checked under the store's hold
        self.mode = MODES[settings.mode]
        self.quantity = quantity  # the tickets it sells
        self.deadline = deadline  # the purchase's: every wait of the sale gets the time left to it

    @property
    def host_lock_path(self) -> Path:
        return self.store.config.lock_path

    @property
    def host_filelock_path(self) -> Path:
        return self.host_lock_path.with_suffix(".filelock")

    def take_advisory_lock(self) -> None:
        raise NotImplementedError(f"the {self.store.kind} store has no advisory locks")

    def lock_inventory_row(self) -> None:
        raise NotImplementedError(f"the {self.store.kind} store has no row locks")

    def lock_a_bucket(self) -> None:
        raise NotImplementedError(f"the {self.store.kind} store has no buckets")

    def lock_service(self) -> LockService:
        return self.store.lock_service()

    @abstractmethod
    def find_replay(self, request: IdempotentRequest) -> Order | None:
        """The order an earlier request with this Idempotency-Key produced, or None (IdempotencyKeyReused if the
        key came with another body)."""

    def read(self, how: Read, holding: Holding) -> Inventory:
        """Step 1: the count as ``how`` reads it."""
        if how is Read.MEMORY:
            return _worker_copy(self.store.identity, self.read_stored(Read.PLAIN, holding))
        return self.read_stored(how, holding)

    def write(
        self, how: Write, before: Inventory, order: Order, request: IdempotentRequest | None, holding: Holding
    ) -> Order:
        """Step 4: write the sale as ``how`` writes it and record ``order``; the order as recorded comes back.

        A store with transactions commits here, inside the guard, so the next buyer the guard lets in sees it.
        The memory mode spends the worker's copy only once the store recorded the order: a write that fails
        sells nothing, from the copy either.
        """
        recorded = self.write_stored(how, before, order, request, holding)
        if how is Write.MEMORY:
            _spend_worker_copy(self.store.identity, before, order["quantity"])
        return recorded

    @abstractmethod
    def read_stored(self, how: Read, holding: Holding) -> Inventory:
        """Read the store's own count."""

    @abstractmethod
    def write_stored(
        self, how: Write, before: Inventory, order: Order, request: IdempotentRequest | None, holding: Holding
    ) -> Order:
        """Write the count (or, for ``Write.MEMORY``, only record the order); raise Conflict or SoldOut."""


class Store(ABC):
    """The booking data of one service, behind the same operations whatever keeps it."""

    kind: ClassVar[str]  # the name answers and orders give the store
    features: ClassVar[frozenset[Feature]]

    def __init__(self, config: Config) -> None:
        self.config = config
        # What the configuration adds to what the store itself can do: a lock service, if it names one.
        self.services = SERVICES if config.redis_url else frozenset()
        self.seen: RuntimeSettings | None = None  # the settings in force when this worker last looked
        if not self.runs(MODES[config.mode]):
            names = ", ".join(mode.name for mode in self.available_modes())
            raise ConfigError(
                f"the {self.kind} store cannot run the {config.mode!r} mode (TICKETLOCK_MODE) as configured: "
                f"use {names}"
            )

    @property
    @abstractmethod
    def identity(self) -> str:
        """Which data this store keeps (its file, or its database): the same on every worker of every host."""

    @classmethod
    def supports(cls, mode: Mode, services: frozenset[Ability] = frozenset()) -> bool:
        """Whether this kind of store runs ``mode`` when the configuration gives it ``services`` (SERVICES: all)."""
        return mode.needs() <= cls.features | services

    @classmethod
    def modes(cls, services: frozenset[Ability] = frozenset()) -> list[Mode]:
        """The modes this kind of store runs with ``services``, in the table's order."""
        return [mode for mode in TABLE if cls.supports(mode, services)]

    def runs(self, mode: Mode) -> bool:
        """Whether this store, as configured, runs ``mode``."""
        return self.supports(mode, self.services)

    def available_modes(self) -> list[Mode]:
        """The modes this store, as configured, runs, in the table's order."""
        return self.modes(self.services)

    def lock_service(self) -> LockService:
        """This worker's way to the configured lock service (made on first use, after the fork)."""
        config = self.config
        assert config.redis_url is not None, "only a mode that needs a lock service asks for one"
        return lock_service_for(
            config.redis_url, config.lease_ms, config.host_name, config.masked_redis_url, os.getpid()
        )

    def check_services(self) -> None:
        """Raise LockUnavailable if the configured lock service does not answer (GET /health)."""
        if self.services:
            self.lock_service().check()

    # --- Life cycle --------------------------------------------------------------------------------------------

    @abstractmethod
    def prepare(self) -> None:
        """Once, before any worker starts: create whatever is missing and apply the configured settings."""

    @abstractmethod
    def check(self) -> None:
        """Raise the error a purchase would meet now, if any: the store is out of reach, damaged or unwritable
        (``GET /health``)."""

    # --- Settings ----------------------------------------------------------------------------------------------

    @abstractmethod
    def read_settings(self) -> RuntimeSettings:
        """The mode and race window every worker of every host sells with."""

    @abstractmethod
    def change_settings(self, change: Mapping[str, Any]) -> RuntimeSettings:
        """Apply ``{"mode"?, "race_window_ms"?}`` for every worker; a purchase never undoes it."""

    def settings_seen(self) -> RuntimeSettings:
        """The settings a purchase starts with: those in force when this worker last looked (read now, the first
        time). A guess, which the sale checks under the store's hold (``check_in_force``)."""
        if self.seen is None:
            self.seen = self.read_settings()
        return self.seen

    def check_in_force(self, began_with: RuntimeSettings, in_force: RuntimeSettings) -> None:
        """Note the settings a sale found in force under the store's hold; SettingsChanged unless they are the ones
        it ``began_with``."""
        self.seen = in_force
        if in_force != began_with:
            raise SettingsChanged(in_force)

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

    def refusals(self) -> list[dict[str, Any]]:
        """The stale writes refused since the last reset (a lease holder's token was superseded), oldest first:
        none in a store that does not fence (``Write.FENCED``)."""
        return []

    # --- Purchases ---------------------------------------------------------------------------------------------

    @abstractmethod
    def begin_sale(self, settings: RuntimeSettings, quantity: int, deadline: Deadline) -> AbstractContextManager[Sale]:
        """A sale of ``quantity`` tickets with ``settings``, inside the store's own hold against resets and mode
        switches; done when it ends.

        Raises LockTimeout when that hold stays busy past the purchase's ``deadline``, SettingsChanged when a switch
        came before the hold was granted (a store may find out at the sale's first statement instead of here),
        StoreUnavailable when the store cannot be reached.
        """

    def make_durable(  # noqa: B027 - optional hook
        self, order: Order, request: IdempotentRequest | None, deadline: Deadline
    ) -> None:
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
