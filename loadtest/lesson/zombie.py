"""Section 5, zombie: a child that has ended but whose parent has not yet collected its exit status.

Against a real gunicorn: the master is stopped (SIGSTOP) and one worker is killed (SIGKILL). The kernel keeps the
dead worker's entry, state Z, for the master to read with ``wait()``; the master, stopped, cannot. Meanwhile the
other workers go on answering. Continued (SIGCONT), the master reaps the zombie and forks a replacement.
"""

from __future__ import annotations

import os
import signal

from loadtest.client import ServiceClient
from loadtest.lesson.processes import Ledger, described, service, status, wait_until
from loadtest.lesson.step import Step

TIMEOUT_S = 10.0
REQUESTS = 12  # sent while the master is stopped


def show(ledger: Ledger) -> Step:
    step = Step("zombie", "a dead worker that its stopped master has not reaped")
    with service(ledger, workers=4) as running:
        master = running.master_pid or 0
        workers = running.worker_pids()
        victim = workers[0]
        step.say(f"gunicorn master {master}, workers {', '.join(map(str, workers))}")
        os.kill(master, signal.SIGSTOP)
        stopped = wait_until(lambda: _state(master) == "T", TIMEOUT_S) is not None
        step.say(f"SIGSTOP the master: /proc/{master}: {described(master)}")
        os.kill(victim, signal.SIGKILL)
        zombie = wait_until(lambda: _state(victim) == "Z", TIMEOUT_S) is not None
        seen = status(victim)
        step.say(f"SIGKILL worker {victim}: /proc/{victim}: {described(victim)}, a zombie whose parent is the master")
        client = ServiceClient(running.url, timeout_s=TIMEOUT_S)
        answered_by = sorted({client.tickets()["worker_pid"] for _ in range(REQUESTS)})
        step.say(f"meanwhile {REQUESTS} GET /tickets were answered by workers {', '.join(map(str, answered_by))}")
        os.kill(master, signal.SIGCONT)
        reaped = wait_until(lambda: status(victim) is None, TIMEOUT_S)
        replaced = wait_until(lambda: len(running.worker_pids()) == len(workers), TIMEOUT_S) is not None
        now = running.worker_pids()
        ledger.add(*now)
        new = sorted(set(now) - set(workers))
        step.say(
            f"SIGCONT the master: it reaped {victim} "
            + (f"within {reaped:.2f} s" if reaped is not None else f"NOT within {TIMEOUT_S:g} s")
            + f" and forked {', '.join(map(str, new)) or 'nothing'} in its place; now {', '.join(map(str, now))}"
        )
    step.summary = (
        f"worker {victim} killed under a stopped master: state {seen.state if seen else '?'}, ppid "
        f"{seen.ppid if seen else '?'} (the master); SIGCONT: reaped, replaced by {', '.join(map(str, new)) or '?'}"
    )
    step.figures = {"master": master, "workers": workers, "killed": victim, "answered_by": answered_by}
    step.figures |= {"zombie": seen.state if seen else None, "zombie_ppid": seen.ppid if seen else None}
    step.figures |= {"reaped_after_s": reaped, "replacements": new}
    step.check(stopped, f"the master never showed state T after SIGSTOP ({described(master)})")
    step.check(
        zombie and seen is not None and seen.ppid == master, f"worker {victim} never showed as the master's zombie"
    )
    step.check(bool(answered_by) and victim not in answered_by, "the other workers did not answer meanwhile")
    step.check(reaped is not None, f"the master did not reap {victim} within {TIMEOUT_S:g} s of SIGCONT")
    step.check(replaced and len(new) == 1, f"the master forked {len(new)} replacements, not 1")
    return step


def _state(pid: int) -> str | None:
    seen = status(pid)
    return seen.state if seen else None
