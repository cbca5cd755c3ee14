"""The HTTP API as documented: every endpoint's answers, and a clear JSON error for every kind of bad request."""

from __future__ import annotations

import json
import socket
from importlib import resources
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from loadtest.embedded import EmbeddedService
from service import create_app
from service.modes import TABLE
from service.stores.file import FileStore
from tests.conftest import Api, store_files


def test_health(client: FlaskClient) -> None:
    response = client.get("/health")
    assert (response.status_code, response.json) == (200, {"status": "ok"})


def test_tickets_shows_inventory_mode_and_worker(client: FlaskClient) -> None:
    body = client.get("/tickets").json
    assert list(body) == [
        "event", "total", "remaining", "sold", "buckets", "mode", "race_window_ms", "worker_pid", "host", "store"
    ]  # fmt: skip
    assert (body["total"], body["remaining"], body["sold"], body["buckets"], body["mode"]) == (10, 10, 0, [], "locked")
    assert (body["host"], body["store"]) == (socket.gethostname(), "file")


def test_an_order_is_created_recorded_and_found(client: FlaskClient, tmp_path: Path) -> None:
    response = client.post("/orders", json={"buyer": "路人1"})

    assert response.status_code == 201
    order = response.json
    assert list(order) == [
        "order_id", "buyer", "quantity", "remaining", "mode", "attempts", "fence", "worker_pid", "host", "store",
        "timing",
    ]  # fmt: skip
    assert order["fence"] is None and order["timing"]["lease_until"] is None  # no lease in the locked mode
    assert (order["buyer"], order["quantity"], order["remaining"], order["mode"]) == ("路人1", 1, 9, "locked")
    timing = order["timing"]
    assert timing["started_at"] <= timing["read_at"] <= timing["wrote_at"]
    assert response.headers["Location"] == f"/orders/{order['order_id']}"
    assert client.get(f"/orders/{order['order_id']}").json == order
    assert client.get("/orders").json == {"count": 1, "limit": 100, "offset": 0, "orders": [order]}
    assert json.loads((tmp_path / "db.json").read_text())["remaining"] == 9
    assert "路人1" in (tmp_path / "db.json.orders").read_text(encoding="utf-8")


def test_quantity_takes_several_tickets(client: FlaskClient) -> None:
    assert client.post("/orders", json={"buyer": "ana", "quantity": 4}).json["remaining"] == 6
    assert client.get("/tickets").json["sold"] == 4


def test_sold_out_sells_nothing_and_writes_nothing(client: FlaskClient, tmp_path: Path) -> None:
    client.post("/reset", json={"tickets": 1})
    client.post("/orders", json={"buyer": "first"})
    before = store_files(tmp_path)

    response = client.post("/orders", json={"buyer": "second"})

    assert response.status_code == 409
    assert response.json["error"] == "sold_out"
    assert store_files(tmp_path) == before


def test_orders_are_paged(client: FlaskClient) -> None:
    buyers = [f"buyer-{n}" for n in range(5)]
    for buyer in buyers:
        client.post("/orders", json={"buyer": buyer})

    page = client.get("/orders?limit=2&offset=3").json

    assert (page["count"], page["limit"], page["offset"]) == (5, 2, 3)
    assert [order["buyer"] for order in page["orders"]] == buyers[3:5]


def test_unknown_order_is_404(client: FlaskClient) -> None:
    response = client.get("/orders/does-not-exist")
    assert (response.status_code, response.json["error"]) == (404, "order_not_found")


def test_mode_is_read_and_switched(client: FlaskClient) -> None:
    assert client.get("/mode").json == {"mode": "locked", "race_window_ms": 20}
    assert client.put("/mode", json={"mode": "unlocked"}).json == {"mode": "unlocked", "race_window_ms": 20}
    assert client.post("/orders", json={"buyer": "ana"}).json["mode"] == "unlocked"


def test_reset_restores_the_count_and_clears_every_order(client: FlaskClient) -> None:
    client.post("/orders", json={"buyer": "ana"})

    fresh = client.post("/reset", json={"tickets": 3, "event": "matinee"}).json

    assert (fresh["event"], fresh["total"], fresh["remaining"], fresh["sold"]) == ("matinee", 3, 3, 0)
    assert client.get("/orders").json["count"] == 0
    assert client.post("/reset").json["total"] == 3  # no body: restore the current total


