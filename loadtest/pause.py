"""The pause that breaks a lease: stop the worker holding it with SIGSTOP, let its lease run out, then SIGCONT.

This is the fault Jepsen injects into lock services (and what a long GC pause, a page-fault storm or a stopped VM
does): the stopped worker is in the middle of its critical section and does not know that time passed. It can
only be done to processes this program may signal: the embedded hosts' workers. The lease's value in the lock
service names its holder ("host-2 pid 4711 9f3c1a2b"), so the pause finds its target there. The holder is kept
stopped only if it still holds the lease once stopped, and is between its read and its write, where a pause
breaks a lease: the database says so, its last statement being the read (a holder stopped while its write holds
the row's lock would only keep the others waiting). Otherwise it gets SIGCONT at once and the next holder is
tried. A stopped worker always gets SIGCONT again, also when the phase ends early.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.queues
import os
import re
import signal
import time
from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import psycopg
import redis

from loadtest.server import processes_in_group
from service.lock_service import FENCE_KEY, LEASE_KEY
from service.stores.postgres import CLAIM, READ, READ_SETTINGS

HOLDER = re.compile(r"(?P<host>.+) pid (?P<pid>\d+) \w+")  # the lease's value: service/lock_service.py
TRY_EVERY_S = 0.005  # how long a holder runs between two tries to stop it
PAUSED, READING, WRITING = "paused", "reading", "writing"
# A worker whose last query holds one of these has read the count and works: each statement's text up to its first
# parameter, since the server shows parameters as $1, $2, ... (a query may start with the sale's SET LOCAL).
READ_STARTS, CLAIM_STARTS = (statement.split("%(")[0].strip() for statement in (READ, CLAIM))
# A claim's round trip ends with the settings read after it (PostgresSale._claim): the last query then shown.
AFTER_A_CLAIM = READ_SETTINGS.strip()
WRITES = ("WITH written", "UPDATE", "INSERT")  # a write, and its order, in one statement (not a claim)
LOOK_EVERY_S = 0.001
START_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Pause:
    """A lease holder stopped and resumed: which worker, and when (epoch seconds)."""

    host: str
    worker_pid: int
    stopped_at: float
    resumed_at: float

    @property
    def ms(self) -> float:
        """How long the worker stood still."""
        return (self.resumed_at - self.stopped_at) * 1000


class HolderPause:
    """``with HolderPause(redis_url, database_url, masters, pause_s):`` stops one lease holder among the workers of
    the gunicorn ``masters`` once, between its read and its write, while tickets are left (``.pause`` after).

    The watching runs in a process of its own: in this one, the buyers' threads would keep it from the GIL for
    longer than a race window.
    """

    def __init__(self, redis_url: str, database_url: str, masters: list[int], pause_s: float) -> None:
        context = multiprocessing.get_context("spawn")
        self.stop = context.Event()
        self.results: multiprocessing.queues.Queue[Pause | None] = context.Queue()
        self.masters = masters
        self.process = context.Process(
            target=_watch, args=(redis_url, database_url, masters, pause_s, self.stop, self.results), daemon=True
        )
        self.pause: Pause | None = None

    def __enter__(self) -> HolderPause:
        self.process.start()
        if self.results.get(timeout=START_TIMEOUT_S) is not READY_MARK:  # it watches before the buyers go
            raise RuntimeError("the holder pause did not start")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop.set()
        try:
            self.pause = self.results.get(timeout=START_TIMEOUT_S)
            self.process.join(timeout=START_TIMEOUT_S)
        finally:
            if self.process.exitcode != 0:  # whatever happened to it, no worker stays stopped
                self.process.kill()
                for pid in _workers(self.masters):
                    _resume(pid)


READY_MARK = None  # the first thing the watcher says: it is ready (then, the pause it made, or None)


def _watch(redis_url: str, database_url: str, masters: list[int], pause_s: float, stop: Any, results: Any) -> None:
    """The watcher process: say it is ready, pause one holder, then say which (None if none) once told to stop."""
    watcher = _Watcher(redis_url, database_url, masters, pause_s, stop)
    results.put(READY_MARK)
    try:
        watcher.watch()
    finally:
        stop.wait()
        results.put(watcher.pause)


class _Watcher:
    """Finds the lease's holder, and stops it when it stands between its read and its write."""

    def __init__(self, redis_url: str, database_url: str, masters: list[int], pause_s: float, stop: Any) -> None:
        self.client = redis.Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
        # A worker stays stopped while the watcher asks where it stands: never longer than a second.
        self.database = psycopg.connect(
            database_url, autocommit=True, connect_timeout=2, options="-c statement_timeout=1000"
        )
        self.masters = masters
        self.workers = _workers(masters)
        self.pause_s = pause_s
        self.done = stop
        self.pause: Pause | None = None
        # The token the phase's reset left on the row (it moves the row's token on, and may give it the next grant's).
        row = self.database.execute("SELECT fence FROM inventory WHERE id = 1").fetchone()
        self.reset_fence = row[0] if row else None

    def watch(self) -> None:
        """Until the pause is done or the phase ends: find a holder that has held the lease a moment, pause it."""
        seen, next_try = "", 0.0
        while not self.done.is_set() and self.pause is None:
            holder = self._holder()
            if holder != seen:
                seen, next_try = holder, time.monotonic() + TRY_EVERY_S
            elif holder and time.monotonic() >= next_try:
                # Not again at once: stopping a holder again and again would keep it from ever reading.
                next_try = time.monotonic() + TRY_EVERY_S
                if self._try_to_pause(holder) is WRITING:
                    next_try = math.inf  # too late for this holder: wait for the next one
            time.sleep(LOOK_EVERY_S)

    def _is_ours(self, pid: int) -> bool:
        """Whether ``pid`` is a worker of our hosts (looked up again only for a pid not seen before: a worker that
        gunicorn started since)."""
        if pid not in self.workers:
            self.workers = _workers(self.masters)
        return pid in self.workers

    def _holder(self) -> str:
        try:
            value = self.client.get(LEASE_KEY)
        except redis.RedisError:
            return ""
        return value.decode() if isinstance(value, bytes) else ""

    def _try_to_pause(self, holder: str) -> str:
        """Stop the worker the lease names, and keep it stopped only if it still holds the lease, and has read a
        count it will sell from but not written yet: where it stood (PAUSED, READING or WRITING)."""
        named = HOLDER.fullmatch(holder)
        if named is None or not self._is_ours(int(named["pid"])):
            return WRITING  # not a worker of our hosts
        host, pid = named["host"], int(named["pid"])
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return WRITING  # it has exited since
        stopped_at = time.time()
        try:
            where = self._where(host, pid) if self._holder() == holder else WRITING
            if where is PAUSED:
                self.done.wait(self.pause_s)
        finally:
            _resume(pid)
        if where is PAUSED:
            self.pause = Pause(host, pid, stopped_at, time.time())
        return where

    def _newest_token(self) -> int | None:
        """The fencing token of the newest grant: the holder's."""
        try:
            value = self.client.get(FENCE_KEY)
        except redis.RedisError:
            return None
        return int(value) if isinstance(value, bytes) else None

    def _where(self, host: str, pid: int) -> str:
        """Where a stopped worker stands, by its last statement (each worker names its connections,
        service/stores/postgres.py) and the tickets left: PAUSED when it read a count it will sell from and works.

        A claim counts only if it is the holder's: the row carries the newest token, put there by a claim (not by the
        phase's reset, which moves the row's token on, and may give it the token of the next grant). The claim of the
        worker's previous sale, sold out right after it, stays its last statement until its next claim, and so does a
        claim refused, for a moment. (A read is followed by the end of its transaction, whatever happens next.)
        """
        row = self.database.execute(
            "SELECT a.query, i.remaining, i.fence FROM pg_stat_activity a, inventory i "
            "WHERE a.application_name = %s AND a.state <> 'active' "
            "ORDER BY a.state_change DESC LIMIT 1",  # its connection in use now: the last one to change
            (f"ticketlock {host} pid {pid}",),
        ).fetchone()
        if row is None or row[1] == 0:
            return WRITING  # nothing it could sell: a pause would show nothing
        query = row[0]
        claimed = row[2] == self._newest_token() and row[2] != self.reset_fence
        if READ_STARTS in query or ((CLAIM_STARTS in query or query.strip() == AFTER_A_CLAIM) and claimed):
            return PAUSED
        return WRITING if query.lstrip().startswith(WRITES) and CLAIM_STARTS not in query else READING


def _resume(pid: int) -> None:
    """SIGCONT to a worker, unless it has exited."""
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def _workers(masters: list[int]) -> set[int]:
    """The workers of these gunicorn masters right now (each master leads the process group of its workers)."""
    return {pid for master in masters for pid in processes_in_group(master) if pid != master}
