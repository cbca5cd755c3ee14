"""Section 6, orphan: a process whose parent died is adopted, and gunicorn's workers notice and leave.

Against a real gunicorn: the master is killed (SIGKILL), so it cannot stop its workers. The kernel gives each
orphan to the nearest *subreaper* above it, or PID 1 if there is none. This lesson makes itself one
(``prctl(PR_SET_CHILD_SUBREAPER)``) so that it can watch the orphans and collect their exit status: on this machine
PID 1 may never reap them. A gunicorn sync worker compares its parent with the master it was forked by each time
its ``select()`` wakes (a connection, or half the worker timeout: ``gunicorn/workers/sync.py``,
``is_parent_alive``), and on a change shuts itself down.
"""

from __future__ import annotations

import os
import signal
import socket
from urllib.parse import urlsplit

from loadtest.lesson.processes import Ledger, become_subreaper, ended, reap, service, status, wait_until
from loadtest.lesson.step import Step

WORKER_TIMEOUT_S = 8  # gunicorn's worker timeout here: its workers wake at least every 4 s (the least allowed
# with a 1 s lock timeout, service/config.py's longest purchase: 1 s, the longest race window, 5 s, the flush, 1 s)
SETTINGS = {"TICKETLOCK_LOCK_TIMEOUT": "1", "TICKETLOCK_WORKER_TIMEOUT": str(WORKER_TIMEOUT_S)}
ADOPTED_WITHIN_S = 5.0
EXIT_WITHIN_S = WORKER_TIMEOUT_S / 2 + 5.0  # their longest sleep in select(), and a margin for a busy machine


def show(ledger: Ledger) -> Step:
    step = Step("orphan", "the master dies: its workers are adopted, notice it, and leave")
    me = os.getpid()
    become_subreaper()
    try:
        with service(ledger, workers=4, environment=SETTINGS) as running:
            master = running.master_pid or 0
            workers = running.worker_pids()
            host, port = urlsplit(running.url).hostname or "", urlsplit(running.url).port or 0
            step.say(f"gunicorn master {master}, workers {', '.join(map(str, workers))}, each with ppid {master}")
            os.kill(master, signal.SIGKILL)
            adopted = wait_until(lambda: all(_parent(pid) not in (master, None) for pid in workers), ADOPTED_WITHIN_S)
            parents = sorted({parent for pid in workers if (parent := _parent(pid)) is not None})
            step.say(
                f"SIGKILL the master: its workers' ppid is now {', '.join(map(str, parents))} "
                f"(this lesson, pid {me}, the nearest subreaper; without one, PID 1)"
            )
            exits = wait_until(lambda: all(ended(pid) for pid in workers), EXIT_WITHIN_S)
            codes = {pid: reap(pid) for pid in workers}
            step.say(
                "each worker noticed its parent changed and exited by itself "
                + (f"within {exits:.1f} s" if exits is not None else f"... NOT all within {EXIT_WITHIN_S:g} s")
                + f" (exit codes {', '.join(str(code) for code in codes.values())}); gunicorn's log has "
                f"{running.log_tail(60).count('Parent changed, shutting down')} lines 'Parent changed, shutting down'"
            )
            listening = _accepts(host, port)
            step.say(f"{running.url}: {'STILL accepts connections' if listening else 'refuses connections'}")
    finally:
        become_subreaper(False)
    step.summary = (
        f"master {master} killed: its workers' ppid became {', '.join(map(str, parents))} (the lesson, a subreaper); "
        + (f"each exited by itself within {exits:.1f} s" if exits is not None else "they did not all exit")
        + f"; the port {'still listens' if listening else 'refuses connections'}"
    )
    step.figures = {"master": master, "workers": workers, "new_parents": parents, "adopted_after_s": adopted}
    step.figures |= {"exited_after_s": exits, "exit_codes": codes, "still_listening": listening}
    step.check(adopted is not None and parents == [me], f"the workers' new parents are {parents}, not this lesson")
    step.check(exits is not None, f"the orphaned workers did not all exit within {EXIT_WITHIN_S:g} s")
    step.check(not listening, f"something still listens on {running.url}")
    return step


def _parent(pid: int) -> int | None:
    seen = status(pid)
    return seen.ppid if seen else None


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False
