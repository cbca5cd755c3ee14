"""gunicorn settings for the booking service, read from the TICKETLOCK_* variables that service/config.py declares."""

import os

import gunicorn.util
from gunicorn.arbiter import Arbiter
from gunicorn.workers.base import Worker

from service import prepare_for_start
from service.config import ConfigError, load_server_settings
from service.errors import StoreError, write_protocol_error
from service.serve import refuse_addresses_in_use

# --- The app, and gunicorn's own settings (a bad one stops the start with one clear line) -------------------
wsgi_app = "service:create_app()"
try:
    ticketlock = load_server_settings()
except ConfigError as error:
    raise SystemExit(f"ticketlock: {error}") from None

# --- Where to listen (127.0.0.1 unless you say otherwise; the container sets 0.0.0.0:8000) -------------------
bind = [ticketlock.bind]

# --- Worker processes: each has its own memory; db.json and its lock are all they share ------------------
workers = ticketlock.workers
worker_class = ticketlock.worker_class
threads = ticketlock.threads  # per worker, with the gthread worker class
timeout = ticketlock.worker_timeout_s  # gunicorn kills a worker silent this long: a waiting buyer gets its 503 first
graceful_timeout = 10
control_socket_disable = True  # gunicorn's control socket is one path per user: several servers would collide

# --- Requests gunicorn refuses itself (bad request line, URL over 4 KB) get a JSON error, not an HTML page ---
# gunicorn's workers call util.write_error for these (gunicorn/workers/base.py, Worker.handle_error).
gunicorn.util.write_error = write_protocol_error

# --- Logging -----------------------------------------------------------------------------------------------
loglevel = ticketlock.log_level
accesslog = ticketlock.access_log


# --- Hooks ---------------------------------------------------------------------------------------------------
def on_starting(server: Arbiter) -> None:
    try:
        refuse_addresses_in_use(server.cfg.address)
        config = prepare_for_start()
    except (ConfigError, StoreError) as error:  # one clear line, not a traceback: a bad setting, a port in use, ...
        raise SystemExit(f"ticketlock: {error}") from None
    where = config.masked_database_url or config.db_path
    server.log.info("master %s: host %s, store ready at %s", os.getpid(), config.host_name, where)


def post_fork(server: Arbiter, worker: Worker) -> None:
    server.log.info("worker %s started", worker.pid)


def worker_exit(server: Arbiter, worker: Worker) -> None:
    server.log.info("worker %s exited", worker.pid)
