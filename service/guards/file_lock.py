"""filelock's lock, ``filelock.FileLock`` on ``<TICKETLOCK_DB>.filelock``: one sale at a time on this host, by polling.

It keeps apart the same processes as the host's ``flock`` guard (``host_file.py``), and teaches how a lock *waits*.
filelock tries a non-blocking ``flock`` and, while another holder has it, sleeps ``POLL_INTERVAL_S`` between tries:
a waiter starts up to one poll interval after the lock came free, and the worker that just let go usually takes it
again first. ``flock`` itself sleeps in the kernel, which wakes the next waiter the moment the holder lets go
(docs/file-store.md, "Why flock(2), and filelock.FileLock beside it").

Its lock file is a file of its own, beside db.json, never the host's ``db.json.lock``: every file-store sale already
holds that one shared (``service/stores/file/__init__.py``), and filelock opens a descriptor of its own, so its
exclusive try would wait for this very process's shared hold until the lock timeout.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

from service.guards.base import Guard, GuardedSale, Holding

if TYPE_CHECKING:
    from filelock import BaseFileLock

POLL_INTERVAL_S = 0.05  # filelock's own default, kept: the wait it adds between two buyers is the lesson


class PollingFileLock(Guard):
    """``filelock.FileLock`` on the host's filelock file, its waiters polling every ``POLL_INTERVAL_S``."""

    description = f"filelock.FileLock on <TICKETLOCK_DB>.filelock, waiters polling every {POLL_INTERVAL_S * 1000:g} ms"

    def _acquire(self, sale: GuardedSale, timeout_s: float) -> Holding | None:
        lock = _lock_of(sale.host_filelock_path, os.getpid())
        try:
            lock.acquire(timeout=timeout_s)
        except TimeoutError:  # filelock.Timeout
            return None
        return Holding()

    def _release(self, sale: GuardedSale) -> None:
        _lock_of(sale.host_filelock_path, os.getpid()).release()

    def _name(self, sale: GuardedSale) -> str:
        return sale.host_filelock_path.name


@functools.cache
def _lock_of(lock_path: Path, pid: int) -> BaseFileLock:
    # Keyed by pid: filelock refuses a lock made before a fork, so each worker makes its own, on first use. One
    # instance per worker, thread-local (each thread holds it through a descriptor of its own, so the threads of a
    # gthread worker exclude one another too), and no singleton sharing of holds between instances.
    # Imported here, on first use: importing filelock registers handlers that run at every fork of the process
    # (filelock/_core/_fork.py), which the gunicorn master and the processes that never take this lock can do without.
    from filelock import FileLock

    return FileLock(lock_path, thread_local=True, is_singleton=False, poll_interval=POLL_INTERVAL_S)
