"""The run-time toggle: every worker sees a mode change on its very next request, and no purchase undoes one."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from loadtest.embedded import EmbeddedService
from service.stores.file import FileStore
from tests.conftest import Api, lock_holders


def _ask_many_times(api: Api, path: str, times: int) -> list[dict[str, object]]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda _: api.get(path).json(), range(times)))


@pytest.mark.parametrize("sequence", [["unlocked", "locked"], ["locked", "unlocked", "locked"]])
def test_every_worker_sees_a_mode_change_on_its_next_request(
    api: Api, service: EmbeddedService, sequence: list[str]
) -> None:
    for mode in sequence:
        assert api.put("/mode", {"mode": mode}).json()["mode"] == mode

        answers = _ask_many_times(api, "/tickets", 80)

        assert {answer["mode"] for answer in answers} == {mode}
        assert len({answer["worker_pid"] for answer in answers}) >= 2, "only one worker answered"


def test_race_window_changes_at_run_time_for_every_worker(api: Api, service: EmbeddedService) -> None:
    assert api.put("/mode", {"race_window_ms": 0}).json() == {"mode": "locked", "race_window_ms": 0}

    answers = _ask_many_times(api, "/mode", 40)

    assert all(answer == {"mode": "locked", "race_window_ms": 0} for answer in answers)


def _wait_for_shared_holders(service: EmbeddedService, count: int) -> None:
    """Wait until ``count`` unlocked purchases hold the inventory lock (shared), i.e. sit in their race window."""
    deadline = time.monotonic() + 10
    while sum(kind == "READ" for _, kind in lock_holders(service.directory / "db.json.lock")) < count:
        assert time.monotonic() < deadline, "the unlocked purchases never reached their race window"
        time.sleep(0.005)


def test_a_mode_change_is_not_lost_to_purchases_racing_with_it(api: Api, service: EmbeddedService) -> None:
    # Three unlocked purchases sit in a long race window on three workers while the fourth switches the mode;
    # they then write their stale reads back. The mode must survive those writes.
    api.put("/mode", {"mode": "unlocked", "race_window_ms": 600})
    with ThreadPoolExecutor(max_workers=3) as pool:
        purchases = [pool.submit(api.post, "/orders", {"buyer": f"slow-{n}"}) for n in range(3)]
        _wait_for_shared_holders(service, 3)
        switched_at = time.time()
        assert api.put("/mode", {"mode": "locked"}).status_code == 200
        orders = [purchase.result().json() for purchase in purchases]

    assert all(order["timing"]["wrote_at"] > switched_at for order in orders)
    assert [order["mode"] for order in orders] == ["unlocked"] * 3
    assert api.get("/mode").json() == {"mode": "locked", "race_window_ms": 600}


# Every mode of the file store that keeps the workers of one host apart.
@pytest.mark.parametrize("safe_mode", [mode.name for mode in FileStore.modes() if mode.holds_for(hosts=1, processes=4)])
def test_a_safe_mode_is_not_oversold_by_unlocked_purchases_still_in_flight(
    api: Api, service: EmbeddedService, safe_mode: str
) -> None:
    # One ticket. An unlocked purchase has read 1 and sits in its race window when a safe mode takes over: the
    # next buyer must end up with its write (0 left), not the stale 1 it read. The switch waits for the straggler
    # to write, and a sale that read the mode before the switch starts again in the new one.
    api.reset(tickets=1)
    api.put("/mode", {"mode": "unlocked", "race_window_ms": 600})
    with ThreadPoolExecutor(max_workers=1) as pool:
        straggler = pool.submit(api.post, "/orders", {"buyer": "straggler"})
        _wait_for_shared_holders(service, 1)
        assert api.put("/mode", {"mode": safe_mode}).status_code == 200
        late = api.post("/orders", {"buyer": "late"})
        assert straggler.result().status_code == 201

    assert (late.status_code, late.json()["error"]) == (409, "sold_out")
    assert [order["buyer"] for order in api.all_orders()] == ["straggler"]
