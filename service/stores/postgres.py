"""The PostgreSQL store: the inventory, orders, idempotency keys and settings in one database every host shares.

Chosen by a ``postgresql://`` URL in ``TICKETLOCK_DATABASE_URL``. Each worker process opens its own connection
pool on first use, after gunicorn forked it (a pool made in the master would hand every worker the same
sockets). Plain SQL, one short named statement per step, parameters always bound.

A sale is one transaction: BEGIN, the hold against mode switches, the mode's guard, read, work, write, record the
order, COMMIT; the 201 goes out only after the commit. Every sale holds a *shared* advisory lock, and ``PUT /mode``
and ``POST /reset`` take it *exclusively*: a switch waits for the sales in flight, and a sale that began before a
switch finds out (the settings it reads under the hold are not its own) and starts again in the new mode. No
straggler of an unsafe mode can write after a safe mode took over.

A sale's statements go in round trips of several statements each (psycopg's pipeline mode): the first carries the
BEGIN, the hold, the settings in force, the guard's statement (``service/guards/``: the advisory lock, the row
lock, a bucket) and the read; the second the write, the order, the key and COMMIT. The ``atomic`` mode's
conditional write needs no read before it: its sale is one round trip. The round trips are counted from the
database's side by a test (``loadtest/database_proxy.py``).

Every wait is bounded: ``lock_timeout`` and ``statement_timeout`` end a purchase that waited too long for a
lock (503 lock_timeout, nothing sold) and ``idle_in_transaction_session_timeout`` ends the transaction of a
worker that stopped in the middle of one, releasing its locks. Those run on the server; a database that stops
answering altogether is bounded on this side (``watchdog.py``): each call may take TICKETLOCK_DATABASE_TIMEOUT,
plus the lock wait the server itself bounds, and past that its connection is cut and discarded (503
store_unavailable, or outcome_unknown if the COMMIT had been sent).
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import os
import select
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from typing import Any, ClassVar, NoReturn

import psycopg
from psycopg import errors
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from service.config import MAX_RACE_WINDOW_MS, Config
from service.deadline import Deadline
from service.errors import (
    Conflict,
    IdempotencyKeyReused,
    LockTimeout,
    LockUnavailable,
    OutcomeUnknown,
    SoldOut,
    StaleFence,
    StoreDamaged,
    StoreUnavailable,
)
from service.guards import NOTHING_SOLD, Ability, Holding
from service.modes import MODES, Feature, Isolation, Mode, Read, Write
from service.stores.base import (
    Feed,
    IdempotentRequest,
    Inventory,
    Order,
    RuntimeSettings,
    Sale,
    Store,
    settings_with,
    stamp_written,
)
from service.stores.watchdog import NoAnswer, answering_within

log = logging.getLogger(__name__)

# Advisory locks are named by two integers: ticketlock's own class, then one number per mutex.
LOCK_CLASS = 0x746B6C6B  # "tklk"
SWITCH_LOCK = 1  # shared by every purchase; exclusive for a mode switch or a reset
INVENTORY_LOCK = 2  # the advisory-lock mode's mutex
SCHEMA_LOCK = 3  # creating the tables, when several hosts start at once

# --- The tables ------------------------------------------------------------------------------------------------

CREATE_TABLES = f"""
SELECT pg_advisory_xact_lock({LOCK_CLASS}, {SCHEMA_LOCK});
CREATE TABLE IF NOT EXISTS inventory (
    id          integer PRIMARY KEY CHECK (id = 1),
    event       text    NOT NULL,
    total       bigint  NOT NULL CHECK (total >= 0),
    remaining   bigint  NOT NULL CHECK (remaining BETWEEN 0 AND total),
    version     bigint  NOT NULL DEFAULT 0,
    generation  text    NOT NULL DEFAULT md5(random()::text),
    fence       bigint  NOT NULL DEFAULT 0  -- the newest lease token that claimed the row (fenced-lease)
);
CREATE TABLE IF NOT EXISTS orders (
    seq         bigserial PRIMARY KEY,
    order_id    text    NOT NULL UNIQUE,
    buyer       text    NOT NULL,
    quantity    integer NOT NULL,
    remaining   bigint  NOT NULL,
    mode        text    NOT NULL,
    attempts    integer NOT NULL,
    worker_pid  integer NOT NULL,
    host        text    NOT NULL,
    started_at  double precision NOT NULL,
    read_at     double precision NOT NULL,
    wrote_at    double precision NOT NULL,
    fence       bigint,
    lease_until double precision
);
-- A database made before the lease modes gets their columns. Only then: ALTER TABLE locks the table against every
-- reader, and would queue them all behind any open sale.
DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM information_schema.columns WHERE table_name = 'inventory' AND column_name = 'fence') THEN
        ALTER TABLE inventory ADD COLUMN fence bigint NOT NULL DEFAULT 0;
        ALTER TABLE orders ADD COLUMN fence bigint, ADD COLUMN lease_until double precision;
    END IF;
