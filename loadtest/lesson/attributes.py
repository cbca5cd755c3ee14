"""Section 4, attributes: a process's ``name``, ``pid``, ``is_alive()`` before and after ``terminate()``, and its
``exitcode`` (minus the signal that ended it: -15 for SIGTERM)."""

from __future__ import annotations

import signal
import time
from multiprocessing.synchronize import Event

from loadtest.lesson.processes import FORK, Ledger, finish, status
from loadtest.lesson.step import Step

TIMEOUT_S = 10.0


def wait_for_a_ticket(running: Event) -> None:
    """In the child: say it runs, then wait far longer than the lesson lets it."""
    running.set()
    time.sleep(60)


def show(ledger: Ledger) -> Step:
    step = Step("attributes", "a process's name, pid, is_alive(), terminate() and exitcode")
    running = FORK.Event()
    buyer = FORK.Process(target=wait_for_a_ticket, args=(running,), name="buyer-1")
    step.say(f"before start(): name {buyer.name!r}, pid {buyer.pid}, is_alive() {buyer.is_alive()}")
    try:
        ledger.start(buyer)
        # Terminated before CPython finished forking it, the child would lose the SIGTERM: CPython clears signals
        # that arrive before its after-fork step, and the lesson's own SIGTERM handler is in force until then.
        running.wait(TIMEOUT_S)
        alive = buyer.is_alive()
        seen = status(buyer.pid)
        step.say(f"after start(): pid {buyer.pid}, is_alive() {alive}; /proc: {seen.described if seen else 'none'}")
        buyer.terminate()  # SIGTERM
        buyer.join(5)
    finally:
        finish([buyer])
    after = status(buyer.pid)
    step.say(
        f"after terminate() and join(): is_alive() {buyer.is_alive()}, exitcode {buyer.exitcode} (SIGTERM is "
        f"{int(signal.SIGTERM)}); /proc/{buyer.pid}: {after.described if after else 'gone'}"
    )
    step.summary = (
        f"{buyer.name}: pid {buyer.pid}, is_alive() {alive}; after terminate(): is_alive() {buyer.is_alive()}, "
        f"exitcode {buyer.exitcode}"
    )
    step.figures = {"name": buyer.name, "pid": buyer.pid, "alive_before": alive, "exitcode": buyer.exitcode}
    step.check(alive and seen is not None, "the started process was not alive")
    step.check(not buyer.is_alive() and after is None, "the terminated process is still there")
    step.check(buyer.exitcode == -signal.SIGTERM, f"exitcode {buyer.exitcode}, not -{int(signal.SIGTERM)}")
    return step
