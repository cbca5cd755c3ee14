"""Several hosts on one real PostgreSQL: the file lock stops protecting, the database's mutexes hold, also under faults.

Two hosts (two gunicorn masters with four workers each, each on its own loopback address with its own lock
file) sell from one throwaway PostgreSQL server started from the operating system's binaries. Every scenario is
bounded in buyers and time, and every process it starts is stopped by PID.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
from flask.testing import FlaskClient
from psycopg import sql

from loadtest.checker import Outcome
from loadtest.cluster import Cluster
from loadtest.database_proxy import DatabaseProxy
from loadtest.embedded import EmbeddedService
from loadtest.postgres import ThrowawayPostgres
from loadtest.redis_server import ThrowawayRedis
from service import create_app, prepare_for_start
from service.config import MAX_LOCK_TIMEOUT_S, MAX_RACE_WINDOW_MS, load_config
from service.guards import SERVICES
from service.modes import MODES, Read
from service.purchase import PurchaseRequest, purchase
from service.stores.postgres import INVENTORY_LOCK, LOCK_CLASS, SWITCH_LOCK, PostgresStore
from tests.conftest import (
    Api,
    assert_a_purchase_ends_at_its_deadline,
    buy_together,
    finish_load,
    purchase_outcome,
    release_together,
    run_cli,
    start_load,
    wait_until_selling,
)

# The cluster below has a lock service: every mode of the postgres store runs.
POSTGRES_MODES = [mode.name for mode in PostgresStore.modes(SERVICES)]
# On two hosts of four workers each, as the cluster of these tests runs.
SAFE_MODES = [name for name in POSTGRES_MODES if MODES[name].holds_for(hosts=2, processes=8)]
UNSAFE_MODES = [name for name in POSTGRES_MODES if not MODES[name].holds_for(hosts=2, processes=8)]


@pytest.fixture(scope="module")
def cluster(postgres: ThrowawayPostgres, redis_server: ThrowawayRedis) -> Iterator[Cluster]:
    """Two hosts of four workers each on the session's PostgreSQL, with its Redis as their lock service."""
    with Cluster(
        hosts=2, workers=4, store="postgres", database_url=postgres.url, redis_url=redis_server.url
    ) as running:
        yield running


@pytest.fixture
def hosts(cluster: Cluster) -> list[Api]:
    """One API client per host, the store reset to 10 tickets in locked mode with the default race window."""
    apis = [Api(url) for url in cluster.urls]
    apis[0].reset(tickets=10)
    apis[0].put("/mode", {"mode": "locked", "race_window_ms": 20})
    return apis


@pytest.fixture
def database(postgres: ThrowawayPostgres) -> Iterator[psycopg.Connection[Any]]:
    """A connection of the test's own, to look at the service's sessions and locks."""
    with psycopg.connect(postgres.url, autocommit=True) as connection:
        yield connection


@pytest.fixture
def own_database(postgres: ThrowawayPostgres, request: pytest.FixtureRequest) -> str:
    """The URL of a new, empty database of the session's server, for a test that damages it."""
    return postgres.create_database(re.sub(r"\W", "_", request.node.name)[:50].lower())


# --- Every mode across hosts ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def every_mode(cluster: Cluster) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """The load tester against both hosts: every mode, three trials, buyers spread round-robin, as JSON."""
    completed = run_cli("--url", *cluster.urls, "--modes", "all", "--trials", "3", "--require-oversell", "--json")
    return completed, json.loads(completed.stdout)


def test_across_hosts_every_mode_shows_its_expected_outcome(every_mode: Any) -> None:
    completed, result = every_mode

    assert completed.returncode == 0, completed.stderr
    assert (result["store"], result["deployment"]) == ("postgres", {"hosts": 2, "processes": 8})
    assert list(result["summary"]) == POSTGRES_MODES
    assert all(summary["as_expected"] for summary in result["summary"].values()), result["summary"]


@pytest.mark.parametrize("mode", UNSAFE_MODES)
def test_the_modes_that_do_not_protect_every_host_oversell_in_every_trial(every_mode: Any, mode: str) -> None:
    _, result = every_mode

    phases = [phase for phase in result["phases"] if phase["mode"] == mode]
    assert len(phases) == 3 and all(phase["check"]["oversold"] > 0 for phase in phases)
    # Both hosts sold: the buyers went to them round-robin.
    assert all({host for host, _ in phase["check"]["sellers"]} == {"host-1", "host-2"} for phase in phases)


