"""The inventory row's own lock (``SELECT ... FOR UPDATE``): a writer of the row waits until the holder commits.

The database lets go of it at commit or rollback; the wait is bounded by its ``lock_timeout``.
"""

from __future__ import annotations

from typing import ClassVar

from service.guards.base import Ability, Guard, GuardedSale, Holding


class RowLock(Guard):
    """The inventory row's lock, held until the sale's transaction ends."""

    description = "the inventory row's lock (SELECT ... FOR UPDATE), held until commit"
    needs: ClassVar[frozenset[Ability]] = frozenset({Ability.ROW_LOCKS})

    def _acquire(self, sale: GuardedSale, timeout_s: float) -> Holding:
        sale.lock_inventory_row()
        return Holding()
