"""The purchase modes: one table saying, for each mode, what guards the four steps and how they read and write.

Every purchase runs the same read -> check -> work -> write (``service/purchase.py``). A mode changes only
what surrounds those steps (its guard, one class per mechanism in ``service/guards/``), how the read reads and
how the write writes. A store runs a mode when it declares everything the mode needs among its features
(``Store.supports``); the routes, the load tester, the OpenAPI document and the README all read this table.

What a mode *protects* decides whether it can be oversold: a lock of one worker process keeps apart only the
threads of that process, the file lock only the processes of one host, and the database's mutexes every host
that sells from it. ``Mode.holds_for`` turns that into the outcome a load test should expect.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any

from service.guards import (
    AdvisoryLock,
    BucketLock,
    Guard,
    HostFileLock,
    Lease,
    Nothing,
    PollingFileLock,
    RowLock,
    ThreadLock,
)
from service.guards.base import Ability
from service.guards.file_lock import POLL_INTERVAL_S


class Read(Enum):
    """How step 1 reads the count."""

    PLAIN = "the count"
    SEEN = (
        "the count as this worker last saw it, read afresh only when that says sold out: the conditional write "
        "checks the count itself"
    )
    CLAIM = "the count, claiming its row with the fencing token at once (refused if a newer token claimed it)"
    MEMORY = "the worker process's own copy of the count, loaded from the store after each reset"


class Write(Enum):
    """How step 4 writes the count."""

    BLIND = "the count read minus the quantity"
    IF_VERSION = "the count read minus the quantity, only if the version read is unchanged"
    CONDITIONAL = "remaining - quantity where remaining >= quantity, in one statement"
    MEMORY = "the worker's own copy only; the store records the order but its count never moves"
    FENCED = "the count read minus the quantity, only where the row still carries this sale's token"
    FROM_BUCKETS = "each bucket the sale holds, less the tickets it takes from it"


class Isolation(Enum):
    """The transaction isolation a database store runs the four steps in (the file store has none)."""

    READ_COMMITTED = "read committed"
    REPEATABLE_READ = "repeatable read"


class Reach(IntEnum):
    """Which purchases a mode keeps apart from one another, from none to all of them."""

    NOTHING = 0
    ONE_PROCESS = 1  # the threads of one worker process
    ONE_HOST = 2  # the worker processes of one host
    EVERY_HOST = 3  # every host selling from the same store

    @property
    def label(self) -> str:
        """The words the API and the reports use."""
        return self.name.lower().replace("_", " ")


Feature = Ability | Read | Write | Isolation  # what a store may declare it can do


@dataclass(frozen=True)
class Lapse:
    """What a mode whose guard runs out (a lease) does when a holder outlives it: paused, or working too long."""

    holds: bool  # whether the mode still keeps every buyer apart then
    lesson: str  # one line: what happened instead, or why it still holds


@dataclass(frozen=True)
class Mode:
    """One row of the table: a mode's guard, read, write and isolation, what it protects, and its lesson."""

    name: str
    guard: Guard
    read: Read
    write: Write
    protects: Reach
    lesson: str  # one line: why it oversells, or why it holds
    isolation: Isolation = Isolation.READ_COMMITTED
    lapse: Lapse | None = None  # for a guard that runs out by itself: a holder that outlives it

    def needs(self) -> frozenset[Feature]:
        """What a store must declare among its features to run this mode."""
        return self.guard.needs | {self.read, self.write, self.isolation}

    def holds_for(self, hosts: int, processes: int, lapsed: bool = False) -> bool:
        """Whether this mode keeps every buyer apart when ``processes`` worker processes on ``hosts`` hosts sell
        (and ``lapsed``: a holder outlived its lease)."""
        needed = Reach.EVERY_HOST if hosts > 1 else Reach.ONE_HOST if processes > 1 else Reach.ONE_PROCESS
        if lapsed and self.lapse:
            return self.lapse.holds and self.protects >= needed
        return self.protects >= needed

    def lesson_for(self, lapsed: bool = False) -> str:
        """The one line that explains an outcome of this mode."""
        return self.lapse.lesson if lapsed and self.lapse else self.lesson

    def describe(self) -> dict[str, Any]:
        """The mode as the API shows it."""
        return {
            "name": self.name,
            "protects": self.protects.label,
            "guard": self.guard.description,
            "read": self.read.value,
            "write": self.write.value,
            "isolation": self.isolation.value,
            "lesson": self.lesson,
            "lapse": {"holds": self.lapse.holds, "lesson": self.lapse.lesson} if self.lapse else None,
        }


