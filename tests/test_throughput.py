"""The throughput mode: every request counted, failures counted instead of raised, keep-alive used when offered.

Speed itself is measured by bench/bench.py, never asserted here.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.embedded import EmbeddedService
from loadtest.throughput import ThroughputOptions, run
from tests.conftest import Api, run_cli


def test_a_counted_run_sends_exactly_that_many_requests(api: Api, service: EmbeddedService) -> None:
    api.reset(tickets=1000)

    result = run(ThroughputOptions(service.url, requests=50, processes=2, connections=4))

    assert (result.answered, result.failed, result.statuses) == (50, 0, {201: 50})
    assert len(api.all_orders()) == 50
    assert result.requests_per_s > 0 and result.latency_ms.max >= result.latency_ms.p50 > 0


def test_an_unreachable_server_is_counted_not_raised() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago, with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    result = run(ThroughputOptions(f"http://127.0.0.1:{port}", requests=12, processes=2, connections=4))

    assert (result.answered, result.failed) == (0, 12)
    assert result.errors == {"connection_refused": 12}


@pytest.fixture(scope="module")
def threaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedService]:
    environment = {"TICKETLOCK_WORKER_CLASS": "gthread", "TICKETLOCK_THREADS": "4"}
    with EmbeddedService(workers=2, directory=tmp_path_factory.mktemp("gthread"), environment=environment) as running:
        yield running


def test_connections_are_kept_alive_when_the_server_allows_it(threaded: EmbeddedService) -> None:
    result = run(
        ThroughputOptions(threaded.url, requests=80, processes=1, connections=4, method="GET", path="/tickets")
    )

    assert (result.answered, result.statuses) == (80, {200: 80})
    assert result.connections_opened <= 8  # gthread keeps connections open; sync workers would need 80


def test_the_cli_compares_the_modes(tmp_path: Path) -> None:
    completed = run_cli("--throughput", "1", "--json", cwd=tmp_path)

    assert completed.returncode == 0, completed.stderr
    document = json.loads(completed.stdout)
    assert document["race_window_ms"] == 0 and set(document["modes"]) == {"unlocked", "locked"}
    for result in document["modes"].values():
        assert result["answered"] > 0 and set(result["statuses"]) == {"201"}
        assert result["requests_per_s"] > 0
