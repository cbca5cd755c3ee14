"""Section 8, mutex: the lesson's own ticket grab, ten processes buying from one ``db.json``, without a lock and
with ``multiprocessing.Lock()``; then ``make demo``, the same lesson over HTTP.

Each buyer looks up the count (all at once: reading never hurts), then buys: reads the count, works, and writes
the count minus one if one was left. Unlocked, the buyers read the same count and each writes it minus one: more
buyers get a ticket than there are tickets. Under the lock, one buys at a time. The classic program sleeps 1 to
3 s; here each buyer works ``WORK_S``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import nullcontext
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Lock
from pathlib import Path

from loadtest.lesson.processes import FORK, Ledger, finish, service
from loadtest.lesson.step import Step
from loadtest.report import verdict
from loadtest.runner import LoadOptions, run

BUYERS = 10
TICKETS = 3
WORK_S = 0.1


def search(db: Path) -> int:
    """Look up how many tickets are left."""
    count: int = json.loads(db.read_text())["count"]
    return count


def get(db: Path) -> bool:
    """Buy one ticket: read the count, work, write the count minus one if one was left."""
    count = search(db)
    time.sleep(WORK_S)
    if count < 1:
        return False
    written = db.with_name(f"{db.name}.{os.getpid()}")
    written.write_text(json.dumps({"count": count - 1}))
    written.replace(db)  # whole, so that another buyer never reads half a file
    return True


def buyer(db: Path, lock: Lock | None, bought: Queue[tuple[int, bool]]) -> None:
    """In each buyer process: search, then buy, under ``lock`` if there is one."""
    search(db)
    with lock or nullcontext():
        bought.put((os.getpid(), get(db)))


def grab(ledger: Ledger, folder: Path, locked: bool) -> tuple[int, int]:
    """Ten buyers at once on a fresh db.json: how many were told they got a ticket, and the count left after."""
    db = folder / ("db-locked.json" if locked else "db-unlocked.json")
    db.write_text(json.dumps({"count": TICKETS}))
    lock = FORK.Lock() if locked else None
    bought: Queue[tuple[int, bool]] = FORK.Queue()
    buyers = [FORK.Process(target=buyer, args=(db, lock, bought), name=f"buyer-{n + 1}") for n in range(BUYERS)]
    try:
        ledger.start(*buyers)
        sold = sum(got for _, got in (bought.get(timeout=10 + BUYERS * WORK_S) for _ in buyers))
    finally:
        finish(buyers)
    return sold, search(db)


def show(ledger: Ledger) -> Step:
    step = Step("mutex", "ten processes buy from one db.json, without and with multiprocessing.Lock()")
    with tempfile.TemporaryDirectory(prefix="ticketlock-lesson-") as folder:
        unlocked, unlocked_left = grab(ledger, Path(folder), locked=False)
        locked, locked_left = grab(ledger, Path(folder), locked=True)
    step.say(f"{BUYERS} processes, {TICKETS} tickets in a temporary db.json, each buyer working {WORK_S:g} s:")
    step.say(f"  without a lock: {unlocked} were told they got a ticket, db.json says {unlocked_left} left")
    step.say(f"  with multiprocessing.Lock(): {locked} were told they got a ticket, db.json says {locked_left} left")
    with service(ledger, workers=4) as running:
        result = run(LoadOptions(urls=(running.url,)))
    step.say("make demo, the same lesson over HTTP (4 gunicorn workers, 100 buyers, 10 tickets):")
    for mode in ("unlocked", "locked"):
        step.say("  " + verdict(mode, result.phases_for(mode), result.deployment))
    over_http = {phase.mode: phase.check for phase in result.phases}
    step.summary = (
        f"{BUYERS} processes, {TICKETS} tickets: without a lock {unlocked} sold; with Lock() {locked} sold; over HTTP "
        f"unlocked sold {over_http['unlocked'].ok}, locked {over_http['locked'].ok} of 10"
    )
    step.figures = {"buyers": BUYERS, "tickets": TICKETS, "unlocked_sold": unlocked, "locked_sold": locked}
    step.figures["http"] = {mode: {"sold": check.ok, "oversold": check.oversold} for mode, check in over_http.items()}
    step.check(unlocked > TICKETS, f"without a lock {unlocked} were sold, not more than the {TICKETS} tickets")
    step.check(locked == TICKETS and locked_left == 0, f"with the lock {locked} were sold and {locked_left} left")
    step.check(over_http["unlocked"].oversold > 0, "over HTTP, unlocked did not oversell")
    step.check(over_http["locked"].correct, "over HTTP, locked was not correct")
    return step