@pytest.mark.parametrize("mode", SAFE_MODES)
def test_the_database_mutexes_are_correct_across_hosts_in_every_trial(every_mode: Any, mode: str) -> None:
    _, result = every_mode

    for phase in [phase for phase in result["phases"] if phase["mode"] == mode]:
        figures = phase["check"]
        assert figures["correct"], figures["anomalies"]
        assert figures["ok"] == figures["orders_recorded"] == 10 and figures["remaining"] == 0


def test_the_one_command_demo_starts_three_hosts_on_its_own_postgres_and_redis_and_stops_them(tmp_path: Path) -> None:
    completed = run_cli("--hosts", "3", "--store", "postgres", "--json", cwd=tmp_path)

    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["deployment"] == {"hosts": 3, "processes": 12}
    # Every mode, then the lease modes with their holder stopped past the lease: the lease's lesson.
    assert list(result["summary"]) == [*POSTGRES_MODES, "lease+pause", "fenced-lease+pause"]
    assert all(summary["as_expected"] for summary in result["summary"].values()), result["summary"]
    assert result["summary"]["lease"]["oversold_trials"] == 0 < result["summary"]["lease+pause"]["oversold_trials"]
    # Three masters, twelve workers, the database server and the lock service: all gone.
    assert len(result["service_pids"]) == 3 * 5 + 2
    assert all(not Path(f"/proc/{pid}").exists() for pid in result["service_pids"])


def test_buckets_under_load_are_never_oversold_and_no_two_sales_wait_for_each_other(
    cluster: Cluster, postgres: ThrowawayPostgres
) -> None:
    # 100 buyers at once for 10 tickets over 8 buckets: sales find every bucket with a ticket busy, wait for one, or
    # take them all. Waits taken in one order never form a circle, which the database would break after its
    # deadlock_timeout (1 s), as "deadlock detected", and the purchase would start again.
    logged_before = postgres.log_path.stat().st_size

    completed = run_cli("--url", *cluster.urls, "--modes", "buckets", "--trials", "3", "--json")

    assert completed.returncode == 0, completed.stderr
    phases = json.loads(completed.stdout)["phases"]
    assert len(phases) == 3 and all(phase["check"]["correct"] and phase["check"]["ok"] == 10 for phase in phases)
    logged = postgres.log_path.read_bytes()[logged_before:].decode(errors="replace")
    assert "deadlock detected" not in logged


def test_buckets_sell_larger_quantities_across_buckets_without_a_deadlock(
    cluster: Cluster, postgres: ThrowawayPostgres
) -> None:
    # 11 tickets over 8 buckets (2, 2, 2, 1, 1, 1, 1, 1) and 40 buyers of 2 at once: most sales find no free bucket
    # holding 2, wait for a busy one (passing over buckets of 1), or take every bucket.
    logged_before = postgres.log_path.stat().st_size
    apis = [Api(url) for url in cluster.urls]
    apis[0].put("/mode", {"mode": "buckets", "race_window_ms": 20})
    apis[0].reset(11)

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda n: apis[n % 2].post("/orders", {"buyer": f"b{n}", "quantity": 2}), range(40)))

    assert sorted({answer.status_code for answer in answers}) == [201, 409]
    assert sum(answer.status_code == 201 for answer in answers) == 5
    assert apis[1].tickets()["remaining"] == 1
    logged = postgres.log_path.read_bytes()[logged_before:].decode(errors="replace")
    assert "deadlock detected" not in logged


# --- Round trips ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def counted(postgres: ThrowawayPostgres, redis_server: ThrowawayRedis) -> Iterator[tuple[FlaskClient, DatabaseProxy]]:
    """The app in this process, on a database of its own reached through a proxy that counts round trips."""
    postgres.create_database("round_trips")
    with DatabaseProxy(postgres.socket_folder / ".s.PGSQL.5432") as proxy:
        settings = {
            "database_url": f"postgresql://ticketlock@{proxy.url_host}/round_trips",
            "redis_url": redis_server.url,
            "race_window_ms": 0,
        }
        prepare_for_start(settings)
        client = create_app(settings).test_client()
        assert client.post("/reset", json={"tickets": 1_000_000}).status_code == 200
        yield client, proxy


