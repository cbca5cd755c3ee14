"""The locked mode under faults: killed workers, a killed server, a busy lock, damaged files, failed writes.

Every scenario runs a real 4-worker gunicorn on loopback, is bounded in buyers and time, and ends every
process it started (EmbeddedService stops its process group and checks by PID that nothing survives).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from loadtest.checker import Check, check
from loadtest.embedded import EmbeddedService
from service.config import MAX_LOCK_TIMEOUT_S, MAX_RACE_WINDOW_MS
from tests.conftest import (
    Api,
    assert_a_purchase_ends_at_its_deadline,
    buy_together,
    lock_holders,
    read_db,
    start_load,
    store_files,
)


def lock_holder(lock_path: Path) -> int | None:
    """The PID holding the exclusive flock on ``lock_path`` (None when it is free)."""
    return next((pid for pid, kind in lock_holders(lock_path) if kind == "WRITE"), None)


def wait_for_workers(service: EmbeddedService, count: int, health: int = 200) -> None:
    """Wait until gunicorn has replaced killed workers and GET /health answers ``health`` again."""
    deadline = time.monotonic() + 20
    while len(service.worker_pids()) < count or _health(service.url) != health:
        assert time.monotonic() < deadline, f"gunicorn did not get back to {count} workers"
        time.sleep(0.05)


def _health(url: str) -> int | None:
    try:
        return Api(url).get("/health", timeout=2).status_code
    except requests.RequestException:
        return None


def assert_locked_invariants(result: Check, tickets: int, db_path: Path, orders: list[dict[str, Any]]) -> None:
    """Zero oversell, no lost or phantom order, and a count that errs only toward selling less."""
    assert result.correct, result.anomalies
    assert result.oversold == 0 and not result.lost_orders and not result.duplicate_ids
    recorded = sum(order["quantity"] for order in orders)
    sold_by_count = tickets - read_db(db_path)["remaining"]
    # A worker killed between writing the count and journaling the order leaves one ticket unsold and unowned;
    # its buyer never got a 201 (the connection died), so at most one such ticket per unknown outcome.
    assert 0 <= sold_by_count - recorded <= result.info


# --- 1. Worker crash -----------------------------------------------------------------------------------------------


def test_killing_workers_mid_purchase_never_oversells_nor_loses_an_order(tmp_path: Path) -> None:
    tickets = 40
    with EmbeddedService(workers=4, race_window_ms=40, directory=tmp_path) as service:
        api = Api(service.url)
        buyers, outcomes = start_load([service.url], tickets, "locked")
        kills: list[tuple[int, bool]] = []

        random_choice = random.Random(7)
        while buyers.is_alive() and len(kills) < 6:
            time.sleep(0.15)
            holder = lock_holder(tmp_path / "db.json.lock")
            workers = service.worker_pids()
            # Every other kill targets the worker holding the lock, in the middle of its race window.
            in_window = len(kills) % 2 == 0 and holder in workers
            victim = holder if in_window else random_choice.choice(workers)
            if victim is None:
                continue
            os.kill(victim, signal.SIGKILL)
            kills.append((victim, in_window))
        buyers.join(timeout=60)
        assert not buyers.is_alive()
        wait_for_workers(service, 4)
        orders = api.all_orders()
        result = check(tickets, outcomes, api.tickets()["remaining"], orders)

        assert len(kills) >= 3 and any(in_window for _, in_window in kills), kills
        assert result.info >= 1  # the killed workers' buyers never heard back
        assert_locked_invariants(result, tickets, service.db_path, orders)
        assert api.all_orders() == orders  # and the journal reads the same after the dust settles


# --- 2. Whole-server crash --------------------------------------------------------------------------------------


def test_a_killed_server_restarts_cleanly_on_the_same_files(tmp_path: Path) -> None:
    tickets = 40
    with EmbeddedService(workers=4, race_window_ms=40, directory=tmp_path) as first:
        buyers, outcomes = start_load([first.url], tickets, "locked")
        while len((tmp_path / "db.json.orders").read_bytes().splitlines()) < 5:  # crash it mid-run
            time.sleep(0.01)
        os.killpg(first.master_pid or 0, signal.SIGKILL)  # master and every worker at once
        buyers.join(timeout=60)
    # What a crash can leave behind: a temporary file half written, and a torn last line in the journal.
    half_written = tmp_path / ".db.json.k1ll3d.tmp"
    half_written.write_text('{"event": "half')
    an_hour_ago = time.time() - 3600
    os.utime(half_written, (an_hour_ago, an_hour_ago))  # left by a crash, not by a live writer
    with open(tmp_path / "db.json.orders", "ab") as journal:
        journal.write(b'{"order_id": "torn", "buyer": "crash", "qua')

    with EmbeddedService(workers=4, directory=tmp_path) as second:
        api = Api(second.url)
        orders = api.all_orders()
        result = check(tickets, outcomes, api.tickets()["remaining"], orders)

        assert result.ok >= 1 and result.info >= 1, "the crash should hit the run in the middle"
        assert_locked_invariants(result, tickets, second.db_path, orders)
        assert "torn" not in {order["order_id"] for order in orders}
        assert not list(tmp_path.glob(".db.json.*.tmp"))
        # New sales go on after the torn line, on a line of their own.
        after = api.post("/orders", {"buyer": "after the crash"})
        assert after.status_code == 201
        assert api.all_orders()[-1] == after.json()
        journal_lines = (tmp_path / "db.json.orders").read_bytes().splitlines()
        assert journal_lines[-2].endswith(b'"qua') and json.loads(journal_lines[-1]) == after.json()


# --- 3. Lock contention -------------------------------------------------------------------------------------------


def test_a_busy_lock_answers_503_with_retry_after_and_never_sells_twice(tmp_path: Path) -> None:
    with EmbeddedService(
        workers=4, race_window_ms=400, directory=tmp_path, environment={"TICKETLOCK_LOCK_TIMEOUT": "0.1"}
    ) as service:
        api = Api(service.url)
        api.reset(tickets=100)

        responses = buy_together(service.url, buyers=12)

        statuses = [response.status_code for response in responses]
        busy = [response for response in responses if response.status_code == 503]
        assert set(statuses) <= {201, 503} and busy and 201 in statuses, statuses
        for response in busy:
            assert response.json()["error"] == "lock_timeout"
            assert int(response.headers["Retry-After"]) >= 1
            # Not a speed target, a hang check: the wait is bounded by the 0.1 s timeout plus queueing
            # behind at most the other requests of this test.
            assert response.elapsed.total_seconds() < 12 * 0.4 + 2
        sold = statuses.count(201)
        assert api.get("/tickets").json()["remaining"] == 100 - sold
        assert len(api.all_orders()) == sold


def test_a_purchase_at_the_largest_timeouts_ends_at_its_one_deadline_before_the_worker_timeout(tmp_path: Path) -> None:
    # The largest lock timeout and race window, the default worker timeout (which must exceed both together).
    timeouts = {
        "TICKETLOCK_LOCK_TIMEOUT": str(MAX_LOCK_TIMEOUT_S),
        "TICKETLOCK_RACE_WINDOW_MS": str(MAX_RACE_WINDOW_MS),
    }
    with (
        EmbeddedService(workers=1, directory=tmp_path, environment=timeouts) as service,
        open(tmp_path / "db.json.lock", "a") as lock_file,
    ):
        # Another process of the host holds the lock file: first exclusively, as a locked sale does, so that the
        # purchase waits for its sale's shared hold; then shared, so that its guard waits to take it exclusively.
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        assert_a_purchase_ends_at_its_deadline(service, hand_on=lambda: fcntl.flock(lock_file, fcntl.LOCK_SH))


# --- 4. Damaged store ---------------------------------------------------------------------------------------------

DAMAGED = {
    "empty": (b"", "empty"),
    "truncated": (b'{"event": "x", "total": 10, "rem', "not valid JSON"),
    "not JSON": (b"tickets: 10\n", "not valid JSON"),
    "a list": (b"[10, 10]", "exactly"),
    "a missing field": (b'{"event": "x", "total": 10}', "exactly"),
    "more remaining than total": (b'{"event": "x", "total": 10, "remaining": 11}', "remaining"),
    "a boolean count": (b'{"event": "x", "total": true, "remaining": 1}', "whole numbers"),
    "a negative count": (b'{"event": "x", "total": 10, "remaining": -1}', "whole numbers"),
}


@pytest.mark.parametrize("mode", ["locked", "unlocked"])
@pytest.mark.parametrize("damage", DAMAGED)
def test_a_damaged_db_json_is_reported_and_left_untouched(
    api: Api, service: EmbeddedService, damage: str, mode: str
) -> None:
    api.put("/mode", {"mode": mode})
    content, problem = DAMAGED[damage]
    service.db_path.write_bytes(content)
    before = store_files(service.directory)

    health = api.get("/health")
    for response in (api.get("/tickets"), api.post("/orders", {"buyer": "ana"}), health):
        assert response.status_code == (503 if response is health else 500)
        error = response.json()
        assert error["error"] == "store_damaged"
        assert str(service.db_path) in error["message"] and problem in error["message"]
    assert store_files(service.directory) == before


def test_a_db_json_removed_at_run_time_is_reported_not_recreated(api: Api, service: EmbeddedService) -> None:
    service.db_path.unlink()

    response = api.post("/orders", {"buyer": "ana"})

    assert (response.status_code, response.json()["error"]) == (500, "store_damaged")
    assert "missing" in response.json()["message"]
    assert not service.db_path.exists()


def test_a_missing_db_json_is_created_from_the_configured_defaults(tmp_path: Path) -> None:
    environment = {"TICKETLOCK_TICKETS": "7", "TICKETLOCK_EVENT": "Matinee"}
    with EmbeddedService(workers=2, directory=tmp_path, environment=environment) as service:
        tickets = Api(service.url).get("/tickets").json()

    assert (tickets["event"], tickets["total"], tickets["remaining"]) == ("Matinee", 7, 7)
    assert read_db(tmp_path / "db.json") == {
        "event": "Matinee",
        "total": 7,
        "remaining": 7,
        "version": 0,
        "reflects": {"journal": "", "bytes": 0, "order": None},  # no journal yet
    }


@contextmanager
def file_size_limit(pids: list[int], limit_bytes: int) -> Iterator[None]:
    """Make writes past ``limit_bytes`` fail (EFBIG) in these processes: a full disk, without filling one."""
    unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    for pid in pids:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit_bytes, resource.RLIM_INFINITY))
    try:
        yield
    finally:
        for pid in pids:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, unlimited)


@pytest.mark.parametrize("mode", ["locked", "unlocked"])
@pytest.mark.parametrize("failing", ["db.json", "journal"])
def test_a_failed_write_keeps_the_previous_files_and_tells_the_buyer_no(
    api: Api, service: EmbeddedService, mode: str, failing: str
) -> None:
    api.put("/mode", {"mode": mode})
    api.post("/orders", {"buyer": "before"})
    db_before = service.db_path.read_bytes()
    journal_size = (service.directory / "db.json.orders").stat().st_size
    # db.json is ~70 bytes: a 20-byte limit fails its write; the journal is larger: a limit just past its
    # size lets db.json be written and makes the order's line fail half-way.
    limit = 20 if failing == "db.json" else journal_size + 10

    with file_size_limit(service.worker_pids(), limit):
        response = api.post("/orders", {"buyer": "during the fault"})

    assert response.status_code == 500 and response.json()["error"] == "store_write_failed"
    assert service.db_path.read_bytes() == db_before
    orders = api.all_orders()
    assert [order["buyer"] for order in orders] == ["before"]
    after = api.post("/orders", {"buyer": "after the fault"})
    assert after.status_code == 201 and after.json()["remaining"] == 8
    assert [order["buyer"] for order in api.all_orders()] == ["before", "after the fault"]


def test_a_failed_write_in_memory_mode_leaves_the_worker_copy_unspent(tmp_path: Path) -> None:
    # One worker, so that every purchase reads the same copy of the count.
    with EmbeddedService(workers=1, race_window_ms=0, directory=tmp_path) as service:
        api = Api(service.url)
        api.put("/mode", {"mode": "memory"})
        before = api.post("/orders", {"buyer": "before"})
        journal_size = (tmp_path / "db.json.orders").stat().st_size

        with file_size_limit(service.worker_pids(), journal_size + 10):
            failed = api.post("/orders", {"buyer": "during the fault"})
        after = api.post("/orders", {"buyer": "after the fault"})

        assert (failed.status_code, failed.json()["error"]) == (500, "store_write_failed")
        # The copy moved for the two recorded sales only: 10 -> 9 -> 8.
        assert [before.json()["remaining"], after.json()["remaining"]] == [9, 8]
        assert [order["buyer"] for order in api.all_orders()] == ["before", "after the fault"]


def test_a_db_json_removed_at_run_time_stays_missing_when_a_worker_restarts(api: Api, service: EmbeddedService) -> None:
    api.post("/orders", {"buyer": "sold before"})
    service.db_path.unlink()
    os.kill(service.worker_pids()[0], signal.SIGKILL)
    wait_for_workers(service, 4, health=503)  # the store is damaged, and GET /health says so

    answers = [api.post("/orders", {"buyer": f"after-{n}"}) for n in range(8)]  # reaches every worker

    assert {answer.status_code for answer in answers} == {500}
    assert not service.db_path.exists()


def test_a_retry_after_a_failed_write_may_change_its_body(api: Api, service: EmbeddedService) -> None:
    key = {"Idempotency-Key": "first-try-failed"}
    api.post("/orders", {"buyer": "before"})
    journal_size = (service.directory / "db.json.orders").stat().st_size

    with file_size_limit(service.worker_pids(), journal_size + 10):
        failed = api.post("/orders", {"buyer": "typo"}, headers=key)
    corrected = api.post("/orders", {"buyer": "fixed"}, headers=key)

    assert failed.json()["error"] == "store_write_failed"
    assert corrected.status_code == 201 and corrected.json()["buyer"] == "fixed"
    assert [order["buyer"] for order in api.all_orders()] == ["before", "fixed"]


@contextmanager
def unwritable(folder: Path) -> Iterator[None]:
    """Make ``folder`` refuse new files: its mode for a user; for root, whom modes do not stop, the immutable
    attribute (``chattr +i``), which needs a filesystem that has it (ext4, xfs, btrfs)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        reason = f"as root, only chattr +i makes a folder unwritable, and it failed here: {made.stderr.strip()}"
        pytest.fail(f"CI=true: {reason}") if os.environ.get("CI") == "true" else pytest.skip(reason)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_health_answers_503_while_the_folder_of_db_json_is_unwritable(tmp_path: Path) -> None:
    with EmbeddedService(workers=2, directory=tmp_path) as service:
        api = Api(service.url)
        with unwritable(tmp_path):
            health = api.get("/health")
            order = api.post("/orders", {"buyer": "ana"})
        after = api.get("/health")
        tickets = api.tickets()

    # GET /health says what the purchase meets: the same code, and where.
    assert (order.status_code, order.json()["error"]) == (500, "store_write_failed")
    assert (health.status_code, health.json()["error"]) == (503, "store_write_failed")
    assert str(tmp_path) in health.json()["message"] and health.headers["Retry-After"] == "1"
    assert (after.status_code, tickets["remaining"]) == (200, 10)


