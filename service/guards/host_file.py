"""The host's file lock: ``flock`` on ``<TICKETLOCK_DB>.lock``, taken exclusively, so one sale at a time.

Every worker process of the host opens the same file and so waits for the same lock (``service/flock.py``).
A worker on another host opens a file of its own: this guard protects one host only (the ``locked`` mode).
"""

from __future__ import annotations

from service import flock
from service.guards.base import Guard, GuardedSale, Holding


class HostFileLock(Guard):
    """An exclusive ``flock`` on the host's lock file, asleep in the kernel while another worker holds it."""

    description = "the host's file lock (flock on <TICKETLOCK_DB>.lock)"

    def _acquire(self, sale: GuardedSale, timeout_s: float) -> Holding | None:
        return Holding() if flock.acquire(sale.host_lock_path, timeout_s) else None

    def _release(self, sale: GuardedSale) -> None:
        flock.release(sale.host_lock_path)

    def _name(self, sale: GuardedSale) -> str:
        return sale.host_lock_path.name
