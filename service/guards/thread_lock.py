"""The lock a single-process tutorial would use, ``threading.Lock``: it keeps apart the threads of one process.

Every worker process has its own, so it never keeps apart two processes (the ``thread-lock`` mode's lesson).
"""

from __future__ import annotations

import functools
import os
import threading

from service.guards.base import Guard, GuardedSale, Holding


class ThreadLock(Guard):
    """The worker process's own ``threading.Lock``."""

    description = "a threading.Lock of the worker process"

    def _acquire(self, sale: GuardedSale, timeout_s: float) -> Holding | None:
        return Holding() if _lock_of(os.getpid()).acquire(timeout=timeout_s) else None

    def _release(self, sale: GuardedSale) -> None:
        _lock_of(os.getpid()).release()

    def _name(self, sale: GuardedSale) -> str:
        return "the worker's thread lock"


@functools.cache
def _lock_of(pid: int) -> threading.Lock:
    # Keyed by pid: a lock copied from the gunicorn master at fork is never the one a worker uses.
    return threading.Lock()
