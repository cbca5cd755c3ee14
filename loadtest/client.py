"""Talking to the booking API over HTTP with ``requests``, as people write such scripts: the admin calls, and each
buyer's purchase on a ``requests.Session`` of its own.

``--throughput`` alone sends on the standard library's ``http.client`` (``ServiceClient.connection``): there the
client's own CPU per request limits the figure, and requests spends several times as much of it (measured in
docs/load-tester.md).
"""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests

from loadtest.checker import FAIL, INFO, OK, Outcome


class ServiceUnreachable(Exception):
    """No connection to the service could be made, or it did not answer in time."""


class ServiceError(Exception):
    """The service answered an admin call with an unexpected status; the message carries its error."""


@dataclass(frozen=True)
class Reply:
    """A parsed HTTP answer."""

    status: int
    body: Any
    headers: dict[str, str]


class ServiceClient:
    """One booking service at ``base_url`` (``http://host:port`` with an optional path prefix)."""

    def __init__(self, base_url: str, token: str | None = None, timeout_s: float = 10.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def connection(self) -> http.client.HTTPConnection:
        """A new, not yet connected, ``http.client`` connection to the service (``--throughput`` only)."""
        kind = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return kind(self.host, self.port, timeout=self.timeout_s)

    def request(self, method: str, path: str, body: Any = None, admin: bool = False) -> Reply:
        """Send one request on a fresh connection; ServiceUnreachable if no answer comes."""
        try:
            response = requests.request(
                method, self.base_url + path, json=body, headers=self._headers(admin), timeout=self.timeout_s
            )
        except requests.RequestException as error:
            raise ServiceUnreachable(f"{self.base_url} did not answer {method} {path}: {describe(error)}") from None
        return Reply(response.status_code, _parsed(response), dict(response.headers))

    def _headers(self, admin: bool) -> dict[str, str]:
        if admin and self.token:
            return {"Authorization": f"Bearer {self.token}"}
        return {}

    def expect(self, reply: Reply, status: int, what: str) -> dict[str, Any]:
        """The reply's JSON object if it has ``status``, else ServiceError naming the service's own error."""
        if reply.status != status:
            detail = reply.body.get("message") if isinstance(reply.body, dict) else reply.body
            hint = " (pass the service's admin token with --token)" if reply.status == 401 else ""
            raise ServiceError(f"{what} failed with HTTP {reply.status}: {detail}{hint}")
        if not isinstance(reply.body, dict):
            raise ServiceError(f"{what}: the answer is not a JSON object: {str(reply.body)[:200]}")
        return reply.body

    def health(self) -> dict[str, Any]:
        """``GET /health``."""
        return self.expect(self.request("GET", "/health"), 200, "health check")

    def tickets(self) -> dict[str, Any]:
        """``GET /tickets``."""
        return self.expect(self.request("GET", "/tickets"), 200, "reading the inventory")

    def modes(self) -> dict[str, Any]:
        """``GET /modes``: the store, the mode in force, the lease, and every mode with whether this store runs it."""
        return self.expect(self.request("GET", "/modes"), 200, "listing the modes")

    def refusals(self) -> list[dict[str, Any]]:
        """``GET /refusals``: the stale writes the store refused since the last reset."""
        refusals: list[dict[str, Any]] = self.expect(self.request("GET", "/refusals"), 200, "listing refusals")[
            "refusals"
        ]
        return refusals

    def reset(self, tickets: int) -> dict[str, Any]:
        """``POST /reset``: ``tickets`` tickets, no orders."""
        return self.expect(self.request("POST", "/reset", {"tickets": tickets}, admin=True), 200, "reset")

    def set_mode(self, mode: str, race_window_ms: int | None = None) -> dict[str, Any]:
        """``PUT /mode``, optionally changing the race window too."""
        change: dict[str, object] = {"mode": mode}
        if race_window_ms is not None:
            change["race_window_ms"] = race_window_ms
        return self.expect(self.request("PUT", "/mode", change, admin=True), 200, "setting the mode")

    def all_orders(self, page_size: int = 1000) -> list[dict[str, Any]]:
        """Every recorded order, fetched page by page."""
        orders: list[dict[str, Any]] = []
        while True:
            page = self.expect(
                self.request("GET", f"/orders?limit={page_size}&offset={len(orders)}"), 200, "listing orders"
            )
            orders += page["orders"]
            if not page["orders"] or len(orders) >= page["count"]:
                return orders


def _parsed(response: requests.Response) -> Any:
    """The answer's JSON, or its text when it is not JSON (an error page of a proxy, say), or None when empty."""
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return response.text


# Server errors after which the service promises nothing was sold: the checker holds it to that promise.
NOTHING_SOLD = {
    "lock_timeout",
    "too_many_conflicts",
    "store_damaged",
    "store_write_failed",
    "store_unavailable",
    "lock_unavailable",
}


class Buyer:
    """One buyer: a ``requests.Session`` of its own, and its ``POST /orders`` prepared, so that ``buy`` only sends."""

    def __init__(self, url: str, name: str, quantity: int = 1, timeout_s: float = 10.0) -> None:
        self.name = name
        self.quantity = quantity
        self.timeout_s = timeout_s
        self.session = requests.Session()
        body: dict[str, Any] = {"buyer": name, "quantity": quantity}
        self.request = self.session.prepare_request(requests.Request("POST", url, json=body))

    def buy(self) -> Outcome:
        """Send the purchase and classify the answer as ok, fail or info; the session is closed after."""
        invoked_at = time.time()
        try:
            response = self.session.send(self.request, timeout=self.timeout_s)
        except requests.RequestException as error:
            return Outcome(self.name, self.quantity, INFO, invoked_at, time.time(), error=describe(error))
        finally:
            self.session.close()
        return classify(self.name, self.quantity, invoked_at, response.status_code, _parsed(response))


def classify(buyer: str, quantity: int, invoked_at: float, status: int, body: object) -> Outcome:
    """The outcome of a purchase answered just now with ``status`` and ``body`` (parsed JSON, or text): ok for a
    201 with an order, fail when the service promises nothing was sold, info otherwise."""
    completed_at = time.time()
    error_code = body.get("error") if isinstance(body, dict) else None
    if status == 201 and isinstance(body, dict) and "order_id" in body:
        return Outcome(buyer, quantity, OK, invoked_at, completed_at, status, order=body)
    kind = FAIL if 400 <= status < 500 or error_code in NOTHING_SOLD else INFO
    return Outcome(buyer, quantity, kind, invoked_at, completed_at, status, error_code or f"http_{status}")


def describe(error: BaseException) -> str:
    """A short, stable name for a network failure: ``timeout``, ``connection_refused``, ...

    requests wraps the socket's error in its own (and urllib3's) exceptions: the name is that of the first known
    failure found down the chain of causes.
    """
    for cause in _causes(error):
        if isinstance(cause, (socket.timeout, TimeoutError, requests.Timeout)):
            return "timeout"
        if isinstance(cause, ConnectionRefusedError):
            return "connection_refused"
        if isinstance(cause, (ConnectionResetError, http.client.RemoteDisconnected)):
            return "connection_reset"
    return type(error).__name__


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error``, then what caused it, nearest first: explicit causes, contexts, urllib3's ``reason`` and arguments."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        cause = pending.pop(0)
        if id(cause) in seen:
            continue
        seen.add(id(cause))
        yield cause
        linked = [cause.__cause__, cause.__context__, getattr(cause, "reason", None), *cause.args]
        pending += [each for each in linked if isinstance(each, BaseException)]