@pytest.mark.parametrize("key", [False, True], ids=["", "with an idempotency key"])
@pytest.mark.parametrize("mode", POSTGRES_MODES)
def test_a_purchase_takes_two_round_trips_to_the_database_and_an_atomic_one_takes_one(
    counted: tuple[FlaskClient, DatabaseProxy], mode: str, key: bool
) -> None:
    client, proxy = counted
    client.put("/mode", json={"mode": mode, "race_window_ms": 0})
    count = iter(range(1_000_000))

    def buy() -> None:
        headers = {"Idempotency-Key": f"{mode}-{next(count)}"} if key else {}
        assert client.post("/orders", json={"buyer": "counted"}, headers=headers).status_code == 201

    turns = proxy.turns_per(buy, 10)

    # A sale's round trips: BEGIN, its hold, the settings, its guard and its read; then its write, order, key and
    # COMMIT. A read that goes nowhere (the atomic mode's) saves the first. A key's lookup goes with the read, and
    # takes a round trip of its own where there is none (the atomic mode's) or where the read must go alone (a claim).
    read = MODES[mode].read
    expected = 2 - (read is Read.SEEN) + (key and read in (Read.SEEN, Read.CLAIM))
    assert turns == expected


# --- Switching modes ---------------------------------------------------------------------------------------------


def test_a_mode_switch_on_one_host_is_seen_by_every_worker_of_every_host(hosts: list[Api], cluster: Cluster) -> None:
    for mode in ("row-lock", "unlocked", "atomic"):
        assert hosts[1].put("/mode", {"mode": mode}).status_code == 200

        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda n: hosts[n % 2].get("/tickets").json(), range(80)))

        assert {answer["mode"] for answer in answers} == {mode}
        assert {answer["host"] for answer in answers} == {"host-1", "host-2"}
        assert len({(answer["host"], answer["worker_pid"]) for answer in answers}) >= 4


def _purchases_in_flight(database: psycopg.Connection[Any]) -> int:
    """Purchases holding the shared advisory lock every purchase takes against mode switches."""
    row = database.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 1 AND mode = 'ShareLock' AND granted"
    ).fetchone()
    return int(row[0]) if row else 0


def test_a_safe_mode_switched_on_waits_for_unlocked_stragglers_on_every_host(
    hosts: list[Api], cluster: Cluster, database: psycopg.Connection[Any]
) -> None:
    # One ticket. Unlocked purchases on both hosts have read 1 and sit in their race window when the mode becomes
    # row-lock: the switch waits for them, and the next, row-lock, buyer must see their writes, not the 1 they read.
    hosts[0].reset(tickets=1)
    hosts[0].put("/mode", {"mode": "unlocked", "race_window_ms": 600})
    with ThreadPoolExecutor(max_workers=2) as pool:
        stragglers = [pool.submit(hosts[n].post, "/orders", {"buyer": f"straggler-{n}"}) for n in range(2)]
        deadline = time.monotonic() + 10
        while _purchases_in_flight(database) < 2:
            assert time.monotonic() < deadline, "the unlocked purchases never reached their race window"
            time.sleep(0.005)
        switch = hosts[1].put("/mode", {"mode": "row-lock"})
        switched_at = time.time()
        late = hosts[0].post("/orders", {"buyer": "late"})
        sold = [straggler.result().json() for straggler in stragglers]

    assert switch.status_code == 200
    assert all(order["mode"] == "unlocked" and order["timing"]["wrote_at"] < switched_at for order in sold)
    assert (late.status_code, late.json()["error"]) == (409, "sold_out")
    assert sorted(order["buyer"] for order in hosts[1].all_orders()) == ["straggler-0", "straggler-1"]


def test_concurrent_retries_with_one_key_on_both_hosts_sell_once_even_unlocked(
    hosts: list[Api], cluster: Cluster
) -> None:
    hosts[0].put("/mode", {"mode": "unlocked"})
    key = {"Idempotency-Key": "one-key-two-hosts"}

    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda n: hosts[n % 2].post("/orders", {"buyer": "ana"}, headers=key), range(6)))

    assert {answer.status_code for answer in answers} <= {200, 201} and [a.status_code for a in answers].count(201) == 1
    assert len({answer.json()["order_id"] for answer in answers}) == 1
    assert hosts[1].get("/tickets").json()["remaining"] == 9  # the unique key kept the other sales from committing


