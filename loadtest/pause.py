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

import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType

import psycopg
import redis

from service.lock_service import LEASE_KEY
from service.stores.postgres import CLAIM, READ

HOLDER = re.compile(r"(?P<host>.+) pid (?P<pid>\d+) \w+")  # the lease's value: service/lock_service.py
HELD_BEFORE_PAUSE_S = 0.005  # a holder has usually read by then: it works for the race window (20 ms by default)
# A worker whose last statement is one of these has read the count and works: its text up to the first parameter,
# since the server shows parameters as $1, $2, ...
STATEMENTS_BEFORE_THE_WORK = tuple(statement.split("%(")[0].strip() for statement in (READ, CLAIM))
LOOK_EVERY_S = 0.001


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
    """``with HolderPause(redis_url, database_url, workers, pause_s):`` stops one lease holder among
    ``workers()`` once, between its read and its write, while tickets are left."""

    def __init__(self, redis_url: str, database_url: str, workers: Callable[[], Iterable[int]], pause_s: float) -> None:
        self.client = redis.Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
        self.database = psycopg.connect(database_url, autocommit=True, connect_timeout=2)
        self.workers = workers
        self.pause_s = pause_s
        self.done = threading.Event()
        self.pause: Pause | None = None
        self.thread = threading.Thread(target=self._watch, name="holder-pause", daemon=True)

    def __enter__(self) -> HolderPause:
        self.thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.done.set()
        self.thread.join()
        self.client.close()
        self.database.close()

    def _watch(self) -> None:
        """Until the pause is done or the phase ends: find a holder that has held the lease a moment, pause it."""
        seen, since, tried = "", 0.0, ""
        while not self.done.is_set() and self.pause is None:
            holder = self._holder()
            if holder != seen:
                seen, since = holder, time.monotonic()
            elif holder and holder != tried and time.monotonic() - since >= HELD_BEFORE_PAUSE_S:
                tried = holder  # one try per holder: stopping it again and again would keep it from its read
                self._try_to_pause(holder)
            time.sleep(LOOK_EVERY_S)

    def _holder(self) -> str:
        try:
            value = self.client.get(LEASE_KEY)
        except redis.RedisError:
            return ""
        return value.decode() if isinstance(value, bytes) else ""

    def _try_to_pause(self, holder: str) -> None:
        """Stop the worker the lease names; keep it stopped only if it still holds the lease, and has read a count
        it will sell from but not written yet."""
        named = HOLDER.fullmatch(holder)
        if named is None or int(named["pid"]) not in set(self.workers()):
            return
        host, pid = named["host"], int(named["pid"])
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.time()
        try:
            if self._holder() != holder or not self._between_read_and_write(host, pid):
                return  # it let go, it has not read yet, or it is writing: the pause would show nothing
            self.done.wait(self.pause_s)
        finally:
            os.kill(pid, signal.SIGCONT)
        self.pause = Pause(host, pid, stopped_at, time.time())

    def _between_read_and_write(self, host: str, pid: int) -> bool:
        """Whether the worker's last statement was its read (or its fenced claim) while tickets are left: it read
        a count it will sell from, and works (each worker names its connections, service/stores/postgres.py)."""
        row = self.database.execute(
            "SELECT a.query, i.remaining FROM pg_stat_activity a, inventory i "
            "WHERE a.application_name = %s AND a.state <> 'active' "
            "ORDER BY a.state_change DESC LIMIT 1",  # its connection in use now: the last one to change
            (f"ticketlock {host} pid {pid}",),
        ).fetchone()
        return row is not None and row[1] > 0 and row[0].lstrip().startswith(STATEMENTS_BEFORE_THE_WORK)
