"""Shared fixtures: an in-process app for logic, and a real multi-worker gunicorn on loopback for concurrency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from loadtest.checker import INFO, Check, Outcome, check
from loadtest.client import classify
from loadtest.embedded import EmbeddedService
from loadtest.postgres import PostgresNotFound, ThrowawayPostgres
from loadtest.redis_server import RedisNotFound, ThrowawayRedis
from service import create_app, prepare_for_start
from service.config import load_config, load_server_settings

ADMIN_TOKEN = "test-admin-token"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    """The Flask app on a fresh db.json in a temporary folder (no gunicorn; its on_starting step done by hand)."""
    config = {"db_path": tmp_path / "db.json"}
    prepare_for_start(config)
    return create_app(config)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client for ``app``."""
    return app.test_client()


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedService]:
    """One real gunicorn with 4 workers for the whole session; tests reset it through the API."""
    with EmbeddedService(workers=4, directory=tmp_path_factory.mktemp("service")) as running:
        yield running


@pytest.fixture(scope="session")
def postgres() -> Iterator[ThrowawayPostgres]:
    """One throwaway PostgreSQL server for the session, from the operating system's binaries."""
    with _installed_or_skip(ThrowawayPostgres, PostgresNotFound) as database:
        yield database


@pytest.fixture(scope="session")
def redis_server() -> Iterator[ThrowawayRedis]:
    """One throwaway Redis server for the session (the lock service), from the operating system's package."""
    with _installed_or_skip(ThrowawayRedis, RedisNotFound) as server:
        yield server


Server = TypeVar("Server", ThrowawayPostgres, ThrowawayRedis)


@contextmanager
def _installed_or_skip(server: Callable[[], Server], not_installed: type[Exception]) -> Iterator[Server]:
    """Run ``server()`` for the block. Without its program, the tests that need it skip with one line saying why;
    with CI=true, which installs it, that is a failure."""
    try:
        started = server()
    except not_installed as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {error}")
        pytest.skip(str(error))
    with started:
        yield started


@pytest.fixture
def api(service: EmbeddedService) -> Api:
    """The session's service, reset to 10 tickets in locked mode with the default race window."""
    api = Api(service.url)
    api.reset(tickets=10)
    api.put("/mode", {"mode": "locked", "race_window_ms": 20})
    return api


class Api:
    """The tests' one HTTP client, on requests: JSON in, responses out, each request on a connection of its own
    (so one Api may serve several threads); an admin token if given."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 30) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, body: object = None, **kwargs: Any) -> requests.Response:
        """``method path`` with ``body`` as JSON; ``kwargs`` go to requests (headers, params, data, timeout)."""
        kwargs["headers"] = {**self.headers, **(kwargs.get("headers") or {})}
        kwargs.setdefault("timeout", self.timeout_s)
        return requests.request(method, self.url + path, json=body, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: object = None, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, body, **kwargs)

    def put(self, path: str, body: object = None, **kwargs: Any) -> requests.Response:
        return self.request("PUT", path, body, **kwargs)

    def tickets(self) -> dict[str, Any]:
        """``GET /tickets``: the event, its count and the mode in force."""
        tickets: dict[str, Any] = _answer(self.get("/tickets"))
        return tickets

    def reset(self, tickets: int) -> dict[str, Any]:
        """``POST /reset``: ``tickets`` tickets, no orders."""
        return _answer(self.post("/reset", {"tickets": tickets}))

    def all_orders(self) -> list[dict[str, Any]]:
        """Every recorded order (up to 1000)."""
        orders: list[dict[str, Any]] = _answer(self.get("/orders", params={"limit": 1000}))["orders"]
        return orders


def _answer(response: requests.Response) -> Any:
    """The JSON of a 200 answer; requests.HTTPError, with the service's own message, for any other status."""
    if response.status_code != 200:
        raise requests.HTTPError(f"{response.url}: {response.status_code} {response.text}", response=response)
    return response.json()


