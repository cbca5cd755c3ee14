"""What the operating system says about a process (from ``/proc``), and the ledger of every process the lesson
starts, so that the end of the run can check by PID that each one is gone and end any that is not."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from loadtest.embedded import EmbeddedService

STATES = {
    "R": "running",
    "S": "sleeping",
    "D": "waiting for the disk",
    "T": "stopped",
    "t": "stopped by a tracer",
    "Z": "a zombie",
    "X": "dead",
    "I": "idle",
}
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h

# The lesson's processes are forked, as the classic lesson's are on Linux: the child starts as a copy of the parent,
# memory and all, which is what section 3 is about (and Python 3.14 no longer forks by default).
FORK = multiprocessing.get_context("fork")


@dataclass(frozen=True)
class Status:
    """One line of ``/proc/<pid>/stat``, the fields the lesson reads."""

    pid: int
    name: str
    state: str  # one letter: R, S, T, Z, ...
    ppid: int
    started: int  # clock ticks after boot: with the pid, it names one process even after its pid is reused

    @property
    def described(self) -> str:
        """``state S (sleeping), ppid 1234``."""
        return f"state {self.state} ({STATES.get(self.state, 'unknown')}), ppid {self.ppid}"


def status(pid: int | None) -> Status | None:
    """What /proc says of ``pid`` now, or None when there is no such process (not even a zombie)."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces and parentheses: split at the last one.
    head, _, tail = stat.rpartition(")")
    fields = tail.split()
    return Status(pid, head.partition("(")[2], fields[0], int(fields[1]), int(fields[19]))


def ended(pid: int | None) -> bool:
    """Whether ``pid`` has exited: it is gone, or a zombie waiting for its parent."""
    seen = status(pid)
    return seen is None or seen.state == "Z"


def described(pid: int | None) -> str:
    """What /proc says of ``pid``, in words (or "gone")."""
    seen = status(pid)
    return seen.described if seen else "gone"


def wait_until(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.01) -> float | None:
    """Seconds it took for ``condition()`` to hold, or None if it did not within ``timeout_s``."""
    started = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - started
        if time.monotonic() - started >= timeout_s:
            return None
        time.sleep(interval_s)


def become_subreaper(on: bool = True) -> None:
    """Make this process the nearest subreaper of its descendants (``prctl(PR_SET_CHILD_SUBREAPER)``): an orphan
    below it is adopted by it rather than by PID 1, and it can watch and reap them."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def reap(pid: int) -> int | None:
    """Collect the exit status of ``pid`` if it is this process's child and has exited (None otherwise).

    Returns the exit code, or minus the signal that ended it, as ``multiprocessing``'s ``exitcode`` does.
    """
    try:
        done, wait_status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(wait_status) if done else None


class Ledger:
    """Every process the lesson started, by PID and start time; ``left()`` is those that still exist."""

    def __init__(self) -> None:
        self.started: dict[int, int] = {}

    def start(self, *processes: BaseProcess) -> None:
        """Start these ``multiprocessing`` processes and note them."""
        for process in processes:
            process.start()
            self.add(process.pid)

    def add(self, *pids: int | None) -> None:
        """Note processes that run now (one that already ended has nothing left to check)."""
        for pid in pids:
            now = status(pid)
            if now is not None:
                self.started.setdefault(now.pid, now.started)

    def left(self) -> list[int]:
        """The noted processes that still exist, zombies included (a pid reused by another process is gone)."""
        return sorted(pid for pid, started in self.started.items() if _same(pid, started))

    def end_all(self) -> list[int]:
        """SIGCONT and SIGKILL whatever is left, reap what is this process's child: the PIDs that survive that."""
        for pid in self.left():
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # a stopped process dies of SIGKILL too, but its parent may be stopped
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: all(reap(pid) is not None or status(pid) is None for pid in self.left()), 5.0)
        return self.left()


def _same(pid: int, started: int) -> bool:
    now = status(pid)
    return now is not None and now.started == started


def finish(children: Iterable[BaseProcess], timeout_s: float = 5.0) -> None:
    """Join each child; terminate, then kill, one that does not end in time (a Ctrl-C, a failed check)."""
    for child in children:
        if child.pid is None:
            continue  # never started
        child.join(timeout_s)
        if child.is_alive():
            child.terminate()
            child.join(timeout_s)
        if child.is_alive():
            child.kill()
            child.join(timeout_s)


@contextmanager
def service(ledger: Ledger, **settings: Any) -> Iterator[EmbeddedService]:
    """A real gunicorn (the load tester's embedded service) whose master and workers are in the ledger; stopped,
    and checked gone by process group, when the block ends."""
    with EmbeddedService(**settings) as running:
        # The service answers as soon as one worker does: wait for the others, so that they are all in the ledger.
        wait_until(lambda: len(running.worker_pids()) >= running.workers, 10.0)
        ledger.add(running.master_pid, *running.worker_pids())
        try:
            yield running
        finally:
            with suppress(ProcessLookupError):
                os.killpg(running.master_pid or 0, signal.SIGCONT)  # a stopped master would not hear SIGTERM
