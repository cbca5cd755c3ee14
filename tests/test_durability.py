"""The file store's writes: every order flushed before its 201 (one fsync for several), db.json swapped in whole.

The flush lock file (db.json.orders.flushed) holds which journal, and how many of its bytes, are known to be on
disk; a purchase skips its fsync only when that covers its line (service/stores/file.py, group commit).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from loadtest.embedded import EmbeddedService
from service.config import load_config
from service.modes import MODES, Write
from service.purchase import PurchaseRequest, purchase
from service.stores.file import FileStore, atomic
from service.stores.file.journal import FLUSHED
from tests.conftest import Api, buy_together, read_db


def flushed(directory: Path) -> tuple[int, int]:
    """(journal inode, bytes on disk) as the flush lock file records them."""
    inode, size = FLUSHED.unpack((directory / "db.json.orders.flushed").read_bytes())
    return inode, size


def journal(directory: Path) -> tuple[int, int]:
    stat = os.stat(directory / "db.json.orders")
    return stat.st_ino, stat.st_size


@pytest.mark.parametrize("mode", ["locked", "unlocked"])
def test_every_order_told_201_lies_in_the_flushed_part_of_the_journal(tmp_path: Path, mode: str) -> None:
    with EmbeddedService(workers=4, race_window_ms=0, directory=tmp_path) as service:
        api = Api(service.url)
        api.put("/mode", {"mode": mode, "race_window_ms": 0})
        api.reset(tickets=10_000)

        answers = buy_together(service.url, 120)

        assert all(answer.status_code == 201 for answer in answers)
        # The last purchase to finish flushed (or found flushed) everything before its own line.
        assert flushed(tmp_path) == journal(tmp_path)
        assert len(api.all_orders()) == 120


def test_a_reset_forgets_the_flushes_of_the_journal_it_replaces(tmp_path: Path) -> None:
    # A new journal may get the inode of an old one; it must never count as flushed because of the old one.
    store = FileStore(load_config({"db_path": tmp_path / "db.json", "race_window_ms": 0}))
    store.prepare()
    config = store.config
    purchase(store, PurchaseRequest("ana", 1), config)
    assert flushed(tmp_path) == journal(tmp_path)

    store.reset(tickets=10, event=None)
    assert flushed(tmp_path) == (0, 0)

    purchase(store, PurchaseRequest("bo", 1), config)
    assert flushed(tmp_path) == journal(tmp_path)


def test_db_json_is_swapped_in_whole_and_no_temporary_file_stays(tmp_path: Path) -> None:
    store = FileStore(load_config({"db_path": tmp_path / "db.json", "tickets": 5, "race_window_ms": 0}))
    store.prepare()
    for buyer in ("ana", "bo", "cy"):
        purchase(store, PurchaseRequest(buyer, 1), store.config)

    assert read_db(tmp_path / "db.json")["remaining"] == 2
    assert list(tmp_path.glob(".*.tmp")) == []


def test_where_names_cannot_be_exchanged_the_file_is_renamed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some filesystems and C libraries have no renameat2(RENAME_EXCHANGE): os.replace does the same job there.
    monkeypatch.setattr(atomic, "_renameat2", None)
    store = FileStore(load_config({"db_path": tmp_path / "db.json", "tickets": 5, "race_window_ms": 0}))
    store.prepare()
    purchase(store, PurchaseRequest("ana", 2), store.config)

    assert read_db(tmp_path / "db.json")["remaining"] == 3
    assert list(tmp_path.glob(".*.tmp")) == []


# --- After a power cut: db.json older than the journal -------------------------------------------------------------

STALE = ["written after the first sale", "of an older ticketlock, which did not say what it reflects"]


@pytest.mark.parametrize("stale", STALE)
@pytest.mark.parametrize("mode", [mode.name for mode in FileStore.modes()])
def test_a_db_json_older_than_the_journal_is_brought_up_to_date_at_start(tmp_path: Path, mode: str, stale: str) -> None:
    with EmbeddedService(workers=2, race_window_ms=0, directory=tmp_path) as first:
        api = Api(first.url)
        api.put("/mode", {"mode": mode})
        api.reset(tickets=10)
        of_an_older_ticketlock = read_db(tmp_path / "db.json")
        of_an_older_ticketlock.pop("reflects")  # taken to reflect none of the journal
        sold = [api.post("/orders", {"buyer": "first"}).status_code]
        after_the_first_sale = read_db(tmp_path / "db.json")
        sold += [api.post("/orders", {"buyer": f"buyer-{n}"}).status_code for n in range(3)]
    older = after_the_first_sale if stale == STALE[0] else of_an_older_ticketlock
    # The journal is flushed before every 201, db.json is not: after a power cut it may be older. Put one back.
    (tmp_path / "db.json").write_text(json.dumps(older))

    with EmbeddedService(workers=2, race_window_ms=0, directory=tmp_path) as restarted:
        api = Api(restarted.url)
        remaining = api.tickets()["remaining"]
        api.put("/mode", {"mode": "locked"})
        after = [api.post("/orders", {"buyer": f"after-{n}"}).status_code for n in range(remaining + 2)]
        log = restarted.log_path.read_text()

    moves_the_count = MODES[mode].write is not Write.MEMORY
    assert sold == [201] * 4
    # The count is what the journal allows: every order of a mode that moves it is applied, once.
    assert remaining == (6 if moves_the_count else 10)
    assert after == [201] * remaining + [409, 409]  # and the locked mode then sells exactly the tickets left
    if moves_the_count:
        applied = 3 if stale == STALE[0] else 4
        assert f"{applied} orders were journaled after the" in log and f"remaining {6 + applied} -> 6" in log
    else:
        assert "db.json is up to date" in log


def test_a_restart_applies_nothing_that_db_json_already_counts(tmp_path: Path) -> None:
    config = load_config({"db_path": tmp_path / "db.json", "race_window_ms": 0})
    store = FileStore(config)
    store.prepare()
    store.reset(tickets=10, event=None)
    for buyer in ("ana", "bo", "cy"):
        purchase(store, PurchaseRequest(buyer, 2), config)

    FileStore(config).prepare()  # a restart after a clean stop (or a crash of processes, not of the machine)

    assert store.read_inventory().remaining == 4


def test_a_worker_started_without_the_start_step_brings_db_json_up_to_date_before_its_first_sale(
    tmp_path: Path,
) -> None:
    # gunicorn 'service:create_app()' and flask run never run prepare(): each worker does its redo itself.
    config = load_config({"db_path": tmp_path / "db.json", "race_window_ms": 0})
    store = FileStore(config)
    store.prepare()
    store.reset(tickets=10, event=None)
    purchase(store, PurchaseRequest("first", 1), config)
    after_the_first_sale = read_db(tmp_path / "db.json")
    for buyer in ("ana", "bo", "cy"):
        purchase(store, PurchaseRequest(buyer, 1), config)
    (tmp_path / "db.json").write_text(json.dumps(after_the_first_sale))  # what a power cut can leave

    worker = FileStore(config)  # a new worker process's store, no prepare()
    sold = purchase(worker, PurchaseRequest("after", 1), config).order

    assert sold["remaining"] == 5  # 10 - 4 journaled - this one: not the stale 9 - 1
    assert worker.read_inventory().remaining == 5