def test_the_live_feed_misses_no_order_and_repeats_none_while_hosts_sell(hosts: list[Api], cluster: Cluster) -> None:
    hosts[0].reset(tickets=200)
    hosts[0].put("/mode", {"mode": "unlocked", "race_window_ms": 5})
    seen: list[str] = []
    cursor = hosts[0].get("/orders", params={"after": ""}).json()["cursor"]
    selling = threading.Thread(target=buy_together, args=(cluster.urls[0], 60))
    selling.start()
    deadline = time.monotonic() + 60
    while selling.is_alive() or len(seen) < len(hosts[1].all_orders()):
        assert time.monotonic() < deadline, f"the feed gave {len(seen)} orders"
        page = hosts[1].get("/orders", params={"after": cursor}).json()
        assert not page["reset"]
        seen += [order["order_id"] for order in page["orders"]]
        cursor = page["cursor"]
        time.sleep(0.01)
    selling.join()

    assert seen == [order["order_id"] for order in hosts[0].all_orders()]


# --- Faults -----------------------------------------------------------------------------------------------------


def _holder_of_a_contended_lock(database: psycopg.Connection[Any]) -> int | None:
    """The gunicorn worker whose transaction holds a lock that other purchases wait for (sitting in its race
    window), from the application_name each worker gives its connections."""
    row = database.execute(
        """
        SELECT holder.application_name
        FROM pg_stat_activity waiter
        CROSS JOIN LATERAL unnest(pg_blocking_pids(waiter.pid)) AS blocking(pid)
        JOIN pg_stat_activity holder ON holder.pid = blocking.pid
        WHERE waiter.application_name LIKE 'ticketlock %'
          AND holder.state = 'idle in transaction' AND holder.wait_event_type IS DISTINCT FROM 'Lock'
        LIMIT 1
        """
    ).fetchone()
    match = re.search(r"pid (\d+)$", row[0]) if row else None
    return int(match.group(1)) if match else None


@pytest.mark.parametrize("mode", ["row-lock", "advisory-lock"])
def test_killing_the_worker_that_holds_the_database_lock_releases_it_and_loses_nothing(
    cluster: Cluster, database: psycopg.Connection[Any], mode: str
) -> None:
    tickets = 40
    buyers, outcomes = start_load(cluster.urls, tickets, mode, race_window_ms=40)
    killed: list[int] = []
    while buyers.is_alive() and len(killed) < 3:
        holder = _holder_of_a_contended_lock(database)
        if holder is None or holder in killed:
            time.sleep(0.005)
            continue
        os.kill(holder, signal.SIGKILL)
        killed.append(holder)
        time.sleep(0.2)  # let the database see the connection drop and hand the lock on

    result = finish_load(buyers, outcomes, cluster.urls, tickets)
    assert killed, "no worker was caught holding the lock"
    assert result.info >= 1  # the killed workers' buyers never heard back
    assert result.ok >= 10  # the lock was handed on: sales went on after each kill
    wait_until_selling(cluster.urls[0])


def _terminate_service_connections(database: psycopg.Connection[Any]) -> int:
    row = database.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name LIKE 'ticketlock %'"
    ).fetchone()
    return int(row[0]) if row else 0


def test_terminating_every_service_connection_mid_load_loses_nothing_and_recovers(
    cluster: Cluster, database: psycopg.Connection[Any]
) -> None:
    tickets = 60
    buyers, outcomes = start_load(cluster.urls, tickets, "atomic", race_window_ms=40)
    terminated = []
    for _ in range(3):
        time.sleep(0.3)
        terminated.append(_terminate_service_connections(database))

    finish_load(buyers, outcomes, cluster.urls, tickets)
    assert sum(terminated) >= 4, terminated
    _assert_answers_were_json_and_bounded(outcomes)
    wait_until_selling(cluster.urls[0])


def test_a_database_restart_mid_load_answers_503_then_recovers_by_itself(
    cluster: Cluster, postgres: ThrowawayPostgres
) -> None:
    tickets = 60
    buyers, outcomes = start_load(cluster.urls, tickets, "row-lock", race_window_ms=40)
    time.sleep(0.3)
    postgres.stop()
    down = [Api(url).post("/orders", {"buyer": "while down"}, timeout=20) for url in cluster.urls]
    health = Api(cluster.urls[0]).get("/health", timeout=20)
    postgres.restart()

    finish_load(buyers, outcomes, cluster.urls, tickets)
    back_after_s = wait_until_selling(cluster.urls[1])
    for answer in [*down, health]:
        assert (answer.status_code, answer.json()["error"]) == (503, "store_unavailable")
        assert answer.headers["Retry-After"] == "1"
        assert answer.elapsed.total_seconds() < 15  # a hang check (database timeout, queueing), not a target
    assert back_after_s < 20
    assert Counter(outcome.error for outcome in outcomes)["store_unavailable"] >= 1
    _assert_answers_were_json_and_bounded(outcomes)


