"""Section 2, join: ten buyers started, then joined, against ``join`` right after each ``start``.

``join`` waits for one process to end. Called after every ``start``, it waits for each buyer before the next is
even started: the whole task becomes serial, and the wall time adds up every buyer's.
"""

from __future__ import annotations

import time
from multiprocessing.context import ForkProcess

from loadtest.lesson.processes import FORK, Ledger, ended, finish
from loadtest.lesson.step import Step

BUYERS = 10
WORK_S = 0.2  # each buyer's work (the classic lesson sleeps a random 1 to 3 s)


def buy() -> None:
    """One buyer's work: waiting, as a buyer waits for the network."""
    time.sleep(WORK_S)


def show(ledger: Ledger) -> Step:
    step = Step("join", "start every buyer, then join them all, against join right after each start")
    buyers: list[ForkProcess] = []
    try:
        started = time.monotonic()
        together = [FORK.Process(target=buy, name=f"buyer-{n + 1}") for n in range(BUYERS)]
        buyers += together
        ledger.start(*together)
        at_once = sum(1 for buyer in together if not ended(buyer.pid))
        for buyer in together:
            buyer.join()
        together_s = time.monotonic() - started

        started = time.monotonic()
        most_at_once = 0
        for n in range(BUYERS):
            buyer = FORK.Process(target=buy, name=f"buyer-{n + 1}")
            buyers.append(buyer)
            ledger.start(buyer)
            most_at_once = max(most_at_once, sum(1 for each in buyers if each.is_alive()))
            buyer.join()
        serial_s = time.monotonic() - started
    finally:
        finish(buyers)
    step.say(f"{BUYERS} buyers, each working {WORK_S:g} s:")
    step.say(f"  start all, then join all: {together_s:.2f} s wall time; {at_once} of them in /proc at once")
    step.say(f"  join right after each start: {serial_s:.2f} s wall time; at most {most_at_once} alive at once")
    step.say(f"  serial takes {serial_s / together_s:.1f} times as long: every buyer waits for the one before")
    step.summary = f"start all then join: {together_s:.2f} s; join after each start: {serial_s:.2f} s (serial)"
    step.figures = {"buyers": BUYERS, "work_s": WORK_S, "together_s": together_s, "serial_s": serial_s}
    step.check(at_once > 1, f"only {at_once} of {BUYERS} buyers were in /proc together")
    step.check(most_at_once == 1, f"{most_at_once} buyers ran at once although each was joined before the next")
    step.check(serial_s >= BUYERS * WORK_S, f"serial took {serial_s:.2f} s, less than {BUYERS} x {WORK_S:g} s")
    step.check(together_s < serial_s / 2, f"together took {together_s:.2f} s, not well under serial's {serial_s:.2f} s")
    return step
