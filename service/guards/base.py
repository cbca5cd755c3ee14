"""What every guard is: a mechanism held around a sale's four steps, with one protocol for all of them.

``with guard.held(sale, timeout_s) as holding:`` takes the guard (waiting at most ``timeout_s``, else
LockTimeout: 503, nothing sold), runs the block, and lets go. ``holding`` carries what the steps may need from
the guard (a fencing token, for a guard that hands one out). As in filelock's ``_api.py``, this base class owns
the protocol, the timeout and the error; each subclass owns only how its one mechanism takes and lets go.

A guard that needs something of the store asks the sale for it through a named method of ``GuardedSale``,
and names that ability in ``needs``: a store runs the guard only if it declares every ability needed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import ClassVar, Protocol

from service.errors import LockTimeout
from service.lock_service import LockService

NOTHING_SOLD = "nothing was sold"


class Ability(Enum):
    """Something a guard asks of the store it guards (a store lists those it has among its features)."""

    ADVISORY_LOCKS = "named mutexes held until the transaction ends"
    ROW_LOCKS = "row locks held until the transaction ends"
    BUCKETS = "the count split into buckets, each with a lock of its own, one taken without waiting behind a busy one"
    LOCK_SERVICE = "a lock service to hold leases in (TICKETLOCK_REDIS_URL)"


# What a configuration gives any store, whatever the store itself can do.
SERVICES = frozenset({Ability.LOCK_SERVICE})


class GuardedSale(Protocol):
    """What a guard may ask of the store during a sale; the store's sale offers the abilities it declares."""

    @property
    def host_lock_path(self) -> Path:
        """The host's lock file (beside db.json, whichever store keeps the data)."""

    @property
    def host_filelock_path(self) -> Path:
        """The filelock mode's lock file, beside the host's lock file (``service/guards/file_lock.py`` says why)."""

    def take_advisory_lock(self) -> None:
        """Wait for the store's named mutex of the inventory, held until the sale commits (ADVISORY_LOCKS)."""

    def lock_inventory_row(self) -> None:
        """Lock the inventory's row until the sale commits (ROW_LOCKS)."""

    def lock_a_bucket(self) -> None:
        """Lock, until the sale commits, a bucket that holds the sale's tickets and that no other sale holds; or wait
        for one; or every bucket, for a quantity no bucket holds alone (BUCKETS). The sale's count is then theirs."""

    def lock_service(self) -> LockService:
        """This worker's way to the lock service (LOCK_SERVICE)."""


@dataclass(frozen=True)
class Holding:
    """What a held guard hands to the four steps: a lease's fencing token and end, for a guard that has them."""

    fence: int | None = None
    lease_until: float | None = None  # epoch seconds: a holder still working after this is no longer protected


class Guard(ABC):
    """One mechanism that keeps sales apart, taken before step 1 and let go after step 4."""

    description: ClassVar[str]  # what is held, in the words GET /modes and the README use
    needs: ClassVar[frozenset[Ability]] = frozenset()

    @contextmanager
    def held(self, sale: GuardedSale, timeout_s: float) -> Iterator[Holding]:
        """Hold this guard around the block; LockTimeout if it stayed taken for ``timeout_s`` seconds."""
        holding = self._acquire(sale, timeout_s)
        if holding is None:
            raise LockTimeout(f"{self._name(sale)} stayed taken for {timeout_s:.3g} s; {NOTHING_SOLD}. Retry shortly.")
        try:
            yield holding
        finally:
            self._release(sale)

    @abstractmethod
    def _acquire(self, sale: GuardedSale, timeout_s: float) -> Holding | None:
        """Take the guard, waiting at most ``timeout_s``: what the steps may need, or None if it stayed taken."""

    def _release(self, sale: GuardedSale) -> None:  # noqa: B027 - letting go of nothing is a valid release
        """Let go (a database's lock needs nothing here: the sale's commit ends it)."""

    def _name(self, sale: GuardedSale) -> str:
        """The guard as a timeout message names it."""
        return self.description
