"""The lock of one bucket of the tickets: the count split over several rows, each sale locking one no other holds.

A single inventory row has one lock, so a mode that holds it across the race window sells one buyer per window,
however many hosts there are. Split the tickets over buckets (TICKETLOCK_BUCKETS rows) and each sale locks only the
bucket it sells from, skipping those that other sales hold (``FOR UPDATE SKIP LOCKED``): as many buyers work at once
as there are buckets. The store waits for a bucket only when every bucket holding enough is busy, and takes every
bucket for a quantity that none holds alone; it answers "sold out" only when the buckets it holds then, all of them,
add up to too few. The database lets go of them at commit or rollback; waits are bounded by its ``lock_timeout``.
Only the write takes the inventory row's lock, from there to the commit, so that orders are recorded in turn: not
across the race window (``service/stores/postgres.py``, RECORD_ORDER).
"""

from __future__ import annotations

from typing import ClassVar

from service.guards.base import Ability, Guard, GuardedSale, Holding


class BucketLock(Guard):
    """The lock of one bucket of the tickets with stock (of several, for a large quantity), held until commit."""

    description = (
        "the lock of one bucket of the tickets, a free one taken without waiting behind a busy one (SELECT ... FOR "
        "UPDATE SKIP LOCKED), else a busy one waited for, else every bucket; held until commit"
    )
    needs: ClassVar[frozenset[Ability]] = frozenset({Ability.BUCKETS})

    def _acquire(self, sale: GuardedSale, timeout_s: float) -> Holding:
        sale.lock_a_bucket()  # the database raises LockTimeout after its lock_timeout
        return Holding()
