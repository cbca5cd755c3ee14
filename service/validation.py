"""Turning request bodies, query strings and headers into checked values, or an InvalidRequest that says why."""

from __future__ import annotations

import ipaddress
import json
import re
import unicodedata
from collections.abc import Callable, Collection
from typing import Any
from urllib.parse import urlsplit

from flask import Request
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import UnsupportedMediaType

from service.config import MAX_RACE_WINDOW_MS, MAX_TICKETS
from service.errors import InvalidRequest
from service.modes import MODES, Mode
from service.purchase import PurchaseRequest

MAX_BODY_BYTES = 16 * 1024
MAX_TEXT_LENGTH = 100
MAX_QUANTITY = 10
MAX_PAGE_SIZE = 1000
MAX_OFFSET = 10**12
MAX_IDEMPOTENCY_KEY_LENGTH = 255
_DIGITS = re.compile(r"[0-9]{1,13}")
_CURSOR = re.compile(r"[0-9a-f]{0,64}\.[0-9]{1,18}")
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")


def json_object(request: Request, *, required: bool) -> dict[str, Any]:
    """The body as a JSON object; an empty body is ``{}`` when the body is optional."""
    body = request.get_data(cache=False)  # enforces MAX_CONTENT_LENGTH: 413 beyond it
    if not body:
        if required:
            raise InvalidRequest("A JSON body is required.", code="missing_body")
        return {}
    if not request.is_json:
        raise UnsupportedMediaType()
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise InvalidRequest(f"The body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest('The body must be a JSON object, such as {"buyer": "ana"}.', code="invalid_json")
    return data


def served_host(host: str, allowed: Collection[str]) -> None:
    """The request's ``Host`` (``name[:port]``) must name this service: ``localhost``, a loopback address, or one of
    ``allowed`` (TICKETLOCK_ALLOWED_HOSTS). Else 400 host_not_allowed: a web page whose own name was rebound to
    127.0.0.1 (DNS rebinding) reaches the service, but names itself (Django's ``ALLOWED_HOSTS`` does the same)."""
    name = _host_name(host)
    if name and (name == "localhost" or _is_loopback(name) or name in allowed or "*" in allowed):
        return
    shown = ", ".join(allowed) if allowed else "none"
    raise InvalidRequest(
        f"This service does not answer to the host {host[:100]!r}: it answers to localhost, the loopback addresses "
        f"and the names in TICKETLOCK_ALLOWED_HOSTS ({shown}).",
        code="host_not_allowed",
    )


def _host_name(host: str) -> str:
    """The name of ``name[:port]``, lower case, without brackets or a final dot ("" if there is none)."""
    try:
        return (urlsplit(f"//{host}").hostname or "").removesuffix(".")
    except ValueError:
        return ""


def _is_loopback(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def order_request(data: dict[str, Any], idempotency_key: str | None) -> PurchaseRequest:
    """``POST /orders``: ``{"buyer": text, "quantity": 1..10 (default 1)}``."""
    _only(data, "buyer", "quantity")
    return PurchaseRequest(
        buyer=text(data, "buyer"),
        quantity=whole_number(data, "quantity", low=1, high=MAX_QUANTITY, default=1),
        idempotency_key=_idempotency_key(idempotency_key),
    )


def settings_change(data: dict[str, Any], available: list[Mode], needs: Callable[[Mode], str]) -> dict[str, Any]:
    """``PUT /mode``: ``{"mode": one of ``available``, "race_window_ms": 0..5000}``, at least one of them; ``needs``
    names what this service lacks to run another mode."""
    _only(data, "mode", "race_window_ms")
    names = ", ".join(f'"{mode.name}"' for mode in available)
    if not data:
        raise InvalidRequest(f'Send {{"mode": ...}} with one of {names}, and/or "race_window_ms".')
    change: dict[str, Any] = {}
    if "mode" in data:
        mode = data["mode"]
        if not isinstance(mode, str) or mode not in MODES:
            raise InvalidRequest(f"Unknown mode {str(mode)[:40]!r}: use one of {names}.", code="unknown_mode")
        if MODES[mode] not in available:
            raise InvalidRequest(
                f"The {mode!r} mode needs {needs(MODES[mode])}; this service runs {names}.", code="mode_not_available"
            )
        change["mode"] = mode
    if "race_window_ms" in data:
        change["race_window_ms"] = whole_number(data, "race_window_ms", low=0, high=MAX_RACE_WINDOW_MS)
    return change


def reset_request(data: dict[str, Any]) -> tuple[int | None, str | None]:
    """``POST /reset``: ``{"tickets": 0..1e9, "event": text}``, both optional."""
    _only(data, "tickets", "event")
    tickets = whole_number(data, "tickets", low=0, high=MAX_TICKETS) if "tickets" in data else None
    event = text(data, "event") if "event" in data else None
    return tickets, event


def feed(args: MultiDict[str, str]) -> tuple[str, int]:
    """``?after=<cursor>&limit=1..1000`` for the incremental ``GET /orders``; an empty cursor starts at the first."""
    if "offset" in args:
        raise InvalidRequest("Use 'after' or 'offset', not both.", code="invalid_paging")
    cursors = args.getlist("after")
    if len(cursors) > 1 or (cursors[0] and not _CURSOR.fullmatch(cursors[0])):
        raise InvalidRequest(
            "'after' must be empty or a cursor from an earlier answer's 'cursor', given once.", code="invalid_cursor"
        )
    return cursors[0], _query_number(args, "limit", default=100, low=1, high=MAX_PAGE_SIZE)


def page(args: MultiDict[str, str]) -> tuple[int, int]:
    """``?limit=1..1000&offset=0..`` for ``GET /orders``; defaults 100 and 0."""
    limit = _query_number(args, "limit", default=100, low=1, high=MAX_PAGE_SIZE)
    offset = _query_number(args, "offset", default=0, low=0, high=MAX_OFFSET)
    return limit, offset


def text(data: dict[str, Any], field: str) -> str:
    """A required, non-blank text field of at most MAX_TEXT_LENGTH characters, without control characters."""
    if field not in data:
        raise InvalidRequest(f"'{field}' is required.", code="missing_field")
    value = data[field]
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT_LENGTH:
        raise InvalidRequest(
            f"'{field}' must be non-blank text of at most {MAX_TEXT_LENGTH} characters.", code="invalid_field"
        )
    if any(unicodedata.category(character) in ("Cc", "Cs") for character in value):
        raise InvalidRequest(f"'{field}' must not contain control characters.", code="invalid_field")
    return value


def whole_number(data: dict[str, Any], field: str, *, low: int, high: int, default: int | None = None) -> int:
    """An integer field in ``low..high``; JSON true/false and 1.0 are not integers."""
    if field not in data and default is not None:
        return default
    value = data.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"'{field}' must be a whole number from {low} to {high}.", code="invalid_field")
    return value


def _only(data: dict[str, Any], *allowed: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise InvalidRequest(
            f"Unknown field(s) {', '.join(repr(name[:40]) for name in unknown)}; "
            f"this endpoint accepts {', '.join(allowed)}.",
            code="unknown_field",
        )


def _query_number(args: MultiDict[str, str], name: str, *, default: int, low: int, high: int) -> int:
    values = args.getlist(name)
    if not values:
        return default
    raw = values[0]
    if len(values) > 1 or not _DIGITS.fullmatch(raw) or not low <= int(raw) <= high:
        raise InvalidRequest(
            f"'{name}' must be a whole number from {low} to {high}, given once.", code="invalid_paging"
        )
    return int(raw)


def _idempotency_key(value: str | None) -> str | None:
    if value is None:
        return None
    if len(value) > MAX_IDEMPOTENCY_KEY_LENGTH or not _IDEMPOTENCY_KEY.fullmatch(value):
        raise InvalidRequest(
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} printable ASCII characters, such as a UUID.",
            code="invalid_idempotency_key",
        )
    return value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")
