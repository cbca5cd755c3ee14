"""The file store: db.json and the files beside it, on one host; nothing else in the project opens them.

For db.json at PATH the store keeps:

    PATH               the inventory {"event", "total", "remaining", "version", "reflects"}: one human-readable
                       line, replaced atomically (``atomic.py``); "version" grows with every write and reset, and
                       "reflects" says how much of the journal the count has applied (``journal.Reflects``)
    PATH.orders        the order journal, and PATH.orders.flushed, how much of it is on disk (``journal.py``)
    PATH.keys/         one small file per Idempotency-Key (``keys.py``)
    PATH.settings      how purchases run {"mode", "race_window_ms"}: read on every request by every worker
    PATH.lock          the host's lock file, and PATH.settings.lock for settings changes (``service/flock.py``)

Every sale holds the host's lock file *shared* from start to end: shared holders never exclude one another, so
the unguarded modes race as if nothing were held, but a reset or a mode switch (each takes the file exclusively)
waits for the sales in flight, and a sale checks under its hold that its mode is still in force. So no sale of an
unguarded mode that began before a switch can write in the middle of a safe mode's sale. A guard or a write that
takes the same file exclusively (the ``locked`` mode's guard, the optimistic check-and-write) converts that hold:
``flock`` keeps one lock per open file, and a thread uses one descriptor per lock file (``service/flock.py``).

db.json is not flushed to disk at every sale; the journal is, before every 201. After a power cut db.json may be
older than the journal, so at every start ``prepare`` applies to the count the orders recorded after what
db.json reflects (a redo, as a database replays its log), and logs how many (docs/file-store.md, "Durability").
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, ClassVar

from service import flock
from service.config import FLUSH_AFTER_DEADLINE_S, MAX_RACE_WINDOW_MS, Config
from service.deadline import Deadline
from service.errors import Conflict, OrderNotDurable, StoreDamaged, StoreWriteFailed
from service.guards import NOTHING_SOLD, Holding
from service.modes import MODES, Feature, Isolation, Read, Write
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
from service.stores.file.atomic import (
    check_writable,
    create_if_absent,
    read_json_file,
    remove_leftovers,
    replace_json,
)
from service.stores.file.journal import Journal, Reflects
from service.stores.file.keys import IdempotencyKeys

__all__ = ["FileStore"]

log = logging.getLogger(__name__)

INVENTORY_KEYS = {"event", "total", "remaining"}  # "version" and "reflects" are absent from files written before them

ADVICE = {
    "inventory": (
        "Fix it by hand (remaining = total minus the quantities in db.json.orders), "
        "or POST /reset to start over (that clears every order)."
    ),
    "settings": 'PUT /mode with both "mode" and "race_window_ms" rewrites it, and so does a restart.',
    "key": "Delete that key file, or POST /reset (that clears every order).",
}


class FileStore(Store):
    """The booking data on disk: one instance per worker process, holding paths and no open files."""

    kind = "file"
    features: ClassVar[frozenset[Feature]] = frozenset(
        {Read.PLAIN, Read.MEMORY, Write.BLIND, Write.IF_VERSION, Write.MEMORY, Isolation.READ_COMMITTED}
    )

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.path = Path(config.db_path)
        self.settings_path = self._beside("settings")
        self.settings_lock_path = self._beside("settings.lock")
        self.lock_path = config.lock_path
        self.lock_timeout_s = config.lock_timeout_s
        self.journal = Journal(self._beside("orders"), config.lock_timeout_s)
        self.keys = IdempotencyKeys(self._beside("keys"), self.journal.find, _damage_of("key"))
        self.up_to_date_in: int | None = None  # the process that brought db.json up to date with the journal

    def _beside(self, suffix: str) -> Path:
        return self.path.with_name(f"{self.path.name}.{suffix}")

    @property
    def identity(self) -> str:
        return str(self.path)

    # --- Life cycle ---------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Delete what killed writers left, create missing files, and apply the configured mode and window."""
        temporaries = [*self.path.parent.glob(f".{self.path.name}.*.tmp"), *self.keys.leftover_candidates()]
        self.up_to_date_in = os.getpid()
        for leftover in remove_leftovers(temporaries):
            log.warning("removed %s, left by a writer that was killed", leftover)
        # At start, db.json may be created while the journal holds no orders (below, on first use, only while
        # there is no journal at all): recreating it with every ticket for sale would sell the orders again.
        self._create_missing(may_create_inventory=not self.journal.has_orders())
        self._write_settings(RuntimeSettings.configured(self.config))
        self.journal.forget_flushes()  # the journal may have been replaced, or cut, while the service was stopped
        self._apply_journal()

    def _apply_journal(self, *, say_so_when_nothing: bool = True) -> None:
        """Bring db.json's count up to date with the orders journaled after what it reflects (a power cut can leave
        it older than the journal, which was flushed before every 201). The memory mode's orders never moved the
        count and are left out; a count never goes below 0. A db.json that does not say what it reflects (written
        before it did), or names another journal, is taken to reflect none of it: a count may then end up lower
        than the orders allow, never higher."""
        with flock.holding(self.lock_path, self.lock_timeout_s, "db.json was not brought up to date"):
            try:
                inventory, reflects = self.read_db()
            except StoreDamaged as damage:
                log.warning("db.json not brought up to date with the journal: %s", damage)
                return
            end = self.journal.end()
            if reflects is None or reflects.journal != end.journal:
                reflects = Reflects(end.journal, 0)
            later = [order for order in self.journal.orders_from(reflects.bytes) if order["order_id"] != reflects.order]
            redo = [order for order in later if _moves_the_count(order)]
            sold = sum(int(order["quantity"]) for order in redo)
            after = replace(inventory, remaining=max(0, inventory.remaining - sold), version=inventory.version + 1)
            if redo:
                self._write_inventory(after, end)
        if not redo:
            if say_so_when_nothing:
                log.info("db.json is up to date: no order that moves the count was journaled after what it reflects")
            return
        log.warning(
            "db.json brought up to date with the journal: %d orders were journaled after the %d bytes its count "
            "reflected (%d tickets): remaining %d -> %d (orders of the memory mode left out, as they never move the "
            "count: %d)",
            len(redo),
            reflects.bytes,
            sold,
            inventory.remaining,
            after.remaining,
            len(later) - len(redo),
        )

    def _bring_up_to_date(self) -> None:
        """Once in each worker process, before its first sale: what ``prepare`` does at start, for a service that
        gunicorn started without the project's settings (``gunicorn 'service:create_app()'``, ``flask run``).
        db.json then reflects the whole journal, so every later call finds nothing to redo."""
        if self.up_to_date_in != os.getpid():
            self._apply_journal(say_so_when_nothing=False)
            self.up_to_date_in = os.getpid()

    def check(self) -> None:
        """db.json and the settings file read and valid (else StoreDamaged), and a new file can be made in their
        folder (else StoreWriteFailed), as every sale makes one."""
        self.read_inventory()
        self.read_settings()
        check_writable(self._beside("health"))

    def _create_missing(self, *, may_create_inventory: bool = False) -> None:
        create_if_absent(self.settings_path, asdict(RuntimeSettings.configured(self.config)))
        if may_create_inventory and not self.path.exists():
            full = Inventory.full(self.config.event, self.config.tickets)
            create_if_absent(self.path, _db_json(full, self.journal.end()))

    # --- The inventory (db.json) ----------------------------------------------------------------------------

    def read_inventory(self) -> Inventory:
        """Read db.json, refusing a file that is not JSON or not an inventory.

        A db.json that is missing while no journal exists yet is created from the configuration (the first
        request of a service started without ``prepare``); once orders or a reset happened, it is damage.
        """
        return self.read_db()[0]

    def read_db(self) -> tuple[Inventory, Reflects | None]:
        """db.json's inventory, and how much of the journal its count reflects (None: the file does not say)."""
        data = self._read_json(self.path, "inventory", create=self._create_inventory_on_first_use)
        if not isinstance(data, dict) or not INVENTORY_KEYS <= set(data) <= INVENTORY_KEYS | {"version", "reflects"}:
            problem = (
                'expected an object with exactly "event", "total", "remaining" and, optionally, "version" and '
                '"reflects"'
            )
            raise _damaged(self.path, problem, "inventory")
        event, total, remaining, version = data["event"], data["total"], data["remaining"], data.get("version", 0)
        if not isinstance(event, str) or not all(map(_is_count, (total, remaining, version))) or remaining > total:
            problem = '"event" must be text and the rest whole numbers, with 0 <= remaining <= total'
            raise _damaged(self.path, problem, "inventory")
        reflects = _reflects(data.get("reflects"))
        if "reflects" in data and reflects is None:
            problem = '"reflects" must be {"journal": text, "bytes": a whole number, "order": text or null}'
            raise _damaged(self.path, problem, "inventory")
        return Inventory(event=event, total=total, remaining=remaining, version=version), reflects

    def _create_inventory_on_first_use(self) -> None:
        if self.journal.exists():
            raise _damaged(self.path, "the file is missing", "inventory")
        self._create_missing(may_create_inventory=True)

    def _write_inventory(self, inventory: Inventory, reflects: Reflects | None, *, durable: bool = True) -> None:
        """Replace db.json atomically with this inventory, whose count reflects ``reflects`` of the journal
        (``durable``: fsynced before it takes db.json's place)."""
        replace_json(self.path, _db_json(inventory, reflects), durable=durable)

    # --- Settings ---------------------------------------------------------------------------------------------

    def read_settings(self) -> RuntimeSettings:
        """Read the settings every worker shares (created from the configuration if missing)."""
        data = self._read_json(self.settings_path, "settings", create=self._create_missing)
        if not isinstance(data, dict) or set(data) != {"mode", "race_window_ms"}:
            problem = 'expected an object with exactly "mode" and "race_window_ms"'
            raise _damaged(self.settings_path, problem, "settings")
        mode, window = data["mode"], data["race_window_ms"]
        if mode not in MODES or not self.runs(MODES[mode]) or not _is_count(window) or window > MAX_RACE_WINDOW_MS:
            modes = ", ".join(mode.name for mode in self.available_modes())
            problem = f'"mode" must be one of {modes} and "race_window_ms" 0..{MAX_RACE_WINDOW_MS}'
            raise _damaged(self.settings_path, problem, "settings")
        return RuntimeSettings(mode=mode, race_window_ms=window)

    def change_settings(self, change: Mapping[str, Any]) -> RuntimeSettings:
        """Rewrite the settings file, once every sale in flight has written (the host's lock file, exclusively).
        It is never written by a purchase, so no racing buyer can undo this."""
        not_changed = "the mode was not changed"
        with (
            flock.holding(self.settings_lock_path, self.lock_timeout_s, not_changed),
            flock.holding(self.lock_path, self.lock_timeout_s, not_changed),
        ):
            try:
                current = self.read_settings()
            except StoreDamaged:
                current = RuntimeSettings.configured(self.config)  # a full PUT /mode repairs a damaged file
            settings = settings_with(current, change)
            self._write_settings(settings)
        return settings

    def _write_settings(self, settings: RuntimeSettings) -> None:
        replace_json(self.settings_path, asdict(settings))

    # --- Sales ------------------------------------------------------------------------------------------------

    @contextmanager
    def begin_sale(self, settings: RuntimeSettings, quantity: int, deadline: Deadline) -> Iterator[Sale]:
        """Hold the host's lock file shared for the whole sale, and check that ``settings`` are still the ones in
        force: the settings file is read here only, once per sale (SettingsChanged if a switch came first: the
        purchase starts again in the new mode)."""
        self._bring_up_to_date()
        with flock.holding(self.lock_path, deadline.left(), NOTHING_SOLD, shared=True):
            self.check_in_force(settings, self.read_settings())
            yield FileSale(self, settings, quantity, deadline)

    def record_sale(
        self,
        before: Inventory,
        order: Order,
        request: IdempotentRequest | None = None,
        reflected: Reflects | None = None,
    ) -> None:
        """The "write" of a purchase: claim the Idempotency-Key, write the new count, then journal the order.

        The order of the writes is what makes a crash at any point harmless: killed before the count is
        written, nothing happened; killed between the count and the journal line, one ticket is counted as sold
        that nobody holds (the buyer never got a 201); killed after the line, the sale is complete. A crash can
        only ever sell less, never twice. If writing the journal line fails, the count is put back, with what
        it ``reflected`` of the journal.

        The order is journaled but not fsynced when this returns: ``make_durable`` does that, outside the lock,
        before the buyer is told (docs/file-store.md, "Durability").
        """
        after = replace(before, remaining=order["remaining"], version=before.version + 1)
        if request is not None:
            self.keys.claim(request, order["order_id"])
        journal = self.journal.end(order["order_id"])  # the order's line goes right after these bytes
        self._write_inventory(after, journal, durable=False)
        stamp_written(order)
        try:
            self.journal.append(order)
        except StoreWriteFailed:
            self._write_inventory(before, reflected, durable=False)
            raise
        if request is not None:
            self.keys.complete(request, order)

    def record_order(self, order: Order, request: IdempotentRequest | None = None) -> None:
        """Journal an order without touching the count (the memory mode: the worker's own copy was spent)."""
        if request is not None:
            self.keys.claim(request, order["order_id"])
        stamp_written(order)
        self.journal.append(order)
        if request is not None:
            self.keys.complete(request, order)

    def make_durable(self, order: Order, request: IdempotentRequest | None, deadline: Deadline) -> None:
        """Flush the journal (and the key file) to disk, so the order survives a crash or a power cut; the wait for
        the flush lock ends at the purchase's deadline, or FLUSH_AFTER_DEADLINE_S from now if that is later."""
        try:
            self.journal.flush(max(deadline.left(), FLUSH_AFTER_DEADLINE_S))
            if request is not None:
                self.keys.make_durable(request)
        except OSError as error:  # LockTimeout too: the disk stalled
            raise OrderNotDurable(
                f"Order {order['order_id']} was recorded, but flushing it to disk failed ({error.strerror or error}): "
                f"it may not survive a crash. GET /orders/{order['order_id']} shows whether it stands."
            ) from error

    # --- Orders -------------------------------------------------------------------------------------------------

    def orders_page(self, limit: int, offset: int) -> tuple[int, list[Order]]:
        return self.journal.page(limit, offset)

    def feed(self, cursor: str, limit: int) -> Feed:
        return self.journal.feed(cursor, limit)

    def find_order(self, order_id: str) -> Order | None:
        return self.journal.find(order_id)

    # --- Reset ---------------------------------------------------------------------------------------------------

    def reset(self, tickets: int | None, event: str | None) -> Inventory:
        """Start over: a fresh journal, no idempotency keys, then the fresh inventory, with no purchase in flight.

        A damaged settings file stops the reset before anything changes; an unusable db.json is replaced by the
        configured event and tickets.
        """
        self.read_settings()
        with flock.holding(self.lock_path, self.lock_timeout_s, "the store was not reset"):
            try:
                current = self.read_inventory()
            except StoreDamaged:
                # Unknown version: a clock reading is larger than any count of writes, so memory copies reload.
                current = Inventory.full(self.config.event, self.config.tickets, version=time.time_ns())
            fresh = Inventory.full(
                event or current.event, current.total if tickets is None else tickets, version=current.version + 1
            )
            journal = self.journal.start_afresh()
            self.keys.discard_all()
            self._write_inventory(fresh, journal)
        return fresh

    # --- Files ---------------------------------------------------------------------------------------------------

    def _read_json(self, path: Path, kind: str, *, create: Callable[[], None] | None = None) -> Any:
        """The file's JSON; ``create`` makes a missing file on the store's first use (None: missing is damage)."""
        try:
            return read_json_file(path)
        except FileNotFoundError:
            if create is None:
                raise _damaged(path, "the file is missing", kind) from None
            create()
            return self._read_json(path, kind)
        except OSError as error:
            raise _damaged(path, f"it cannot be read ({error.strerror})", kind) from error
        except ValueError as error:
            raise _damaged(path, str(error), kind) from None


