"""Every error the booking service can answer with, and the one place that turns them into JSON responses.

The tree::

    BookingError                          500 internal_error
    ├── InvalidRequest (ValueError)       400 invalid_request and friends (bad JSON, bad field, bad paging,
    │                                     a Host the service does not answer to)
    ├── Unauthorized (PermissionError)    401 unauthorized
    ├── OrderNotFound (LookupError)       404 order_not_found
    ├── SoldOut                           409 sold_out
    ├── IdempotencyKeyReused              422 idempotency_key_reused
    ├── LockTimeout (TimeoutError)        503 lock_timeout, with Retry-After: nothing sold
    ├── TooManyConflicts                  503 too_many_conflicts, with Retry-After: nothing sold
    ├── LockUnavailable (ConnectionError) 503 lock_unavailable, with Retry-After: the lock service is out of
    │                                         reach, nothing sold
    ├── Unhealthy                         503 (GET /health), with Retry-After: the code and message of what is wrong
    └── StoreError (OSError)              500: the store is damaged, unwritable or unreachable
        ├── StoreDamaged                  500 store_damaged: nothing sold, the file left as it is
        ├── StoreWriteFailed              500 store_write_failed: nothing sold, the previous files intact
        ├── OrderNotDurable               500 order_not_durable: recorded, but the fsync failed
        ├── StoreUnavailable              503 store_unavailable, with Retry-After: the database is out of reach,
        │                                     nothing sold
        └── OutcomeUnknown                503 outcome_unknown, with Retry-After: the connection broke during the
                                              commit; GET /orders/<id> tells whether the order stands

Two exceptions are never answered: a purchase that meets them starts again (``service/purchase.py``)::

    Conflict                              the count changed between the read and the write
    ├── StaleFence                        the store holds a newer fencing token than this holder's
    └── SettingsChanged                   a switch came before the sale's hold (``service/stores/base.py``): it
                                          starts again at once, in the mode in force

Werkzeug's own HTTP errors (unknown route, wrong method, body too large, ...) get the same JSON shape, and so
do the requests gunicorn refuses before Flask sees them (a malformed request line, a URL over 4 KB, ...).
"""

from __future__ import annotations

import json
import logging
import socket
from typing import ClassVar

from flask import Flask, Response, jsonify
from gunicorn.util import write_nonblock
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class BookingError(Exception):
    """Root of the service's errors: ``status`` and ``code`` say how the error handler answers."""

    status = 500
    code = "internal_error"
    headers: ClassVar[dict[str, str]] = {}

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidRequest(BookingError, ValueError):
    """The request is malformed: bad JSON, a missing or bad field, bad paging."""

    status = 400
    code = "invalid_request"


class Unauthorized(BookingError, PermissionError):
    """An admin endpoint was called without the configured bearer token."""

    status = 401
    code = "unauthorized"
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": 'Bearer realm="ticketlock admin"'}


class OrderNotFound(BookingError, LookupError):
    """No order has the requested id."""

    status = 404
    code = "order_not_found"


class SoldOut(BookingError):
    """Fewer tickets remain than the buyer asked for; nothing was sold and nothing written."""

    status = 409
    code = "sold_out"


class IdempotencyKeyReused(BookingError):
    """An Idempotency-Key came back with a different body than the one it was first used with."""

    status = 422
    code = "idempotency_key_reused"


class LockTimeout(BookingError, TimeoutError):
    """The inventory lock was not free within the configured timeout; the client should retry."""

    status = 503
    code = "lock_timeout"
    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class TooManyConflicts(BookingError):
    """Every attempt of a purchase met a concurrent write, a newer lease token or a mode switch; nothing was sold."""

    status = 503
    code = "too_many_conflicts"
    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class LockUnavailable(BookingError, ConnectionError):
    """The lock service (Redis) cannot be reached, so no lease can be taken; nothing was sold."""

    status = 503
    code = "lock_unavailable"
    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class Unhealthy(BookingError):
    """GET /health's answer while something the service serves from is wrong: 503, with the code and the message
    of that problem (the ones a purchase would get), so that a healthcheck and a person both learn what it is."""

    status = 503
    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}

    def __init__(self, problem: BookingError) -> None:
        super().__init__(problem.message, code=problem.code)


