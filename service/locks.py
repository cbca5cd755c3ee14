"""The locks the modes hold: the host's file lock (inter-process), and the worker process's own thread lock.

The file lock is a ``filelock`` lock whose waiters sleep in the kernel until the holder lets go.

``filelock.FileLock`` on Linux tries a non-blocking ``flock(2)`` and, when the lock is busy, sleeps
``poll_interval`` (50 ms) before trying again. Under contention the next buyer therefore starts up to 50 ms
after the lock came free, which halves throughput and multiplies p99 latency by ~7 (issue #6).

``QueuedFileLock`` keeps filelock's API and bookkeeping (timeouts, ``Timeout``, re-entrancy, fork checks) and
changes only how one attempt waits: a blocking ``flock`` that the kernel ends the moment the lock is released,
bounded by the lock's timeout with a ``SIGALRM`` timer, the way util-linux's ``flock --timeout`` does it.
Python runs signal handlers only in a process's main thread, which is where gunicorn's default sync workers
run requests; other threads (and a main thread whose own ``ITIMER_REAL`` is already running) make
non-blocking attempts instead, and filelock polls between them every ``THREAD_POLL_INTERVAL_S``.

The lock can be taken exclusive (one holder) or shared (any number of shared holders, but never together
with an exclusive one): see ``service/purchase.py`` for why the unlocked mode takes it shared.

Like every ``flock``, the lock is advisory, covers processes that open the same file through the same kernel,
and is released by the kernel when its holder dies, even by SIGKILL.

The thread lock is the lock a single-process tutorial would use, ``threading.Lock``: every worker process has
its own, so it keeps apart the threads of one process and never two processes (the ``thread-lock`` mode).
"""

from __future__ import annotations

import fcntl
import functools
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from types import FrameType

from filelock import BaseFileLock, Timeout

from service.errors import LockTimeout
from service.modes import Guard

THREAD_POLL_INTERVAL_S = 0.002


class QueuedFileLock(BaseFileLock):
    """A ``flock`` on ``lock_file``; use it like ``filelock.FileLock(lock_file, timeout=...)``."""

    def __init__(self, lock_file: str | os.PathLike[str], timeout: float, *, shared: bool = False) -> None:
        super().__init__(lock_file, timeout=timeout, poll_interval=THREAD_POLL_INTERVAL_S)
        self.operation = fcntl.LOCK_SH if shared else fcntl.LOCK_EX

    def _acquire(self) -> None:
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock_within(fd, self.operation, self.timeout)
            # A lock on a file that was deleted or replaced while we queued excludes nobody who opens the file
            # now: let go and let filelock try again on the current file (filelock's own lock does the same).
            if not os.path.samestat(os.fstat(fd), os.stat(self.lock_file)):
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError, _WaitExpired):
            # Closing the descriptor also drops a lock the timer interrupted just after it was granted.
            os.close(fd)
            return
        except BaseException:
            os.close(fd)
            raise
        self._mark_descriptor_owned(fd)

    def _release(self) -> None:
        fd = self._context.lock_file_fd
        assert fd is not None
        fcntl.flock(fd, fcntl.LOCK_UN)
        self._mark_descriptor_released()
        os.close(fd)


class _WaitExpired(Exception):
    """The SIGALRM timer ended a blocking wait for the lock."""


def _flock_within(fd: int, operation: int, timeout_s: float) -> None:
    """Take ``operation`` (LOCK_EX or LOCK_SH) on ``fd``, queueing in the kernel for at most ``timeout_s``.

    Raises BlockingIOError when the lock is busy and this thread cannot wait in the kernel, and _WaitExpired
    when the timer ended the wait.
    """
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        if timeout_s == 0 or threading.current_thread() is not threading.main_thread():
            raise
    with _alarm_after(timeout_s):
        fcntl.flock(fd, operation)


_waiting = False  # True only while the main thread is blocked in flock(): the only moment SIGALRM may end


@contextmanager
def _alarm_after(seconds: float) -> Iterator[None]:
    """Raise _WaitExpired in the blocked main thread after ``seconds`` (never if negative)."""
    global _waiting
    if seconds < 0:
        yield
        return
    if signal.getitimer(signal.ITIMER_REAL) != (0.0, 0.0):
        raise BlockingIOError  # someone else's timer is running: leave it alone and let filelock poll
    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    _waiting = True
    try:
        yield
    finally:
        # Stop the wait first, then the timer, then restore the handler: a SIGALRM that is still pending when
        # signal.signal() runs it must find nothing to interrupt, and none may arrive under the old handler.
        _waiting = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _expire(signum: int, frame: FrameType | None) -> None:
    if _waiting:
        raise _WaitExpired


@contextmanager
def holding(lock_path: Path, timeout_s: float, consequence: str, *, shared: bool = False) -> Iterator[None]:
    """Hold the lock on ``lock_path``; a wait longer than ``timeout_s`` raises LockTimeout (503, Retry-After)."""
    lock = _lock_for(lock_path, timeout_s, shared, os.getpid())
    try:
        lock.acquire()
    except Timeout:
        message = f"{lock_path.name} stayed locked for {timeout_s:g} s; {consequence}. Retry shortly."
        raise LockTimeout(message) from None
    try:
        yield
    finally:
        lock.release()


@functools.cache
def _lock_for(lock_path: Path, timeout_s: float, shared: bool, pid: int) -> QueuedFileLock:
    # One lock object per worker process: keyed by pid, so a worker never uses one inherited from the gunicorn
    # master (filelock refuses those), and made on first use, inside the worker, never at import.
    return QueuedFileLock(lock_path, timeout=timeout_s, shared=shared)


def thread_guard(guard: Guard, timeout_s: float, consequence: str) -> AbstractContextManager[None]:
    """The worker process's own thread lock for the ``thread-lock`` mode's guard; nothing for any other guard."""
    if guard is not Guard.THREAD_LOCK:
        return nullcontext()
    return _holding_thread_lock(_thread_lock_for(os.getpid()), timeout_s, consequence)


@contextmanager
def _holding_thread_lock(lock: threading.Lock, timeout_s: float, consequence: str) -> Iterator[None]:
    if not lock.acquire(timeout=timeout_s):
        raise LockTimeout(f"the worker's thread lock stayed taken for {timeout_s:g} s; {consequence}. Retry shortly.")
    try:
        yield
    finally:
        lock.release()


@functools.cache
def _thread_lock_for(pid: int) -> threading.Lock:
    # Keyed by pid, like the file lock: a lock copied from the master at fork is never the one used.
    return threading.Lock()
