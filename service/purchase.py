"""The critical section: how one purchase reads, checks, works and writes, in whichever mode is in force.

The four steps are written once, in ``purchase``. The mode in force (``service/modes.py``) chooses what is held
around them (its guard, ``service/guards/``), how step 1 reads and how step 4 writes; the store
(``service/stores/``) carries out those choices. A write that finds the count changed since the read (the
optimistic version check, a repeatable-read serialization failure) raises Conflict, and the purchase starts
again afresh, in a new transaction, a bounded number of times with jitter; the order records how many attempts
it took.

A purchase starts with the settings (mode, race window) its worker saw last, and the store checks them under its
hold against switches (``Store.begin_sale``): a switch that came first makes it start again at once, in the mode in
force (SettingsChanged), so that no purchase reads the settings apart from its sale.

A purchase has one deadline, ``TICKETLOCK_LOCK_TIMEOUT`` after it began: every attempt, every wait for a guard or
a hold, and every pause between attempts gets the time left to it, so that waits never add up past it. The work
of an attempt that began in time (the race window, at most 5 s) and its write may end after it; gunicorn's
worker timeout is checked to exceed all of that (``config.load_server_settings``), so no worker is killed while
its buyer waits.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
import uuid
from dataclasses import dataclass

from service.config import Config
from service.deadline import Deadline
from service.errors import Conflict, SoldOut, TooManyConflicts
from service.guards import Holding
from service.modes import MODES, Mode
from service.stores.base import IdempotentRequest, Inventory, Order, RuntimeSettings, SettingsChanged, Store

# Before attempt n + 1, a purchase sleeps a random time of up to BACK_OFF_S * 2**n, at most MAX_BACK_OFF_S. Measured
# on one hot row with 12 workers (bench/RESULTS.md): shorter waits make the buyers collide again and sell less.
BACK_OFF_S = 0.005
MAX_BACK_OFF_S = 0.05


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


def purchase(store: Store, request: PurchaseRequest, config: Config) -> Purchase:
    """Sell ``request.quantity`` tickets to ``request.buyer``, or raise SoldOut, LockTimeout, TooManyConflicts."""
    started_at = time.time()
    deadline = Deadline.after(config.lock_timeout_s)
    settings = store.settings_seen()
    attempt = 1
    while True:
        try:
            return _attempt(store, request, config, settings, attempt, started_at, deadline)
        except Conflict as conflict:
            if isinstance(conflict, SettingsChanged) and not deadline.passed:
                settings = conflict.in_force  # a switch came first, no buyer collided: again at once, in its mode
                continue  # (not an attempt: the order's attempts count collisions)
            if attempt >= config.max_attempts or deadline.passed:
                raise TooManyConflicts(
                    f"{attempt} attempts each found the count changed before they could write ({conflict}); "
                    "nothing was sold. Retry shortly."
                ) from None
        # Jitter spreads out the buyers that collided, so that they do not collide again in step.
        time.sleep(min(random.uniform(0, min(MAX_BACK_OFF_S, BACK_OFF_S * 2**attempt)), deadline.left()))
        attempt += 1


def _attempt(
    store: Store,
    request: PurchaseRequest,
    config: Config,
    settings: RuntimeSettings,
    attempt: int,
    started_at: float,
    deadline: Deadline,
) -> Purchase:
    idempotent = request.idempotent()
    mode = MODES[settings.mode]
    replayed = False
    with (
        store.begin_sale(settings, request.quantity, deadline) as sale,  # the store's hold against switches
        mode.guard.held(sale, deadline.left()) as holding,  # the mode's guard, around the four steps
    ):
        if idempotent and (earlier := sale.find_replay(idempotent)):
            order, replayed = earlier, True
        else:
            inventory = sale.read(mode.read, holding)  # 1. read
            read_at = time.time()

            if inventory.remaining < request.quantity:  # 2. check
                raise SoldOut(f"Sold out: {inventory.remaining} left, {request.quantity} requested.")

            if settings.race_window_ms:  # even sleep(0) gives up the CPU, inside the lock
                time.sleep(settings.race_window_ms / 1000)  # 3. work (the race window)

            order = _new_order(request, mode, inventory, holding, store, config, attempt, started_at, read_at)
            order = sale.write(mode.write, inventory, order, idempotent, holding)  # 4. write

    # Durable before the 201, but flushed after the guard is released, so that buyers queue behind the guard
    # and not behind the disk (docs/file-store.md, "Durability").
    store.make_durable(order, idempotent, deadline)
    return Purchase(order, replayed)


def _new_order(
    request: PurchaseRequest,
    mode: Mode,
    inventory: Inventory,
    holding: Holding,
    store: Store,
    config: Config,
    attempt: int,
    started_at: float,
    read_at: float,
) -> Order:
    return {
        "order_id": uuid.uuid4().hex,
        "buyer": request.buyer,
        "quantity": request.quantity,
        "remaining": inventory.remaining - request.quantity,
        "mode": mode.name,
        "attempts": attempt,
        "fence": holding.fence,  # the lease's token, for a guard that hands one out
        "worker_pid": os.getpid(),
        "host": config.host_name,
        "store": store.kind,
        # and wrote_at: the store says when it wrote
        "timing": {"started_at": started_at, "read_at": read_at, "lease_until": holding.lease_until},
    }
