"""Shared fixtures: an in-process app for logic, and a real multi-worker gunicorn on loopback for concurrency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from loadtest.embedded import EmbeddedService
from loadtest.postgres import PostgresNotFound, ThrowawayPostgres
from service import create_app, prepare_for_start

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
    """One throwaway PostgreSQL server for the session, from the operating system's binaries.

    Without them the tests that need it skip with one line saying why; with CI=true, which installs them,
    that is a failure.
    """
    try:
        database = ThrowawayPostgres()
    except PostgresNotFound as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {error}")
        pytest.skip(str(error))
    with database:
        yield database


@pytest.fixture
def api(service: EmbeddedService) -> Iterator[Api]:
    """The session's service, reset to 10 tickets in locked mode with the default race window."""
    api = Api(service.url)
    api.reset(tickets=10)
    api.put("/mode", {"mode": "locked", "race_window_ms": 20})
    yield api
    api.session.close()


class Api:
    """A thin requests wrapper for tests: JSON in, responses out."""

    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.session.get(self.url + path, timeout=30, **kwargs)

    def post(self, path: str, body: object = None, **kwargs: Any) -> requests.Response:
        return self.session.post(self.url + path, json=body, timeout=30, **kwargs)

    def put(self, path: str, body: object = None, **kwargs: Any) -> requests.Response:
        return self.session.put(self.url + path, json=body, timeout=30, **kwargs)

    def reset(self, tickets: int) -> dict[str, Any]:
        response = self.post("/reset", {"tickets": tickets})
        assert response.status_code == 200, response.text
        return response.json()

    def all_orders(self) -> list[dict[str, Any]]:
        response = self.get("/orders", params={"limit": 1000})
        assert response.status_code == 200, response.text
        return response.json()["orders"]


def buy_together(url: str, buyers: int, quantity: int = 1) -> list[requests.Response]:
    """``buyers`` threads, each POSTing one order, all released at the same moment by a barrier."""
    responses: list[requests.Response | None] = [None] * buyers
    start_line = threading.Barrier(buyers)

    def buyer(index: int) -> None:
        with requests.Session() as session:
            start_line.wait()
            responses[index] = session.post(
                f"{url}/orders", json={"buyer": f"buyer-{index}", "quantity": quantity}, timeout=60
            )

    threads = [threading.Thread(target=buyer, args=(index,)) for index in range(buyers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(response is not None for response in responses), "a buyer thread failed"
    return [response for response in responses if response is not None]


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