END $$;
-- The writes the store refused because a newer lease token had claimed the row since (fenced-lease).
CREATE TABLE IF NOT EXISTS refusals (
    seq         bigserial PRIMARY KEY,
    buyer       text    NOT NULL,
    quantity    integer NOT NULL,
    remaining   bigint  NOT NULL,  -- what the refused write would have left
    fence       bigint  NOT NULL,
    newest      bigint  NOT NULL,
    worker_pid  integer NOT NULL,
    host        text    NOT NULL,
    started_at  double precision NOT NULL,
    read_at     double precision NOT NULL,
    refused_at  double precision NOT NULL,
    lease_until double precision
);
-- The buckets mode's buckets, which hold the count between them while that mode is in force.
CREATE TABLE IF NOT EXISTS buckets (
    id          integer PRIMARY KEY,
    remaining   bigint  NOT NULL CHECK (remaining >= 0)
);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key_digest  text PRIMARY KEY,
    fingerprint text NOT NULL,
    order_id    text NOT NULL REFERENCES orders (order_id)
);
CREATE TABLE IF NOT EXISTS settings (
    id              integer PRIMARY KEY CHECK (id = 1),
    mode            text    NOT NULL,
    race_window_ms  integer NOT NULL
)"""
# Only while no order is recorded: an inventory row recreated full under recorded orders would sell them again.
CREATE_INVENTORY = """
INSERT INTO inventory (id, event, total, remaining)
SELECT 1, %(event)s, %(total)s, %(total)s WHERE NOT EXISTS (SELECT 1 FROM orders)
ON CONFLICT (id) DO NOTHING"""
CREATE_SETTINGS = """
INSERT INTO settings (id, mode, race_window_ms) VALUES (1, %(mode)s, %(race_window_ms)s)
ON CONFLICT (id) DO NOTHING"""

# --- A purchase, step by step ----------------------------------------------------------------------------------
#
# A sale sends its statements in two round trips (psycopg's pipeline mode: several statements, one wait for their
# answers): BEGIN, the hold against switches, the settings in force, its guard's statement and its read; then its
# write, its order, its key and COMMIT. A sale whose write needs no read (the conditional write) sends one.

BEGIN = {
    Isolation.READ_COMMITTED: "BEGIN ISOLATION LEVEL READ COMMITTED",
    Isolation.REPEATABLE_READ: "BEGIN ISOLATION LEVEL REPEATABLE READ",
}
HOLD_AGAINST_SWITCHES = f"SELECT pg_advisory_xact_lock_shared({LOCK_CLASS}, {SWITCH_LOCK})"
READ_SETTINGS = "SELECT mode, race_window_ms FROM settings WHERE id = 1"
# Each statement of a read-committed transaction takes its own snapshot: the settings are read once the hold is
# granted, so a switch that committed while the sale waited for it is seen.
HOLD_AND_SETTINGS = [(HOLD_AGAINST_SWITCHES, None), (READ_SETTINGS, None)]
# A purchase's lock waits end at its deadline. lock_timeout bounds one wait, and one round trip may wait twice (for
# the hold, then for the guard): this sets it, for the rest of the transaction, to what is left of the deadline, given
# in milliseconds after the transaction began and counted on the server's clock. It goes before each statement that
# may wait.
LOCK_WAITS_UNTIL = """
SELECT set_config(
    'lock_timeout',
    greatest(1, %s - 1000 * extract(epoch FROM clock_timestamp() - transaction_timestamp()))::bigint::text,
    true
)"""
TAKE_ADVISORY_LOCK = f"SELECT pg_advisory_xact_lock({LOCK_CLASS}, {INVENTORY_LOCK})"
LOCK_ROW = "SELECT 1 FROM inventory WHERE id = 1 FOR UPDATE"

READ = "SELECT event, total, remaining, version FROM inventory WHERE id = 1"
# The count with its buckets: the row's and the buckets' together (one of the two holds it: ``_place_the_count``).
READ_WITH_BUCKETS = """
SELECT event, total, remaining + coalesce((SELECT sum(remaining) FROM buckets), 0)::bigint, version,
       coalesce((SELECT array_agg(remaining ORDER BY id) FROM buckets), '{}')
FROM inventory WHERE id = 1"""
# The buckets mode's guard: a bucket holding the quantity that no other sale holds, at random (a skip never waits);
# if every such bucket is busy, one of them, waited for; if none holds the quantity alone, every bucket with tickets.
# Every wait goes in the order of the buckets' ids, and a sale that goes on to take every bucket first lets go of
# those its wait passed over: two sales that took buckets in two orders could wait for each other in a circle.
TAKE_A_FREE_BUCKET = """
SELECT id, remaining FROM buckets WHERE remaining >= %(quantity)s
ORDER BY random() LIMIT 1 FOR UPDATE SKIP LOCKED"""
WAIT_FOR_A_BUCKET = """
SELECT id, remaining FROM buckets WHERE remaining >= %(quantity)s
ORDER BY id LIMIT 1 FOR UPDATE"""
TAKE_EVERY_BUCKET = "SELECT id, remaining FROM buckets WHERE remaining > 0 ORDER BY id FOR UPDATE"
# A wait that found no bucket holding the quantity may still hold buckets it passed over with fewer tickets, in no
# order that the others share: rolled back to before it, the sale holds none when it takes every bucket in order.
BEFORE_THE_WAIT = "SAVEPOINT before_the_wait"
BACK_TO_BEFORE_THE_WAIT = "ROLLBACK TO SAVEPOINT before_the_wait"

# Fencing: the read claims the row with the lease's token, and the write goes only where the row still carries it.
CLAIM = """
UPDATE inventory SET fence = %(fence)s WHERE id = 1 AND fence < %(fence)s
RETURNING event, total, remaining, version"""
NEWEST_FENCE = "SELECT fence FROM inventory WHERE id = 1"

# Step 4. Each write changes the count only while the sale's mode is in force (a sale that begins its transaction
# at its write learns there whether a switch came first) and returns the count it left; the order is recorded in
# the same statement, only if the write was made. So the write, the order, the key and COMMIT go in one round trip.
WHILE_IN_FORCE = "EXISTS (SELECT FROM settings WHERE id = 1 AND mode = %(sale_mode)s)"
WRITE_BLIND = f"UPDATE inventory SET remaining = %(remaining)s, version = version + 1 WHERE id = 1 AND {WHILE_IN_FORCE}"
WRITE_IF_VERSION = WRITE_BLIND + " AND version = %(version)s"
WRITE_FENCED = WRITE_BLIND + " AND fence = %(fence)s"
WRITE_IF_ENOUGH = f"""
UPDATE inventory SET remaining = remaining - %(quantity)s, version = version + 1
WHERE id = 1 AND remaining >= %(quantity)s AND {WHILE_IN_FORCE}"""
# The memory mode writes no count: it records its order under the row's lock, with its worker's copy of the count.
WRITE_NOTHING = f"SELECT %(remaining)s::bigint AS remaining FROM inventory WHERE id = 1 AND {WHILE_IN_FORCE} FOR UPDATE"
# The buckets mode writes the buckets its guard holds, each less what the sale takes from it, and returns the count
# it leaves: the buckets' sum as the statement sees it (every sale recorded before, whose commit the inventory row's
# lock waited for, and its own buckets before its write) less the quantity.
WRITE_BUCKETS = f"""
UPDATE buckets SET remaining = buckets.remaining - taken.quantity
FROM unnest(%(bucket_ids)s::integer[], %(bucket_quantities)s::bigint[]) AS taken (id, quantity)
WHERE buckets.id = taken.id AND {WHILE_IN_FORCE}
RETURNING (SELECT sum(remaining) FROM buckets)::bigint - %(quantity)s AS remaining"""
RETURNING_REMAINING = " RETURNING remaining"
# Every order is inserted while its transaction holds the inventory row's lock (each write of the row takes it; the
# memory mode's takes it without writing; the buckets mode's takes it with LOCK_ROW, before): orders therefore commit
# in the order of their seq, and a live view that asks for "the orders after seq N" never skips one that commits late.
RECORD_ORDER = """
INSERT INTO orders (order_id, buyer, quantity, remaining, mode, attempts, worker_pid, host,
                    started_at, read_at, wrote_at, fence, lease_until)
