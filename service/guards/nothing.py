"""The guard that guards nothing: the four steps run as they are, and concurrent sales race."""

from __future__ import annotations

from service.guards.base import Guard, GuardedSale, Holding


class Nothing(Guard):
    """No lock at all (the ``unlocked`` mode, and the modes whose read or write does the protecting)."""

    description = "nothing"

    def _acquire(self, sale: GuardedSale, timeout_s: float) -> Holding:
        return Holding()
