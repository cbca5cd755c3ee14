"""Every mode of the file store on a real 4-worker gunicorn: the lesson's wrong turns oversell, the fixes hold.

The modes table (service/modes.py) says what each mode protects; these tests hold the service to it with the
load tester's own checker, over several trials of 100 buyers and 10 tickets.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from loadtest.embedded import EmbeddedService
from loadtest.timeline import Bar, bars_from_orders, overlapping_pairs
from service.guards import SERVICES
from service.modes import MODES, TABLE
from service.stores import STORES
from service.stores.file import FileStore
from tests.conftest import ROOT, Api, buy_together, run_cli

TRIALS = 3
FILE_MODES = [mode.name for mode in FileStore.modes()]
# On one host of four workers, as the load tester's embedded service runs.
WRONG_TURNS = [mode.name for mode in FileStore.modes() if not mode.holds_for(hosts=1, processes=4)]
FIXES = [mode.name for mode in FileStore.modes() if mode.holds_for(hosts=1, processes=4)]


@pytest.fixture(scope="module")
def every_mode(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``--modes all`` on the embedded 4-worker file store, three trials each, as JSON."""
    folder = tmp_path_factory.mktemp("every-mode")
    completed = run_cli("--modes", "all", "--trials", str(TRIALS), "--require-oversell", "--json", cwd=folder)
    return completed, json.loads(completed.stdout)


