"""ticketlock's booking service: a Flask app whose gunicorn worker processes all share one db.json."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from flask import Flask

from service.config import Config, load_config
from service.errors import register_error_handlers
from service.routes import bp
from service.stores import open_store
from service.validation import MAX_BODY_BYTES

__all__ = ["create_app", "prepare_for_start"]


def create_app(config: Mapping[str, object] | None = None) -> Flask:
    """Build the app: defaults, then TICKETLOCK_* environment variables, then ``config`` (tests pass theirs).

    The app only uses the store, which reaches its files or its database on first use, in the worker;
    ``prepare_for_start`` readies it once, before any worker starts, when gunicorn runs the project's settings.
    """
    settings = load_config(config)
    store = open_store(settings)

    app = Flask(__name__, static_folder="page", static_url_path="/page")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False  # OPTIONS would answer an empty text/html page, not JSON
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep fields in the documented order
    app.json.ensure_ascii = False  # type: ignore[attr-defined]  # show "路人1", not "\u8def\u4eba1"
    app.extensions["ticketlock.config"] = settings
    app.extensions["ticketlock.store"] = store
    # What GET /health checks, in order: the store, then each service the app depends on (a lock service adds its
    # own check here); each raises the error a purchase would meet.
    app.extensions["ticketlock.health_checks"] = [store.check, store.check_services]
    app.register_blueprint(bp)
    register_error_handlers(app)
    _log_through_gunicorn()
    return app


def prepare_for_start(config: Mapping[str, object] | None = None) -> Config:
    """Run once in the gunicorn master before any worker starts (its ``on_starting`` hook).

    The store creates what is missing (db.json and its settings, or the database's tables) and cleans up what
    a killed writer left; the file store also applies the configured mode and race window at every start, and
    applies to db.json's count the orders journaled after what it reflects (after a power cut).
    Raises StoreUnavailable, naming the database with its password masked, when it cannot be reached.
    """
    settings = load_config(config)
    _log_through_gunicorn()  # what prepare did (the orders a file store applied at start) goes to gunicorn's log
    open_store(settings).prepare()
    return settings


def _log_through_gunicorn() -> None:
    """Under gunicorn, send the service's log records to gunicorn's error log."""
    gunicorn_log = logging.getLogger("gunicorn.error")
    if gunicorn_log.handlers:
        service_log = logging.getLogger("service")
        service_log.handlers = gunicorn_log.handlers
        service_log.setLevel(gunicorn_log.level)
        service_log.propagate = False