def _assert_answers_were_json_and_bounded(outcomes: list[Outcome]) -> None:
    """Every buyer got a JSON answer (never an HTML page) or a connection error, and never waited past 20 s."""
    assert not [outcome.error for outcome in outcomes if (outcome.error or "").startswith("http_")]
    assert all(outcome.error != "timeout" for outcome in outcomes)


def _timed(send: Callable[[], requests.Response]) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = send()
    return response, time.monotonic() - started


def test_a_database_that_stops_answering_gets_503_within_its_timeout_and_no_worker_is_killed(
    postgres: ThrowawayPostgres, tmp_path: Path
) -> None:
    database_timeout_s, lock_timeout_s, worker_timeout_s = 2, 1, 10  # the worker timeout must exceed 1 + 5 + 2 s
    name = "silent_database"
    postgres.create_database(name)
    with DatabaseProxy(postgres.socket_folder / ".s.PGSQL.5432") as proxy:
        settings = {
            "TICKETLOCK_DATABASE_URL": f"postgresql://ticketlock@{proxy.url_host}/{name}",
            "TICKETLOCK_DATABASE_TIMEOUT": str(database_timeout_s),
            "TICKETLOCK_LOCK_TIMEOUT": str(lock_timeout_s),
            "TICKETLOCK_WORKER_TIMEOUT": str(worker_timeout_s),
            "TICKETLOCK_MODE": "row-lock",
            "TICKETLOCK_RACE_WINDOW_MS": "300",
        }
        with (
            EmbeddedService(workers=4, directory=tmp_path, environment=settings) as service,
            ThreadPoolExecutor() as pool,
        ):
            api = Api(service.url, timeout_s=20)
            api.reset(tickets=20)
            while len(workers := service.worker_pids()) < 4:  # every worker booted
                time.sleep(0.05)
            # Mid-load: 8 buyers at once for 4 workers; one holds the row lock in its race window, three wait for it.
            load = pool.submit(release_together, 8, lambda index: purchase_outcome(api, index))
            time.sleep(0.15)
            proxy.stall()
            stalled_at = time.monotonic()
            in_flight = load.result()
            # Sent while the database stays silent, once the workers are free again.
            health, health_s = _timed(lambda: api.get("/health"))
            sent, sent_s = _timed(lambda: api.post("/orders", {"buyer": "during the partition"}))
            time.sleep(max(0.0, stalled_at + worker_timeout_s + 2 - time.monotonic()))  # past gunicorn's timeout
            proxy.resume()
            stalled_s = time.monotonic() - stalled_at
            back_after_s = wait_until_selling(service.url)
            survivors, log = service.worker_pids(), service.log_path.read_text()

    print(
        f"\nstalled {stalled_s:.1f} s; GET /health {health.status_code} in {health_s:.2f} s, a purchase sent "
        f"meanwhile {sent.status_code} in {sent_s:.2f} s; the 8 buyers in flight: "
        f"{sorted((outcome.error or outcome.status, round(outcome.latency_s, 2)) for outcome in in_flight)}; "
        f"selling again {back_after_s:.2f} s after the database answered"
    )
    # Each answer within the database timeout, plus the lock wait the server itself ends at the deadline.
    assert (health.status_code, health.json()["error"], health.headers["Retry-After"]) == (
        503,
        "store_unavailable",
        "1",
    )
    assert health_s < database_timeout_s + 1, health_s  # a hang check with a margin for this loaded machine
    assert (sent.status_code, sent.json()["error"]) == (503, "store_unavailable")
    assert "did not answer" in sent.json()["message"] or "cannot be reached" in sent.json()["message"]
    assert sent_s < lock_timeout_s + database_timeout_s + 1, sent_s
    # The buyers in flight got JSON answers: sold before the partition, refused, or unknown only for a commit.
    assert all(outcome.error in {None, "store_unavailable", "lock_timeout", "outcome_unknown"} for outcome in in_flight)
    assert {"store_unavailable"} <= {outcome.error for outcome in in_flight}
    # No worker was killed, and the service sold again by itself.
    assert survivors == workers and "WORKER TIMEOUT" not in log
    assert back_after_s < 20


