"""The order journal, ``db.json.orders``: one JSON line per order, only ever appended, flushed by group commit.

A reset starts a new journal whose first line names it (``{"journal": "<id>"}``), so that a live view reading
from a byte offset can tell that it is reading another journal. A line is appended whole or not at all; a line
torn by a power cut is skipped when read, and the next order starts on a fresh line after it.

``PATH.flushed`` is the flush lock file, and records which journal (its inode) and how many of its bytes are on
disk: ``flush`` fsyncs only when the bytes it must make durable are not on disk yet, so that one fsync serves
every worker that appended while the previous one ran (group commit).

db.json says how much of the journal its count reflects (``Reflects``): which journal, the bytes before the sale
that wrote it, and that sale's order, whose line is appended just after. ``orders_from`` reads what came later.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from service import flock
from service.errors import LockTimeout, StoreWriteFailed
from service.stores.base import Feed, Order
from service.stores.file.atomic import replace_bytes, to_json_bytes

log = logging.getLogger(__name__)

FEED_CHUNK_BYTES = 64 * 1024
FLUSHED = struct.Struct("<QQ")  # the flush lock file's record: the journal's inode, and its bytes on disk
HEADER_BYTES = 128  # enough for a reset's first line, {"journal": "<32 hex digits>"}


@dataclass(frozen=True)
class Reflects:
    """How much of the journal a count reflects: every order of journal ``journal`` ("" for one started by its
    first order) whose line starts before byte ``bytes``, and the order ``order``, written with the count just
    before its own line was appended (None: no such order)."""

    journal: str
    bytes: int
    order: str | None = None


class Journal:
    """The orders of one file store, oldest first, in the file at ``path``."""

    def __init__(self, path: Path, lock_timeout_s: float) -> None:
        self.path = path
        self.flushed_path = path.with_name(f"{path.name}.flushed")
        self.lock_timeout_s = lock_timeout_s

    # --- Writing -----------------------------------------------------------------------------------------------

    def append(self, order: Order) -> None:
        """Append the order's line, whole or not at all (StoreWriteFailed); it is on disk after ``flush``."""
        line = to_json_bytes(order) + b"\n"
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise StoreWriteFailed(f"could not open {self.path}: {error.strerror}") from error
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                self.forget_flushes()  # a journal just made (the first order, or one deleted by hand)
            elif os.pread(fd, 1, size - 1) != b"\n":
                # A power cut can leave a torn last line; start ours on a fresh line so it stays readable.
                line = b"\n" + line
            written = os.write(fd, line)
            if written != len(line):
                self._take_back(fd, size, written)
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(line)} bytes)")
        except OSError as error:
            raise StoreWriteFailed(f"could not append to {self.path}: {error.strerror or error}") from error
        finally:
            os.close(fd)

    def _take_back(self, fd: int, size: int, written: int) -> None:
        """Cut a short write's bytes off the end: a line missing only its newline would read as a sale.

        Those bytes may have been flushed meanwhile, and the next line will take their place: the flush record
        must end before them.
        """
        try:
            with self._forgetting_flushes(beyond=size):
                _cut_back(fd, size, written)
        except LockTimeout:
            _cut_back(fd, size, written)  # the disk stalls: the part must go all the same

    def start_afresh(self) -> Reflects:
        """Replace the journal by an empty one whose first line names it (a reset): all of it, reflected."""
        journal_id = uuid.uuid4().hex
        header = to_json_bytes({"journal": journal_id}) + b"\n"
        replace_bytes(self.path, header)
        self.forget_flushes()
        return Reflects(journal_id, len(header))

    def flush(self, timeout_s: float) -> None:
        """fsync the journal, unless an fsync that began after everything now in it was written already did; the
        wait for the flush lock lasts ``timeout_s`` at the most.

        This is group commit: while one worker's fsync runs, the workers that appended meanwhile queue for the
        flush lock; the first of them then flushes all their lines with one fsync, and the others find theirs on
        disk already.
        """
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            written = os.fstat(fd)  # this worker's line is in there, and perhaps others' after it
            with flock.holding(self.flushed_path, timeout_s, "the order was not flushed") as record:
                inode, flushed = read_flushed(record)
                if inode == written.st_ino and written.st_size <= flushed:
                    return
                size = os.fstat(fd).st_size
                os.fsync(fd)
                os.pwrite(record, FLUSHED.pack(written.st_ino, size), 0)
        finally:
            os.close(fd)

    def forget_flushes(self) -> None:
        """Record that nothing of the journal is known to be on disk (it was replaced, or cut while stopped)."""
        with self._forgetting_flushes():
            pass

    @contextmanager
    def _forgetting_flushes(self, beyond: int = 0) -> Iterator[None]:
        """Hold the flush lock while the journal is cut back to ``beyond`` bytes (0: replaced by a new journal).

        What is recorded as flushed then ends at ``beyond``: bytes written there later are not the ones that were
        flushed, and a new journal may reuse an earlier one's inode.
        """
        with flock.holding(self.flushed_path, self.lock_timeout_s, "the journal was not changed") as record:
            inode, flushed = read_flushed(record)
            if flushed > beyond:
                os.pwrite(record, FLUSHED.pack(inode if beyond else 0, beyond), 0)
            yield

    # --- Reading -----------------------------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether a journal was ever started (by an order or a reset)."""
        return self.path.exists()

    def end(self, order: str | None = None) -> Reflects:
        """The journal as it is now, all of it (and ``order``, about to be appended): what a count written now
        reflects. ("", 0) while there is no journal."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return Reflects("", 0, order)
        try:
            first_line = os.pread(fd, HEADER_BYTES, 0).partition(b"\n")[0]
            return Reflects(_journal_id(first_line), os.fstat(fd).st_size, order)
        finally:
            os.close(fd)

    def orders(self) -> Iterator[Order]:
        """Every recorded order, oldest first, read line by line so memory does not grow with the journal."""
        return self.orders_from(0)

    def orders_from(self, offset: int) -> Iterator[Order]:
        """The recorded orders whose lines start at byte ``offset`` or later, oldest first."""
        try:
            journal = open(self.path, "rb")  # noqa: SIM115 - closed below, after the last line
        except FileNotFoundError:
            return
        with journal:
            end = 0
            for number, line in enumerate(journal, start=1):
                start, end = end, end + len(line)
                if start < offset:
                    continue
                order = _parse_order_line(line)
                if order is not None:
                    yield order
                elif not (number == 1 and _journal_id(line)):
                    log.warning("%s line %d is not an order (a torn write?); skipped", self.path, number)

    def has_orders(self) -> bool:
        """Whether any order is recorded."""
        return any(True for _ in self.orders())

    def page(self, limit: int, offset: int) -> tuple[int, list[Order]]:
        """How many orders there are, and ``limit`` of them from ``offset``: reads the whole journal, which is fine
        for paging, never on the buying path."""
        count = 0
        page: list[Order] = []
        for count, order in enumerate(self.orders(), start=1):
            if offset < count <= offset + limit:
                page.append(order)
        return count, page

    def find(self, order_id: str) -> Order | None:
        """The order with this id, or None. Reads the whole journal: fine for lookups, never on the buying path."""
        return next((order for order in self.orders() if order["order_id"] == order_id), None)

    def feed(self, cursor: str, limit: int) -> Feed:
        """The orders after ``cursor`` ("<journal id>.<byte offset>"): a seek, then only the new lines.

        Only whole lines count: a line still being appended (or torn by a crash, until the next order starts a
        fresh line after it) ends the slice, and the next cursor points at its start.
        """
        journal_id, _, offset_text = cursor.rpartition(".")
        try:
            journal = open(self.path, "rb")  # noqa: SIM115 - closed below
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


def read_flushed(fd: int) -> tuple[int, int]:
    """The flush lock file's record: the journal's inode, and how many of its bytes are on disk (0, 0: none)."""
    inode, flushed = FLUSHED.unpack(os.pread(fd, FLUSHED.size, 0).ljust(FLUSHED.size, b"\0"))
    return inode, flushed


def _cut_back(fd: int, size: int, written: int) -> None:
    """Cut the ``written`` bytes of a short write off the end of the file, unless someone appended after them."""
    if os.fstat(fd).st_size == size + written:
        os.ftruncate(fd, size)


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
