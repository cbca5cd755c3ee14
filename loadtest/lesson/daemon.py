"""Section 7, daemon: a ``daemon=True`` child ends with its parent, a non-daemon child outlives it.

A parent process starts two children and its own code ends at once. ``multiprocessing`` then ends the daemon
child (SIGTERM, exitcode -15) and waits for the non-daemon one, which finishes its work: the parent exits only
after it.
"""

from __future__ import annotations

import os
import time
from multiprocessing.queues import Queue
from typing import Any

from loadtest.lesson.processes import FORK, Ledger, ended, finish, status, wait_until
from loadtest.lesson.step import Step

DAEMON_WORK_S = 30.0  # never finished: it ends with its parent
WORK_S = 1.0
TIMEOUT_S = 10.0


def work(seconds: float) -> None:
    """In a child: work, then end."""
    time.sleep(seconds)


def parent(pids: Queue[Any]) -> None:
    """In the parent process: start a daemon and a non-daemon child, report them, and end its own code at once."""
    daemon = FORK.Process(target=work, args=(DAEMON_WORK_S,), name="daemon", daemon=True)
    worker = FORK.Process(target=work, args=(WORK_S,), name="non-daemon")
    daemon.start()
    worker.start()
    pids.put((os.getpid(), daemon.pid, worker.pid, time.time()))
    # Returning ends the parent's code; multiprocessing now terminates `daemon` and joins `worker`.


def show(ledger: Ledger) -> Step:
    step = Step("daemon", "a daemon child ends with its parent, a non-daemon child outlives it")
    pids: Queue[Any] = FORK.Queue()
    boss = FORK.Process(target=parent, args=(pids,), name="parent")
    try:
        ledger.start(boss)
        boss_pid, daemon, worker, code_ended_at = pids.get(timeout=TIMEOUT_S)
        ledger.add(daemon, worker)
        daemon_gone = wait_until(lambda: ended(daemon), TIMEOUT_S)
        worker_seen = status(worker)
        step.say(f"parent {boss_pid} started daemon child {daemon} and non-daemon child {worker}; its code ended")
        step.say(
            f"daemon {daemon}: gone "
            + (f"{daemon_gone:.2f} s later" if daemon_gone is not None else "NOT within the time")
            + f" (its work was {DAEMON_WORK_S:g} s); non-daemon {worker}: /proc says "
            + (worker_seen.described if worker_seen else "gone")
        )
        worker_done = wait_until(lambda: ended(worker), TIMEOUT_S)
        boss.join(TIMEOUT_S)
        parent_exit_s = time.time() - code_ended_at
    finally:
        finish([boss])
    step.say(
        f"the non-daemon child finished its {WORK_S:g} s of work; the parent waited for it and exited "
        f"{parent_exit_s:.2f} s after its code ended (exitcode {boss.exitcode})"
    )
    step.summary = (
        f"daemon child ended {daemon_gone or 0:.2f} s after its parent's code; the non-daemon child worked on "
        f"({worker_seen.state if worker_seen else '?'}), and the parent exited after it, {parent_exit_s:.2f} s later"
    )
    step.figures = {"parent": boss_pid, "daemon": daemon, "non_daemon": worker, "daemon_ended_after_s": daemon_gone}
    step.figures |= {"non_daemon_state": worker_seen.state if worker_seen else None, "parent_exit_s": parent_exit_s}
    step.check(daemon_gone is not None and daemon_gone < WORK_S, "the daemon child did not end with its parent")
    step.check(worker_seen is not None and worker_seen.state != "Z", "the non-daemon child did not outlive the code")
    step.check(worker_done is not None and boss.exitcode == 0, "the non-daemon child or its parent did not finish")
    step.check(parent_exit_s >= WORK_S * 0.9, f"the parent exited {parent_exit_s:.2f} s after its code, not after")
    return step
