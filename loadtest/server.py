"""What every server a run starts shares: a process group of its own, a log, and a stop checked by PID.

gunicorn (``embedded.py``), PostgreSQL (``postgres.py``) and Redis (``redis_server.py``) each start in a process
group of their own. Stopping sends the server's own stop signal to the group, waits, then SIGKILLs whatever is
left, and checks by PID, from ``/proc``, that nothing of it remains. A server made in a temporary folder deletes
it when its ``with`` block ends (``stop`` alone keeps it, so that ``start`` serves the same data again), and a
start that fails or is interrupted (Ctrl-C while gunicorn boots) stops what it started before it raises.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

STOP_TIMEOUT_S = 10.0


class ServerProcess(ABC):
    """``with server:`` runs it until the block ends. A subclass starts it; this class stops it."""

    what: ClassVar[str]  # how messages name the server
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM  # what asks it to stop cleanly
    stop_timeout_s: ClassVar[float] = STOP_TIMEOUT_S
    process: subprocess.Popen[bytes] | None
    log_path: Path
    _temporary: tempfile.TemporaryDirectory[str] | None = None  # the folder it made for itself, if it made one

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server, then delete the temporary folder it made, if it made one."""
        try:
            self.stop()
        finally:
            if self._temporary:
                self._temporary.cleanup()

    @abstractmethod
    def start(self) -> None:
        """Start the server and wait until it answers."""

    @property
    def pid(self) -> int | None:
        """The server's PID (also its process group id), while it runs."""
        return self.process.pid if self.process else None

    def stop(self) -> None:
        """The stop signal to the process group, a wait, then SIGKILL; raise if any of its processes survives."""
        if self.process is None:
            return
        survivors = stop_group(self.process, self.stop_signal, self.stop_timeout_s)
        self.process = None
        if survivors:
            raise RuntimeError(f"processes {survivors} of {self.what} survived SIGKILL")

    def log_tail(self, lines: int = 20) -> str:
        """The end of the server's log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def stop_group(process: subprocess.Popen[bytes], first: signal.Signals, timeout_s: float) -> list[int]:
    """Send ``first`` to the process group ``process`` leads, wait, then SIGKILL what is left: the survivors' PIDs."""
    group = process.pid
    signal_group(group, first)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        signal_group(group, signal.SIGKILL)
        process.wait(timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    while processes_in_group(group) and time.monotonic() < deadline:
        signal_group(group, signal.SIGKILL)
        time.sleep(0.05)
    return processes_in_group(group)


def processes_in_group(group: int) -> list[int]:
    """PIDs of live (not zombie) processes whose process group is ``group``."""
    return sorted(process.pid for process in _live_processes() if process.group == group)


def descendants(root: int) -> list[int]:
    """PIDs of every live process below ``root``: children, grandchildren, and so on."""
    children: dict[int, list[int]] = {}
    for process in _live_processes():
        children.setdefault(process.parent, []).append(process.pid)
    found: list[int] = []
    frontier = [root]
    while frontier:
        below = children.get(frontier.pop(), [])
        found += below
        frontier += below
    return sorted(found)


@dataclass(frozen=True)
class _Process:
    pid: int
    parent: int
    group: int


def _live_processes() -> Iterator[_Process]:
    """Every process that is not a zombie, from /proc/<pid>/stat."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it ended while we looked
        # The command name (field 2) is in parentheses and may hold spaces: split after its closing one.
        state, parent, group = stat[stat.rindex(")") + 2 :].split()[:3]
        if state != "Z":
            yield _Process(int(entry.name), int(parent), int(group))


def signal_group(group: int, signal_number: signal.Signals) -> None:
    """Send a signal to every process of a group that is still there."""
    with suppress(ProcessLookupError):
        os.killpg(group, signal_number)
