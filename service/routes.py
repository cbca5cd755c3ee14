"""The HTTP API: each route checks its input, calls the store or ``purchase``, and returns JSON (and the page)."""

from __future__ import annotations

import hmac
import json
import os
from dataclasses import asdict
from functools import partial
from importlib import resources
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from service import validation
from service.config import Config
from service.errors import BookingError, OrderNotFound, Unauthorized, Unhealthy
from service.modes import TABLE, Mode
from service.purchase import purchase
from service.stores import Inventory, RuntimeSettings, Store, what_mode_needs

bp = Blueprint("booking", __name__)

# The page runs only its own script and stylesheet and talks only to this service: a buyer's name that looks
# like HTML can never run as script (the page also writes every value as text).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _config() -> Config:
    """The app's configuration (``create_app`` keeps it in ``app.extensions``)."""
    config: Config = current_app.extensions["ticketlock.config"]
    return config


def _store() -> Store:
    """The app's store: this worker's own, reaching its files or its database on first use."""
    store: Store = current_app.extensions["ticketlock.store"]
    return store


@bp.before_app_request
def served_host() -> None:
    """Every request, before any route: a ``Host`` this service answers to, else 400 host_not_allowed."""
    validation.served_host(request.host, _config().allowed_hosts)


@bp.get("/")
def page() -> Response:
    """GET / -> 200 the live page (HTML; its script and stylesheet are under /page/)."""
    return current_app.send_static_file("index.html")


@bp.after_app_request
def security_headers(response: Response) -> Response:
    """Every answer: the page's Content-Security-Policy, and no guessing of content types."""
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@bp.get("/health")
def health() -> Response:
    """GET /health -> 200 {"status": "ok"}; 503 {"error", "message"} naming what is wrong, with the code a purchase
    would get: the store's files or rows damaged (store_damaged), its folder unwritable (store_write_failed), its
    database out of reach (store_unavailable), the lock service out of reach (lock_unavailable). The store is
    checked first, then every other dependency."""
    for check in current_app.extensions["ticketlock.health_checks"]:
        try:
            check()
        except BookingError as problem:
            raise Unhealthy(problem) from problem
    return jsonify(status="ok")


@bp.get("/tickets")
def tickets() -> Response:
    """GET /tickets -> 200 {"event", "total", "remaining", "sold", "buckets", "mode", "race_window_ms", "worker_pid",
    "host", "store"}; ``buckets``: what each bucket holds while the ``buckets`` mode splits the count (else [])."""
    store = _store()
    return jsonify(_tickets_view(store.read_inventory(), store.read_settings()))


@bp.post("/orders")
def create_order() -> tuple[Response, int, dict[str, str]]:
    """POST /orders {"buyer", "quantity"?} -> 201 the order; 200 a replay of the same Idempotency-Key.

    Errors: 400 bad body, 409 sold_out, 422 Idempotency-Key reused with another body, 500 store trouble,
    503 lock_timeout, too_many_conflicts, store_unavailable, lock_unavailable or outcome_unknown.
    """
    purchase_request = validation.order_request(
        validation.json_object(request, required=True), request.headers.get("Idempotency-Key")
    )
    done = purchase(_store(), purchase_request, _config())
    headers = {"Location": f"/orders/{done.order['order_id']}"}
    if done.replayed:
        return jsonify(done.order), 200, {**headers, "Idempotent-Replayed": "true"}
    return jsonify(done.order), 201, headers


@bp.get("/orders")
def list_orders() -> Response:
    """GET /orders?limit=100&offset=0 -> 200 {"count", "limit", "offset", "orders"}, oldest first.

    GET /orders?after=<cursor>&limit=100 -> 200 {"cursor", "reset", "orders"}: the orders recorded after the
    cursor of an earlier answer ("" for the first), for a live view. 400 invalid_paging or invalid_cursor.
    """
    store = _store()
    if "after" in request.args:
        cursor, limit = validation.feed(request.args)
        return jsonify(asdict(store.feed(cursor, limit)))
    limit, offset = validation.page(request.args)
    count, orders = store.orders_page(limit, offset)
    return jsonify(count=count, limit=limit, offset=offset, orders=orders)