def test_a_purchase_at_the_largest_timeouts_ends_at_its_one_deadline_on_the_database_too(
    own_database: str, tmp_path: Path
) -> None:
    settings = {
        "TICKETLOCK_LOCK_TIMEOUT": str(MAX_LOCK_TIMEOUT_S),
        "TICKETLOCK_RACE_WINDOW_MS": str(MAX_RACE_WINDOW_MS),
    }
    settings |= {"TICKETLOCK_DATABASE_URL": own_database, "TICKETLOCK_MODE": "advisory-lock"}
    with (
        EmbeddedService(workers=1, directory=tmp_path, environment=settings) as service,
        psycopg.connect(own_database, autocommit=True) as holder,
    ):

        def as_a_sale_of_the_advisory_lock_mode() -> None:
            holder.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, INVENTORY_LOCK))
            holder.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, SWITCH_LOCK))

        # First as a mode switch would, so that the purchase waits for its hold against switches; then as another
        # sale of the advisory-lock mode, so that its guard waits too.
        holder.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, SWITCH_LOCK))
        assert_a_purchase_ends_at_its_deadline(service, hand_on=as_a_sale_of_the_advisory_lock_mode)


# --- Missing rows -----------------------------------------------------------------------------------------------


def _delete_row(url: str, table: str) -> None:
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(table)))


def test_a_missing_inventory_row_is_never_made_full_again_while_orders_exist_and_reset_makes_it(
    own_database: str,
) -> None:
    config = load_config({"database_url": own_database, "tickets": 10, "race_window_ms": 0})
    first = PostgresStore(config)
    first.prepare()
    purchase(first, PurchaseRequest("ana", 2), config)
    _delete_row(own_database, "inventory")

    restarted = PostgresStore(config)  # what a restart does, and each new worker on its first connection
    restarted.prepare()
    client = create_app({"database_url": own_database}).test_client()
    tickets, health = client.get("/tickets"), client.get("/health")
    reset = client.post("/reset", json={})

    assert (tickets.status_code, tickets.json["error"]) == (500, "store_damaged")
    assert "POST /reset makes it again" in tickets.json["message"]
    assert (health.status_code, health.json) == (503, tickets.json)
    assert reset.status_code == 200, reset.text
    assert (reset.json["total"], reset.json["remaining"], client.get("/orders").json["count"]) == (10, 10, 0)
    assert client.get("/health").status_code == 200


def test_a_missing_settings_row_is_written_again_by_reset_and_by_put_mode(own_database: str) -> None:
    prepare_for_start({"database_url": own_database})
    client = create_app({"database_url": own_database}).test_client()
    client.post("/orders", json={"buyer": "ana"})
    _delete_row(own_database, "settings")

    tickets, health = client.get("/tickets"), client.get("/health")
    reset = client.post("/reset", json={"tickets": 5})
    _delete_row(own_database, "settings")
    switched = client.put("/mode", json={"mode": "atomic"})

    assert (tickets.status_code, tickets.json["error"]) == (500, "store_damaged")
    assert "PUT /mode writes it again" in tickets.json["message"] and "POST /reset" in tickets.json["message"]
    assert (health.status_code, health.json) == (503, tickets.json)
    assert (reset.status_code, reset.json["mode"], reset.json["remaining"]) == (200, "locked", 5)
    assert switched.json == {"mode": "atomic", "race_window_ms": 20}
    assert client.post("/orders", json={"buyer": "bo"}).json["mode"] == "atomic"


def test_a_database_unreachable_at_start_is_one_clear_line_with_the_password_masked(tmp_path: Path) -> None:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("TICKETLOCK_")}
    environment |= {
        "TICKETLOCK_DATABASE_URL": "postgresql://ticketlock:s3cret@127.0.0.1:1/ticketlock",
        "TICKETLOCK_BIND": "127.0.0.1:0",
        "TICKETLOCK_DB": str(tmp_path / "db.json"),
    }
    serve = Path(sys.executable).with_name("ticketlock-serve")
    completed = subprocess.run([serve], env=environment, capture_output=True, text=True, timeout=60, cwd=tmp_path)

    assert completed.returncode != 0
    lines = [line for line in completed.stderr.splitlines() if line.startswith("ticketlock:")]
    assert len(lines) == 1, completed.stderr
    assert "postgresql://ticketlock:***@127.0.0.1:1/ticketlock cannot be reached" in lines[0]
    assert "s3cret" not in completed.stderr + completed.stdout and "Traceback" not in completed.stderr
