"""The critical section: how one purchase reads, checks, works and writes, and what guards those steps.

The four steps are written once, in ``PurchaseStrategy.purchase``. A strategy only chooses the guard around
them: ``UnlockedPurchase`` none at all (several workers read the same count and each writes count - 1: the
lost update, the oversell), ``LockedPurchase`` the inter-process file lock (one worker at a time: never
oversold). ``strategy_for`` is the one place that maps a mode to a strategy; a new strategy (an optimistic
version check, a lock service shared by several hosts) is a new subclass and one more entry there.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from contextlib import AbstractContextManager, nullcontext
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


class PurchaseStrategy:
    """Sells tickets with read -> check -> work -> write; subclasses choose what guards those four steps."""

    mode = ""

    def __init__(self, store: Store, lock_timeout_s: float) -> None:
        self.store = store
        self.lock_timeout_s = lock_timeout_s

    def guard(self) -> AbstractContextManager[object]:
        """What surrounds the critical section."""
        raise NotImplementedError

    def purchase(self, request: PurchaseRequest, race_window_ms: int) -> Purchase:
        """Sell ``request.quantity`` tickets to ``request.buyer``, or raise SoldOut / LockTimeout."""
        idempotent = request.idempotent()
        started_at = time.time()
        with self.guard():
            if idempotent and (earlier := self.store.find_replay(idempotent)):
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
        self.store.sync_orders()
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
    """No guard: the race is on."""

    mode = "unlocked"

    def guard(self) -> AbstractContextManager[object]:
        return nullcontext()


class LockedPurchase(PurchaseStrategy):
    """The inventory file lock around the critical section: one worker process at a time."""

    mode = "locked"

    def guard(self) -> AbstractContextManager[object]:
        return holding(self.store.lock_path, self.lock_timeout_s, "nothing was sold")


def strategy_for(mode: str, store: Store, lock_timeout_s: float) -> PurchaseStrategy:
    """The one place that maps a mode name to its strategy."""
    strategies: dict[str, type[PurchaseStrategy]] = {"unlocked": UnlockedPurchase, "locked": LockedPurchase}
    return strategies[mode](store, lock_timeout_s)
