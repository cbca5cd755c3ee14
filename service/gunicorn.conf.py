"""gunicorn settings for the booking service; each one reads a TICKETLOCK_* environment variable first."""

import os

import gunicorn.util
from gunicorn.arbiter import Arbiter
from gunicorn.workers.base import Worker

from service import prepare_for_start
from service.config import MAX_RACE_WINDOW_MS, ConfigError, load_config
from service.errors import StoreError, write_protocol_error


def _whole_number(variable: str, default: int) -> int:
    text = os.environ.get(variable, str(default))
    if not text.isdigit() or int(text) < 1:
        raise SystemExit(f"ticketlock: {variable}={text!r} must be a whole number of at least 1")
    return int(text)


# --- The app (its settings are checked here, so a bad one stops the start with one clear line) -------------
wsgi_app = "service:create_app()"
try:
    ticketlock_config = load_config()
except ConfigError as error:
    raise SystemExit(f"ticketlock: {error}") from None

# --- Where to listen (127.0.0.1 unless you say otherwise; the container sets 0.0.0.0:8000) -------------------
bind = [os.environ.get("TICKETLOCK_BIND", "127.0.0.1:8000")]

# --- Worker processes: each has its own memory; db.json and its lock are all they share ------------------
workers = _whole_number("TICKETLOCK_WORKERS", 4)
worker_class = os.environ.get("TICKETLOCK_WORKER_CLASS", "sync")
if worker_class not in ("sync", "gthread"):
    # An event-loop worker (gevent, eventlet) would block all its requests in the lock's kernel wait.
    raise SystemExit(f"ticketlock: TICKETLOCK_WORKER_CLASS={worker_class!r}: use sync or gthread (service/locks.py)")
threads = _whole_number("TICKETLOCK_THREADS", 1)  # per worker, with the gthread worker class
timeout = _whole_number("TICKETLOCK_WORKER_TIMEOUT", 30)
if ticketlock_config.lock_timeout_s + MAX_RACE_WINDOW_MS / 1000 >= timeout:
    # gunicorn kills a worker silent for `timeout` s: a buyer must get its 503 before that.
    raise SystemExit(
        f"ticketlock: TICKETLOCK_WORKER_TIMEOUT={timeout} must exceed the lock timeout "
        f"({ticketlock_config.lock_timeout_s:g} s) plus the longest race window ({MAX_RACE_WINDOW_MS / 1000:g} s)"
    )
graceful_timeout = 10
control_socket_disable = True  # gunicorn's control socket is one path per user: several servers would collide

# --- Requests gunicorn refuses itself (bad request line, URL over 4 KB) get a JSON error, not an HTML page ---
# gunicorn's workers call util.write_error for these (gunicorn/workers/base.py, Worker.handle_error).
gunicorn.util.write_error = write_protocol_error

# --- Logging -----------------------------------------------------------------------------------------------
loglevel = os.environ.get("TICKETLOCK_LOG_LEVEL", "info")
if loglevel not in ("debug", "info", "warning", "error", "critical"):
    raise SystemExit(f"ticketlock: TICKETLOCK_LOG_LEVEL={loglevel!r}: use debug, info, warning, error or critical")
accesslog = os.environ.get("TICKETLOCK_ACCESS_LOG") or None


# --- Hooks ---------------------------------------------------------------------------------------------------
def on_starting(server: Arbiter) -> None:
    try:
        config = prepare_for_start()
    except (ConfigError, StoreError) as error:  # one clear line, not a traceback: a bad setting, an absent database
        raise SystemExit(f"ticketlock: {error}") from None
    where = config.masked_database_url or config.db_path
    server.log.info("master %s: host %s, store ready at %s", os.getpid(), config.host_name, where)


def post_fork(server: Arbiter, worker: Worker) -> None:
    server.log.info("worker %s started", worker.pid)


def worker_exit(server: Arbiter, worker: Worker) -> None:
    server.log.info("worker %s exited", worker.pid)