T = TypeVar("T")


def release_together(
    count: int, send: Callable[[int], T], concurrency: int | None = None, timeout_s: float = 60
) -> list[T]:
    """The tests' one start line: ``send(index)`` for each index below ``count``, results in index order, from
    ``concurrency`` threads (default: one per index) that all wait at one barrier, so that they start together."""
    threads = min(concurrency or count, count)
    results: dict[int, T] = {}
    indices = iter(range(count))
    take_lock = threading.Lock()
    start_line = threading.Barrier(threads)

    def sender() -> None:
        start_line.wait(timeout=timeout_s)
        while True:
            with take_lock:
                index = next(indices, None)
            if index is None:
                return
            results[index] = send(index)

    senders = [threading.Thread(target=sender) for _ in range(threads)]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join()
    assert len(results) == count, "a sender thread failed"
    return [results[index] for index in range(count)]


def round_robin(urls: Sequence[str], timeout_s: float = 30) -> Callable[[int], Api]:
    """The Api that request ``index`` goes to: the hosts in turn."""
    apis = [Api(url, timeout_s=timeout_s) for url in urls]
    return lambda index: apis[index % len(apis)]


def buy_together(url: str, buyers: int, quantity: int = 1) -> list[requests.Response]:
    """``buyers`` buyers (``buyer-0``, ``buyer-1``, ...) POSTing one order each, all released at the same moment."""
    api = Api(url, timeout_s=60)
    return release_together(
        buyers, lambda index: api.post("/orders", {"buyer": f"buyer-{index}", "quantity": quantity})
    )


def purchase_outcome(api: Api, index: int) -> Outcome:
    """Buyer ``index + 1``'s purchase as the load tester's checker reads it: ok, fail, or info when the answer
    (or its absence) leaves it unknown."""
    buyer = f"buyer-{index + 1}"
    invoked_at = time.time()
    try:
        response = api.post("/orders", {"buyer": buyer, "quantity": 1})
    except requests.RequestException as error:
        failure = "timeout" if isinstance(error, requests.Timeout) else type(error).__name__
        return Outcome(buyer, 1, INFO, invoked_at, time.time(), error=failure)
    try:
        body: object = response.json()
    except ValueError:  # not JSON: an answer from something other than the service's error handler
        body = response.text
    return classify(buyer, 1, invoked_at, response.status_code, body)


def start_load(
    urls: Sequence[str], tickets: int, mode: str, race_window_ms: int | None = None
) -> tuple[threading.Thread, list[Outcome]]:
    """Reset to ``tickets`` in ``mode``, then 120 buyers, 12 at a time round-robin over ``urls``, from a background
    thread; the list gets their outcomes when the last one has answered (each waits up to 20 s)."""
    admin = Api(urls[0])
    admin.reset(tickets)
    change: dict[str, object] = {"mode": mode}
    if race_window_ms is not None:
        change["race_window_ms"] = race_window_ms
    _answer(admin.put("/mode", change))
    outcomes: list[Outcome] = []

    def buy() -> None:
        host = round_robin(urls, timeout_s=20)
        outcomes.extend(release_together(120, lambda index: purchase_outcome(host(index), index), concurrency=12))

    buyers = threading.Thread(target=buy, daemon=True)
    buyers.start()
    return buyers, outcomes


def finish_load(buyers: threading.Thread, outcomes: list[Outcome], urls: list[str], tickets: int) -> Check:
    """Wait for the load ``start_load`` began, then check: nothing oversold, no acknowledged order lost, and, a
    transaction being all or nothing, a count that matches the recorded orders exactly."""
    buyers.join(timeout=120)
    assert not buyers.is_alive()
    orders, remaining = read_back(urls)
    result = check(tickets, outcomes, remaining, orders)
    assert result.correct, result.anomalies
    assert not result.lost_orders and result.oversold == 0
    assert tickets - remaining == sum(order["quantity"] for order in orders)
    return result


