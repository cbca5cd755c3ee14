"""Section 1, start: the two ways to start a process, a target function and a ``Process`` subclass."""

from __future__ import annotations

import os
from multiprocessing.context import ForkProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

from loadtest.lesson.processes import FORK, Ledger, finish, status
from loadtest.lesson.step import Step

TIMEOUT_S = 10.0


def say_who_i_am(style: str, answers: Queue[Any], may_end: Event) -> None:
    """In the child: tell the parent this process's pid and its parent's, then wait to be let go (so that the
    parent can look it up in /proc while it runs)."""
    answers.put((style, os.getpid(), os.getppid()))
    may_end.wait(TIMEOUT_S)


class Buyer(ForkProcess):
    """The second style: a subclass of ``Process`` whose ``run`` is what the child does."""

    def __init__(self, answers: Queue[Any], may_end: Event) -> None:
        super().__init__(name="buyer-subclass")
        self.answers = answers
        self.may_end = may_end

    def run(self) -> None:
        say_who_i_am("a Process subclass", self.answers, self.may_end)


def show(ledger: Ledger) -> Step:
    step = Step("start", "two ways to start a process: a target function, a Process subclass")
    answers: Queue[Any] = FORK.Queue()
    may_end = FORK.Event()
    children = [
        FORK.Process(target=say_who_i_am, args=("a target function", answers, may_end), name="buyer-target"),
        Buyer(answers, may_end),
    ]
    try:
        ledger.start(*children)
        told = {pid: (style, ppid) for style, pid, ppid in (answers.get(timeout=TIMEOUT_S) for _ in children)}
        parts = []
        for child in children:
            style, ppid = told.get(child.pid, ("?", 0))
            seen = status(child.pid)
            step.say(
                f"{style}: {child.name} says it is pid {child.pid}, its parent {ppid} (this lesson is {os.getpid()})"
            )
            step.say(f"  /proc/{child.pid}/stat: {seen.described if seen else 'no such process'}")
            step.check(ppid == os.getpid(), f"{child.name} says its parent is {ppid}, not {os.getpid()}")
            step.check(seen is not None and seen.ppid == os.getpid(), f"/proc disagrees about {child.name}'s parent")
            parts.append(f"{style}: pid {child.pid}, parent {ppid}")
        step.summary = "; ".join(parts)
        step.figures = {"parent": os.getpid(), "children": {child.name: child.pid for child in children}}
    finally:
        may_end.set()
        finish(children)
    return step