def test_openapi_document_is_served_and_covers_every_route(client: FlaskClient) -> None:
    served = client.get("/openapi.json").json
    kept = json.loads(resources.files("service").joinpath("openapi.json").read_text())
    schemas = served["components"]["schemas"]
    assert schemas["Mode"].pop("enum") == [mode.name for mode in TABLE]
    assert schemas["SettingsChange"]["properties"]["mode"].pop("enum") == [mode.name for mode in FileStore.modes()]
    assert served == kept
    documented = {
        (path.replace("{order_id}", "<order_id>"), method.upper())
        for path, item in served["paths"].items()
        for method in item
    }
    routes = {
        (rule.rule, method)
        for rule in client.application.url_map.iter_rules()
        for method in rule.methods - {"HEAD", "OPTIONS"}
        if rule.endpoint != "static"
    }
    assert documented == routes


# --- Bad requests, against the real service: a JSON error, the right status, and no store file touched ----------

JSON = {"Content-Type": "application/json"}
BAD_REQUESTS = [
    # (method, path, raw body, extra headers, status, error code)
    ("POST", "/orders", b"", JSON, 400, "missing_body"),
    ("POST", "/orders", b'{"buyer": ', JSON, 400, "invalid_json"),
    ("POST", "/orders", b'["ana"]', JSON, 400, "invalid_json"),
    ("POST", "/orders", b'{"buyer": "ana", "quantity": NaN}', JSON, 400, "invalid_json"),
    ("POST", "/orders", b"[" * 5000 + b"]" * 5000, JSON, 400, "invalid_json"),
    ("POST", "/orders", b'{"buyer": "ana"}', {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    (
        "POST",
        "/orders",
        b'{"buyer": "ana"}',
        {"Content-Type": "application/x-www-form-urlencoded"},
        415,
        "unsupported_media_type",
    ),
    ("POST", "/orders", b'{"buyer": "' + b"a" * 20_000 + b'"}', JSON, 413, "payload_too_large"),
    ("POST", "/orders", b"{}", JSON, 400, "missing_field"),
    ("POST", "/orders", b'{"buyer": "ana", "coupon": "free"}', JSON, 400, "unknown_field"),
    *[
        ("POST", "/orders", json.dumps({"buyer": buyer}).encode(), JSON, 400, "invalid_field")
        for buyer in ["", "   ", 7, None, True, ["ana"], "a" * 101, "ana\u0000", "line\nbreak", "\x1b[31mred"]
    ],
    ("POST", "/orders", b'{"buyer": "\\ud800"}', JSON, 400, "invalid_field"),
    *[
        ("POST", "/orders", json.dumps({"buyer": "ana", "quantity": quantity}).encode(), JSON, 400, "invalid_field")
        for quantity in [0, -1, 11, 1.5, 1.0, True, False, None, "1", 10**30, -(10**30)]
    ],
    ("POST", "/orders", b'{"buyer": "ana"}', {**JSON, "Idempotency-Key": "k" * 256}, 400, "invalid_idempotency_key"),
    ("POST", "/orders", b'{"buyer": "ana"}', {**JSON, "Idempotency-Key": "clé-1"}, 400, "invalid_idempotency_key"),
    *[
        ("GET", f"/orders?{query}", b"", {}, 400, "invalid_paging")
        for query in [
            "limit=0",
            "limit=1001",
            "limit=-1",
            "limit=abc",
            "limit=1.5",
            "offset=-1",
            "offset=%EF%BC%91",
            "limit=",
            "offset=99999999999999",
        ]
    ],
    ("GET", "/orders/nope", b"", {}, 404, "order_not_found"),
    ("PUT", "/mode", b'{"mode": "fast"}', JSON, 400, "unknown_mode"),
    ("PUT", "/mode", b'{"mode": null}', JSON, 400, "unknown_mode"),
    ("PUT", "/mode", b"{}", JSON, 400, "invalid_request"),
    ("PUT", "/mode", b"", JSON, 400, "missing_body"),
    ("PUT", "/mode", b'{"mode": "locked", "turbo": true}', JSON, 400, "unknown_field"),
    *[
        ("PUT", "/mode", json.dumps({"race_window_ms": window}).encode(), JSON, 400, "invalid_field")
        for window in [-1, 5001, True, 2.5, "20", None]
    ],
    ("PUT", "/mode", b'{"mode": "unlocked"}', {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    *[
        ("POST", "/reset", json.dumps({"tickets": tickets}).encode(), JSON, 400, "invalid_field")
        for tickets in [-1, True, 1.0, "10", None, 10**10]
    ],
    ("POST", "/reset", b'{"event": ""}', JSON, 400, "invalid_field"),
    ("POST", "/reset", b'{"seats": 5}', JSON, 400, "unknown_field"),
    ("POST", "/reset", b"not json", JSON, 400, "invalid_json"),
    ("POST", "/reset", b'{"tickets": 5}', {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    ("GET", "/no-such-thing", b"", {}, 404, "not_found"),
    ("GET", "/orders?limit=" + "9" * 5000, b"", {}, 414, "uri_too_long"),  # refused by gunicorn itself
    ("DELETE", "/tickets", b"", {}, 405, "method_not_allowed"),
    ("POST", "/health", b"", {}, 405, "method_not_allowed"),
    ("PATCH", "/orders", b"{}", JSON, 405, "method_not_allowed"),
]


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "code"), BAD_REQUESTS)
def test_bad_request_gets_a_json_error_and_changes_nothing(
    api: Api,
    service: EmbeddedService,
    method: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    api.post("/orders", {"buyer": "someone"})  # so the journal has content that must stay the same
    before = store_files(service.directory)

    response = api.request(method, path, data=body, headers=headers)

    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()
    assert set(error) == {"error", "message"} and error["error"] == code and error["message"]
    assert store_files(service.directory) == before
    if status == 405:
        assert response.headers["Allow"]


def test_a_request_gunicorn_cannot_parse_gets_a_json_error_too(service: EmbeddedService) -> None:
    host, port = service.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"GET /tickets HTTP/9.9\r\nHost: x\r\n\r\n")
        raw = b""
        while chunk := connection.recv(65536):
            raw += chunk

    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"Content-Type: application/json" in head
    error = json.loads(body)
    assert error["error"] == "bad_request" and "Invalid HTTP Version" in error["message"]


def test_the_feed_gives_only_what_is_new_and_says_when_the_store_was_reset(client: FlaskClient) -> None:
    first = client.get("/orders?after=").json
    assert (first["orders"], first["reset"]) == ([], False)
    sold = [client.post("/orders", json={"buyer": name}).json for name in ("ana", "bo")]

    new = client.get(f"/orders?after={first['cursor']}").json
    assert (new["orders"], new["reset"]) == (sold, False)
    assert client.get(f"/orders?after={new['cursor']}").json["orders"] == []

    client.post("/reset", json={"tickets": 5})
    after_reset = client.post("/orders", json={"buyer": "cy"}).json
    again = client.get(f"/orders?after={new['cursor']}").json
    assert (again["orders"], again["reset"]) == ([after_reset], True)


@pytest.mark.parametrize("query", ["after=x", "after=1", "after=.5&after=.6", "after=.1&offset=0", "after=ab.-1"])
def test_a_cursor_no_answer_gave_is_refused(client: FlaskClient, query: str) -> None:
    response = client.get(f"/orders?{query}")

    assert response.status_code == 400
    assert response.json["error"] in ("invalid_cursor", "invalid_paging")


# --- The Host header: loopback names and the configured ones, nothing else ----------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("POST", "/reset", {"tickets": 0}), ("PUT", "/mode", {"mode": "unlocked"}), ("POST", "/orders", {"buyer": "x"}),
     ("GET", "/tickets", None), ("GET", "/", None), ("GET", "/page/app.js", None)],
)  # fmt: skip
def test_a_foreign_host_is_refused_before_any_route_and_changes_nothing(
    api: Api, service: EmbeddedService, method: str, path: str, body: object
) -> None:
    # What a page at evil.example sends once its name was rebound to 127.0.0.1 (DNS rebinding).
    api.post("/orders", {"buyer": "someone"})
    before = store_files(service.directory)

    response = api.request(method, path, body, headers={"Host": "evil.example:8000"})

    assert response.status_code == 400 and response.headers["Content-Type"] == "application/json"
    assert response.json()["error"] == "host_not_allowed" and "TICKETLOCK_ALLOWED_HOSTS" in response.json()["message"]
    assert store_files(service.directory) == before


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.0.0.1:8000", "127.0.0.2:80", "localhost", "LOCALHOST:8000", "[::1]", "[::1]:8000"]
)
def test_the_loopback_names_are_served(api: Api, host: str) -> None:
    response = api.get("/tickets", headers={"Host": host})

    assert response.status_code == 200, response.text


def test_the_names_in_allowed_hosts_are_served_and_no_others(tmp_path: Path) -> None:
    config = {"db_path": tmp_path / "db.json", "allowed_hosts": "ticketlock.example, lb"}
    client = create_app(config).test_client()

    assert client.get("/tickets", headers={"Host": "Ticketlock.Example:8000"}).status_code == 200
    assert client.get("/tickets", headers={"Host": "lb"}).status_code == 200
    assert client.get("/tickets", headers={"Host": "ticketlock.example.evil"}).json["error"] == "host_not_allowed"