SELECT %(order_id)s, %(buyer)s, %(quantity)s, written.remaining, %(mode)s, %(attempts)s, %(worker_pid)s, %(host)s,
       %(started_at)s, %(read_at)s, %(wrote_at)s, %(fence)s::bigint, %(lease_until)s::double precision
FROM written LIMIT 1
RETURNING remaining"""


def _recorded_if_written(write: str) -> str:
    """One statement: ``write``, and the order recorded if it wrote (a write returns the count it left)."""
    return f"WITH written AS ({write}){RECORD_ORDER}"


WRITE_AND_RECORD = {
    Write.BLIND: _recorded_if_written(WRITE_BLIND + RETURNING_REMAINING),
    Write.IF_VERSION: _recorded_if_written(WRITE_IF_VERSION + RETURNING_REMAINING),
    Write.CONDITIONAL: _recorded_if_written(WRITE_IF_ENOUGH + RETURNING_REMAINING),
    Write.FENCED: _recorded_if_written(WRITE_FENCED + RETURNING_REMAINING),
    Write.MEMORY: _recorded_if_written(WRITE_NOTHING),
    Write.FROM_BUCKETS: _recorded_if_written(WRITE_BUCKETS),
}
RECORD_KEY = """
INSERT INTO idempotency_keys (key_digest, fingerprint, order_id)
SELECT %s, %s, order_id FROM orders WHERE order_id = %s"""
# A fenced write that found a newer token on the row is recorded as refused, with that token.
RECORD_REFUSAL_IF_STALE = """
INSERT INTO refusals (buyer, quantity, remaining, fence, newest, worker_pid, host, started_at, read_at, refused_at,
                      lease_until)
SELECT %(buyer)s, %(quantity)s, %(remaining)s, %(fence)s, fence, %(worker_pid)s, %(host)s, %(started_at)s,
       %(read_at)s, %(wrote_at)s, %(lease_until)s::double precision
FROM inventory WHERE id = 1 AND fence <> %(fence)s
RETURNING newest"""
COMMIT = "COMMIT"
ROLLBACK = "ROLLBACK"

ORDER_COLUMNS = (
    "order_id, buyer, quantity, remaining, mode, attempts, worker_pid, host, started_at, read_at, wrote_at, fence, "
    "lease_until"
)
FIND_REPLAY = f"""
SELECT k.fingerprint, {", ".join(f"o.{column}" for column in ORDER_COLUMNS.split(", "))}
FROM idempotency_keys k JOIN orders o USING (order_id) WHERE k.key_digest = %s"""

# --- Settings, resets and reading ------------------------------------------------------------------------------

TAKE_SWITCH_LOCK = f"SELECT pg_advisory_xact_lock({LOCK_CLASS}, {SWITCH_LOCK})"
WRITE_SETTINGS = """
INSERT INTO settings (id, mode, race_window_ms) VALUES (1, %(mode)s, %(race_window_ms)s)
ON CONFLICT (id) DO UPDATE SET mode = excluded.mode, race_window_ms = excluded.race_window_ms"""
CLEAR_ORDERS = "TRUNCATE idempotency_keys, orders, refusals"
# A missing row is made again, its version a clock reading (in microseconds): larger than any count of writes, so
# that the memory mode's copies of the count are loaded again. A reset also claims the row (fence + 1): no sale
# that claimed it before the reset can write after it.
RESTORE_INVENTORY = """
INSERT INTO inventory (id, event, total, remaining, version)
VALUES (1, %(event)s, %(total)s, %(total)s, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)
ON CONFLICT (id) DO UPDATE SET event = excluded.event, total = excluded.total, remaining = excluded.total,
                               version = inventory.version + 1, generation = md5(random()::text),
                               fence = inventory.fence + 1
