"""Section 3, memory: a child that zeroes a global changes its own copy; then the service's ``memory`` mode, the
same fact over HTTP (each gunicorn worker sells from its own copy of the count)."""

from __future__ import annotations

import os
from multiprocessing.queues import Queue

from loadtest.lesson.processes import FORK, Ledger, finish, service
from loadtest.lesson.step import Step
from loadtest.runner import LoadOptions, run

n = 100  # the lesson's global: the tickets this process believes are left
BUYERS = 40
TICKETS = 10


def sell_everything(answers: Queue[tuple[int, int]]) -> None:
    """In the child: set the global to 0 and say what this process now sees."""
    global n
    n = 0
    answers.put((os.getpid(), n))


def show(ledger: Ledger) -> Step:
    step = Step("memory", "each process has its own memory")
    answers: Queue[tuple[int, int]] = FORK.Queue()
    child = FORK.Process(target=sell_everything, args=(answers,), name="seller")
    try:
        ledger.start(child)
        child_pid, child_n = answers.get(timeout=10)
    finally:
        finish([child])
    step.say(f"the global n is {n} in this lesson (pid {os.getpid()}); child {child_pid} sets n = 0 and sees {child_n}")
    step.say(f"after the child ended, this lesson still sees n = {n}: the child changed its own copy")
    step.check(child_n == 0 and n == 100, f"the child saw {child_n} and the parent {n}")

    with service(ledger, workers=4) as running:
        result = run(LoadOptions(urls=(running.url,), modes=("memory",), buyers=BUYERS, tickets=TICKETS))
    check = result.phases[0].check
    sellers = len(check.sellers)
    step.say(
        f"over HTTP, memory mode: {BUYERS} buyers, {TICKETS} tickets; {sellers} gunicorn workers each sold from its "
        f"own copy of the count: {check.ok} told they got a ticket, and db.json still says {check.remaining} left"
    )
    step.summary = (
        f"child set n = 0, the parent still sees {n}; memory mode: {sellers} workers sold {check.ok} of {TICKETS} "
        f"tickets, db.json still says {check.remaining} left"
    )
    step.figures = {"parent_n": n, "child_n": child_n, "http": {"sold": check.ok, "remaining": check.remaining}}
    step.figures["http"]["workers"] = sellers
    step.check(sellers > 1 and check.ok > TICKETS, f"the workers sold {check.ok} tickets, not more than {TICKETS}")
    step.check(check.remaining == TICKETS, f"db.json's count moved to {check.remaining}")
    return step
