"""ticketlock's booking service: a Flask app whose gunicorn worker processes all share one db.json."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from flask import Flask

from service.config import Config, load_config
from service.errors import register_error_handlers
from service.routes import Booking, bp
from service.store import Inventory, PurchaseSettings, Store
from service.validation import MAX_BODY_BYTES

__all__ = ["create_app", "prepare_for_start"]


def create_app(config: Mapping[str, object] | None = None) -> Flask:
    """Build the app: defaults, then TICKETLOCK_* environment variables, then ``config`` (tests pass theirs).

    The app only uses the store; ``prepare_for_start`` creates its files, once, before any worker starts.
    """
    settings = load_config(config)
    store = Store(settings.db_path)

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False  # OPTIONS would answer an empty text/html page, not JSON
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep fields in the documented order
    app.json.ensure_ascii = False  # type: ignore[attr-defined]  # show "路人1", not "\u8def\u4eba1"
    app.extensions["ticketlock"] = Booking(config=settings, store=store)
    app.register_blueprint(bp)
    register_error_handlers(app)
    _log_through_gunicorn()
    return app


def prepare_for_start(config: Mapping[str, object] | None = None) -> Config:
    """Run once in the gunicorn master before any worker starts (its ``on_starting`` hook).

    Deletes temporary files a killed writer left, creates a missing db.json from the defaults, and applies
    the configured mode and race window, so that the environment decides how a freshly started server sells.
    """
    settings = load_config(config)
    store = Store(settings.db_path)
    for leftover in store.remove_leftovers():
        logging.getLogger(__name__).warning("removed %s, left by a writer that was killed", leftover)
    store.create_missing(Inventory.full(settings.event, settings.tickets), PurchaseSettings.configured(settings))
    store.write_settings(PurchaseSettings.configured(settings))
    return settings


def _log_through_gunicorn() -> None:
    """Under gunicorn, send the service's log records to gunicorn's error log."""
    gunicorn_log = logging.getLogger("gunicorn.error")
    if gunicorn_log.handlers:
        service_log = logging.getLogger("service")
        service_log.handlers = gunicorn_log.handlers
        service_log.setLevel(gunicorn_log.level)
        service_log.propagate = False