def read_back(urls: list[str], within_s: float = 20) -> tuple[list[dict[str, Any]], int]:
    """The recorded orders (from one host) and the remaining count (from another), once they answer again."""
    apis = [Api(url, timeout_s=20) for url in urls]
    deadline = time.monotonic() + within_s
    while True:
        try:
            return apis[-1].all_orders(), apis[0].tickets()["remaining"]
        except requests.RequestException:
            assert time.monotonic() < deadline, f"the service did not answer within {within_s} s"
            time.sleep(0.1)


def wait_until_selling(url: str, within_s: float = 20) -> float:
    """Restock one ticket and buy it as soon as the service sells again; how many seconds that took."""
    api = Api(url)
    started = time.monotonic()
    while True:
        try:
            if api.post("/reset", {"tickets": 1}).status_code == 200:
                if (sold := api.post("/orders", {"buyer": "probe"})).status_code == 201:
                    return time.monotonic() - started
                assert sold.status_code == 503, sold.text
        except requests.RequestException:
            pass
        assert time.monotonic() - started < within_s, f"the service did not sell again within {within_s} s"
        time.sleep(0.1)


def store_files(directory: Path) -> dict[str, bytes]:
    """The bytes of every file under ``directory`` but the server log (db.json, its sidecars, keys, temporaries)."""
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != "gunicorn.log"
    }


def lock_holders(lock_path: Path) -> list[tuple[int, str]]:
    """(PID, "WRITE" or "READ") of every process holding a flock on ``lock_path``, read from /proc/locks."""
    status = os.stat(lock_path)
    file_id = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    holders = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1093 fe:00:2148872 0 EOF"; a "->" after the number marks a waiter.
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == file_id:
            holders.append((int(fields[4]), fields[3]))
    return holders


def read_db(path: Path) -> dict[str, Any]:
    """db.json parsed; fails the test if it is not valid JSON."""
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def start_cli(*arguments: str, cwd: Path = ROOT) -> subprocess.Popen[str]:
    """``python -m loadtest`` with these arguments, running in the background."""
    command = [sys.executable, "-m", "loadtest", *arguments]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_cli(*arguments: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """``python -m loadtest`` with these arguments, to the end (SIGTERMed after 5 minutes)."""
    process = start_cli(*arguments, cwd=cwd)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.terminate()  # the CLI stops its embedded service on SIGTERM
        stdout, stderr = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def assert_a_purchase_ends_at_its_deadline(service: EmbeddedService, hand_on: Callable[[], None]) -> None:
    """One purchase while another process holds what it waits for first; ``hand_on()``, 2 s before the purchase's
    deadline, lets it past that wait into a second. Both waits together must end at the one deadline: 503
    lock_timeout, nothing sold, and the worker never killed by gunicorn's timeout (``TICKETLOCK_*`` as the
    service was started with: ``service.extra_environment``)."""
    settings = {**service.extra_environment, "TICKETLOCK_DB": str(service.db_path)}
    lock_timeout_s = load_config(environ=settings).lock_timeout_s
    worker_timeout_s = load_server_settings(environ=settings).worker_timeout_s
    workers = service.worker_pids()
    with ThreadPoolExecutor(max_workers=1) as buyer:
        sent = time.monotonic()
        answer = buyer.submit(Api(service.url, timeout_s=60).post, "/orders", {"buyer": "patient"})
        time.sleep(lock_timeout_s - 2)
        hand_on()
        response = answer.result()
        answered_s = time.monotonic() - sent

    assert (response.status_code, response.json()["error"]) == (503, "lock_timeout"), response.text
    assert answered_s < worker_timeout_s, answered_s
    assert service.worker_pids() == workers and "WORKER TIMEOUT" not in service.log_path.read_text()
    tickets = Api(service.url).tickets()
    assert (tickets["remaining"], tickets["sold"]) == (10, 0)