def test_a_journal_line_cut_just_before_its_newline_is_not_an_order(tmp_path: Path) -> None:
    # A write that stops one byte short leaves a complete JSON object without its newline: it must not stay.
    script = f"""
import json, resource, time
time.time = lambda: 1764000000.25  # the moment the store stamps as wrote_at, so that the line's length is known
from pathlib import Path
from service.config import load_config
from service.errors import StoreWriteFailed
from service.stores.base import Inventory
from service.stores.file import FileStore
store = FileStore(load_config({{"db_path": Path({str(tmp_path / "db.json")!r}), "tickets": 5}}))
store.prepare()
order = {{"order_id": "cut", "buyer": "a buyer whose line is longer than db.json", "quantity": 1, "remaining": 4,
         "timing": {{"started_at": 1.0, "read_at": 1.0, "wrote_at": time.time()}}}}
line = json.dumps(order, ensure_ascii=False, separators=(",", ":")).encode() + b"\\n"
resource.setrlimit(resource.RLIMIT_FSIZE, (len(line) - 1, resource.RLIM_INFINITY))
try:
    store.record_sale(Inventory.full("x", 5), order)
except StoreWriteFailed as error:
    print("refused:", error)
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)

    assert "refused: could not append" in completed.stdout, completed.stdout + completed.stderr
    assert (tmp_path / "db.json.orders").read_bytes() == b""
    assert read_db(tmp_path / "db.json")["remaining"] == 5


def test_a_damaged_key_file_is_reported_not_sold_again(api: Api, service: EmbeddedService) -> None:
    key = {"Idempotency-Key": "damaged-key"}
    assert api.post("/orders", {"buyer": "ana"}, headers=key).status_code == 201
    (key_file,) = (service.directory / "db.json.keys").glob("*.json")
    key_file.write_text("{not json")

    retry = api.post("/orders", {"buyer": "ana"}, headers=key)

    assert (retry.status_code, retry.json()["error"]) == (500, "store_damaged")
    assert api.get("/tickets").json()["sold"] == 1


def test_a_damaged_settings_file_is_repaired_by_a_full_put_and_blocks_a_reset(
    api: Api, service: EmbeddedService
) -> None:
    api.post("/orders", {"buyer": "ana"})
    settings = service.directory / "db.json.settings"
    settings.write_text('{"mode": "lockd", "race_window_ms": 20}')
    before = store_files(service.directory)

    reset = api.post("/reset", {"tickets": 5})
    assert (reset.status_code, reset.json()["error"]) == (500, "store_damaged")
    assert "PUT /mode" in reset.json()["message"]
    health = api.get("/health")
    assert (health.status_code, health.json()["error"]) == (503, "store_damaged")
    assert "db.json.settings" in health.json()["message"]
    assert store_files(service.directory) == before

    repaired = api.put("/mode", {"mode": "locked", "race_window_ms": 20})
    assert repaired.status_code == 200
    assert api.post("/orders", {"buyer": "bo"}).status_code == 201
