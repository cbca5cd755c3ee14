"""The load-test CLI end to end: the default demo, its JSON, its exit statuses, and the picture of the race."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

import pytest

from loadtest.checker import OK, Outcome, check
from loadtest.cli import exit_status
from loadtest.embedded import EmbeddedService
from loadtest.runner import Latency, LoadOptions, PhaseResult, RunResult
from loadtest.server import descendants
from loadtest.timeline import bars_from_orders, overlapping_pairs, render_text, shared_reads
from tests.conftest import Api, run_cli, start_cli


def pid_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], Path]:
    """The default command, run once with --json and an SVG timeline, from an empty folder."""
    folder = tmp_path_factory.mktemp("demo")
    completed = run_cli("--json", "--svg", str(folder / "race.svg"), cwd=folder)
    return completed, json.loads(completed.stdout), folder


def test_the_default_demo_oversells_unlocked_is_correct_locked_and_exits_0(demo: Any) -> None:
    completed, result, _ = demo
    assert completed.returncode == 0, completed.stderr
    unlocked, locked = result["phases"]
    assert (unlocked["mode"], locked["mode"]) == ("unlocked", "locked")
    assert unlocked["check"]["oversold"] > 0
    assert locked["check"]["correct"] and locked["check"]["anomalies"] == []
    assert result["embedded"] is True and result["exit_status"] == 0


def test_the_default_demo_leaves_no_process_behind(demo: Any) -> None:
    _, result, _ = demo
    pids = set(result["service_pids"])
    pids |= {pid for phase in result["phases"] for pid in phase["check"]["worker_pids"]}
    assert len(pids) >= 5  # the master and its four workers
    assert all(pid_is_gone(pid) for pid in pids)


def test_the_json_figures_add_up(demo: Any) -> None:
    _, result, _ = demo
    for phase in result["phases"]:
        figures = phase["check"]
        assert figures["ok"] + figures["fail"] + figures["info"] == figures["buyers"] == 100
        assert len(phase["outcomes"]) == 100
        assert {"p50", "p90", "p99", "max"} <= set(phase["latency_ms"])
        assert phase["throughput_rps"] > 0 and len(figures["worker_pids"]) >= 2
        assert 0 <= phase["send_spread_ms"] < phase["duration_s"] * 1000  # the first sends, within the phase
        for key in (
            "tickets",
            "remaining",
            "orders_recorded",
            "oversold",
            "lost_updates",
            "lost_orders",
            "unexpected_orders",
            "duplicate_ids",
        ):
            assert key in figures
    locked = result["phases"][1]["check"]
    assert locked["orders_recorded"] == locked["tickets"] - locked["remaining"] == locked["ok"] == 10


def test_the_timeline_shows_overlap_unlocked_and_none_locked(demo: Any) -> None:
    _, result, folder = demo
    unlocked, locked = (bars_from_orders(phase["orders"]) for phase in result["phases"])

    assert overlapping_pairs(unlocked) and shared_reads(unlocked)
    assert not overlapping_pairs(locked) and not shared_reads(locked)
    assert sorted(bar.count_read for bar in locked) == list(range(1, 11))
    assert result["phases"][0]["timeline"]["overlapping_pairs"] > 0
    assert result["phases"][1]["timeline"] == {"overlapping_pairs": 0, "shared_reads": {}}
    svg = ElementTree.parse(folder / "race.svg").getroot()
    assert svg.tag.endswith("svg") and len(svg.findall(".//{http://www.w3.org/2000/svg}rect")) > 10


def test_the_text_report_tells_the_story(tmp_path: Path) -> None:
    completed = run_cli("--buyers", "60", "--tickets", "5", "--race-window-ms", "30", cwd=tmp_path)

    assert completed.returncode == 0, completed.stderr
    assert "UNLOCKED: 60 buyers, 5 tickets ->" in completed.stdout and "oversold by" in completed.stdout
    assert "LOCKED: 60 buyers, 5 tickets -> 5 buyers were told they got a ticket, 55 were told sold out: correct" in (
        completed.stdout
    )
    assert "latency p99 (ms)" in completed.stdout and "sends spread over (ms)" in completed.stdout
    assert re.search(r"same read \|\s*\^\d", completed.stdout)
    assert "No two sales overlapped" in completed.stdout


def test_an_unreachable_service_exits_2_with_one_clear_line() -> None:
    completed = run_cli("--url", "http://127.0.0.1:9")

    assert completed.returncode == 2
    assert completed.stderr.strip().count("\n") == 0
    assert "did not answer" in completed.stderr and "Traceback" not in completed.stderr


@pytest.mark.parametrize(
    "arguments",
    [["--buyers", "0"], ["--modes", "fast"], ["--url", "ftp://x"], ["--nope"], ["--svg", "/no/such/folder/x.svg"]],
)
def test_usage_errors_exit_2(arguments: list[str]) -> None:
    completed = run_cli(*arguments)
    assert completed.returncode == 2 and "usage:" in completed.stderr


def test_require_oversell_fails_when_one_worker_hides_the_race(tmp_path: Path) -> None:
    completed = run_cli("--workers", "1", "--modes", "unlocked", "--require-oversell", "-q", cwd=tmp_path)

    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert "correct, nothing oversold" in completed.stdout
    assert "--require-oversell: unlocked trial 1 did not oversell" in completed.stderr


def test_against_a_running_service_with_url(api: Api, service: EmbeddedService) -> None:
    completed = run_cli("--url", service.url, "--buyers", "30", "--tickets", "5", "--require-oversell", "-q")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout.count("\n") == 2
    # Said before it starts: the service's orders are about to go.
    first_line = completed.stderr.splitlines()[0]
    assert service.url in first_line and "every order recorded there is cleared" in first_line


def _result_with_locked_check(**check_arguments: Any) -> RunResult:
    phase = PhaseResult(
        mode="locked",
        trial=1,
        race_window_ms=20,
        check=check(**check_arguments),
        duration_s=1.0,
        throughput_rps=1.0,
        send_spread_ms=0.0,
        latency_ms=Latency(1, 1, 1, 1),
        errors={},
        outcomes=[],
        orders=[],
    )
    return RunResult(["http://x"], embedded=False, store="file", options=LoadOptions(), phases=[phase])


def test_a_locked_anomaly_exits_1() -> None:
    recorded = {"order_id": "a", "buyer": "b1", "quantity": 1, "remaining": 0, "worker_pid": 1}
    outcomes = [Outcome("b1", 1, OK, 0, 1, 201, order=recorded), Outcome("b2", 1, OK, 0, 1, 201, order=recorded)]
    broken = _result_with_locked_check(tickets=1, outcomes=outcomes, remaining=0, recorded=[recorded])
    clean = _result_with_locked_check(tickets=1, outcomes=outcomes[:1], remaining=0, recorded=[recorded])

    assert exit_status(broken) == 1
    assert exit_status(clean) == 0


def _three_sales_of_ticket_10(host: str = "") -> list[dict[str, Any]]:
    """Three workers that each read 10 at once."""
    return [
        {
            "order_id": str(n),
            "buyer": f"b{n}",
            "quantity": 1,
            "remaining": 9,
            "worker_pid": 100 + n,
            "host": host,
            "timing": {"started_at": 0.0, "read_at": 0.001 * n, "wrote_at": 0.05 + 0.001 * n},
        }
        for n in range(3)
    ]


def test_the_text_timeline_marks_shared_reads() -> None:
    picture = render_text("UNLOCKED", bars_from_orders(_three_sales_of_ticket_10()), mode="unlocked")

    assert picture.count("[10") == 3 and "^10" in picture
    assert "[N===] read N and wrote N-1" in picture and "each of them wrote N-1" in picture


def test_the_memory_timeline_says_that_the_count_never_moved() -> None:
    picture = render_text("MEMORY", bars_from_orders(_three_sales_of_ticket_10()), mode="memory")

    assert "^10" in picture and "own copy" in picture and "the store's count never moved" in picture
    assert "wrote N-1" not in picture


def test_the_host_column_stays_when_several_hosts_ran_even_if_one_made_every_sale() -> None:
    bars = bars_from_orders(_three_sales_of_ticket_10(host="host-1"))

    assert "host-1 pid 100 |" in render_text("ROW-LOCK", bars, mode="row-lock", hosts=2)
    assert "host-1" not in render_text("ROW-LOCK", bars, mode="row-lock", hosts=1)


def test_sigterm_stops_the_run_and_its_embedded_service(tmp_path: Path) -> None:
    process = start_cli(
        "--modes", "locked", "--tickets", "200", "--buyers", "400", "--race-window-ms", "50", cwd=tmp_path
    )
    try:
        assert process.stderr is not None
        assert "releasing" in process.stderr.readline()  # the service is up and the buyers are on their way
        deadline = time.monotonic() + 10
        while len(service := descendants(process.pid)) < 5:  # gunicorn's master and its four workers
            assert time.monotonic() < deadline, service
            time.sleep(0.02)
    finally:
        process.terminate()
        process.communicate(timeout=60)

    assert process.returncode == 128 + 15
    assert all(pid_is_gone(pid) for pid in service)
