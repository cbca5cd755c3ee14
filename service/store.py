"""db.json and the files beside it; nothing else in the project opens them.

For db.json at PATH the store keeps:

    PATH               the inventory {"event", "total", "remaining"}: small, human-readable, replaced atomically
    PATH.orders        the order journal: one JSON object per line, only ever appended (and emptied by a reset)
    PATH.settings      how purchases run {"mode", "race_window_ms"}: read on every request by every worker
    PATH.keys/         one small file per Idempotency-Key, naming the order it produced
    PATH.lock          the inventory lock file, and PATH.settings.lock for settings changes (service/locks.py)

Every whole-file write goes to a temporary file in the same folder and is then renamed over the old one
(``os.replace``), so a reader sees the old file or the new one, never half of one, and a process killed
mid-write leaves only a ``.PATH...tmp`` file behind that nothing reads (``remove_leftovers`` deletes them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from service.config import MAX_RACE_WINDOW_MS, MODES, Config
from service.errors import IdempotencyKeyReused, OrderNotDurable, StoreDamaged, StoreWriteFailed

log = logging.getLogger(__name__)

Order = dict[str, Any]
LEFTOVER_AGE_S = 60  # a temporary file older than this has no live writer (every write takes milliseconds)


@dataclass(frozen=True)
class Inventory:
    """The contents of db.json: how many tickets the event has, and how many are left."""

    event: str
    total: int
    remaining: int

    @classmethod
    def full(cls, event: str, total: int) -> Inventory:
        """An inventory with every ticket still for sale."""
        return cls(event=event, total=total, remaining=total)

    @property
    def sold(self) -> int:
        """Tickets the count says are gone (the order journal may disagree after an unlocked run)."""
        return self.total - self.remaining


@dataclass(frozen=True)
class PurchaseSettings:
    """How purchases run, switchable at run time: the mode and the simulated work between read and write."""

    mode: str
    race_window_ms: int

    @classmethod
    def configured(cls, config: Config) -> PurchaseSettings:
        """The settings the configuration starts a server with."""
        return cls(mode=config.mode, race_window_ms=config.race_window_ms)


@dataclass(frozen=True)
class IdempotentRequest:
    """A purchase that carried an Idempotency-Key: the key and a fingerprint of the body it came with."""

    key: str
    fingerprint: str

    @property
    def file_name(self) -> str:
        """Keys are client text: the file is named by their hash so no key can escape the folder."""
        return hashlib.sha256(self.key.encode()).hexdigest() + ".json"


ADVICE = {
    "inventory": (
        "Fix it by hand (remaining = total minus the quantities in db.json.orders), "
        "or POST /reset to start over (that clears every order)."
    ),
    "settings": 'PUT /mode with both "mode" and "race_window_ms" rewrites it, and so does a restart.',
    "key": "Delete that key file, or POST /reset (that clears every order).",
}


class Store:
    """The booking data on disk: one instance per worker process, holding paths and no open files."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.journal_path = self._beside("orders")
        self.settings_path = self._beside("settings")
        self.keys_path = self._beside("keys")
        self.lock_path = self._beside("lock")
        self.settings_lock_path = self._beside("settings.lock")

    def _beside(self, suffix: str) -> Path:
        return self.path.with_name(f"{self.path.name}.{suffix}")

    # --- Start-up (the gunicorn master, before any worker) ------------------------------------------------------

    def create_missing(self, inventory: Inventory, settings: PurchaseSettings) -> None:
        """Create the settings file, and db.json unless orders were already sold without it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._create_if_absent(self.settings_path, asdict(settings))
        if self.path.exists() or self._journal_has_orders():
            # Recreating db.json with every ticket for sale while the journal holds orders would sell them again.
            return
        self._create_if_absent(self.path, asdict(inventory))

    def _journal_has_orders(self) -> bool:
        try:
            return self.journal_path.stat().st_size > 0
        except FileNotFoundError:
            return False

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
        """Read db.json, refusing a file that is missing, not JSON or not an inventory."""
        data = self._read_json(self.path, "inventory")
        if not isinstance(data, dict) or set(data) != {"event", "total", "remaining"}:
            raise _damaged(self.path, 'expected an object with exactly "event", "total" and "remaining"', "inventory")
        event, total, remaining = data["event"], data["total"], data["remaining"]
        if not isinstance(event, str) or not _is_count(total) or not _is_count(remaining) or remaining > total:
            problem = '"event" must be text and "remaining" and "total" whole numbers, 0 <= remaining <= total'
            raise _damaged(self.path, problem, "inventory")
        return Inventory(event=event, total=total, remaining=remaining)

    def write_inventory(self, inventory: Inventory, *, durable: bool = True) -> None:
        """Replace db.json atomically with this inventory (``durable``: fsynced before the rename)."""
        self._replace(self.path, asdict(inventory), durable=durable)

    # --- Settings ---------------------------------------------------------------------------------------------

    def read_settings(self) -> PurchaseSettings:
        """Read the purchase settings every worker shares."""
        data = self._read_json(self.settings_path, "settings")
        if not isinstance(data, dict) or set(data) != {"mode", "race_window_ms"}:
            problem = 'expected an object with exactly "mode" and "race_window_ms"'
            raise _damaged(self.settings_path, problem, "settings")
        mode, window = data["mode"], data["race_window_ms"]
        if mode not in MODES or not _is_count(window) or window > MAX_RACE_WINDOW_MS:
            problem = f'"mode" must be {" or ".join(MODES)} and "race_window_ms" 0..{MAX_RACE_WINDOW_MS}'
            raise _damaged(self.settings_path, problem, "settings")
        return PurchaseSettings(mode=mode, race_window_ms=window)

    def write_settings(self, settings: PurchaseSettings) -> None:
        """Replace the settings file atomically. Callers that read-modify-write hold the settings lock."""
        self._replace(self.settings_path, asdict(settings))

    # --- Orders -------------------------------------------------------------------------------------------------

    def record_sale(self, before: Inventory, order: Order, request: IdempotentRequest | None = None) -> None:
        """The "write" of a purchase: claim the Idempotency-Key, write the new count, then journal the order.

        The order of the writes is what makes a crash at any point harmless: killed before the count is
        written, nothing happened; killed between the count and the journal line, one ticket is counted as sold
        that nobody holds (the buyer never got a 201); killed after the line, the sale is complete. A crash can
        only ever sell less, never twice. If writing the journal line fails, the count is put back.

        The order is journaled but not fsynced when this returns: ``make_durable`` does that, outside the lock,
        before the buyer is told (README, "Durability").
        """
        if request is not None:
            self._write_key(request, order["order_id"])
        self.write_inventory(Inventory(before.event, before.total, order["remaining"]), durable=False)
        try:
            self._append_line(self.journal_path, order)
        except StoreWriteFailed:
            self.write_inventory(before, durable=False)
            raise
        if request is not None:
            try:
                self._write_key(request, order["order_id"], order)
            except StoreWriteFailed as error:
                # The sale is complete; the claim written above still leads a retry to it (find_replay).
                log.warning("order %s sold, but its key record was not updated: %s", order["order_id"], error)

    def make_durable(self, order: Order, request: IdempotentRequest | None = None) -> None:
        """Flush the journal (and the key file) to disk, so the order survives a crash or a power cut."""
        paths = [self.journal_path]
        if request is not None:
            paths += [self.keys_path / request.file_name, self.keys_path]
        try:
            for path in paths:
                _fsync(path)
        except OSError as error:
            raise OrderNotDurable(
                f"Order {order['order_id']} was recorded, but flushing it to disk failed ({error.strerror}): "
                f"it may not survive a crash. GET /orders/{order['order_id']} shows whether it stands."
            ) from error

    def orders(self) -> Iterator[Order]:
        """Every recorded order, oldest first, read line by line so memory does not grow with the journal."""
        try:
            journal = open(self.journal_path, "rb")  # noqa: SIM115 - closed below, after the last line
        except FileNotFoundError:
            return
        with journal:
            for number, line in enumerate(journal, start=1):
                order = _parse_order_line(line)
                if order is None:
                    log.warning("%s line %d is not an order (a torn write?); skipped", self.journal_path, number)
                else:
                    yield order

    def find_order(self, order_id: str) -> Order | None:
        """The order with this id, or None. Reads the whole journal: fine for lookups, never on the buying path."""
        return next((order for order in self.orders() if order["order_id"] == order_id), None)

    # --- Idempotency keys ---------------------------------------------------------------------------------------

    def find_replay(self, request: IdempotentRequest) -> Order | None:
        """The order an earlier request with the same Idempotency-Key produced, if that sale was recorded.

        A key file is written twice: first as a claim naming the order id (before the sale is written), then
        with the whole order (after the journal line). A claim alone means that sale failed or its worker died
        midway; only then is the journal searched, to tell which. Raises IdempotencyKeyReused when the key's
        recorded order came from a different body.
        """
        path = self.keys_path / request.file_name
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
        self._replace(self.keys_path / request.file_name, record, durable=False)

    # --- Reset ---------------------------------------------------------------------------------------------------

    def reset(self, inventory: Inventory) -> None:
        """Start over: empty the journal, drop every idempotency key, then write the fresh inventory."""
        self._replace_bytes(self.journal_path, b"")
        if self.keys_path.exists():
            # One rename takes every key out of use at once; deleting the files may then take its time.
            discarded = self.keys_path.with_name(f".{self.keys_path.name}.{os.getpid()}.{time.time_ns()}.tmp")
            try:
                os.replace(self.keys_path, discarded)
            except OSError as error:
                raise StoreWriteFailed(f"could not clear {self.keys_path}: {error.strerror}") from error
            shutil.rmtree(discarded, ignore_errors=True)
        self.write_inventory(inventory)

    # --- Files ---------------------------------------------------------------------------------------------------

    def _read_json(self, path: Path, kind: str) -> Any:
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            raise _damaged(path, "the file is missing", kind) from None
        except OSError as error:
            raise _damaged(path, f"it cannot be read ({error.strerror})", kind) from error
        if not text.strip():
            raise _damaged(path, "the file is empty", kind)
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as error:
            raise _damaged(path, f"it is not valid JSON ({error})", kind) from None

    def _replace(self, path: Path, data: object, *, durable: bool = True) -> None:
        self._replace_bytes(path, _to_json_bytes(data, indent=2), durable=durable)

    @staticmethod
    def _replace_bytes(path: Path, content: bytes, *, durable: bool = True) -> None:
        """Write a temporary file beside ``path`` and rename it over ``path`` (fsynced first if ``durable``)."""
        temporary = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = _write_temporary(path, content, durable=durable)
            os.replace(temporary, path)
        except OSError as error:
            if temporary is not None:
                with suppress(OSError):
                    os.unlink(temporary)
            message = f"could not write {path}: {error.strerror}; its previous contents are intact"
            raise StoreWriteFailed(message) from error

    @staticmethod
    def _create_if_absent(path: Path, data: object) -> None:
        temporary = _write_temporary(path, _to_json_bytes(data, indent=2), durable=True)
        try:
            # link() fails if the name exists, so a file someone else created in between is never replaced.
            with suppress(FileExistsError):
                os.link(temporary, path)
        finally:
            os.unlink(temporary)

    @staticmethod
    def _append_line(path: Path, data: object) -> None:
        line = _to_json_bytes(data) + b"\n"
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as error:
            raise StoreWriteFailed(f"could not open {path}: {error.strerror}") from error
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # A power cut can leave a torn last line; start ours on a fresh line so it stays readable.
                line = b"\n" + line
            written = os.write(fd, line)
            if written != len(line):
                # Never leave part of an order behind: a line missing only its newline would read as a sale.
                if os.fstat(fd).st_size == size + written:
                    os.ftruncate(fd, size)
                raise OSError(28, f"short write ({written} of {len(line)} bytes)")
        except OSError as error:
            raise StoreWriteFailed(f"could not append to {path}: {error.strerror or error}") from error
        finally:
            os.close(fd)


def _damaged(path: Path, problem: str, kind: str) -> StoreDamaged:
    return StoreDamaged(f"{path} cannot be used: {problem}. The service leaves it untouched. {ADVICE[kind]}")


def _write_temporary(path: Path, content: bytes, *, durable: bool) -> str:
    """A new file beside ``path``, readable by all, holding ``content`` (fsynced if ``durable``): its name."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), 0o644)
            file.write(content)
            if durable:
                file.flush()
                os.fsync(file.fileno())
    except BaseException:
        os.unlink(temporary)
        raise
    return temporary


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _to_json_bytes(data: object, indent: int | None = None) -> bytes:
    """Indented (a file for people to read, ending in a newline) or compact (one journal line, no newline)."""
    if indent:
        return json.dumps(data, ensure_ascii=False, indent=indent).encode() + b"\n"
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def _parse_order_line(line: bytes) -> Order | None:
    try:
        order = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if isinstance(order, dict) and isinstance(order.get("order_id"), str):
        return order
    return None
