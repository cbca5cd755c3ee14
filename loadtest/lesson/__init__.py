"""``ticketlock-lesson``: the multiprocessing lesson behind ticketlock, section by section, with real processes.

Each section starts real processes (``multiprocessing`` children, or a real gunicorn), says what the operating
system reports of them (``/proc``: state, pid, ppid; and wall times), and checks that it showed what it teaches.
"""

from __future__ import annotations

from loadtest.lesson.runner import SECTIONS, Lesson, run
from loadtest.lesson.step import Step

__all__ = ["SECTIONS", "Lesson", "Step", "run"]