class StoreError(BookingError, OSError):
    """The store cannot be used: a file is damaged or unwritable, or the database cannot be reached."""

    code = "store_error"


class StoreDamaged(StoreError):
    """A store file is missing, truncated, not JSON or of the wrong shape. The service never rewrites it silently."""

    code = "store_damaged"


class StoreWriteFailed(StoreError):
    """Writing a store file failed (disk full, permission denied); the previous contents are intact."""

    code = "store_write_failed"


class OrderNotDurable(StoreError):
    """The order was recorded, but flushing it to disk failed: it may not survive a crash."""

    code = "order_not_durable"


class StoreUnavailable(StoreError):
    """The database cannot be reached (down, restarting, or every connection busy); nothing was sold."""

    status = 503
    code = "store_unavailable"
    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class OutcomeUnknown(StoreError):
    """The connection broke while the order was being committed: it may or may not stand."""

    status = 503
    code = "outcome_unknown"
    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class Conflict(Exception):
    """The write found the inventory changed since the read; the purchase starts again (never sent to a client)."""


class StaleFence(Conflict):
    """The store refused a lease holder's token: a newer holder claimed the inventory since (``newest``)."""

    def __init__(self, message: str, newest: int) -> None:
        super().__init__(message)
        self.newest = newest


def error_body(code: str, message: str) -> dict[str, str]:
    """The JSON body of every error response."""
    return {"error": code, "message": message}


def register_error_handlers(app: Flask) -> None:
    """Render every error the app can raise as ``{"error": code, "message": ...}`` with the right status."""
    app.register_error_handler(BookingError, _booking_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)


def _booking_error(error: BookingError) -> tuple[Response, int]:
    if error.status >= 500:
        log.error("%s: %s", error.code, error.message)
    response = jsonify(error_body(error.code, error.message))
    response.headers.update(error.headers)
    return response, error.status


HTTP_CODES = {
    400: ("invalid_request", "The request could not be understood."),
    404: ("not_found", "No such endpoint. See GET /openapi.json for the API."),
    405: ("method_not_allowed", "This endpoint does not accept that method."),
    413: ("payload_too_large", "The request body is too large: every body of this API is a small JSON object."),
    415: ("unsupported_media_type", "Send the body as JSON with 'Content-Type: application/json'."),
}


def _http_error(error: HTTPException) -> tuple[Response, int]:
    status = error.code or 500
    code, message = HTTP_CODES.get(status, (f"http_{status}", error.description or "HTTP error"))
    response = jsonify(error_body(code, message))
    allowed = getattr(error, "valid_methods", None)
    if allowed:
        response.headers["Allow"] = ", ".join(allowed)
    return response, status


def _unexpected_error(error: Exception) -> tuple[Response, int]:
    log.exception("unexpected error", exc_info=error)
    return jsonify(error_body("internal_error", "The server failed on this request; its log has the details.")), 500


PROTOCOL_ADVICE = {
    400: "gunicorn refused the request before the service saw it: send a well-formed HTTP/1.1 request.",
    414: "Keep the request line under 4 KB; GET /orders pages with ?limit= and &offset=.",
    431: "Send fewer or smaller headers.",
}


def write_protocol_error(sock: socket.socket, status: int, reason: str, message: str) -> None:
    """gunicorn's answer to a request it cannot parse, in the same JSON shape as every other error.

    gunicorn.conf.py installs it in place of ``gunicorn.util.write_error``, which writes an HTML page.
    """
    text = f"{message}. {PROTOCOL_ADVICE.get(status, '')}".strip()
    body = json.dumps(error_body(reason.lower().replace(" ", "_"), text), separators=(",", ":")).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    write_nonblock(sock, head.encode("latin-1") + body)
