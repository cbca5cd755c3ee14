"""The critical sections: how one purchase reads, checks, works and writes, and what guards those steps.

The four steps are written once, in ``PurchaseStrategy.purchase``. A strategy only chooses the guard around
them, both built on the inventory lock file (service/locks.py):

- ``LockedPurchase`` holds the lock *exclusively*: one purchase at a time, never oversold.
- ``UnlockedPurchase`` holds it *shared*. Shared holders do not exclude one another, so unlocked purchases
  race freely: several read the same count, each writes count - 1, and the event is oversold. What the
  shared hold adds is that a locked purchase or a reset waits until every unlocked purchase still in flight
  has written, so switching to locked mode can never be undone by a straggler's stale write.

``strategy_for`` is the one place that maps a mode to a strategy; a new strategy (an optimistic version
check, a lock service shared by several hosts) is a new subclass and one more entry there.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass

from service.errors import SoldOut
from service.locks import holding
from service.store import IdempotentRequest, Inventory, Order, Store


@dataclass(frozen=True)
class PurchaseRequest:
    """A validated ``POST /orders``: who buys, how many, and the Idempotency-Key if the client sent one."""

    buyer: str
    quantity: int
    idempotency_key: str | None = None

    def idempotent(self) -> IdempotentRequest | None:
        """The key with a fingerprint of this body, so a retry with a different body can be refused."""
        if self.idempotency_key is None:
            return None
        body = json.dumps({"buyer": self.buyer, "quantity": self.quantity}, sort_keys=True, ensure_ascii=False)
        return IdempotentRequest(self.idempotency_key, hashlib.sha256(body.encode()).hexdigest())


@dataclass(frozen=True)
class Purchase:
    """What a purchase produced: the order, and whether it is a retry's replay of an earlier answer."""

    order: Order
    replayed: bool = False


class PurchaseStrategy(ABC):
    """Sells tickets with read -> check -> work -> write; subclasses choose what guards those four steps."""

    mode = ""

    def __init__(self, store: Store, lock_timeout_s: float) -> None:
        self.store = store
        self.lock_timeout_s = lock_timeout_s

    @abstractmethod
    def guard(self) -> AbstractContextManager[None]:
        """What surrounds the critical section."""

    def purchase(self, request: PurchaseRequest, race_window_ms: int) -> Purchase:
        """Sell ``request.quantity`` tickets to ``request.buyer``, or raise SoldOut / LockTimeout."""
        idempotent = request.idempotent()
        started_at = time.time()
        with self.guard():
            if idempotent and (earlier := self.store.find_replay(idempotent)):
                self.store.make_durable(earlier, idempotent)
                return Purchase(earlier, replayed=True)

            inventory = self.store.read_inventory()  # 1. read
            read_at = time.time()

            if inventory.remaining < request.quantity:  # 2. check
                raise SoldOut(f"Sold out: {inventory.remaining} left, {request.quantity} requested.")

            time.sleep(race_window_ms / 1000)  # 3. work (the race window)

            order = self._new_order(request, inventory, started_at, read_at)
            self.store.record_sale(inventory, order, idempotent)  # 4. write

        # Durable before the 201, but flushed after the lock is released, so that buyers queue behind the
        # lock and not behind the disk (README, "Durability").
        self.store.make_durable(order, idempotent)
        return Purchase(order)

    def _new_order(self, request: PurchaseRequest, inventory: Inventory, started_at: float, read_at: float) -> Order:
        return {
            "order_id": uuid.uuid4().hex,
            "buyer": request.buyer,
            "quantity": request.quantity,
            "remaining": inventory.remaining - request.quantity,
            "mode": self.mode,
            "worker_pid": os.getpid(),
            "timing": {"started_at": started_at, "read_at": read_at, "wrote_at": time.time()},
        }


class UnlockedPurchase(PurchaseStrategy):
    """A shared hold: unlocked purchases race one another, but never a locked purchase or a reset."""

    mode = "unlocked"

    def guard(self) -> AbstractContextManager[None]:
        return holding(self.store.lock_path, self.lock_timeout_s, "nothing was sold", shared=True)


class LockedPurchase(PurchaseStrategy):
    """An exclusive hold on the inventory lock: one purchase at a time, in any worker process."""

    mode = "locked"

    def guard(self) -> AbstractContextManager[None]:
        return holding(self.store.lock_path, self.lock_timeout_s, "nothing was sold")


STRATEGIES: dict[str, type[PurchaseStrategy]] = {"unlocked": UnlockedPurchase, "locked": LockedPurchase}


def strategy_for(mode: str, store: Store, lock_timeout_s: float) -> PurchaseStrategy:
    """The one place that maps a mode name to its strategy."""
    return STRATEGIES[mode](store, lock_timeout_s)


def reset_store(store: Store, fresh: Inventory, lock_timeout_s: float) -> None:
    """The other critical section: clear every order and restore the count, with no purchase in flight."""
    with holding(store.lock_path, lock_timeout_s, "the store was not reset"):
        store.reset(fresh)