TABLE = (
    Mode(
        "unlocked",
        Nothing(),
        Read.PLAIN,
        Write.BLIND,
        Reach.NOTHING,
        "nothing keeps buyers apart: several read the same count and each wrote count - 1",
    ),
    Mode(
        "locked",
        HostFileLock(),
        Read.PLAIN,
        Write.BLIND,
        Reach.ONE_HOST,
        "every worker of this host takes the same file lock, but another host would lock a file of its own",
    ),
    Mode(
        "filelock",
        PollingFileLock(),
        Read.PLAIN,
        Write.BLIND,
        Reach.ONE_HOST,
        f"locked's cure with filelock.FileLock, whose waiters poll every {POLL_INTERVAL_S * 1000:g} ms: the worker "
        "that just let go takes it again before they wake, where flock wakes the next waiter at once; another host "
        "would lock a file of its own",
    ),
    Mode(
        "thread-lock",
        ThreadLock(),
        Read.PLAIN,
        Write.BLIND,
        Reach.ONE_PROCESS,
        "each worker process has its own threading.Lock: it keeps apart threads, never two processes",
    ),
    Mode(
        "memory",
        Nothing(),
        Read.MEMORY,
        Write.MEMORY,
        Reach.NOTHING,
        "each worker sold from its own copy of the count, as a child process changes its own copy of a "
        "global: every worker sold every ticket, and the store's count never moved",
    ),
    Mode(
        "optimistic",
        Nothing(),
        Read.PLAIN,
        Write.IF_VERSION,
        Reach.EVERY_HOST,
        "no lock while working: the write succeeds only if the version is unchanged, else the purchase starts again",
    ),
    Mode(
        "row-lock",
        RowLock(),
        Read.PLAIN,
        Write.BLIND,
        Reach.EVERY_HOST,
        "SELECT ... FOR UPDATE locks the inventory row until commit, and every host waits for it",
    ),
    Mode(
        "advisory-lock",
        AdvisoryLock(),
        Read.PLAIN,
        Write.BLIND,
        Reach.EVERY_HOST,
        "a named mutex held in the database until commit: every host takes the same one",
    ),
    Mode(
        "atomic",
        Nothing(),
        Read.SEEN,
        Write.CONDITIONAL,
        Reach.EVERY_HOST,
        "one conditional UPDATE checks and decrements in a single statement: the count never goes below zero",
    ),
    Mode(
        "repeatable-read",
        Nothing(),
        Read.PLAIN,
        Write.BLIND,
        Reach.EVERY_HOST,
        "unlocked's very steps in a REPEATABLE READ transaction: the database refuses the lost update and the "
        "purchase starts again",
        Isolation.REPEATABLE_READ,
    ),
    Mode(
        "buckets",
        BucketLock(),
        Read.PLAIN,
        Write.FROM_BUCKETS,
        Reach.EVERY_HOST,
        "each sale locks only the bucket of tickets it sells from: a mutex costs the work done while it is held; a "
        "finer one lets more buyers through at once",
    ),
    Mode(
        "lease",
        Lease(),
        Read.PLAIN,
        Write.BLIND,
        Reach.EVERY_HOST,
        "every host takes the same lease in Redis, and no holder worked past it",
        lapse=Lapse(
            holds=False,
            lesson="a holder still worked after its lease ran out: another took the lease, and both wrote the "
            "count they had read",
        ),
    ),
    Mode(
        "fenced-lease",
        Lease(),
        Read.CLAIM,
        Write.FENCED,
        Reach.EVERY_HOST,
        "the lease's fencing token claims the row at the read, and the write goes only where the row still carries it",
        lapse=Lapse(
            holds=True,
            lesson="a holder that outlived its lease found a newer token on the row: its write was refused and it "
            "started again; if every holder outlives its lease, nothing sells at all (safety, not progress)",
        ),
    ),
)

MODES: dict[str, Mode] = {mode.name: mode for mode in TABLE}
FIRST_LESSON = ("unlocked", "locked")  # the race and its cure: what `make demo` runs on one host
