"""The host's file locks: ``flock(2)`` on a lock file, exclusive or shared, each wait bounded by a timeout.

An exclusive hold has one holder; shared holds have any number, but never together with an exclusive one. Like
every ``flock``, these locks are advisory, cover the processes that open the same file through the same kernel,
and are released by the kernel when their holder dies, even by SIGKILL.

A waiter sleeps in the kernel and wakes the moment the holder lets go. The wait is bounded with a ``SIGALRM``
timer, the way util-linux's ``flock --timeout`` does it. Python runs signal handlers only in a process's main
thread, which is where gunicorn's sync workers run requests; other threads (and a main thread whose own
``ITIMER_REAL`` is already running) try again every ``THREAD_POLL_INTERVAL_S`` instead.

A ``flock`` lock belongs to an open file, not to a process: each thread of each worker keeps one descriptor per
lock file, made on first use after the fork, so that two threads never share a lock by accident. It follows that
a thread which holds a file shared and then asks for it exclusively *converts* its hold (the file store relies on
this: see ``service/stores/file/__init__.py``); the conversion first lets go of the shared hold, then waits.
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from service.errors import LockTimeout, StoreWriteFailed

THREAD_POLL_INTERVAL_S = 0.002


@contextmanager
def holding(lock_path: Path, timeout_s: float, consequence: str, *, shared: bool = False) -> Iterator[int]:
    """Hold the lock on ``lock_path``; a wait longer than ``timeout_s`` raises LockTimeout (503, Retry-After).

    Yields the lock file's descriptor, for a lock file that also holds what its holders share. Ending a hold
    lets go of the file entirely, also of a shared hold that this one converted.
    """
    if not acquire(lock_path, timeout_s, shared=shared):
        message = f"{lock_path.name} stayed locked for {timeout_s:.3g} s; {consequence}. Retry shortly."
        raise LockTimeout(message)
    try:
        yield _descriptor(lock_path)
    finally:
        release(lock_path)


def acquire(lock_path: Path, timeout_s: float, *, shared: bool = False) -> bool:
    """Lock the file for this thread, exclusive or shared: whether that happened within ``timeout_s``."""
    operation = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    deadline = time.monotonic() + timeout_s
    while True:
        fd = _descriptor(lock_path)
        if not _flock_until(fd, operation, deadline):
            return False
        # A lock on a file that was deleted or replaced while we queued excludes nobody who opens the file now:
        # let go, and lock the file that is there now.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock_path)):
                return True
        except FileNotFoundError:
            pass
        except BaseException:
            _forget_descriptor(lock_path)  # never leave the lock held by a descriptor nobody will unlock
            raise
        _forget_descriptor(lock_path)


def release(lock_path: Path) -> None:
    """Let go of this thread's hold on the lock file, through whichever descriptor holds it now."""
    fd = _descriptors.get(_key(lock_path))
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)


# (lock file, pid, thread) -> an open descriptor of the lock file. Keyed by pid, so that a worker never locks
# through a descriptor inherited from the gunicorn master (a forked descriptor shares its locks with the
# parent's), and by thread, so that the threads of one worker exclude one another.
_descriptors: dict[tuple[Path, int, int], int] = {}


def _key(lock_path: Path) -> tuple[Path, int, int]:
    return (lock_path, os.getpid(), threading.get_ident())


def _descriptor(lock_path: Path) -> int:
    key = _key(lock_path)
    fd = _descriptors.get(key)
    if fd is None:
        try:
            fd = _descriptors[key] = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:  # a folder that refuses new files: the store cannot be written either
            raise StoreWriteFailed(f"could not open the lock file {lock_path}: {error.strerror}") from error
    return fd


def _forget_descriptor(lock_path: Path) -> None:
    os.close(_descriptors.pop(_key(lock_path)))  # closing it drops its lock


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
