"""The service's own gunicorn settings, plus a CPU profile of each worker (bench.py's breakdown of a request).

Each worker runs cProfile with a CPU clock (time spent waiting for a lock or the disk is not counted) from its
start, and writes its statistics to $TICKETLOCK_BENCH_PROFILES/<pid>.prof when it exits.
"""

import cProfile
import os
import runpy
import time

from service.serve import GUNICORN_CONF

globals().update(
    {name: value for name, value in runpy.run_path(str(GUNICORN_CONF)).items() if not name.startswith("__")}
)
_service_worker_exit = worker_exit  # noqa: F821 - defined by the service's settings just above
_profile = cProfile.Profile(time.process_time)


def post_worker_init(worker):
    _profile.enable()


def worker_exit(server, worker):
    _profile.disable()
    _profile.dump_stats(os.path.join(os.environ["TICKETLOCK_BENCH_PROFILES"], f"{os.getpid()}.prof"))
    _service_worker_exit(server, worker)