def _phases(result: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    return [phase for phase in result["phases"] if phase["mode"] == mode]


def test_all_runs_every_mode_of_the_file_store_and_each_shows_its_expected_outcome(every_mode: Any) -> None:
    completed, result = every_mode

    assert completed.returncode == 0, completed.stderr
    assert list(result["summary"]) == FILE_MODES
    assert result["deployment"] == {"hosts": 1, "processes": 4}
    for mode, summary in result["summary"].items():
        assert summary["as_expected"], summary["verdict"]
        assert MODES[mode].lesson in summary["verdict"]


@pytest.mark.parametrize("mode", WRONG_TURNS)
def test_the_wrong_turns_oversell_in_every_trial(every_mode: Any, mode: str) -> None:
    _, result = every_mode

    for phase in _phases(result, mode):
        assert phase["check"]["oversold"] > 0, phase["check"]
    assert result["summary"][mode]["oversold_trials"] == TRIALS


@pytest.mark.parametrize("mode", FIXES)
def test_the_fixes_are_correct_in_every_trial(every_mode: Any, mode: str) -> None:
    _, result = every_mode

    for phase in _phases(result, mode):
        check = phase["check"]
        assert check["correct"] and check["ok"] == check["orders_recorded"] == 10 and check["remaining"] == 0


def _lanes(phase: dict[str, Any]) -> dict[tuple[str, int], list[Bar]]:
    lanes: dict[tuple[str, int], list[Bar]] = defaultdict(list)
    for bar in bars_from_orders(phase["orders"]):
        lanes[(bar.host, bar.worker_pid)].append(bar)
    return lanes


def test_a_thread_lock_keeps_apart_only_the_sales_of_one_worker(every_mode: Any) -> None:
    _, result = every_mode

    for phase in _phases(result, "thread-lock"):
        for bars in _lanes(phase).values():
            # Within a lane the lock holds: each sale starts after the previous one of that worker wrote.
            assert all(later.read_at >= earlier.wrote_at for earlier, later in itertools.pairwise(bars))
        assert overlapping_pairs(bars_from_orders(phase["orders"])), "no two workers overlapped"


def test_memory_mode_sells_every_ticket_once_per_worker_and_never_moves_the_count(every_mode: Any) -> None:
    _, result = every_mode

    for phase in _phases(result, "memory"):
        check = phase["check"]
        assert check["remaining"] == 10  # the store's count: no worker ever wrote it
        lanes = _lanes(phase)
        assert len(lanes) == 4 and check["ok"] <= 4 * 10
        for bars in lanes.values():
            # Each worker counted down its own copy from the 10 it loaded: 10, 9, 8, ...
            assert [bar.count_read for bar in bars] == list(range(10, 10 - len(bars), -1))


def test_the_table_shows_every_mode_with_its_conflicts_and_retries(tmp_path: Path) -> None:
    completed = run_cli("--modes", "all", "--no-timeline", cwd=tmp_path)

    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    header = next(line for line in lines if line.split()[:2] == ["unlocked", "locked"])
    assert header.split() == FILE_MODES
    for row in ("conflicts retried", "gave up (503)", "expected", "verdict"):
        assert any(line.startswith(row) for line in lines), row
    for mode in FILE_MODES:
        assert any(line.startswith(f"{mode.upper()}: 100 buyers, 10 tickets -> ") for line in lines), mode


def test_optimistic_purchases_retry_afresh_and_say_how_many_attempts_they_took(
    api: Api, service: EmbeddedService
) -> None:
    api.put("/mode", {"mode": "optimistic", "race_window_ms": 50})

    responses = buy_together(service.url, buyers=8)

    orders = [response.json() for response in responses if response.status_code == 201]
    assert len(orders) == 8  # 10 tickets: every buyer got one, some only after starting again
    assert max(order["attempts"] for order in orders) > 1
    assert api.get("/tickets").json()["remaining"] == 2


def test_optimistic_purchases_give_up_after_the_bounded_attempts_and_sell_nothing(tmp_path: Path) -> None:
    environment = {"TICKETLOCK_MAX_ATTEMPTS": "1", "TICKETLOCK_MODE": "optimistic", "TICKETLOCK_RACE_WINDOW_MS": "100"}
    with EmbeddedService(workers=4, directory=tmp_path, environment=environment) as single_try:
        responses = buy_together(single_try.url, buyers=8)

        statuses = Counter(response.status_code for response in responses)
        gave_up = [response for response in responses if response.status_code == 503]
        assert gave_up and statuses[201] >= 1 and set(statuses) == {201, 503}, statuses
        for response in gave_up:
            assert response.json()["error"] == "too_many_conflicts"
            assert response.headers["Retry-After"] == "1"
        tickets = Api(single_try.url).get("/tickets").json()
        assert tickets["sold"] == statuses[201]


def test_a_mode_the_file_store_cannot_run_is_refused_with_the_modes_it_can(api: Api) -> None:
    for mode in ("row-lock", "advisory-lock", "atomic", "repeatable-read"):
        response = api.put("/mode", {"mode": mode})

        assert (response.status_code, response.json()["error"]) == (400, "mode_not_available")
        assert all(f'"{name}"' in response.json()["message"] for name in FILE_MODES)
        assert "needs the postgres store (TICKETLOCK_DATABASE_URL);" in response.json()["message"]
    lease, fenced = (api.put("/mode", {"mode": mode}).json()["message"] for mode in ("lease", "fenced-lease"))
    assert "'lease' mode needs a lock service (TICKETLOCK_REDIS_URL);" in lease
    assert "needs the postgres store (TICKETLOCK_DATABASE_URL) and a lock service (TICKETLOCK_REDIS_URL);" in fenced
    assert api.get("/mode").json()["mode"] == "locked"


def test_get_modes_lists_the_table_and_what_this_store_runs(api: Api) -> None:
    listed = api.get("/modes").json()

    assert (listed["mode"], listed["store"]) == ("locked", "file")
    assert [mode["name"] for mode in listed["modes"]] == [mode.name for mode in TABLE]
    assert [mode["name"] for mode in listed["modes"] if mode["available"]] == FILE_MODES
    unsafe = {mode["name"] for mode in listed["modes"] if mode["protects"] in ("nothing", "one process")}
    assert unsafe == {"unlocked", "thread-lock", "memory"}


def test_the_readme_lists_every_mode_as_the_table_declares_it() -> None:
    section = (ROOT / "README.md").read_text().split("\n## The modes\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z-]+)` \|.*\| ([a-z ]+) \| ([a-z, ]+) \|$", section, re.MULTILINE)

    declared = [
        (mode.name, mode.protects.label, ", ".join(store.kind for store in STORES if store.supports(mode, SERVICES)))
        for mode in TABLE
    ]
    assert rows == declared