@bp.get("/orders/<order_id>")
def get_order(order_id: str) -> Response:
    """GET /orders/<order_id> -> 200 the order; 404 order_not_found."""
    order = _store().find_order(order_id)
    if order is None:
        raise OrderNotFound(f"No order {order_id[:64]!r}. GET /orders lists them.")
    return jsonify(order)


@bp.get("/refusals")
def list_refusals() -> Response:
    """GET /refusals -> 200 {"refusals": [...]}: the writes the store refused since the last reset because a newer
    lease token had claimed the inventory (fenced-lease), oldest first, at most 1000."""
    return jsonify(refusals=_store().refusals())


@bp.get("/mode")
def get_mode() -> Response:
    """GET /mode -> 200 {"mode", "race_window_ms"}."""
    return jsonify(asdict(_store().read_settings()))


@bp.get("/modes")
def list_modes() -> Response:
    """GET /modes -> 200 {"mode", "store", "lease_ms", "modes": [{"name", "protects", "guard", ..., "available"}]};
    ``lease_ms`` is null without a lock service."""
    store = _store()
    available = store.available_modes()
    modes = [{**mode.describe(), "available": mode in available} for mode in TABLE]
    lease_ms = _config().lease_ms if store.services else None
    return jsonify(mode=store.read_settings().mode, store=store.kind, lease_ms=lease_ms, modes=modes)


@bp.put("/mode")
def put_mode() -> Response:
    """PUT /mode {"mode"?, "race_window_ms"?} -> 200 {"mode", "race_window_ms"}.

    400 unknown_mode, or mode_not_available for a mode this store cannot run (both list the modes it can); 401.
    """
    store = _store()
    _require_admin(_config())
    change = validation.settings_change(
        validation.json_object(request, required=True), store.available_modes(), partial(what_mode_needs, store)
    )
    settings = store.change_settings(change)
    current_app.logger.info("purchase settings now %s", settings)
    return jsonify(asdict(settings))


@bp.post("/reset")
def reset() -> Response:
    """POST /reset {"tickets"?, "event"?} -> 200 the fresh state: count restored, all orders cleared. 400; 401."""
    store = _store()
    _require_admin(_config())
    tickets, event = validation.reset_request(validation.json_object(request, required=False))
    fresh = store.reset(tickets, event)
    current_app.logger.info("store reset: %s", fresh)
    return jsonify(_tickets_view(fresh, store.read_settings()))


@bp.get("/openapi.json")
def openapi() -> Response:
    """GET /openapi.json -> 200 the OpenAPI 3 description of this API, its modes taken from the modes table."""
    return jsonify(openapi_document(_store().available_modes()))


def openapi_document(available: list[Mode]) -> dict[str, Any]:
    """service/openapi.json with the modes filled in: every mode of the table where the API names a mode, and
    only the modes this store runs where ``PUT /mode`` accepts one."""
    document: dict[str, Any] = json.loads(resources.files("service").joinpath("openapi.json").read_bytes())
    schemas = document["components"]["schemas"]
    schemas["Mode"]["enum"] = [mode.name for mode in TABLE]
    schemas["SettingsChange"]["properties"]["mode"]["enum"] = [mode.name for mode in available]
    return document


def _tickets_view(inventory: Inventory, settings: RuntimeSettings) -> dict[str, Any]:
    return {
        "event": inventory.event,
        "total": inventory.total,
        "remaining": inventory.remaining,
        "sold": inventory.sold,
        "buckets": list(inventory.buckets),
        "mode": settings.mode,
        "race_window_ms": settings.race_window_ms,
        "worker_pid": os.getpid(),
        "host": _config().host_name,
        "store": _store().kind,
    }


def _require_admin(config: Config) -> None:
    """With an admin token configured, demand ``Authorization: Bearer <token>`` (compared in constant time)."""
    if config.admin_token is None:
        return
    scheme, _, supplied = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(supplied.encode(), config.admin_token.encode()):
        raise Unauthorized("This endpoint needs 'Authorization: Bearer <token>' with the admin token.")
