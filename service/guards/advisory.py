"""A named mutex kept by the database (PostgreSQL's ``pg_advisory_xact_lock``): every host takes the same one.

The store takes it inside the sale's transaction and the database lets go of it at commit or rollback, also when
the connection of a holder that died is closed. The wait is bounded by the database's own ``lock_timeout``.
"""

from __future__ import annotations

from typing import ClassVar

from service.guards.base import Ability, Guard, GuardedSale, Holding


class AdvisoryLock(Guard):
    """The database's advisory lock of the inventory, held until the sale's transaction ends."""

    description = "a PostgreSQL advisory lock (pg_advisory_xact_lock)"
    needs: ClassVar[frozenset[Ability]] = frozenset({Ability.ADVISORY_LOCKS})

    def _acquire(self, sale: GuardedSale, timeout_s: float) -> Holding:
        sale.take_advisory_lock()  # the database raises LockTimeout after its lock_timeout
        return Holding()
