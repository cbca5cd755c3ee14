"""The HTTP API: each route checks its input, calls the store or a purchase strategy, and returns JSON."""

from __future__ import annotations

import hmac
import os
from dataclasses import asdict, dataclass, replace
from importlib import resources
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from service import validation
from service.config import Config
from service.errors import OrderNotFound, StoreDamaged, Unauthorized
from service.locks import holding
from service.purchase import reset_store, strategy_for
from service.store import Inventory, PurchaseSettings, Store

bp = Blueprint("booking", __name__)


@dataclass(frozen=True)
class Booking:
    """What the routes share, kept in ``app.extensions["ticketlock"]``: the configuration and the store."""

    config: Config
    store: Store


def _booking() -> Booking:
    booking: Booking = current_app.extensions["ticketlock"]
    return booking


@bp.get("/health")
def health() -> Response:
    """GET /health -> 200 {"status": "ok"}."""
    return jsonify(status="ok")


@bp.get("/tickets")
def tickets() -> Response:
    """GET /tickets -> 200 {"event", "total", "remaining", "sold", "mode", "race_window_ms", "worker_pid"}."""
    store = _booking().store
    return jsonify(_tickets_view(store.read_inventory(), store.read_settings()))


@bp.post("/orders")
def create_order() -> tuple[Response, int, dict[str, str]]:
    """POST /orders {"buyer", "quantity"?} -> 201 the order; 200 a replay of the same Idempotency-Key.

    Errors: 400 bad body, 409 sold_out, 422 Idempotency-Key reused with another body, 500 store trouble,
    503 lock_timeout.
    """
    booking = _booking()
    purchase_request = validation.order_request(
        validation.json_object(request, required=True), request.headers.get("Idempotency-Key")
    )
    settings = booking.store.read_settings()
    strategy = strategy_for(settings.mode, booking.store, booking.config.lock_timeout_s)
    purchase = strategy.purchase(purchase_request, settings.race_window_ms)
    headers = {"Location": f"/orders/{purchase.order['order_id']}"}
    if purchase.replayed:
        return jsonify(purchase.order), 200, {**headers, "Idempotent-Replayed": "true"}
    return jsonify(purchase.order), 201, headers


@bp.get("/orders")
def list_orders() -> Response:
    """GET /orders?limit=100&offset=0 -> 200 {"count", "limit", "offset", "orders"}. 400 bad paging."""
    limit, offset = validation.page(request.args)
    count = 0
    page: list[dict[str, Any]] = []
    for count, order in enumerate(_booking().store.orders(), start=1):
        if offset < count <= offset + limit:
            page.append(order)
    return jsonify(count=count, limit=limit, offset=offset, orders=page)


@bp.get("/orders/<order_id>")
def get_order(order_id: str) -> Response:
    """GET /orders/<order_id> -> 200 the order; 404 order_not_found."""
    order = _booking().store.find_order(order_id)
    if order is None:
        raise OrderNotFound(f"No order {order_id[:64]!r}. GET /orders lists them.")
    return jsonify(order)


@bp.get("/mode")
def get_mode() -> Response:
    """GET /mode -> 200 {"mode", "race_window_ms"}."""
    return jsonify(asdict(_booking().store.read_settings()))


@bp.put("/mode")
def put_mode() -> Response:
    """PUT /mode {"mode"?, "race_window_ms"?} -> 200 {"mode", "race_window_ms"}. 400 unknown mode; 401."""
    booking = _booking()
    _require_admin(booking.config)
    change = validation.settings_change(validation.json_object(request, required=True))
    store = booking.store
    # Settings live in their own file and are never written by a purchase, so no racing buyer can undo this.
    with holding(store.settings_lock_path, booking.config.lock_timeout_s, "the mode was not changed"):
        settings = replace(_current_or_configured_settings(store, booking.config), **change)
        store.write_settings(settings)
    current_app.logger.info("purchase settings now %s", settings)
    return jsonify(asdict(settings))


@bp.post("/reset")
def reset() -> Response:
    """POST /reset {"tickets"?, "event"?} -> 200 the fresh state: count restored, all orders cleared. 400; 401."""
    booking = _booking()
    _require_admin(booking.config)
    tickets, event = validation.reset_request(validation.json_object(request, required=False))
    store = booking.store
    settings = store.read_settings()  # before anything changes: a damaged settings file stops the reset here
    current = _current_or_configured(store, booking.config)
    fresh = Inventory.full(event or current.event, current.total if tickets is None else tickets)
    reset_store(store, fresh, booking.config.lock_timeout_s)
    current_app.logger.info("store reset: %s", fresh)
    return jsonify(_tickets_view(fresh, settings))


@bp.get("/openapi.json")
def openapi() -> Response:
    """GET /openapi.json -> 200 the OpenAPI 3 description of this API."""
    document = resources.files("service").joinpath("openapi.json").read_bytes()
    return Response(document, mimetype="application/json")


def _tickets_view(inventory: Inventory, settings: PurchaseSettings) -> dict[str, Any]:
    return {
        "event": inventory.event,
        "total": inventory.total,
        "remaining": inventory.remaining,
        "sold": inventory.sold,
        "mode": settings.mode,
        "race_window_ms": settings.race_window_ms,
        "worker_pid": os.getpid(),
    }


def _current_or_configured(store: Store, config: Config) -> Inventory:
    """The inventory to restore: the current one, or the configured defaults if db.json is unusable."""
    try:
        return store.read_inventory()
    except StoreDamaged:
        return Inventory.full(config.event, config.tickets)


def _current_or_configured_settings(store: Store, config: Config) -> PurchaseSettings:
    """The settings a change applies to: the current ones, or the configured ones if the file is unusable."""
    try:
        return store.read_settings()
    except StoreDamaged:
        return PurchaseSettings.configured(config)


def _require_admin(config: Config) -> None:
    """With an admin token configured, demand ``Authorization: Bearer <token>`` (compared in constant time)."""
    if config.admin_token is None:
        return
    scheme, _, supplied = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(supplied.encode(), config.admin_token.encode()):
        raise Unauthorized("This endpoint needs 'Authorization: Bearer <token>' with the admin token.")
