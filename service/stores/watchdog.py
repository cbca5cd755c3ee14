"""A bound, kept on this side, on how long a database connection may stay silent: past it, the connection is cut.

psycopg waits for the server's answer as long as it takes. ``lock_timeout`` and ``statement_timeout`` run on the
server, so they end only the waits a server that still answers reports; a network partition, or a server frozen
mid-query, accepts the bytes and never answers, and the worker would wait until gunicorn kills it. psycopg 3
offers no per-query timeout of its own (its ``Connection.wait`` has one, used only to cancel on Ctrl-C). So each
bounded block registers its connection with one watchdog thread per worker process; a block still running at its
bound has its connection's socket shut down, both ways: the waiting call wakes at once and fails, psycopg marks
the connection broken, and the pool discards it. No cancel request is sent, since it would go the same silent way.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import psycopg

__all__ = ["NoAnswer", "answering_within"]


class NoAnswer(TimeoutError):
    """The database did not answer within the bound, and the connection was cut."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no answer within {seconds:.3g} s")
        self.seconds = seconds


@contextmanager
def answering_within(connection: psycopg.Connection[Any], seconds: float) -> Iterator[None]:
    """Run the block's calls on ``connection``; if it still runs after ``seconds``, cut the connection and raise
    NoAnswer (the call under way fails, and so would any later one)."""
    watchdog = _watchdog_of(os.getpid())
    bound = watchdog.arm(connection, seconds)
    try:
        yield
    except psycopg.OperationalError as error:
        if bound.cut:
            raise NoAnswer(seconds) from error
        raise
    finally:
        watchdog.disarm(bound)


@dataclass(eq=False)
class _Bound:
    connection: psycopg.Connection[Any]
    at: float  # time.monotonic()
    cut: bool = field(default=False)


class _Watchdog:
    """One thread that sleeps until the earliest bound, and cuts the connections whose block outlived it."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.bounds: set[_Bound] = set()
        self.waking_at: float | None = None  # when the thread wakes next (None: when a bound is armed)
        threading.Thread(target=self._watch, name="ticketlock database watchdog", daemon=True).start()

    def arm(self, connection: psycopg.Connection[Any], seconds: float) -> _Bound:
        bound = _Bound(connection, time.monotonic() + seconds)
        with self.condition:
            self.bounds.add(bound)
            if self.waking_at is None or bound.at < self.waking_at:
                self.condition.notify()  # only then: most bounds come after the earliest one, and need no wake-up
        return bound

    def disarm(self, bound: _Bound) -> None:
        with self.condition:
            self.bounds.discard(bound)  # under the lock: once this returns, the bound can no longer cut

    def _watch(self) -> None:
        with self.condition:
            while True:
                now = time.monotonic()
                for bound in [bound for bound in self.bounds if bound.at <= now]:
                    self.bounds.discard(bound)
                    bound.cut = True
                    _shut_down(bound.connection)
                self.waking_at = min((bound.at for bound in self.bounds), default=None)
                self.condition.wait(None if self.waking_at is None else self.waking_at - now)


def _shut_down(connection: psycopg.Connection[Any]) -> None:
    """Shut the connection's socket down both ways, through a duplicate of its descriptor (closing the duplicate
    leaves the connection's own descriptor to psycopg)."""
    with suppress(OSError, psycopg.Error):
        if connection.closed:
            return
        with socket.socket(fileno=os.dup(connection.fileno())) as duplicate:
            duplicate.shutdown(socket.SHUT_RDWR)


@functools.cache
def _watchdog_of(pid: int) -> _Watchdog:
    # Made on first use in each process, keyed by pid: threads do not survive a fork.
    return _Watchdog()
