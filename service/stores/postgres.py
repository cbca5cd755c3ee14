"""The PostgreSQL store: the inventory, orders, idempotency keys and settings in one database every host shares.

Chosen by a ``postgresql://`` URL in ``TICKETLOCK_DATABASE_URL``. Each worker process opens its own connection
pool on first use, after gunicorn forked it (a pool made in the master would hand every worker the same
sockets). Plain SQL, one short named statement per step, parameters always bound.

A sale is one transaction: BEGIN, the hold against mode switches, the mode's guard, read, work, write,
record the order, COMMIT; the 201 goes out only after the commit. Every sale holds a *shared* advisory lock,
and ``PUT /mode`` and ``POST /reset`` take it *exclusively*: a switch waits for the sales in flight, and a sale
that began before a switch finds out (the mode it reads under the hold is not its own) and starts again in the
new mode. No straggler of an unsafe mode can write after a safe mode took over.

The database's guards (``service/guards/``) ask the sale for its advisory lock or its row lock; the sale sends
that statement together with the read, in one round trip.

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
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any, ClassVar

import psycopg
from psycopg import errors, sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from service.config import MAX_RACE_WINDOW_MS, Config
from service.deadline import Deadline
from service.errors import (
    Conflict,
    IdempotencyKeyReused,
    LockTimeout,
    OutcomeUnknown,
    SoldOut,
    StaleFence,
    StoreDamaged,
    StoreUnavailable,
)
from service.guards import NOTHING_SOLD, Ability, Holding
from service.modes import Feature, Isolation, Mode, Read, Write
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

BEGIN = {
    Isolation.READ_COMMITTED: "BEGIN ISOLATION LEVEL READ COMMITTED",
    Isolation.REPEATABLE_READ: "BEGIN ISOLATION LEVEL REPEATABLE READ",
}
HOLD_AGAINST_SWITCHES = f"SELECT pg_advisory_xact_lock_shared({LOCK_CLASS}, {SWITCH_LOCK})"
MODE_IN_FORCE = "SELECT mode FROM settings WHERE id = 1"
# A purchase's lock waits end at its deadline: this goes first in each round trip that may wait for a lock, with
# the milliseconds left (a literal: SET takes no bound parameters), and lasts until the transaction ends.
LOCK_WAITS_UNTIL = "SET LOCAL lock_timeout = {}"
TAKE_ADVISORY_LOCK = f"SELECT pg_advisory_xact_lock({LOCK_CLASS}, {INVENTORY_LOCK})"

READ = "SELECT event, total, remaining, version FROM inventory WHERE id = 1"
LOCK_ROW = "SELECT 1 FROM inventory WHERE id = 1 FOR UPDATE"

WRITE_BLIND = "UPDATE inventory SET remaining = %(remaining)s, version = version + 1 WHERE id = 1"
WRITE_IF_VERSION = WRITE_BLIND + " AND version = %(version)s"
# Fencing: the read claims the row with the lease's token, and the write goes only where the row still carries it.
CLAIM = """
UPDATE inventory SET fence = %(fence)s WHERE id = 1 AND fence < %(fence)s
RETURNING event, total, remaining, version"""
WRITE_FENCED = WRITE_BLIND + " AND fence = %(fence)s"
NEWEST_FENCE = "SELECT fence FROM inventory WHERE id = 1"
RECORD_REFUSAL = """
INSERT INTO refusals (buyer, quantity, remaining, fence, newest, worker_pid, host, started_at, read_at, refused_at,
                      lease_until)
VALUES (%(buyer)s, %(quantity)s, %(remaining)s, %(fence)s, %(newest)s, %(worker_pid)s, %(host)s, %(started_at)s,
        %(read_at)s, %(refused_at)s, %(lease_until)s)"""
WRITE_IF_ENOUGH = """
UPDATE inventory SET remaining = remaining - %(quantity)s, version = version + 1
WHERE id = 1 AND remaining >= %(quantity)s
RETURNING remaining"""
# Every order is inserted while its transaction holds the inventory row's lock (each write above takes it, and
# the memory mode, which writes no count, takes it with LOCK_ROW): orders therefore commit in the order of their seq,
# and a live view that asks for "the orders after seq N" never skips one that commits late.
INSERT_ORDER = """
INSERT INTO orders (order_id, buyer, quantity, remaining, mode, attempts, worker_pid, host,
                    started_at, read_at, wrote_at, fence, lease_until)
