"""Idempotency keys, ``db.json.keys/``: one small file per key, naming the order its first request produced.

A key's file is named by a hash of the key (keys are client text) and written twice: first as a claim naming the
order id, before the sale is written, then with the whole order, after the journal line. A claim alone means
that sale failed or its worker died midway; only then is the journal searched, to tell which.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from service.errors import IdempotencyKeyReused, StoreDamaged, StoreWriteFailed
from service.stores.base import IdempotentRequest, Order
from service.stores.file.atomic import fsync, replace_json

log = logging.getLogger(__name__)


class IdempotencyKeys:
    """The key files of one file store, in the folder ``path``; ``find_order`` looks an order up in the journal."""

    def __init__(
        self, path: Path, find_order: Callable[[str], Order | None], damaged: Callable[[Path, str], StoreDamaged]
    ) -> None:
        self.path = path
        self.find_order = find_order
        self.damaged = damaged  # how the store reports a file it cannot use

    def find_replay(self, request: IdempotentRequest) -> Order | None:
        """The order an earlier request with the same key produced, if that sale was recorded.

        Raises IdempotencyKeyReused when the key's recorded order came from a different body.
        """
        path = self._file(request)
        try:
            record = json.loads(path.read_bytes())
            earlier = record.get("order") or self.find_order(str(record["order_id"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise self.damaged(path, f"it is not a key record ({error})") from None
        if earlier is None:
            return None  # a claim whose sale never happened: this request may try again
        if record.get("fingerprint") != request.fingerprint:
            raise IdempotencyKeyReused(
                "This Idempotency-Key was already used with a different body; use a new key for a new order."
            )
        return dict(earlier)

    def claim(self, request: IdempotentRequest, order_id: str) -> None:
        """Record that this key's sale, ``order_id``, is being written (before anything of it is)."""
        self._write(request, {"order_id": order_id})

    def complete(self, request: IdempotentRequest, order: Order) -> None:
        """Record the whole order under its key; on failure the claim still leads a retry to the order."""
        try:
            self._write(request, {"order_id": order["order_id"], "order": order})
        except StoreWriteFailed as error:
            log.warning("order %s sold, but its key record was not updated: %s", order["order_id"], error)

    def make_durable(self, request: IdempotentRequest) -> None:
        """fsync the key's file and the folder naming it (OSError if the disk fails)."""
        for path in (self._file(request), self.path):
            fsync(path)

    def discard_all(self) -> None:
        """Forget every key at once (a reset): one rename takes them out of use, deleting them may take its time."""
        if not self.path.exists():
            return
        discarded = self.path.with_name(f".{self.path.name}.{os.getpid()}.{time.time_ns()}.tmp")
        try:
            os.replace(self.path, discarded)
        except OSError as error:
            raise StoreWriteFailed(f"could not clear {self.path}: {error.strerror}") from error
        shutil.rmtree(discarded, ignore_errors=True)

    def leftover_candidates(self) -> list[Path]:
        """Temporary files in the keys' folder, some perhaps left by a writer that was killed."""
        return list(self.path.glob(".*.tmp"))

    def _file(self, request: IdempotentRequest) -> Path:
        return self.path / f"{request.digest}.json"

    def _write(self, request: IdempotentRequest, record: dict[str, object]) -> None:
        replace_json(self._file(request), {**asdict(request), **record}, durable=False)
