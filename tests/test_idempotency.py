"""Retries are safe: an Idempotency-Key returns the first order again and never sells a second ticket."""

from __future__ import annotations

import uuid
from collections import Counter

from loadtest.embedded import EmbeddedService
from tests.conftest import Api, release_together, store_files


def test_a_retry_returns_the_same_order_with_200(api: Api) -> None:
    key = {"Idempotency-Key": str(uuid.uuid4())}

    first = api.post("/orders", {"buyer": "ana", "quantity": 2}, headers=key)
    again = api.post("/orders", {"buyer": "ana", "quantity": 2}, headers=key)

    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert api.get("/tickets").json()["sold"] == 2
    assert len(api.all_orders()) == 1


def test_concurrent_retries_on_different_workers_sell_once(api: Api, service: EmbeddedService) -> None:
    key = {"Idempotency-Key": str(uuid.uuid4())}
    retries = 24

    responses = release_together(retries, lambda _: api.post("/orders", {"buyer": "ana"}, headers=key))

    assert Counter(response.status_code for response in responses) == {201: 1, 200: retries - 1}
    assert len({response.json()["order_id"] for response in responses}) == 1
    assert api.get("/tickets").json()["sold"] == 1
    assert len(api.all_orders()) == 1


def test_the_same_key_with_a_different_body_is_refused(api: Api, service: EmbeddedService) -> None:
    key = {"Idempotency-Key": "order-42"}
    assert api.post("/orders", {"buyer": "ana"}, headers=key).status_code == 201
    before = store_files(service.directory)

    for body in ({"buyer": "bob"}, {"buyer": "ana", "quantity": 2}):
        response = api.post("/orders", body, headers=key)
        assert (response.status_code, response.json()["error"]) == (422, "idempotency_key_reused")

    assert store_files(service.directory) == before


def test_a_key_that_met_sold_out_can_buy_after_a_restock(api: Api) -> None:
    api.reset(tickets=0)
    key = {"Idempotency-Key": "late-buyer"}
    assert api.post("/orders", {"buyer": "ana"}, headers=key).status_code == 409

    api.reset(tickets=1)

    assert api.post("/orders", {"buyer": "ana"}, headers=key).status_code == 201


def test_different_keys_are_different_orders(api: Api) -> None:
    for key in ("a", "b"):
        assert api.post("/orders", {"buyer": "ana"}, headers={"Idempotency-Key": key}).status_code == 201
    assert api.get("/tickets").json()["sold"] == 2