VALUES (%(order_id)s, %(buyer)s, %(quantity)s, %(remaining)s, %(mode)s, %(attempts)s, %(worker_pid)s, %(host)s,
        %(started_at)s, %(read_at)s, %(wrote_at)s, %(fence)s, %(lease_until)s)"""
INSERT_KEY = "INSERT INTO idempotency_keys (key_digest, fingerprint, order_id) VALUES (%s, %s, %s)"
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

READ_SETTINGS = "SELECT mode, race_window_ms FROM settings WHERE id = 1"
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
        {Ability.ADVISORY_LOCKS, Ability.ROW_LOCKS, *Read, *Write, *Isolation}
    )

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        assert config.database_url is not None
        self.url = config.database_url
        self.timeout_s = config.database_timeout_s
        lock_ms = round(config.lock_timeout_s * 1000)
        self.tables_ready = False  # per worker process: this object is made in each worker (or copied at fork)
        self.connection_options = {
            "autocommit": True,  # transactions are the explicit BEGIN ... COMMIT of each operation
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

    def check(self) -> None:
        """A round trip to the database that finds its settings and inventory rows."""
        with self._connection() as connection:
            self._settings(connection.execute(READ_SETTINGS).fetchone())
            self._inventory(connection.execute(READ).fetchone())

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
        if mode not in {mode.name for mode in self.available_modes()} or not isinstance(window, int):
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
        if row is None:
            raise StoreDamaged(
                f"The inventory row of {self.config.masked_database_url} is missing. It is never made again with every "
                "ticket for sale while orders are recorded (they would be sold twice): POST /reset makes it again, "
                "and clears every order."
            )
        event, total, remaining, version = row
        return Inventory(event=event, total=total, remaining=remaining, version=version)

    def change_settings(self, change: Mapping[str, Any]) -> RuntimeSettings:
        """Wait for every purchase in flight, on every host, then switch (writing a missing settings row again)."""
        with self._connection(waits_s=self.config.lock_timeout_s) as connection, connection.transaction():
            connection.execute(TAKE_SWITCH_LOCK)
            settings = settings_with(self._settings_or_configured(connection), change)
            connection.execute(WRITE_SETTINGS, vars(settings))
        return settings

    # --- Inventory and orders -------------------------------------------------------------------------------------

    def read_inventory(self) -> Inventory:
        with self._connection() as connection:
            return self._inventory(connection.execute(READ).fetchone())

    def reset(self, tickets: int | None, event: str | None) -> Inventory:
        """With no purchase in flight on any host: no orders, no keys, the count restored, a new generation.

        A missing inventory or settings row is made again (from the configuration, where the request says nothing).
        """
        with self._connection(waits_s=self.config.lock_timeout_s) as connection, connection.transaction():
            connection.execute(TAKE_SWITCH_LOCK)
            connection.execute(WRITE_SETTINGS, vars(self._settings_or_configured(connection)))
            row = connection.execute(READ).fetchone()
            current = self._inventory(row) if row else Inventory.full(self.config.event, self.config.tickets)
            connection.execute(CLEAR_ORDERS)
            fresh = {"event": event or current.event, "total": current.total if tickets is None else tickets}
            return self._inventory(connection.execute(RESTORE_INVENTORY, fresh).fetchone())

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
    def begin_sale(self, mode: Mode, deadline: Deadline) -> Iterator[Sale]:
        """BEGIN, the hold against switches, and a check that ``mode`` is still in force.

        The sale's write commits, inside the mode's guard: a guard of the host (the file lock, the thread lock)
        lets the next buyer read only once this sale's count is visible. A sale that ends without writing (sold
        out, a replayed key, an error) rolls back.
        """
        with self._connection(waits_s=None) as connection:
            sale = PostgresSale(self, connection, deadline, mode)
            try:
                sale.begin()
                yield sale
            finally:
                if not sale.ended and not connection.broken:
                    with answering_within(connection, self.timeout_s):
                        connection.execute(ROLLBACK)


class PostgresSale(Sale):
    """A sale's statements, inside the transaction ``PostgresStore.begin_sale`` began.

    A guard's statement (the advisory lock, the row lock) waits for the sale's next statement and goes with it
    in one round trip: the guard is held from that statement on, before the read.

    A fenced sale is not one transaction: the read claims the row with the lease's token in a statement of its
    own, committed as it runs, so that a newer holder can claim it while this one works; the write begins again
    (holding off switches, and checking the mode anew) and writes only where the row still carries the token.
    """

    store: PostgresStore

    def __init__(
        self, store: PostgresStore, connection: psycopg.Connection[Any], deadline: Deadline, mode: Mode
    ) -> None:
        super().__init__(store, deadline)
        self.connection = connection
        self.mode = mode
        self.guard_statements: list[str] = []
        self.ended = False  # committed, or refused by the database at commit

    def begin(self) -> None:
        """BEGIN, the shared hold against switches, and the mode in force, in one round trip.

        Each statement of a query string takes its own snapshot (read committed), so the mode is read after the
        hold was granted: a switch that committed while this purchase waited is seen.
        """
        start = _one_round_trip(
            BEGIN[self.mode.isolation], _lock_waits_until(self.deadline), HOLD_AGAINST_SWITCHES, MODE_IN_FORCE
        )
        with self.answering():
            in_force = _last_row(self.connection, start)
        self.ended = False
        if not in_force or in_force[0] != self.mode.name:
            raise Conflict(f"the mode changed to {in_force[0] if in_force else None!r}")

    def take_advisory_lock(self) -> None:
        self.guard_statements.append(TAKE_ADVISORY_LOCK)

    def lock_inventory_row(self) -> None:
        self.guard_statements.append(LOCK_ROW)

    def answering(self) -> AbstractContextManager[None]:
        """The sale's next round trips: they may wait for a lock until the purchase's deadline (the server ends
        those waits there), and then have the database timeout to answer."""
        return answering_within(self.connection, self.store.timeout_s + self.deadline.left())

    def _send_guard_statements(self) -> None:
        if self.guard_statements:
            self.connection.execute(_one_round_trip(_lock_waits_until(self.deadline), *self.guard_statements))
            self.guard_statements.clear()

    def find_replay(self, request: IdempotentRequest) -> Order | None:
        with self.answering(), self.connection.cursor(row_factory=dict_row) as cursor:
            self._send_guard_statements()  # the key is looked up under the guard
            row = cursor.execute(FIND_REPLAY, (request.digest,)).fetchone()
        if row is None:
            return None
        if row.pop("fingerprint") != request.fingerprint:
            raise IdempotencyKeyReused(
                "This Idempotency-Key was already used with a different body; use a new key for a new order."
            )
        return _order(tuple(row.values()))

    def read_stored(self, how: Read, holding: Holding) -> Inventory:
        if how is Read.CLAIM:
            return self._claim(_fence_of(holding))
        statements = _one_round_trip(_lock_waits_until(self.deadline), *self.guard_statements, READ)
        self.guard_statements.clear()
        with self.answering():
            return self.store._inventory(_last_row(self.connection, statements))

    def _claim(self, fence: int) -> Inventory:
        """Claim the row with ``fence``, committed as it runs; StaleFence if a newer token claimed it already.

        The sale's first transaction ends before: the claim runs on its own, so that the row's lock lasts only
        while the server runs it, and a holder stopped right after cannot keep the next holder waiting.
        """
        with self.answering():
            self._commit()
            row = self.connection.execute(CLAIM, {"fence": fence}).fetchone()
            if row is None:
                newest = self._newest_fence()
                raise StaleFence(
                    f"the inventory was claimed by token {newest}, newer than this holder's {fence}", newest
                )
        return self.store._inventory(row)

    def _newest_fence(self) -> int:
        row = self.connection.execute(NEWEST_FENCE).fetchone()
        return int(row[0]) if row else 0

    def write_stored(
        self, how: Write, before: Inventory, order: Order, request: IdempotentRequest | None, holding: Holding
    ) -> Order:
        if how is Write.FENCED:
            self.begin()  # the claim ended the first transaction: a new one, holding off switches again
        with self.answering():
            return self._write(how, before, order, request, holding)

    def _write(
        self, how: Write, before: Inventory, order: Order, request: IdempotentRequest | None, holding: Holding
    ) -> Order:
        if how is Write.BLIND:
            self.connection.execute(WRITE_BLIND, {"remaining": order["remaining"]})
        elif how is Write.IF_VERSION:
            written = self.connection.execute(
                WRITE_IF_VERSION, {"remaining": order["remaining"], "version": before.version}
            )
            if written.rowcount == 0:
                raise Conflict(f"the inventory changed since version {before.version} was read")
        elif how is Write.CONDITIONAL:
            row = self.connection.execute(WRITE_IF_ENOUGH, {"quantity": order["quantity"]}).fetchone()
            if row is None:
                raise SoldOut(f"Sold out: fewer than {order['quantity']} left when the order was written.")
            order = {**order, "remaining": row[0]}
        elif how is Write.FENCED:
            self._write_fenced(order, _fence_of(holding))
        else:
            self.connection.execute(LOCK_ROW)  # the memory mode writes no count, but records under the row's lock
        stamp_written(order)
        self.connection.execute(INSERT_ORDER, {**order, **order["timing"]})
        if request is not None:
            self.connection.execute(INSERT_KEY, (request.digest, request.fingerprint, order["order_id"]))
        self._commit(order["order_id"])
        return order

    def _write_fenced(self, order: Order, fence: int) -> None:
        """Write where the row still carries ``fence``; a refusal is recorded, then StaleFence."""
        if self.connection.execute(WRITE_FENCED, {"remaining": order["remaining"], "fence": fence}).rowcount:
            return
        newest = self._newest_fence()
        refusal = {**order, **order["timing"], "newest": newest, "refused_at": time.time()}
        self.connection.execute(RECORD_REFUSAL, refusal)
        self._commit()
        raise StaleFence(f"token {fence} was superseded by {newest} before this holder wrote", newest)

    def _commit(self, order_id: str | None = None) -> None:
        """COMMIT; OutcomeUnknown, naming the order, if the connection broke on the way."""
        self.ended = True  # whatever the answer: a refused commit ends the transaction too
        try:
            self.connection.execute(COMMIT)
        except psycopg.OperationalError as error:
            if not self.connection.broken or order_id is None:
                raise  # the database refused the commit (nothing was written), or it held no order
            raise OutcomeUnknown(
                f"The connection broke while order {order_id} was being committed ({error}): it may "
                f"or may not stand. GET /orders/{order_id} tells."
            ) from None


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


def _lock_waits_until(deadline: Deadline) -> sql.Composable:
    """The statement that ends the transaction's next lock waits at ``deadline``."""
    milliseconds = max(1, math.ceil(deadline.left() * 1000))  # at least 1: a lock_timeout of 0 would mean no limit
    return sql.SQL(LOCK_WAITS_UNTIL).format(sql.Literal(milliseconds))


def _one_round_trip(*statements: str | sql.Composable) -> sql.Composed:
    """Several statements in one query string (no bound parameters allowed there)."""
    return sql.SQL("; ").join(sql.SQL(part) if isinstance(part, str) else part for part in statements)


def _last_row(connection: psycopg.Connection[Any], statements: sql.Composed) -> Any:
    """Run several statements in one round trip (no parameters allowed), and return the last one's first row."""
    with connection.cursor() as cursor:
        cursor.execute(statements)
        for _ in cursor.results():
            pass  # step to the last statement's result
        return cursor.fetchone()


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
