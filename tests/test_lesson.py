"""``ticketlock-lesson`` end to end: every section against real processes and a real gunicorn, what /proc showed,
and every process it started gone when it ends, also when it is interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from loadtest.lesson import SECTIONS, run
from loadtest.lesson.processes import status
from loadtest.server import descendants
from tests.conftest import ROOT


def start_lesson(*arguments: str) -> subprocess.Popen[str]:
    """``python -m loadtest.lesson`` with these arguments, running in the background."""
    command = [sys.executable, "-m", "loadtest.lesson", *arguments]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def lesson() -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """The whole lesson, once, as JSON."""
    process = start_lesson("--json")
    try:
        stdout, stderr = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.terminate()  # the lesson ends what it started on SIGTERM
            process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), json.loads(stdout)


def step(lesson: Any, section: str) -> dict[str, Any]:
    _, result = lesson
    found: dict[str, Any] = next(each for each in result["steps"] if each["section"] == section)
    return found


def test_every_section_runs_in_order_and_shows_what_it_teaches(lesson: Any) -> None:
    completed, result = lesson

    assert completed.returncode == 0, completed.stderr
    assert [each["section"] for each in result["steps"]] == list(SECTIONS)
    for each in result["steps"]:
        assert each["shown"] and each["reason"] == "", each
        assert each["summary"] and each["story"]


def test_every_process_the_lesson_started_is_gone(lesson: Any) -> None:
    _, result = lesson

    # Forked children, gunicorn masters and workers, a replacement worker, orphans: dozens of processes.
    assert len(result["processes_started"]) > 40
    assert result["processes_left"] == result["processes_surviving"] == []
    assert all(status(pid) is None for pid in result["processes_started"])


def test_start_each_child_is_the_lessons_and_proc_agrees(lesson: Any) -> None:
    figures = step(lesson, "start")["figures"]

    children = figures["children"]
    assert set(children) == {"buyer-target", "buyer-subclass"} and len(set(children.values())) == 2
    proc_lines = [line for line in step(lesson, "start")["story"] if "/proc" in line]
    assert proc_lines and all(f"ppid {figures['parent']}" in line for line in proc_lines), proc_lines


def test_join_after_each_start_runs_the_buyers_one_at_a_time(lesson: Any) -> None:
    figures = step(lesson, "join")["figures"]

    assert figures["serial_s"] >= figures["buyers"] * figures["work_s"]  # ten sleeps, one after another
    assert any("at most 1 alive at once" in line for line in step(lesson, "join")["story"])


def test_memory_the_child_changes_its_own_copy_and_so_does_each_worker(lesson: Any) -> None:
    figures = step(lesson, "memory")["figures"]

    assert (figures["child_n"], figures["parent_n"]) == (0, 100)
    assert figures["http"]["remaining"] == 10 and figures["http"]["sold"] > 10 and figures["http"]["workers"] > 1


def test_attributes_terminate_ends_the_process_with_exitcode_minus_15(lesson: Any) -> None:
    figures = step(lesson, "attributes")["figures"]

    assert (figures["name"], figures["alive_before"], figures["exitcode"]) == ("buyer-1", True, -15)


def test_zombie_the_killed_worker_waits_as_the_stopped_masters_zombie(lesson: Any) -> None:
    figures = step(lesson, "zombie")["figures"]

    assert (figures["zombie"], figures["zombie_ppid"]) == ("Z", figures["master"])
    assert figures["answered_by"] and figures["killed"] not in figures["answered_by"]
    assert figures["reaped_after_s"] is not None and len(figures["replacements"]) == 1
    assert figures["replacements"][0] not in figures["workers"]


def test_orphan_the_workers_are_adopted_and_leave_by_themselves(lesson: Any) -> None:
    figures = step(lesson, "orphan")["figures"]

    assert len(figures["workers"]) == 4 and figures["master"] not in figures["new_parents"]
    assert figures["exited_after_s"] is not None and set(figures["exit_codes"].values()) == {0}
    assert figures["still_listening"] is False


def test_daemon_the_daemon_child_ends_with_its_parent_and_the_other_outlives_it(lesson: Any) -> None:
    figures = step(lesson, "daemon")["figures"]

    assert figures["daemon_ended_after_s"] is not None and figures["non_daemon_state"] in ("S", "R")


def test_mutex_oversells_without_the_lock_and_sells_each_ticket_once_with_it(lesson: Any) -> None:
    figures = step(lesson, "mutex")["figures"]

    assert figures["unlocked_sold"] > figures["tickets"] == figures["locked_sold"]
    assert figures["http"]["unlocked"]["oversold"] > 0 and figures["http"]["locked"]["oversold"] == 0


def test_run_is_a_library_call_that_returns_plain_data() -> None:
    lesson = run(["attributes", "start"])

    assert [each.section for each in lesson.steps] == ["start", "attributes"]  # the lesson's order
    assert lesson.shown and lesson.processes_left == []


def test_the_command_is_installed_and_refuses_an_unknown_section() -> None:
    assert Path(sys.executable).with_name("ticketlock-lesson").exists()
    completed = subprocess.run(
        [sys.executable, "-m", "loadtest.lesson", "nope"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 2 and "invalid choice" in completed.stderr


@pytest.mark.parametrize(
    ("section", "interrupt", "moment"),
    [("zombie", signal.SIGTERM, "T"), ("orphan", signal.SIGINT, "S")],
    ids=["SIGTERM while the master is stopped", "Ctrl-C while gunicorn runs"],
)
def test_an_interrupted_lesson_ends_every_process_it_started(section: str, interrupt: int, moment: str) -> None:
    process = start_lesson(section)
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 30
        # Until gunicorn's master and its four workers run, and one of the lesson's processes is in state ``moment``.
        while len(seen) < 5 or not any((now := status(pid)) and now.state == moment for pid in seen):
            assert time.monotonic() < deadline, f"the lesson's gunicorn never ran with a process in state {moment}"
            seen |= set(descendants(process.pid))
            time.sleep(0.01)
        os.kill(process.pid, interrupt)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=60)

    assert process.returncode != 0
    assert [pid for pid in seen if status(pid) is not None] == []