RETURNING event, total, remaining, version"""
# Where the count lives: in the inventory row, or, while the buckets mode is in force, spread over the buckets
# (which exist only then). A switch or a reset moves it, with no sale in flight (``_place_the_count``).
COUNT_IN_BUCKETS = "SELECT EXISTS (SELECT FROM buckets)"
GATHER_THE_BUCKETS = """
UPDATE inventory SET remaining = remaining + (SELECT sum(remaining) FROM buckets)::bigint, version = version + 1
WHERE id = 1 AND EXISTS (SELECT FROM buckets)"""
CLEAR_BUCKETS = "DELETE FROM buckets"
SPREAD_OVER_BUCKETS = """
INSERT INTO buckets (id, remaining)
SELECT n, remaining / %(buckets)s + (n <= remaining %% %(buckets)s)::integer
FROM inventory, generate_series(1, %(buckets)s::integer) AS n WHERE inventory.id = 1"""
EMPTY_THE_ROW = "UPDATE inventory SET remaining = 0, version = version + 1 WHERE id = 1"
COUNT_ORDERS = "SELECT count(*) AS count FROM orders"
REFUSALS_SHOWN = 1000  # GET /refusals: the oldest ones, as many as a page can draw
REFUSALS = f"""
SELECT buyer, quantity, remaining, fence, newest, worker_pid, host, started_at, read_at, refused_at, lease_until
FROM refusals ORDER BY seq LIMIT {REFUSALS_SHOWN}"""
PAGE_OF_ORDERS = f"SELECT {ORDER_COLUMNS} FROM orders ORDER BY seq LIMIT %s OFFSET %s"
FIND_ORDER = f"SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = %s"
# One statement, one snapshot: the generation and the orders can never come from two sides of a reset.
FEED = f"""
SELECT i.generation, o.seq, {", ".join(f"o.{column}" for column in ORDER_COLUMNS.split(", "))}
FROM inventory i
LEFT JOIN LATERAL (
    SELECT * FROM orders
    WHERE seq > CASE WHEN i.generation = %(generation)s THEN %(after)s ELSE 0 END
    ORDER BY seq LIMIT %(limit)s
) o ON true
WHERE i.id = 1"""


class PostgresStore(Store):
    """The booking data in PostgreSQL, shared by every host; one connection pool per worker process."""

    kind = "postgres"
    features: ClassVar[frozenset[Feature]] = frozenset(
        {Ability.ADVISORY_LOCKS, Ability.ROW_LOCKS, Ability.BUCKETS, *Read, *Write, *Isolation}
    )

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        assert config.database_url is not None
        self.url = config.database_url
        self.timeout_s = config.database_timeout_s
        lock_ms = round(config.lock_timeout_s * 1000)
        self.tables_ready = False  # per worker process: this object is made in each worker (or copied at fork)
        self.count_seen: Inventory | None = None  # the count this worker read or wrote last (Read.SEEN)
        self.connection_options = {
            "autocommit": True,  # transactions are the explicit BEGIN ... COMMIT of each operation
            # No statement prepared by psycopg: it forgets them all at every ROLLBACK (a sale sold out, a conflict) and
            # then deallocates them (a round trip more), and in pipeline mode it can lose track of one it prepared.
            "prepare_threshold": None,
            "connect_timeout": max(2, math.ceil(config.database_timeout_s)),  # libpq's minimum is 2 s
            "application_name": f"ticketlock {config.host_name} master",
            # A sale may wait for a guard of the host (the file lock, the thread lock) inside its transaction.
            "options": (
                f"-c lock_timeout={lock_ms} -c statement_timeout={lock_ms + 1000} "
                f"-c idle_in_transaction_session_timeout={lock_ms + MAX_RACE_WINDOW_MS + 5000}"
            ),
        }

    # --- Life cycle ---------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the tables, the inventory and the settings unless another host already did."""
        try:
            with psycopg.connect(self.url, **self.connection_options) as connection:  # type: ignore[arg-type]
                self._create_tables(connection)
        except (psycopg.OperationalError, NoAnswer) as error:
            raise self._unreachable(error, "check TICKETLOCK_DATABASE_URL, and that the database is up") from None

    def _create_tables(self, connection: psycopg.Connection[Any]) -> None:
        with answering_within(connection, self.timeout_s + self.config.lock_timeout_s), connection.transaction():
            connection.execute(CREATE_TABLES)
            connection.execute(CREATE_INVENTORY, {"event": self.config.event, "total": self.config.tickets})
            connection.execute(CREATE_SETTINGS, vars(RuntimeSettings.configured(self.config)))
            settings = connection.execute(READ_SETTINGS).fetchone()
            if settings and settings[0] in MODES and self._misplaced(connection, MODES[settings[0]]):
                connection.execute(TAKE_SWITCH_LOCK)  # a store made in the buckets mode: no sale in flight
                self._place_the_count(connection, MODES[settings[0]])

    def _misplaced(self, connection: psycopg.Connection[Any], mode: Mode) -> bool:
        """Whether the count is not where ``mode`` sells from: the inventory row, or the buckets."""
        row = connection.execute(COUNT_IN_BUCKETS).fetchone()
        return _sells_from_buckets(mode) != bool(row and row[0])

    def _place_the_count(self, connection: psycopg.Connection[Any], mode: Mode) -> None:
        """Put the count where ``mode`` sells from, unless it is there: in the inventory row, or spread evenly over
        TICKETLOCK_BUCKETS buckets. Only while no sale is in flight: under the switch lock, taken exclusively."""
        if not self._misplaced(connection, mode):
            return
        connection.execute(GATHER_THE_BUCKETS)
        connection.execute(CLEAR_BUCKETS)
        if _sells_from_buckets(mode):
            connection.execute(SPREAD_OVER_BUCKETS, {"buckets": self.config.buckets})
            connection.execute(EMPTY_THE_ROW)

    def check(self) -> None:
        """A round trip to the database that finds its settings and inventory rows."""
        with self._connection() as connection:
            self._settings(connection.execute(READ_SETTINGS).fetchone())
            self._inventory(connection.execute(READ_WITH_BUCKETS).fetchone())

    def _unreachable(
        self, error: BaseException, advice: str = "nothing was sold or changed; retry shortly"
    ) -> StoreUnavailable:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return StoreUnavailable(
            f"The database at {self.config.masked_database_url} cannot be reached ({reason}): {advice}."
        )

    @contextmanager
    def _connection(self, waits_s: float | None = 0.0) -> Iterator[psycopg.Connection[Any]]:
        """A connection of this worker's pool; every database error becomes one of the service's own.

        The block's calls must answer within the database timeout, plus ``waits_s`` for the locks they may wait
        for (the server ends those waits itself); ``None`` for a sale, whose steps are bounded one by one, since
        between them it works or waits for a guard of the host.
        """
        try:
            with _pool_for(self, os.getpid()).connection(timeout=self.timeout_s) as connection:
                if not self.tables_ready:
                    self._create_tables(connection)  # a worker started without prepare(): flask run, plain gunicorn
                    self.tables_ready = True
                if waits_s is None:
                    yield connection
                else:
                    with answering_within(connection, self.timeout_s + waits_s):
                        yield connection
        except PoolTimeout as error:
            raise self._unreachable(error) from None
        except NoAnswer as silence:
            raise StoreUnavailable(
                f"The database at {self.config.masked_database_url} did not answer within {silence.seconds:.3g} s, "
                "and the connection was dropped: nothing was sold or changed; retry shortly."
            ) from None
        except (errors.LockNotAvailable, errors.QueryCanceled):
            raise LockTimeout(
                f"the database's lock stayed taken past the lock timeout ({self.config.lock_timeout_s:g} s); "
                f"{NOTHING_SOLD}. Retry shortly."
            ) from None
        except (errors.SerializationFailure, errors.DeadlockDetected, errors.UniqueViolation) as error:
            raise Conflict(str(error).splitlines()[0]) from None
        except psycopg.OperationalError as error:
            raise self._unreachable(error) from None

    def _open_pool(self) -> ConnectionPool[psycopg.Connection[Any]]:
        # Named after the worker, so that pg_stat_activity shows which host and which worker holds what.
        application_name = f"ticketlock {self.config.host_name} pid {os.getpid()}"
        pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            self.url,
            kwargs={**self.connection_options, "application_name": application_name},
            min_size=1,
            max_size=self.config.pool_size,
            open=False,
            timeout=self.timeout_s,
            check=_closed_by_server,
            # Give up a reconnection after a few seconds: the next request asks again at once, so the pool
            # recovers within seconds of the database's return instead of after a long backoff.
            reconnect_timeout=max(4.0, 2 * self.timeout_s),
            name=f"ticketlock-{os.getpid()}",
        )
        pool.open(wait=False)  # connects in the background: a database that is down now is not an error yet
        atexit.register(pool.close, timeout=1.0)
        return pool

    # --- Settings -------------------------------------------------------------------------------------------------

    @property
    def identity(self) -> str:
        return self.url

    def read_settings(self) -> RuntimeSettings:
        with self._connection() as connection:
            row = connection.execute(READ_SETTINGS).fetchone()
        return self._settings(row)

    def _settings(self, row: Any) -> RuntimeSettings:
        mode, window = row if row else (None, None)
        if mode not in MODES or not self.runs(MODES[mode]) or not isinstance(window, int):
            raise StoreDamaged(
                f"The settings row of {self.config.masked_database_url} is missing, or names a mode this store cannot "
                "run: PUT /mode writes it again (the configured mode and race window fill in what it leaves out), "
                "and so does POST /reset."
            )
        return RuntimeSettings(mode=mode, race_window_ms=window)

    def _settings_or_configured(self, connection: psycopg.Connection[Any]) -> RuntimeSettings:
        """The settings row, or the configured settings in place of a missing or damaged one (to write again)."""
        try:
            return self._settings(connection.execute(READ_SETTINGS).fetchone())
        except StoreDamaged:
            return RuntimeSettings.configured(self.config)

    def _inventory(self, row: Any) -> Inventory:
        row = self._inventory_row(row)
        event, total, remaining, version, *buckets = row  # and what each bucket holds, where it was asked for
        return Inventory(event, total, remaining, version, tuple(buckets[0]) if buckets else ())

    def _inventory_row(self, row: Any) -> Any:
        """A row read from the inventory; StoreDamaged if there was none."""
        if row is None:
            raise self._missing_inventory()
        return row

    def _missing_inventory(self) -> StoreDamaged:
        return StoreDamaged(
            f"The inventory row of {self.config.masked_database_url} is missing. It is never made again with every "
            "ticket for sale while orders are recorded (they would be sold twice): POST /reset makes it again, "
            "and clears every order."
        )

    def change_settings(self, change: Mapping[str, Any]) -> RuntimeSettings:
        """Wait for every purchase in flight, on every host, then switch (writing a missing settings row again), and
        put the count where the new mode sells from."""
        with self._connection(waits_s=self.config.lock_timeout_s) as connection, connection.transaction():
            connection.execute(TAKE_SWITCH_LOCK)
            settings = settings_with(self._settings_or_configured(connection), change)
            connection.execute(WRITE_SETTINGS, vars(settings))
            self._place_the_count(connection, MODES[settings.mode])
        self.seen = settings
        return settings

    # --- Inventory and orders -------------------------------------------------------------------------------------

    def read_inventory(self) -> Inventory:
        with self._connection() as connection:
            return self._inventory(connection.execute(READ_WITH_BUCKETS).fetchone())

    def reset(self, tickets: int | None, event: str | None) -> Inventory:
        """With no purchase in flight on any host: no orders, no keys, the count restored, a new generation.

        A missing inventory or settings row is made again (from the configuration, where the request says nothing).
        """
        with self._connection(waits_s=self.config.lock_timeout_s) as connection, connection.transaction():
            connection.execute(TAKE_SWITCH_LOCK)
            settings = self._settings_or_configured(connection)
            connection.execute(WRITE_SETTINGS, vars(settings))
            row = connection.execute(READ).fetchone()
            current = self._inventory(row) if row else Inventory.full(self.config.event, self.config.tickets)
            connection.execute(CLEAR_ORDERS)
            connection.execute(CLEAR_BUCKETS)
            fresh = {"event": event or current.event, "total": current.total if tickets is None else tickets}
            connection.execute(RESTORE_INVENTORY, fresh)
            self._place_the_count(connection, MODES[settings.mode])
            self.count_seen = self._inventory(connection.execute(READ_WITH_BUCKETS).fetchone())
            return self.count_seen

    def orders_page(self, limit: int, offset: int) -> tuple[int, list[Order]]:
        with self._connection() as connection:
            connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")  # one snapshot for both
            count = connection.execute(COUNT_ORDERS).fetchone()
            rows = connection.execute(PAGE_OF_ORDERS, (limit, offset)).fetchall()
            connection.execute(COMMIT)
        return (count[0] if count else 0), [_order(row) for row in rows]

    def feed(self, cursor: str, limit: int) -> Feed:
        generation, _, after = cursor.rpartition(".")
        with self._connection() as connection:
            rows = connection.execute(
                FEED, {"generation": generation, "after": int(after or 0), "limit": limit}
            ).fetchall()
        current = rows[0][0] if rows else ""
        reset = bool(cursor) and generation != current
        orders = [row[2:] for row in rows if row[1] is not None]
        last = rows[-1][1] if orders else (0 if reset or not cursor else int(after))
        return Feed(cursor=f"{current}.{last}", reset=reset, orders=[_order(row) for row in orders])

    def refusals(self) -> list[dict[str, Any]]:
        with self._connection() as connection, connection.cursor(row_factory=dict_row) as cursor:
            rows = cursor.execute(REFUSALS).fetchall()
        return [{**row, "store": self.kind} for row in rows]

    def find_order(self, order_id: str) -> Order | None:
        with self._connection() as connection:
            row = connection.execute(FIND_ORDER, (order_id,)).fetchone()
        return _order(row) if row else None

    # --- Sales --------------------------------------------------------------------------------------------------

    @contextmanager
    def begin_sale(self, settings: RuntimeSettings, quantity: int, deadline: Deadline) -> Iterator[Sale]:
        """A sale on a connection of this worker's pool. Its BEGIN, its hold against switches and the check that
        ``settings`` are still in force go with its first statement (``PostgresSale``): a switch that came first
        raises SettingsChanged there.

        The sale's write commits, inside the mode's guard: a guard of the host (the file lock, the thread lock) lets
        the next buyer read only once this sale's count is visible. A sale that ends without writing (sold out, a
        replayed key, an error) rolls back.
        """
        with self._connection(waits_s=None) as connection:
            sale = PostgresSale(self, connection, settings, quantity, deadline)
            try:
                yield sale
            except (LockTimeout, LockUnavailable):
                if not sale.begun and not deadline.passed:  # a guard of the host or a lock service gave up early
                    with answering_within(connection, self.timeout_s):  # SettingsChanged if a switch came first
                        self.check_in_force(settings, self._settings(connection.execute(READ_SETTINGS).fetchone()))
                raise
            finally:
                self._roll_back_unfinished(connection)

    def _roll_back_unfinished(self, connection: psycopg.Connection[Any]) -> None:
        """Roll back the transaction a sale left open. A connection that cannot is closed (its pool replaces it),
        never raising: what the sale raised, or returned, is what the buyer hears (a sale whose COMMIT may have
        run must answer outcome_unknown, not "nothing was sold")."""
        if connection.broken or connection.info.transaction_status == TransactionStatus.IDLE:
            return
        try:
            with answering_within(connection, self.timeout_s):
                connection.execute(ROLLBACK)
        except (psycopg.Error, NoAnswer):
            connection.close()