class FileSale(Sale):
    """A purchase's read and write on db.json, inside the shared hold ``FileStore.begin_sale`` took."""

    store: FileStore
    reflected: Reflects | None = None  # what the count read reflects of the journal

    def find_replay(self, request: IdempotentRequest) -> Order | None:
        return self.store.keys.find_replay(request)

    def read_stored(self, how: Read, holding: Holding) -> Inventory:
        inventory, self.reflected = self.store.read_db()
        return inventory

    def write_stored(
        self, how: Write, before: Inventory, order: Order, request: IdempotentRequest | None, holding: Holding
    ) -> Order:
        store = self.store
        if how is Write.MEMORY:
            store.record_order(order, request)
        elif how is Write.IF_VERSION:
            # The check and the write under one short exclusive hold (it converts the sale's shared one).
            with flock.holding(store.lock_path, self.deadline.left(), NOTHING_SOLD):
                if store.read_inventory().version != before.version:
                    raise Conflict(f"db.json changed since version {before.version} was read")
                store.record_sale(before, order, request, self.reflected)
        else:
            store.record_sale(before, order, request, self.reflected)
        return order


def _damaged(path: Path, problem: str, kind: str) -> StoreDamaged:
    return StoreDamaged(f"{path} cannot be used: {problem}. The service leaves it untouched. {ADVICE[kind]}")


def _damage_of(kind: str) -> Callable[[Path, str], StoreDamaged]:
    return lambda path, problem: _damaged(path, problem, kind)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _db_json(inventory: Inventory, reflects: Reflects | None) -> dict[str, Any]:
    # Not asdict: its deep copy costs, at every sale. (A file store has no buckets.)
    data = {"event": inventory.event, "total": inventory.total, "remaining": inventory.remaining}
    return {**data, "version": inventory.version, **({"reflects": vars(reflects)} if reflects else {})}


def _reflects(data: object) -> Reflects | None:
    """db.json's "reflects", or None when it is absent or not of its shape."""
    if not isinstance(data, dict) or set(data) != {"journal", "bytes", "order"}:
        return None
    journal, size, order = data["journal"], data["bytes"], data["order"]
    if not isinstance(journal, str) or not _is_count(size) or not isinstance(order, str | None):
        return None
    return Reflects(journal, size, order)


def _moves_the_count(order: Order) -> bool:
    """Whether the order's sale wrote the count: every mode's but the memory mode's (an unknown mode counts)."""
    mode = MODES.get(str(order.get("mode")))
    return mode is None or mode.write is not Write.MEMORY
