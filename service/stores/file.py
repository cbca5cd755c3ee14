"""The file store: db.json and the files beside it, on one host; nothing else in the project opens them.

For db.json at PATH the store keeps:

    PATH               the inventory {"event", "total", "remaining", "version"}: one human-readable line, replaced
                       atomically; "version" grows with every write and reset (the optimistic mode checks it)
    PATH.orders        the order journal: one JSON object per line, only ever appended (and started afresh by a
                       reset, with a first line naming the new journal so that a live view can tell)
    PATH.settings      how purchases run {"mode", "race_window_ms"}: read on every request by every worker
    PATH.keys/         one small file per Idempotency-Key, naming the order it produced
    PATH.lock          the host's lock file, and PATH.settings.lock for settings changes (service/locks.py)
    PATH.orders.flushed
                       the journal's flush lock, recording which journal and how many of its bytes are on disk

Every whole-file write goes to a temporary file in the same folder that then takes the old file's place in one
step, so a reader sees the old file or the new one, never half of one, and a process killed mid-write leaves
only a ``.PATH...tmp`` file behind that nothing reads (``remove_leftovers`` deletes them). The step is an
exchange of the two names where the system offers one (``_swap_into_place`` says why), else ``os.replace``.

The guards: every purchase holds the host's lock file, exclusively in the locked mode (one purchase at a time)
and shared in the others (shared holders never exclude one another, so those modes race as if nothing were
held). The shared hold is what makes a reset, or a switch to the locked mode, wait for purchases still in
their race window. The optimistic mode holds the lock only while it checks the version and writes.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import logging
import os
import shutil
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, ClassVar

from service.config import MAX_RACE_WINDOW_MS, Config
from service.errors import IdempotencyKeyReused, LockTimeout, OrderNotDurable, StoreDamaged, StoreWriteFailed
from service.locks import holding, thread_guard
from service.modes import MODES, Guard, Isolation, Mode, Read, Write
from service.stores.base import (
    Conflict,
    Feature,
    Feed,
    IdempotentRequest,
    Inventory,
    Order,
    PurchaseSettings,
    Store,
    Transaction,
    settings_with,
    stamp_written,
)

log = logging.getLogger(__name__)

LEFTOVER_AGE_S = 60  # a temporary file older than this has no live writer (every write takes milliseconds)
INVENTORY_KEYS = {"event", "total", "remaining"}  # and "version", absent from files written before it existed
NOTHING_SOLD = "nothing was sold"
FEED_CHUNK_BYTES = 64 * 1024
FLUSHED = struct.Struct("<QQ")  # the flush lock file's record: the journal's inode, and its bytes on disk

# renameat2(2), which Python's os module does not wrap: glibc has it since 2.28 (``_swap_into_place``).
_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
AT_FDCWD = -100
RENAME_EXCHANGE = 2

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
        {
            Guard.NONE,
            Guard.THREAD_LOCK,
            Guard.FILE_LOCK,
            Read.PLAIN,
            Read.MEMORY,
            Write.BLIND,
            Write.IF_VERSION,
            Write.MEMORY,
            Isolation.READ_COMMITTED,
        }
    )

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.path = Path(config.db_path)
        self.journal_path = self._beside("orders")
        self.settings_path = self._beside("settings")
        self.keys_path = self._beside("keys")
        self.lock_path = config.lock_path
        self.settings_lock_path = self._beside("settings.lock")
        self.flushed_path = self._beside("orders.flushed")
        self.lock_timeout_s = config.lock_timeout_s

    def _beside(self, suffix: str) -> Path:
        return self.path.with_name(f"{self.path.name}.{suffix}")

    # --- Life cycle ---------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Delete what killed writers left, create missing files, and apply the configured mode and window."""
        for leftover in self.remove_leftovers():
            log.warning("removed %s, left by a writer that was killed", leftover)
        # At start, db.json may be created while the journal holds no orders (below, on first use, only while
        # there is no journal at all): recreating it with every ticket for sale would sell the orders again.
        self._create_missing(may_create_inventory=not self._journal_has_orders())
        self._write_settings(PurchaseSettings.configured(self.config))
        self._forget_flushes()  # the journal may have been replaced, or cut, while the service was stopped

    def check(self) -> None:
        """Files need no connection: the store is there whenever the service is."""

    def _create_missing(self, *, may_create_inventory: bool = False) -> None:
        self._create_if_absent(self.settings_path, asdict(PurchaseSettings.configured(self.config)))
        if may_create_inventory and not self.path.exists():
            self._create_if_absent(self.path, asdict(Inventory.full(self.config.event, self.config.tickets)))

    def _journal_has_orders(self) -> bool:
        return any(True for _ in self._orders())

    def remove_leftovers(self) -> list[Path]:
        """Delete temporary files that a killed writer left behind (old enough that no writer is live)."""
        pattern = f".{self.path.name}.*.tmp"
        candidates = [*self.path.parent.glob(pattern), *self.keys_path.glob(".*.tmp")]
        now = time.time()
        leftovers = []
        for candidate in candidates:
            with suppress(FileNotFoundError):
                if now - candidate.stat().st_mtime > LEFTOVER_AGE_S:
                    if candidate.is_dir():  # the keys of a reset that was killed while deleting them
                        shutil.rmtree(candidate, ignore_errors=True)
                    else:
                        candidate.unlink()
                    leftovers.append(candidate)
        return sorted(leftovers)

    # --- The inventory (db.json) ----------------------------------------------------------------------------

    def read_inventory(self) -> Inventory:
        """Read db.json, refusing a file that is not JSON or not an inventory.

        A db.json that is missing while no journal exists yet is created from the configuration (the first
        request of a service started without ``prepare``); once orders or a reset happened, it is damage.
        """
        data = self._read_json(self.path, "inventory", create=self._create_inventory_on_first_use)
        if not isinstance(data, dict) or not INVENTORY_KEYS <= set(data) <= INVENTORY_KEYS | {"version"}:
            problem = 'expected an object with exactly "event", "total", "remaining" and, optionally, "version"'
            raise _damaged(self.path, problem, "inventory")
        event, total, remaining, version = data["event"], data["total"], data["remaining"], data.get("version", 0)
        if not isinstance(event, str) or not all(map(_is_count, (total, remaining, version))) or remaining > total:
            problem = '"event" must be text and the rest whole numbers, with 0 <= remaining <= total'
            raise _damaged(self.path, problem, "inventory")
        return Inventory(event=event, total=total, remaining=remaining, version=version)

    def _create_inventory_on_first_use(self) -> None:
        if self.journal_path.exists():
            raise _damaged(self.path, "the file is missing", "inventory")
        self._create_missing(may_create_inventory=True)

    def _write_inventory(self, inventory: Inventory, *, durable: bool = True) -> None:
        """Replace db.json atomically with this inventory (``durable``: fsynced before it takes db.json's place)."""
        self._replace(self.path, vars(inventory), durable=durable)  # vars: asdict's deep copy costs, every sale

    # --- Settings ---------------------------------------------------------------------------------------------

    def read_settings(self) -> PurchaseSettings:
        """Read the purchase settings every worker shares (created from the configuration if missing)."""
        data = self._read_json(self.settings_path, "settings", create=self._create_missing)
        if not isinstance(data, dict) or set(data) != {"mode", "race_window_ms"}:
            problem = 'expected an object with exactly "mode" and "race_window_ms"'
            raise _damaged(self.settings_path, problem, "settings")
        mode, window = data["mode"], data["race_window_ms"]
        if mode not in MODES or not self.supports(MODES[mode]) or not _is_count(window) or window > MAX_RACE_WINDOW_MS:
            modes = ", ".join(mode.name for mode in self.modes())
            problem = f'"mode" must be one of {modes} and "race_window_ms" 0..{MAX_RACE_WINDOW_MS}'
            raise _damaged(self.settings_path, problem, "settings")
        return PurchaseSettings(mode=mode, race_window_ms=window)

    def change_settings(self, change: Mapping[str, Any]) -> PurchaseSettings:
        """Rewrite the settings file. It is never written by a purchase, so no racing buyer can undo this."""
        with holding(self.settings_lock_path, self.lock_timeout_s, "the mode was not changed"):
            try:
                current = self.read_settings()
            except StoreDamaged:
                current = PurchaseSettings.configured(self.config)  # a full PUT /mode repairs a damaged file
            settings = settings_with(current, change)
            self._write_settings(settings)
        return settings

    def _write_settings(self, settings: PurchaseSettings) -> None:
        self._replace(self.settings_path, asdict(settings))

    # --- Purchases --------------------------------------------------------------------------------------------

    @contextmanager
    def transaction(self, mode: Mode) -> Iterator[Transaction]:
        """Hold the host's lock file as ``mode`` needs (and, for thread-lock, the worker's thread lock)."""
        with self._hold_for(mode), thread_guard(mode.guard, self.lock_timeout_s, NOTHING_SOLD):
            yield FileTransaction(self)

    def _hold_for(self, mode: Mode) -> AbstractContextManager[object]:
        if mode.guard is Guard.FILE_LOCK:
            return holding(self.lock_path, self.lock_timeout_s, NOTHING_SOLD)  # one purchase at a time
        if mode.write is Write.IF_VERSION:
            return nullcontext()  # it holds the lock only while it checks the version and writes
        return holding(self.lock_path, self.lock_timeout_s, NOTHING_SOLD, shared=True)  # races, but not a reset

    def record_sale(self, before: Inventory, order: Order, request: IdempotentRequest | None = None) -> None:
        """The "write" of a purchase: claim the Idempotency-Key, write the new count, then journal the order.

        The order of the writes is what makes a crash at any point harmless: killed before the count is
        written, nothing happened; killed between the count and the journal line, one ticket is counted as sold
        that nobody holds (the buyer never got a 201); killed after the line, the sale is complete. A crash can
        only ever sell less, never twice. If writing the journal line fails, the count is put back.

        The order is journaled but not fsynced when this returns: ``make_durable`` does that, outside the lock,
        before the buyer is told (README, "Durability").
        """
        after = replace(before, remaining=order["remaining"], version=before.version + 1)
        if request is not None:
            self._write_key(request, order["order_id"])
        self._write_inventory(after, durable=False)
        stamp_written(order)
        try:
            self._append_order(order)
        except StoreWriteFailed:
            self._write_inventory(before, durable=False)
            raise
        self._complete_key(order, request)

    def record_order(self, order: Order, request: IdempotentRequest | None = None) -> None:
        """Journal an order without touching the count (the memory mode: the worker's own copy was spent)."""
        if request is not None:
            self._write_key(request, order["order_id"])
        stamp_written(order)
        self._append_order(order)
        self._complete_key(order, request)

    def make_durable(self, order: Order, request: IdempotentRequest | None) -> None:
        """Flush the journal (and the key file) to disk, so the order survives a crash or a power cut."""
        try:
            self._flush_journal()
            if request is not None:
                for path in (self.keys_path / f"{request.digest}.json", self.keys_path):
                    _fsync(path)
        except OSError as error:  # LockTimeout too: the disk stalled
            raise OrderNotDurable(
                f"Order {order['order_id']} was recorded, but flushing it to disk failed ({error.strerror or error}): "
                f"it may not survive a crash. GET /orders/{order['order_id']} shows whether it stands."
            ) from error

    def _flush_journal(self) -> None:
        """fsync the journal, unless an fsync that began after everything now in it was written already did.

        This is group commit: while one worker's fsync runs, the workers that appended meanwhile queue for the
        flush lock; the first of them then flushes all their lines with one fsync, and the others find theirs on
        disk already. The flush lock file records the journal's inode and how many of its bytes are on disk.
        """
        fd = os.open(self.journal_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            written = os.fstat(fd)  # this worker's line is in there, and perhaps others' after it
            with holding(self.flushed_path, self.lock_timeout_s, "the order was not flushed") as record:
                inode, flushed = _read_flushed(record)
                if inode == written.st_ino and written.st_size <= flushed:
                    return
                size = os.fstat(fd).st_size
                os.fsync(fd)
                os.pwrite(record, FLUSHED.pack(written.st_ino, size), 0)
        finally:
            os.close(fd)

    @contextmanager
    def _forgetting_flushes(self, beyond: int = 0) -> Iterator[None]:
        """Hold the flush lock while the journal is cut back to ``beyond`` bytes (0: replaced by a new journal).

        What is recorded as flushed then ends at ``beyond``: bytes written there later are not the ones that were
        flushed, and a new journal may reuse an earlier one's inode.
        """
        with holding(self.flushed_path, self.lock_timeout_s, "the journal was not changed") as record:
            inode, flushed = _read_flushed(record)
            if flushed > beyond:
                os.pwrite(record, FLUSHED.pack(inode if beyond else 0, beyond), 0)
            yield

    def _forget_flushes(self) -> None:
        with self._forgetting_flushes():
            pass

    # --- Orders -------------------------------------------------------------------------------------------------

    def _orders(self) -> Iterator[Order]:
        """Every recorded order, oldest first, read line by line so memory does not grow with the journal."""
        try:
            journal = open(self.journal_path, "rb")  # noqa: SIM115 - closed below, after the last line
        except FileNotFoundError:
            return
        with journal:
            for number, line in enumerate(journal, start=1):
                order = _parse_order_line(line)
                if order is not None:
                    yield order
                elif not (number == 1 and _journal_id(line)):
                    log.warning("%s line %d is not an order (a torn write?); skipped", self.journal_path, number)

    def orders_page(self, limit: int, offset: int) -> tuple[int, list[Order]]:
        """Reads the whole journal to count it: fine for paging, never on the buying path."""
        count = 0
        page: list[Order] = []
        for count, order in enumerate(self._orders(), start=1):
            if offset < count <= offset + limit:
                page.append(order)
        return count, page

    def feed(self, cursor: str, limit: int) -> Feed:
        """The orders after ``cursor`` ("<journal id>.<byte offset>"): a seek, then only the new lines.

        Only whole lines count: a line still being appended (or torn by a crash, until the next order starts a
        fresh line after it) ends the slice, and the next cursor points at its start.
        """
        journal_id, _, offset_text = cursor.rpartition(".")
        try:
            journal = open(self.journal_path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return Feed(cursor=".0", reset=bool(cursor) and journal_id != "", orders=[])
        with journal:
            first = journal.readline()
            current_id = _journal_id(first)
            start = len(first) if current_id else 0
            offset = max(start, int(offset_text or 0))
            # Another journal, or an offset past this one's end (a journal emptied by hand): start over.
            reset = bool(cursor) and (journal_id != current_id or offset > os.fstat(journal.fileno()).st_size)
            if reset or not cursor:
                offset = start
            journal.seek(offset)
            orders: list[Order] = []
            while len(orders) < limit:
                line = journal.readline(FEED_CHUNK_BYTES)
                if not line.endswith(b"\n"):
                    break
                offset += len(line)
                order = _parse_order_line(line)
                if order is not None:
                    orders.append(order)
        return Feed(cursor=f"{current_id}.{offset}", reset=reset, orders=orders)

    def find_order(self, order_id: str) -> Order | None:
        """The order with this id, or None. Reads the whole journal: fine for lookups, never on the buying path."""
        return next((order for order in self._orders() if order["order_id"] == order_id), None)

    # --- Idempotency keys ---------------------------------------------------------------------------------------

    def find_replay(self, request: IdempotentRequest) -> Order | None:
        """The order an earlier request with the same Idempotency-Key produced, if that sale was recorded.

        A key file is written twice: first as a claim naming the order id (before the sale is written), then
        with the whole order (after the journal line). A claim alone means that sale failed or its worker died
        midway; only then is the journal searched, to tell which. Raises IdempotencyKeyReused when the key's
        recorded order came from a different body.
        """
        path = self.keys_path / f"{request.digest}.json"
        try:
            record = json.loads(path.read_bytes())
            earlier = record.get("order") or self.find_order(str(record["order_id"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise _damaged(path, f"it is not a key record ({error})", "key") from None
        if earlier is None:
            return None  # a claim whose sale never happened: this request may try again
        if record.get("fingerprint") != request.fingerprint:
            raise IdempotencyKeyReused(
                "This Idempotency-Key was already used with a different body; use a new key for a new order."
            )
        return dict(earlier)

    def _write_key(self, request: IdempotentRequest, order_id: str, order: Order | None = None) -> None:
        record: dict[str, object] = {**asdict(request), "order_id": order_id}
        if order is not None:
            record["order"] = order
        self._replace(self.keys_path / f"{request.digest}.json", record, durable=False)

    def _complete_key(self, order: Order, request: IdempotentRequest | None) -> None:
        if request is None:
            return
        try:
            self._write_key(request, order["order_id"], order)
        except StoreWriteFailed as error:
            # The sale is complete; the claim written before it still leads a retry to it (find_replay).
            log.warning("order %s sold, but its key record was not updated: %s", order["order_id"], error)

    # --- Reset ---------------------------------------------------------------------------------------------------

    def reset(self, tickets: int | None, event: str | None) -> Inventory:
        """Start over: a fresh journal, no idempotency keys, then the fresh inventory, with no purchase in flight.

        A damaged settings file stops the reset before anything changes; an unusable db.json is replaced by the
        configured event and tickets.
        """
        self.read_settings()
        with holding(self.lock_path, self.lock_timeout_s, "the store was not reset"):
            try:
                current = self.read_inventory()
            except StoreDamaged:
                # Unknown version: a clock reading is larger than any count of writes, so memory copies reload.
                current = Inventory.full(self.config.event, self.config.tickets, version=time.time_ns())
            fresh = Inventory.full(
                event or current.event, current.total if tickets is None else tickets, version=current.version + 1
            )
            header = _to_json_bytes({"journal": uuid.uuid4().hex}) + b"\n"
            self._replace_bytes(self.journal_path, header)
            self._forget_flushes()
            self._discard_keys()
            self._write_inventory(fresh)
        return fresh

    def _discard_keys(self) -> None:
        if not self.keys_path.exists():
            return
        # One rename takes every key out of use at once; deleting the files may then take its time.
        discarded = self.keys_path.with_name(f".{self.keys_path.name}.{os.getpid()}.{time.time_ns()}.tmp")
        try:
            os.replace(self.keys_path, discarded)
        except OSError as error:
            raise StoreWriteFailed(f"could not clear {self.keys_path}: {error.strerror}") from error
        shutil.rmtree(discarded, ignore_errors=True)

    # --- Files ---------------------------------------------------------------------------------------------------

    def _read_json(self, path: Path, kind: str, *, create: Callable[[], None] | None = None) -> Any:
        """The file's JSON; ``create`` makes a missing file on the store's first use (None: missing is damage)."""
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            if create is None:
                raise _damaged(path, "the file is missing", kind) from None
            create()
            return self._read_json(path, kind)
        except OSError as error:
            raise _damaged(path, f"it cannot be read ({error.strerror})", kind) from error
        if not text.strip():
            raise _damaged(path, "the file is empty", kind)
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as error:
            raise _damaged(path, f"it is not valid JSON ({error})", kind) from None

    def _replace(self, path: Path, data: object, *, durable: bool = True) -> None:
        self._replace_bytes(path, _to_json_bytes(data, readable=True), durable=durable)

    @staticmethod
    def _replace_bytes(path: Path, content: bytes, *, durable: bool = True) -> None:
        """Put a file holding ``content`` in ``path``'s place in one step (fsynced first if ``durable``)."""
        temporary = None
        try:
            temporary = _write_temporary(path, content, durable=durable)
            _swap_into_place(temporary, path)
        except OSError as error:
            if temporary is not None:
                with suppress(OSError):
                    os.unlink(temporary)
            message = f"could not write {path}: {error.strerror}; its previous contents are intact"
            raise StoreWriteFailed(message) from error

    @staticmethod
    def _create_if_absent(path: Path, data: object) -> None:
        temporary = _write_temporary(path, _to_json_bytes(data, readable=True), durable=True)
        try:
            # link() fails if the name exists, so a file someone else created in between is never replaced.
            with suppress(FileExistsError):
                os.link(temporary, path)
        finally:
            os.unlink(temporary)

    def _append_order(self, order: Order) -> None:
        """Append the order's line to the journal, whole or not at all."""
        path = self.journal_path
        line = _to_json_bytes(order) + b"\n"
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise StoreWriteFailed(f"could not open {path}: {error.strerror}") from error
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                self._forget_flushes()  # a journal just made (the first order, or one deleted by hand)
            elif os.pread(fd, 1, size - 1) != b"\n":
                # A power cut can leave a torn last line; start ours on a fresh line so it stays readable.
                line = b"\n" + line
            written = os.write(fd, line)
            if written != len(line):
                # Never leave part of an order behind: a line missing only its newline would read as a sale. Its
                # bytes may have been flushed meanwhile, and the next line will take their place.
                try:
                    with self._forgetting_flushes(beyond=size):
                        _cut_back(fd, size, written)
                except LockTimeout:
                    _cut_back(fd, size, written)  # the disk stalls: the part must go all the same
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(line)} bytes)")
        except OSError as error:
            raise StoreWriteFailed(f"could not append to {path}: {error.strerror or error}") from error
        finally:
            os.close(fd)


class FileTransaction(Transaction):
    """A purchase's read and write on db.json, inside the hold ``FileStore.transaction`` took."""

    def __init__(self, store: FileStore) -> None:
        super().__init__(str(store.path))
        self.store = store

    def find_replay(self, request: IdempotentRequest) -> Order | None:
        return self.store.find_replay(request)

    def read_stored(self, how: Read) -> Inventory:
        return self.store.read_inventory()

    def write_stored(self, how: Write, before: Inventory, order: Order, request: IdempotentRequest | None) -> Order:
        if how is Write.MEMORY:
            self.store.record_order(order, request)
        elif how is Write.IF_VERSION:
            # The check and the write under one short exclusive hold; the work before it held nothing.
            with holding(self.store.lock_path, self.store.lock_timeout_s, NOTHING_SOLD):
                if self.store.read_inventory().version != before.version:
                    raise Conflict(f"db.json changed since version {before.version} was read")
                self.store.record_sale(before, order, request)
        else:
            self.store.record_sale(before, order, request)
        return order


def _damaged(path: Path, problem: str, kind: str) -> StoreDamaged:
    return StoreDamaged(f"{path} cannot be used: {problem}. The service leaves it untouched. {ADVICE[kind]}")


def _write_temporary(path: Path, content: bytes, *, durable: bool) -> str:
    """A new file beside ``path``, readable by all, holding ``content`` (fsynced if ``durable``): its name.

    The name is this thread's own: its process's token (process ids repeat across containers that share a
    volume) and its thread id.
    """
    temporary = f"{path.parent}/.{path.name}.{_process_token(os.getpid())}-{threading.get_ident()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(temporary, flags, 0o644)
    except FileNotFoundError:  # the folder is not there yet: a new store's, or the keys' after a reset
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(temporary, flags, 0o644)
    try:
        os.fchmod(fd, 0o644)  # whatever the umask
        if os.write(fd, content) != len(content):
            raise OSError(errno.ENOSPC, "short write", temporary)
        if durable:
            os.fsync(fd)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    finally:
        os.close(fd)
    return temporary


@functools.cache
def _process_token(pid: int) -> str:
    # Made on first use in each process (keyed by pid, so a forked worker never reuses its master's).
    return f"{pid}-{uuid.uuid4().hex[:8]}"


def _swap_into_place(temporary: str, path: Path) -> None:
    """Make ``path`` name the new file ``temporary`` in one step, and delete the file it named before.

    Why an exchange of the two names rather than ``os.replace``: a rename over an existing file makes ext4 write
    the new file's block at once (its ``auto_da_alloc`` guard against empty files after a crash) and free the
    old file's, and on a filesystem mounted with ``discard`` that free waits for the disk to trim the block,
    about 1 ms here (bench/RESULTS.md), inside the lock. After an exchange, the old file is deleted before its
    data was ever given a block, so nothing is written or trimmed. Readers see the same thing either way: the
    old file or the new one, never half of one. The price is a power cut's, not a crash's: db.json's newest
    contents reach the disk with the next writeback, not with the journal's fsync (README, "Durability").
    """
    exchanged = _renameat2 is not None and (
        _renameat2(AT_FDCWD, os.fsencode(temporary), AT_FDCWD, os.fsencode(path), RENAME_EXCHANGE) == 0
    )
    if exchanged:
        with suppress(OSError):  # a file left here is harmless: remove_leftovers deletes it at the next start
            os.unlink(temporary)  # the old contents now
        return
    # No such file yet, or no exchange here (the filesystem, the kernel, a sandbox): os.replace does the job, and
    # reports any error that is not about exchanging.
    os.replace(temporary, path)


def _cut_back(fd: int, size: int, written: int) -> None:
    """Cut the ``written`` bytes of a short write off the end of the file, unless someone appended after them."""
    if os.fstat(fd).st_size == size + written:
        os.ftruncate(fd, size)


def _read_flushed(fd: int) -> tuple[int, int]:
    """The flush lock file's record: the journal's inode, and how many of its bytes are on disk (0, 0: none)."""
    inode, flushed = FLUSHED.unpack(os.pread(fd, FLUSHED.size, 0).ljust(FLUSHED.size, b"\0"))
    return inode, flushed


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _to_json_bytes(data: object, *, readable: bool = False) -> bytes:
    """Readable (a file for people to read: spaces after the separators, and a final newline) or compact (one
    journal line, no newline)."""
    if readable:
        return json.dumps(data, ensure_ascii=False).encode() + b"\n"
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def _journal_id(line: bytes) -> str:
    """The id a reset wrote on the journal's first line, or "" (a journal started by its first order)."""
    try:
        header = json.loads(line)
    except (ValueError, RecursionError):
        return ""
    journal_id = header.get("journal") if isinstance(header, dict) else None
    return journal_id if isinstance(journal_id, str) else ""


def _parse_order_line(line: bytes) -> Order | None:
    try:
        order = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if isinstance(order, dict) and isinstance(order.get("order_id"), str):
        return order
    return None
