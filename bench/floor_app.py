"""The framework floor: the same gunicorn and Flask answering ``POST /orders`` with a fixed 201 and no store.

It reads and parses the request's JSON body as the booking service does, so that the difference between its
figures and the service's is what the service adds: its routes, its store and its lock.
"""

from __future__ import annotations

from flask import Flask, Response, jsonify, request

FIXED_ORDER = {"order_id": "0" * 32, "buyer": "bench", "quantity": 1, "remaining": 1}


def create_app() -> Flask:
    """An app with ``POST /orders`` (201, always the same order) and ``GET /health``."""
    app = Flask(__name__)

    @app.post("/orders")
    def create_order() -> tuple[Response, int]:
        request.get_json()
        return jsonify(FIXED_ORDER), 201

    @app.get("/health")
    def health() -> Response:
        return jsonify(status="ok")

    return app
