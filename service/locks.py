"""The locks the modes hold: the host's file lock (inter-process), and the worker process's own thread lock.

The file lock is ``flock(2)`` on a lock file beside db.json, taken exclusive (one holder) or shared (any number
of shared holders, but never together with an exclusive one): see ``service/stores/file.py`` for why the other
modes take it shared. Like every ``flock``, it is advisory, covers the processes that open the same file through
the same kernel, and is released by the kernel when its holder dies, even by SIGKILL.

A waiter sleeps in the kernel and wakes the moment the holder lets go. The wait is bounded by the lock timeout
with a ``SIGALRM`` timer, the way util-linux's ``flock --timeout`` does it. Python runs signal handlers only in
a process's main thread, which is where gunicorn's default sync workers run requests; other threads (and a main
thread whose own ``ITIMER_REAL`` is already running) try again every ``THREAD_POLL_INTERVAL_S`` instead.

Why not ``filelock.FileLock``: it polls (a waiter sleeps 50 ms between tries, so the next buyer starts up to
50 ms after the lock came free), and its bookkeeping (fork tracking, registries, path resolution) cost about
70 µs of CPU per acquire and release here, 20 times the ``flock`` calls themselves, in every mode (issue #12,
bench/RESULTS.md). Each thread of each worker process keeps one descriptor per lock file open instead, made on
first use after the fork: ``flock`` locks belong to an open file, so two threads must never share one.

The thread lock is the lock a single-process tutorial would use, ``threading.Lock``: every worker process has
its own, so it keeps apart the threads of one process and never two processes (the ``thread-lock`` mode).
"""

from __future__ import annotations

import fcntl
import functools
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from types import FrameType

from service.errors import LockTimeout
from service.modes import Guard

THREAD_POLL_INTERVAL_S = 0.002


@contextmanager
def holding(lock_path: Path, timeout_s: float, consequence: str, *, shared: bool = False) -> Iterator[int]:
    """Hold the lock on ``lock_path``; a wait longer than ``timeout_s`` raises LockTimeout (503, Retry-After).

    Yields the lock file's descriptor, for a lock file that also holds what its holders share. Holds do not nest:
    a thread holds one lock file once at a time (a second hold would convert the first, and end it on exit).
    """
    fd = _lock(lock_path, fcntl.LOCK_SH if shared else fcntl.LOCK_EX, timeout_s)
    if fd is None:
        message = f"{lock_path.name} stayed locked for {timeout_s:g} s; {consequence}. Retry shortly."
        raise LockTimeout(message)
    try:
        yield fd
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _lock(lock_path: Path, operation: int, timeout_s: float) -> int | None:
    """Take ``operation`` (LOCK_EX or LOCK_SH) on the lock file: the descriptor holding it, or None on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        fd = _descriptor(lock_path)
        if not _flock_until(fd, operation, deadline):
            return None
        # A lock on a file that was deleted or replaced while we queued excludes nobody who opens the file now:
        # let go, and lock the file that is there now.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock_path)):
                return fd
        except FileNotFoundError:
            pass
        except BaseException:
            _forget_descriptor(lock_path)  # never leave the lock held by a descriptor nobody will unlock
            raise
        _forget_descriptor(lock_path)


# (lock file, pid, thread) -> an open descriptor of the lock file. Keyed by pid, so that a worker never locks
# through a descriptor inherited from the gunicorn master (a forked descriptor shares its locks with the
# parent's), and by thread, so that the threads of one worker exclude one another.
_descriptors: dict[tuple[Path, int, int], int] = {}


def _descriptor(lock_path: Path) -> int:
    key = (lock_path, os.getpid(), threading.get_ident())
    fd = _descriptors.get(key)
    if fd is None:
        fd = _descriptors[key] = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    return fd


def _forget_descriptor(lock_path: Path) -> None:
    os.close(_descriptors.pop((lock_path, os.getpid(), threading.get_ident())))  # closing it drops its lock


def _flock_until(fd: int, operation: int, deadline: float) -> bool:
    """Take ``operation`` on ``fd``, waiting until ``deadline`` (time.monotonic) at most: whether it was taken."""
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if threading.current_thread() is threading.main_thread() and _wait_in_kernel(fd, operation, left):
            return True
        time.sleep(min(THREAD_POLL_INTERVAL_S, left))


def _wait_in_kernel(fd: int, operation: int, seconds: float) -> bool:
    """Block in ``flock`` until the lock is granted or ``seconds`` pass: whether it was granted.

    False also when someone else's ``ITIMER_REAL`` is running: then the caller polls.
    """
    global _waiting
    if signal.getitimer(signal.ITIMER_REAL) != (0.0, 0.0):
        return False
    previous = signal.signal(signal.SIGALRM, _expire)
    granted = False
    try:
        try:
            _waiting = True  # before the timer starts, so that however early it fires, it ends the wait
            signal.setitimer(signal.ITIMER_REAL, seconds)
            fcntl.flock(fd, operation)
            granted = True
        finally:
            # Stop the wait first, then the timer: a SIGALRM still pending after this finds nothing to end.
            _waiting = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _WaitExpired:
        granted = False  # the timer fired: before the grant, or just after it, before _waiting was cleared
    finally:
        signal.signal(signal.SIGALRM, previous)
    if not granted:
        fcntl.flock(fd, fcntl.LOCK_UN)  # drops a lock granted just before the timer fired; else does nothing
    return granted


class _WaitExpired(Exception):
    """The SIGALRM timer ended a blocking wait for the lock."""


_waiting = False  # True only while the main thread is blocked in flock(): the only moment SIGALRM may end


def _expire(signum: int, frame: FrameType | None) -> None:
    if _waiting:
        raise _WaitExpired


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
