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
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from service.config import MAX_RACE_WINDOW_MS, MODES
from service.errors import IdempotencyKeyReused, StoreDamaged, StoreWriteFailed

log = logging.getLogger(__name__)

Order = dict[str, Any]


@dataclass(frozen=True)
class Inventory:
    """The contents of db.json: how many tickets the event has, and how many are left."""

    event: str
    total: int
    remaining: int

    @property
    def sold(self) -> int:
        """Tickets the count says are gone (the order journal may disagree after an unlocked run)."""
        return self.total - self.remaining


@dataclass(frozen=True)
class PurchaseSettings:
    """How purchases run, switchable at run time: the mode and the simulated work between read and write."""

    mode: str
    race_window_ms: int


@dataclass(frozen=True)
class IdempotentRequest:
    """A purchase that carried an Idempotency-Key: the key and a fingerprint of the body it came with."""

    key: str
    fingerprint: str

    @property
    def file_name(self) -> str:
        """Keys are client text: the file is named by their hash so no key can escape the folder."""
        return hashlib.sha256(self.key.encode()).hexdigest() + ".json"


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

    # --- Start-up -----------------------------------------------------------------------------------------

    def create_missing(self, inventory: Inventory, settings: PurchaseSettings) -> None:
        """Create db.json and the settings file from these defaults where they do not exist yet."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._create_if_absent(self.path, asdict(inventory))
        self._create_if_absent(self.settings_path, asdict(settings))

    def remove_leftovers(self) -> list[Path]:
        """Delete temporary files that a killed writer left behind. Call only while no worker is running."""
        leftovers = sorted(self.path.parent.glob(f".{self.path.name}.*.tmp"))
        for leftover in leftovers:
            with suppress(FileNotFoundError):
                leftover.unlink()
        return leftovers

    # --- The inventory (db.json) ----------------------------------------------------------------------------

    def read_inventory(self) -> Inventory:
        """Read db.json, refusing a file that is missing, not JSON or not an inventory."""
        data = self._read_json(self.path)
        if not isinstance(data, dict) or set(data) != {"event", "total", "remaining"}:
            raise self._damaged(self.path, 'expected an object with exactly "event", "total" and "remaining"')
        event, total, remaining = data["event"], data["total"], data["remaining"]
        if not isinstance(event, str) or not _is_count(total) or not _is_count(remaining) or remaining > total:
            raise self._damaged(self.path, '"event" must be text and 0 <= "remaining" <= "total" whole numbers')
        return Inventory(event=event, total=total, remaining=remaining)

    def write_inventory(self, inventory: Inventory) -> None:
        """Replace db.json atomically with this inventory."""
        self._replace(self.path, asdict(inventory))

    # --- Settings ---------------------------------------------------------------------------------------------

    def read_settings(self) -> PurchaseSettings:
        """Read the purchase settings every worker shares."""
        data = self._read_json(self.settings_path)
        if not isinstance(data, dict) or set(data) != {"mode", "race_window_ms"}:
            raise self._damaged(self.settings_path, 'expected an object with exactly "mode" and "race_window_ms"')
        mode, window = data["mode"], data["race_window_ms"]
        if mode not in MODES or not _is_count(window) or window > MAX_RACE_WINDOW_MS:
            raise self._damaged(self.settings_path, f'"mode" must be one of {MODES}, "race_window_ms" 0..5000')
        return PurchaseSettings(mode=mode, race_window_ms=window)

    def write_settings(self, settings: PurchaseSettings) -> None:
        """Replace the settings file atomically. Callers that read-modify-write hold the settings lock."""
        self._replace(self.settings_path, asdict(settings))

    # --- Orders -------------------------------------------------------------------------------------------------

    def record_sale(self, before: Inventory, order: Order, request: IdempotentRequest | None = None) -> None:
        """Write the count the sale leaves, then journal the order; if journaling fails, put the count back.

        The order is in the journal (and the count in db.json) when this returns, but not yet fsynced:
        ``sync_orders`` does that, outside the lock, before the buyer is told (README, "Durability").
        """
        if request is not None:
            self._replace(self.keys_path / request.file_name, {**asdict(request), "order_id": order["order_id"]})
        self.write_inventory(Inventory(before.event, before.total, order["remaining"]))
        try:
            self._append_line(self.journal_path, order)
        except StoreWriteFailed:
            self.write_inventory(before)
            raise

    def sync_orders(self) -> None:
        """Flush the journal to disk, so every order appended so far survives a crash or power cut."""
        try:
            fd = os.open(self.journal_path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as error:
            raise StoreWriteFailed(f"could not flush {self.journal_path}: {error.strerror}") from error

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

    def find_replay(self, request: IdempotentRequest) -> Order | None:
        """The order an earlier request with the same Idempotency-Key produced, if it was recorded.

        Raises IdempotencyKeyReused when the key was first used with a different body.
        """
        try:
            record = self._read_json(self.keys_path / request.file_name)
        except StoreDamaged:
            return None
        if not isinstance(record, dict) or record.get("key") != request.key:
            return None
        if record.get("fingerprint") != request.fingerprint:
            raise IdempotencyKeyReused(
                "This Idempotency-Key was already used with a different body; use a new key for a new order."
            )
        # A claim whose order never reached the journal (the sale failed or the worker died) is no replay.
        return self.find_order(str(record.get("order_id")))

    # --- Reset ---------------------------------------------------------------------------------------------------

    def reset(self, inventory: Inventory) -> None:
        """Start over: empty the journal and the idempotency keys, then write the fresh inventory."""
        self._replace_bytes(self.journal_path, b"")
        shutil.rmtree(self.keys_path, ignore_errors=True)
        self.write_inventory(inventory)

    # --- Files ---------------------------------------------------------------------------------------------------

    def _read_json(self, path: Path) -> Any:
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            raise self._damaged(path, "the file is missing") from None
        except OSError as error:
            raise self._damaged(path, f"it cannot be read ({error.strerror})") from error
        if not text.strip():
            raise self._damaged(path, "the file is empty")
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as error:
            raise self._damaged(path, f"it is not valid JSON ({error})") from None

    @staticmethod
    def _damaged(path: Path, problem: str) -> StoreDamaged:
        return StoreDamaged(
            f"{path} cannot be used: {problem}. The service leaves it untouched; "
            "fix or remove it (a missing db.json is recreated at start), or POST /reset."
        )

    def _replace(self, path: Path, data: object) -> None:
        self._replace_bytes(path, _to_json_bytes(data, indent=2))

    @staticmethod
    def _replace_bytes(path: Path, content: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as error:
            raise StoreWriteFailed(f"could not write {path}: {error.strerror}") from error
        try:
            with os.fdopen(fd, "wb") as file:
                os.fchmod(file.fileno(), 0o644)
                file.write(content)
            os.replace(temporary, path)
        except OSError as error:
            with suppress(OSError):
                os.unlink(temporary)
            message = f"could not write {path}: {error.strerror}; its previous contents are intact"
            raise StoreWriteFailed(message) from error

    def _create_if_absent(self, path: Path, data: object) -> None:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                os.fchmod(file.fileno(), 0o644)
                file.write(_to_json_bytes(data, indent=2))
            # link() fails if the name exists: several workers starting at once create the file exactly once.
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
                # A crash can leave a torn last line; start ours on a fresh line so it stays readable.
                line = b"\n" + line
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(28, f"short write ({written} of {len(line)} bytes)")
        except OSError as error:
            raise StoreWriteFailed(f"could not append to {path}: {error.strerror or error}") from error
        finally:
            os.close(fd)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _to_json_bytes(data: object, indent: int | None = None) -> bytes:
    separators = None if indent else (",", ":")
    return json.dumps(data, ensure_ascii=False, indent=indent, separators=separators).encode()


def _parse_order_line(line: bytes) -> Order | None:
    try:
        order = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if isinstance(order, dict) and isinstance(order.get("order_id"), str):
        return order
    return None
