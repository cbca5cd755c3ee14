"""A lease in the lock service (Redis): every host takes the same one, but it runs out by itself.

The lease protects the sales only while no holder works past it. A holder that pauses (a stopped process, a GC
pause, a slow disk) or works longer than the lease is still in its critical section when another holder takes the
lease, and both write: the ``lease`` mode's lesson. The grant hands out a fencing token that grows with every
grant; the ``fenced-lease`` mode's store refuses the writes of a holder whose token is no longer the newest, so a
stale holder sells nothing and starts again (``service/lock_service.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

from service.errors import StaleFence
from service.guards.base import Ability, Guard, GuardedSale, Holding
from service.lock_service import FencedLease


class Lease(Guard):
    """The lock service's lease, waited for by asking again every few milliseconds, let go by compare-and-delete."""

    description = "a lease in Redis (SET NX PX, let go by compare-and-delete) with a fencing token"
    needs: ClassVar[frozenset[Ability]] = frozenset({Ability.LOCK_SERVICE})

    def __init__(self) -> None:
        self._held = threading.local()  # each thread's lease, from _acquire to _release

    @contextmanager
    def held(self, sale: GuardedSale, timeout_s: float) -> Iterator[Holding]:
        """The lease around the block; a store that refuses this holder's token teaches the next grant."""
        try:
            with super().held(sale, timeout_s) as holding:
                yield holding
        except StaleFence as stale:
            sale.lock_service().learn_fence(stale.newest)
            raise

    def _acquire(self, sale: GuardedSale, timeout_s: float) -> Holding | None:
        taken = sale.lock_service().acquire(timeout_s)
        if taken is None:
            return None
        self._held.lease, grant = taken
        return Holding(fence=grant.fence, lease_until=grant.until)

    def _release(self, sale: GuardedSale) -> None:
        lease: FencedLease = self._held.lease
        self._held.lease = None
        sale.lock_service().release(lease)

    def _name(self, sale: GuardedSale) -> str:
        return "the lease"
