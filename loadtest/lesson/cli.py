"""The ``ticketlock-lesson`` command line: run the sections, tell each one's story, exit 0 when all showed it.

Exit status: 0 when every section showed what it teaches and no process it started was left; 1 otherwise (a
line on stderr names the section and the reason); 2 for usage errors.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict
from types import FrameType
from typing import Any, TextIO

from loadtest.lesson.runner import SECTIONS, Lesson, run
from loadtest.lesson.step import Step

EXIT_SHOWN, EXIT_NOT_SHOWN = 0, 1


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``ticketlock-lesson`` and ``python -m loadtest.lesson``."""
    signal.signal(signal.SIGTERM, functools.partial(_on_sigterm, os.getpid()))
    sys.exit(cli(argv, sys.stdout, sys.stderr))


def _on_sigterm(lesson: int, signum: int, frame: FrameType | None) -> None:
    """In the lesson, SIGTERM unwinds like Ctrl-C, so that every process it started is ended on the way out. A
    forked child inherits this handler: there SIGTERM does what it does to any process (``terminate()``'s exitcode
    -15), also before the child's own code has begun."""
    if os.getpid() == lesson:
        sys.exit(128 + signum)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def cli(argv: Sequence[str] | None, out: TextIO, err: TextIO) -> int:
    """Run the command line and return its exit status (``main`` without ``sys.exit``)."""
    arguments = build_parser().parse_args(argv)
    lesson = run(arguments.sections, progress=None if arguments.json else lambda step: print_step(step, out))
    for reason in failure_reasons(lesson):
        print(f"ticketlock-lesson: {reason}", file=err)
    status = EXIT_SHOWN if lesson.shown else EXIT_NOT_SHOWN
    if arguments.json:
        json.dump(to_json(lesson, status), out, indent=2)
        out.write("\n")
    else:
        print(closing_line(lesson), file=out)
    return status


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; ``--help`` documents every option."""
    parser = argparse.ArgumentParser(
        prog="ticketlock-lesson",
        description="The multiprocessing lesson behind ticketlock, section by section, with real processes: what "
        "the operating system reports of them (/proc: state, pid, ppid) and the wall times. Every process it starts "
        "is gone when it ends, also on Ctrl-C.",
        epilog="Exit status: 0 when every section showed what it teaches; 1 when one did not (stderr says which and "
        "why); 2 for usage errors.",
    )
    parser.add_argument(
        "sections",
        nargs="*",
        choices=[*SECTIONS, []],
        metavar="SECTION",
        help=f"sections to run, in the lesson's order whatever order they are given: {', '.join(SECTIONS)} "
        "(default: all)",
    )
    parser.add_argument("--json", action="store_true", help="print the whole result as one JSON document")
    return parser


def print_step(step: Step, out: TextIO) -> None:
    """One section: its title, its story, and whether it showed what it teaches."""
    number = list(SECTIONS).index(step.section) + 1 if step.section in SECTIONS else 0
    print(f"{number}. {step.section}: {step.title}", file=out)
    for line in step.story:
        print(f"   {line}", file=out)
    outcome = "shown" if step.shown else f"NOT SHOWN: {step.reason}"
    print(f"   -> {outcome} ({step.seconds:.1f} s)\n", file=out, flush=True)


def closing_line(lesson: Lesson) -> str:
    """How many sections showed what they teach, and whether every process is gone."""
    shown = sum(step.shown for step in lesson.steps)
    gone = "every one is gone" if not lesson.processes_left else f"{len(lesson.processes_left)} were left behind"
    return (
        f"{shown} of {len(lesson.steps)} sections showed what they teach; "
        f"{len(lesson.processes_started)} processes started, checked by PID: {gone}"
    )


def failure_reasons(lesson: Lesson) -> list[str]:
    """One sentence per section that did not show what it teaches, and for processes left behind."""
    reasons = [f"{step.section}: {step.reason}" for step in lesson.steps if not step.shown]
    if lesson.processes_left:
        reasons.append(f"processes {lesson.processes_left} were left behind; they were killed")
    if lesson.processes_surviving:
        reasons.append(f"processes {lesson.processes_surviving} survived SIGKILL")
    return reasons


def to_json(lesson: Lesson, exit_status: int) -> dict[str, Any]:
    """The whole lesson as plain JSON data."""
    steps = [{**asdict(step), "shown": step.shown} for step in lesson.steps]
    return {**asdict(lesson), "steps": steps, "shown": lesson.shown, "exit_status": exit_status}
