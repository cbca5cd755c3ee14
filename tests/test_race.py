"""The lesson itself, against a real 4-worker gunicorn: unlocked oversells, locked never does."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from loadtest.embedded import EmbeddedService
from tests.conftest import Api, buy_together, read_db


def test_unlocked_mode_oversells_when_buyers_collide(api: Api, service: EmbeddedService) -> None:
    api.put("/mode", {"mode": "unlocked"})

    responses = buy_together(service.url, buyers=100)

    statuses = Counter(response.status_code for response in responses)
    assert set(statuses) <= {201, 409}, statuses
    assert statuses[201] > 10, f"expected an oversell of 10 tickets, got {statuses}"
    # The lost update: more buyers were told yes than the count went down.
    tickets = api.get("/tickets").json()
    assert statuses[201] > tickets["sold"]
    assert len(api.all_orders()) == statuses[201]
    assert read_db(service.db_path)["remaining"] >= 0


@pytest.mark.parametrize("race_window_ms", [20, 0])
def test_locked_mode_sells_exactly_the_tickets_that_exist(
    api: Api, service: EmbeddedService, race_window_ms: int
) -> None:
    api.put("/mode", {"race_window_ms": race_window_ms})

    responses = buy_together(service.url, buyers=100)

    statuses = Counter(response.status_code for response in responses)
    assert statuses == {201: 10, 409: 90}
    assert all(response.json()["error"] == "sold_out" for response in responses if response.status_code == 409)
    tickets = api.get("/tickets").json()
    assert (tickets["remaining"], tickets["sold"]) == (0, 10)
    orders = api.all_orders()
    assert sorted(order["order_id"] for order in orders) == sorted(
        response.json()["order_id"] for response in responses if response.status_code == 201
    )
    assert read_db(service.db_path).items() >= {"event": tickets["event"], "total": 10, "remaining": 0}.items()


def test_several_worker_processes_serve_the_buyers(api: Api, service: EmbeddedService) -> None:
    api.reset(tickets=100)

    responses = buy_together(service.url, buyers=100)

    pids = {response.json()["worker_pid"] for response in responses if response.status_code == 201}
    assert len(pids) >= 3, pids
    assert pids <= set(service.worker_pids())


def test_locked_mode_keeps_the_count_exact_with_larger_orders(api: Api, service: EmbeddedService) -> None:
    api.reset(tickets=25)

    responses = buy_together(service.url, buyers=40, quantity=3)

    sold = sum(response.json()["quantity"] for response in responses if response.status_code == 201)
    assert sold == 24  # eight orders of three fit in 25; the ninth would need 3 of the last 1
    assert api.get("/tickets").json()["remaining"] == 1


@pytest.mark.parametrize(
    "environment",
    [
        {"TICKETLOCK_WORKER_CLASS": "gthread", "TICKETLOCK_THREADS": "4"},  # threads wait by polling the lock
        {"GUNICORN_CMD_ARGS": "--preload"},  # the app is built in the master, the lock only in each worker
    ],
    ids=["gthread", "preload"],
)
def test_locked_mode_is_exact_with_other_gunicorn_setups(tmp_path: Path, environment: dict[str, str]) -> None:
    with EmbeddedService(workers=2, directory=tmp_path, environment=environment) as other:
        api = Api(other.url)
        api.reset(tickets=20)

        responses = buy_together(other.url, buyers=150)

        assert Counter(response.status_code for response in responses) == {201: 20, 409: 130}
        assert api.get("/tickets").json()["remaining"] == 0
        assert len(api.all_orders()) == 20