Statement = tuple[str, Any]  # a query and its parameters (None for none)


class PostgresSale(Sale):
    """A sale's statements, sent in as few round trips as its steps allow (psycopg's pipeline mode).

    The first round trip carries what the sale still owes the database, ahead of its own statement: BEGIN, the
    shared hold against switches, the settings in force (read once the hold is granted), and the statements its guard
    asked for (the advisory lock, the row lock, a bucket), so that the guard is held from there on, before the read.
    The write goes with the order, the key and COMMIT. A conditional write needs no read
    before it (``Read.SEEN``): the atomic mode's sale is one round trip.

    A fenced sale is not one transaction: the read claims the row with the lease's token in a statement of its own,
    committed as it runs, so that a newer holder can claim it while this one works; the write begins again (holding
    off switches, and checking the mode anew) and writes only where the row still carries the token.
    """

    store: PostgresStore

    def __init__(
        self,
        store: PostgresStore,
        connection: psycopg.Connection[Any],
        settings: RuntimeSettings,
        quantity: int,
        deadline: Deadline,
    ) -> None:
        super().__init__(store, settings, quantity, deadline)
        self.connection = connection
        self.begun = False  # whether its BEGIN and hold were sent
        self.deadline_ms = 0  # the purchase's deadline, in milliseconds after its transaction began
        self.guard_statements: list[Statement] = []
        self.wants_a_bucket = False  # the buckets mode's guard asked for one
        self.taken: list[tuple[int, int]] = []  # (bucket, tickets): what the write takes from the buckets it holds
        self.read_ahead: list[psycopg.Cursor[Any]] = []  # a read sent ahead, with the key's lookup

    def take_advisory_lock(self) -> None:
        self.guard_statements.append((TAKE_ADVISORY_LOCK, None))

    def lock_inventory_row(self) -> None:
        self.guard_statements.append((LOCK_ROW, None))

    def lock_a_bucket(self) -> None:
        self.wants_a_bucket = True  # taken with the read: which bucket, and how, depends on what it answers

    def answering(self) -> AbstractContextManager[None]:
        """The sale's next round trips: they may wait for a lock until the purchase's deadline (the server ends
        those waits there), and then have the database timeout to answer."""
        return answering_within(self.connection, self.store.timeout_s + self.deadline.left())

    # --- Round trips ------------------------------------------------------------------------------------------

    def _round_trip(
        self, *statements: Statement, commits: str | None = None, waits: bool = True
    ) -> list[psycopg.Cursor[Any]]:
        """``statements`` (then COMMIT, if it ``commits`` that order) after what the sale still owes the database,
        in one round trip: their cursors. Statements that never wait for a lock (``waits=False``: a read, a take
        that skips locked rows) need no new lock timeout, unless a guard's statement goes with them.

        A round trip that begins the transaction reads the settings in force once the hold is granted: SettingsChanged
        if they are not the sale's. Nothing was written then: its statements read, or write only while the sale's
        mode is in force. A write made in the mode in force stands; only the race window may have moved, and the work
        is done, so that is only noted.
        """
        if not self.begun:  # the deadline, in milliseconds after the BEGIN sent now
            self.deadline_ms = max(1, math.ceil(self.deadline.left() * 1000))  # 1: a lock_timeout of 0 is no limit
        lock_waits: Statement = (LOCK_WAITS_UNTIL, (self.deadline_ms,))
        begins = not self.begun
        opening = [(BEGIN[self.mode.isolation], None), lock_waits, *HOLD_AND_SETTINGS] if begins else []
        if waits or self.guard_statements:
            opening.append(lock_waits)
        ending = [(COMMIT, None)] if commits else []
        sent = [*opening, *self.guard_statements, *statements, *ending]
        self.begun, self.guard_statements = True, []
        cursors = self._send(sent, commits)
        if begins:
            in_force = self.store._settings(cursors[len(HOLD_AND_SETTINGS) + 1].fetchone())
            mode_still_in_force = commits is not None and in_force.mode == self.settings.mode  # and its write stands
            self.store.check_in_force(in_force if mode_still_in_force else self.settings, in_force)
        return cursors[len(sent) - len(statements) - len(ending) : len(sent) - len(ending)]

    def _send(self, statements: list[Statement], order_id: str | None = None) -> list[psycopg.Cursor[Any]]:
        """One round trip; with ``order_id``, it commits that order: OutcomeUnknown, naming it, if the session ends
        on the way (the connection breaks, or the server ends it), since the COMMIT may or may not have run. A
        statement the server refused in a session that goes on aborted the transaction: nothing was written."""
        with self.answering():
            try:
                return _pipelined(self.connection, statements)
            except psycopg.OperationalError as error:
                ended = self.connection.broken or error.sqlstate is None or error.diag.severity in ("FATAL", "PANIC")
                if order_id is None or not ended:
                    raise
                raise OutcomeUnknown(
                    f"The connection broke while order {order_id} was being committed ({error}): it may "
                    f"or may not stand. GET /orders/{order_id} tells."
                ) from None

    # --- The steps --------------------------------------------------------------------------------------------

    def find_replay(self, request: IdempotentRequest) -> Order | None:
        # The key is looked up with the sale's first statements (under the guard's lock where one was asked for before;
        # a bucket is taken after it, in the same round trip); the read goes with it, as it would come right after.
        replay, *self.read_ahead = self._round_trip(
            (FIND_REPLAY, (request.digest,)), *self._read_statements(), waits=False
        )
        row = replay.fetchone()
        if row is None:
            return None
        fingerprint, *order = row
        if fingerprint != request.fingerprint:
            raise IdempotencyKeyReused(
                "This Idempotency-Key was already used with a different body; use a new key for a new order."
            )
        return _order(order)

    def _read_statements(self) -> list[Statement]:
        """What a read of the count sends: the row, or a bucket with its guard's lock and the buckets' sum."""
        if self.mode.read not in (Read.PLAIN, Read.MEMORY):
            return []  # a claim goes alone, and a read of the count seen goes nowhere
        if self.wants_a_bucket:
            return [(TAKE_A_FREE_BUCKET, {"quantity": self.quantity}), (READ_WITH_BUCKETS, None)]
        return [(READ, None)]

    def read_stored(self, how: Read, holding: Holding) -> Inventory:
        if how is Read.CLAIM:
            return self._claim(_fence_of(holding))
        if how is Read.SEEN and (seen := self.store.count_seen) and seen.remaining >= self.quantity:
            return seen  # the conditional write checks the count itself: sold out is never answered from a guess
        read = self._read_statements() or [(READ, None)]
        cursors, self.read_ahead = self.read_ahead or self._round_trip(*read, waits=False), []
        if self.wants_a_bucket:
            return self._take_buckets(*cursors)
        self.store.count_seen = self.store._inventory(cursors[0].fetchone())
        return self.store.count_seen

    def _take_buckets(self, free: psycopg.Cursor[Any], read: psycopg.Cursor[Any]) -> Inventory:
        """The buckets the sale takes its tickets from, locked: a free one, else a busy one waited for, else every
        bucket; and the count, their sum (exact when every bucket is held: sold out is then checked, not guessed)."""
        inventory = self.store._inventory(read.fetchone())
        held = free.fetchall()
        if not held:
            _, waited = self._round_trip((BEFORE_THE_WAIT, None), (WAIT_FOR_A_BUCKET, {"quantity": self.quantity}))
            held = waited.fetchall()
        if not held:  # no bucket holds the quantity alone: let go of those the wait passed over, then take them all
            _, every = self._round_trip((BACK_TO_BEFORE_THE_WAIT, None), (TAKE_EVERY_BUCKET, None))
            held = every.fetchall()
            inventory = replace(inventory, remaining=sum(count for _, count in held))
        self.taken = _take_from(held, self.quantity)
        return inventory

    def _claim(self, fence: int) -> Inventory:
        """Claim the row with ``fence``, committed as it runs; StaleFence if a newer token claimed it already.

        It goes in a transaction of its own, so that the row's lock lasts only while the server runs it, and a
        holder stopped right after cannot keep the next holder waiting; the settings in force are read after it, so
        that a switch the claim waited for (one that moved the count into the buckets) is seen. A transaction begun
        before (to look up a key) ends first.
        """
        ending: list[Statement] = [(COMMIT, None)] if self.begun else []
        *_, claimed, in_force = self._send([*ending, (CLAIM, {"fence": fence}), (READ_SETTINGS, None)])
        self.begun = False  # the write begins a new transaction
        self.store.check_in_force(self.settings, self.store._settings(in_force.fetchone()))
        row = claimed.fetchone()
        if row is None:
            [found] = self._send([(NEWEST_FENCE, None)])
            newest = int(self.store._inventory_row(found.fetchone())[0])
            raise StaleFence(f"the inventory was claimed by token {newest}, newer than this holder's {fence}", newest)
        return self.store._inventory(row)

    def write_stored(
        self, how: Write, before: Inventory, order: Order, request: IdempotentRequest | None, holding: Holding
    ) -> Order:
        """The write, the order, the key and COMMIT in one round trip (after the sale's BEGIN and hold, for a sale
        that sent nothing before)."""
        stamp_written(order)  # sent now, and recorded with the write in one statement
        values = {
            **order,
            **order["timing"],
            "sale_mode": self.settings.mode,
            "version": before.version,
            "bucket_ids": [bucket for bucket, _ in self.taken],
            "bucket_quantities": [tickets for _, tickets in self.taken],
        }
        # The buckets mode's orders, too, are recorded in turn, under the inventory row's lock (RECORD_ORDER says why).
        in_turn: list[Statement] = [(LOCK_ROW, None)] if how is Write.FROM_BUCKETS else []
        statements = [*in_turn, (WRITE_AND_RECORD[how], values)]
        if request is not None:
            statements.append((RECORD_KEY, (request.digest, request.fingerprint, order["order_id"])))
        if how is Write.FENCED:
            statements.append((RECORD_REFUSAL_IF_STALE, values))
        cursors = self._round_trip(*statements, commits=order["order_id"])
        row = cursors[len(in_turn)].fetchone()
        if row is None:
            self._nothing_written(how, before, order, refused=cursors[-1])
        self.store.count_seen = replace(before, remaining=row[0])
        return {**order, "remaining": row[0]}

    def _nothing_written(self, how: Write, before: Inventory, order: Order, refused: psycopg.Cursor[Any]) -> NoReturn:
        """Raise what a write that wrote nothing means, its mode being in force (the settings were checked)."""
        if how is Write.IF_VERSION:
            raise Conflict(f"the inventory changed since version {before.version} was read")
        if how is Write.CONDITIONAL:
            raise SoldOut(f"Sold out: fewer than {order['quantity']} left when the order was written.")
        if how is Write.FENCED and (newest := refused.fetchone()):
            message = f"token {order['fence']} was superseded by {newest[0]} before this holder wrote"
            raise StaleFence(message, newest[0])
        raise self.store._missing_inventory()  # a blind write finds no row only where it was deleted


