"""Running the lesson: the sections in order, each bounded, and at the end a check by PID that every process any
of them started is gone (those still there are ended, and the run fails)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from loadtest.lesson import attributes, daemon, join, memory, mutex, orphan, start, zombie
from loadtest.lesson.processes import Ledger
from loadtest.lesson.step import Step

Section = Callable[[Ledger], Step]
SECTIONS: dict[str, Section] = {
    "start": start.show,
    "join": join.show,
    "memory": memory.show,
    "attributes": attributes.show,
    "zombie": zombie.show,
    "orphan": orphan.show,
    "daemon": daemon.show,
    "mutex": mutex.show,
}


@dataclass
class Lesson:
    """The sections run, in order, and what was left of the processes they started."""

    steps: list[Step]
    processes_started: list[int]
    processes_left: list[int] = field(default_factory=list)  # still there at the end, then ended by force
    processes_surviving: list[int] = field(default_factory=list)  # still there even after SIGKILL

    @property
    def shown(self) -> bool:
        """Whether every section showed what it teaches and no process was left behind."""
        return all(step.shown for step in self.steps) and not self.processes_left and not self.processes_surviving


def run(sections: Sequence[str] = (), progress: Callable[[Step], None] | None = None) -> Lesson:
    """Run ``sections`` (every one by default) in the lesson's order; ``progress`` hears of each as it ends.

    A section that raises is reported as not shown, with the error as its reason, and the lesson goes on.
    """
    ledger = Ledger()
    steps: list[Step] = []
    left: list[int] = []
    try:
        for name, section in SECTIONS.items():
            if sections and name not in sections:
                continue
            started = time.monotonic()
            try:
                step = section(ledger)
            except Exception as error:
                step = Step(name, name, reason=f"{type(error).__name__}: {error}")
            step.seconds = time.monotonic() - started
            left = ledger.left()
            step.check(not left, f"processes {left} were still there when the section ended")
            steps.append(step)
            if progress:
                progress(step)
    finally:
        left = ledger.left()
        surviving = ledger.end_all()  # also on Ctrl-C or SIGTERM, before the exception goes on
    return Lesson(steps, sorted(ledger.started), left, surviving)