def _fence_of(holding: Holding) -> int:
    """The token of a guard that hands one out; only a lease does, and only lease modes fence."""
    assert holding.fence is not None, "a fenced read or write needs a guard that hands out a fencing token"
    return holding.fence


@functools.cache
def _pool_for(store: PostgresStore, pid: int) -> ConnectionPool[psycopg.Connection[Any]]:
    # One pool per store and worker process, opened on first use: keyed by pid, so a pool that a --preload
    # master opened is never the one a worker uses.
    return store._open_pool()


def _closed_by_server(connection: psycopg.Connection[Any]) -> None:
    """The pool's check of a connection it hands out, without a round trip to the database.

    An idle connection has nothing to read, unless the server ended it (a restart, pg_terminate_backend) and its
    goodbye waits on the socket: then the pool drops it and takes another, instead of failing a buyer's
    first statement.
    """
    readable, _, _ = select.select([connection.fileno()], [], [], 0)
    if readable:
        connection.close()  # so that the pool replaces it rather than hand it out again
        raise psycopg.OperationalError("the server closed this idle connection")


def _pipelined(connection: psycopg.Connection[Any], statements: list[Statement]) -> list[psycopg.Cursor[Any]]:
    """Run ``statements`` in one round trip (psycopg's pipeline mode): their cursors, or the first error one met.

    psycopg raises an error as soon as it reads it, which may be while later statements are still being queued: the
    queuing stops there, and the pipeline ends by itself (its skipped statements' errors are not the news).
    """
    cursors: list[psycopg.Cursor[Any]] = []
    first: psycopg.Error | None = None
    try:
        with connection.pipeline():
            for query, parameters in statements:
                try:
                    cursors.append(connection.execute(query, parameters))
                except psycopg.Error as error:
                    first = error
                    break
    except psycopg.Error:
        if first is None:
            raise
    if first is not None:
        raise first
    return cursors


def _take_from(held: list[tuple[int, int]], quantity: int) -> list[tuple[int, int]]:
    """(bucket, tickets) taken from the ``held`` (bucket, count) pairs: the fullest first, until ``quantity``."""
    taken: list[tuple[int, int]] = []
    for bucket, count in sorted(held, key=lambda pair: -pair[1]):
        tickets = min(count, quantity)
        if tickets > 0:
            taken.append((bucket, tickets))
            quantity -= tickets
    return taken


def _sells_from_buckets(mode: Mode) -> bool:
    """Whether ``mode`` sells from the buckets (its guard asks for them) rather than from the inventory row."""
    return Ability.BUCKETS in mode.needs()


def _order(row: Any) -> Order:
    (order_id, buyer, quantity, remaining, mode, attempts, worker_pid, host) = row[:8]
    started_at, read_at, wrote_at, fence, lease_until = row[8:]
    return {
        "order_id": order_id,
        "buyer": buyer,
        "quantity": quantity,
        "remaining": remaining,
        "mode": mode,
        "attempts": attempts,
        "fence": fence,
        "worker_pid": worker_pid,
        "host": host,
        "store": PostgresStore.kind,
        "timing": {"started_at": started_at, "read_at": read_at, "lease_until": lease_until, "wrote_at": wrote_at},
    }
