"""The checker on hand-made histories: it names every kind of anomaly, and passes a clean run."""

from __future__ import annotations

from typing import Any

import pytest

from loadtest.checker import FAIL, INFO, OK, Outcome, check


def order(order_id: str, buyer: str, remaining: int, pid: int = 1, quantity: int = 1) -> dict[str, Any]:
    return {"order_id": order_id, "buyer": buyer, "quantity": quantity, "remaining": remaining, "worker_pid": pid}


def ok(buyer: str, recorded: dict[str, Any]) -> Outcome:
    return Outcome(buyer, recorded["quantity"], OK, 0.0, 0.1, 201, order=recorded)


def fail(buyer: str) -> Outcome:
    return Outcome(buyer, 1, FAIL, 0.0, 0.1, 409, "sold_out")


def info(buyer: str) -> Outcome:
    return Outcome(buyer, 1, INFO, 0.0, 5.0, error="timeout")


def clean_run() -> tuple[list[Outcome], list[dict[str, Any]]]:
    """3 tickets, 5 buyers, two workers: 3 sold one after another, 2 told sold out."""
    orders = [order("a", "b1", 2, pid=1), order("b", "b2", 1, pid=2), order("c", "b3", 0, pid=1)]
    outcomes = [ok("b1", orders[0]), ok("b2", orders[1]), ok("b3", orders[2]), fail("b4"), fail("b5")]
    return outcomes, orders


def test_a_clean_run_is_correct() -> None:
    outcomes, orders = clean_run()

    result = check(3, outcomes, remaining=0, recorded=orders)

    assert result.correct, result.anomalies
    assert (result.ok, result.fail, result.info, result.orders_recorded) == (3, 2, 0, 3)
    assert (result.oversold, result.lost_updates) == (0, 0)
    assert result.worker_pids == [1, 2]


def test_oversold_and_lost_updates_are_flagged() -> None:
    # Two workers both read 1 and both wrote 0: two buyers told yes for one ticket.
    orders = [order("a", "b1", 0, pid=1), order("b", "b2", 0, pid=2)]

    result = check(1, [ok("b1", orders[0]), ok("b2", orders[1])], remaining=0, recorded=orders)

    assert (result.oversold, result.lost_updates) == (1, 1)
    assert any(anomaly.startswith("oversold by 1") for anomaly in result.anomalies)
    assert any("lost updates" in anomaly for anomaly in result.anomalies)


def test_a_lost_update_without_oversell_is_flagged() -> None:
    # 5 tickets, 2 sales that both read 5 and wrote 4: nobody oversold, but the count lost a sale.
    orders = [order("a", "b1", 4), order("b", "b2", 4, pid=2)]

    result = check(5, [ok("b1", orders[0]), ok("b2", orders[1])], remaining=4, recorded=orders)

    assert (result.oversold, result.lost_updates) == (0, 1)
    assert not result.correct


def test_a_lost_order_is_flagged() -> None:
    outcomes, orders = clean_run()

    result = check(3, outcomes, remaining=0, recorded=orders[:2])

    assert result.lost_orders == ["c"]
    assert any("lost orders" in anomaly for anomaly in result.anomalies)


def test_an_unexpected_order_is_flagged() -> None:
    outcomes, orders = clean_run()
    # b4 was told "sold out", yet the store holds an order for it.
    recorded = [*orders, order("d", "b4", 0)]

    result = check(4, outcomes, remaining=0, recorded=recorded)

    assert result.unexpected_orders == ["d"]
    assert not result.correct


def test_a_duplicated_order_id_is_flagged() -> None:
    outcomes, orders = clean_run()

    result = check(3, outcomes, remaining=0, recorded=[*orders, orders[2]])

    assert result.duplicate_ids == ["c"]
    assert any("duplicated" in anomaly for anomaly in result.anomalies)


def test_an_unknown_outcome_may_explain_one_recorded_order() -> None:
    outcomes, orders = clean_run()
    # 4 tickets; b4 timed out, but its purchase went through: that is allowed.
    recorded = [*orders, order("d", "b4", 0)]
    outcomes = [*outcomes[:3], info("b4"), fail("b5")]

    result = check(4, outcomes, remaining=0, recorded=recorded)

    assert result.correct, result.anomalies
    assert result.info == 1


@pytest.mark.parametrize("remaining", [2, 1])
def test_with_unknown_outcomes_the_count_must_stay_within_bounds(remaining: int) -> None:
    # 5 tickets, 2 told yes, 1 unknown: remaining may be 3 (the unknown failed) or 2 (it succeeded), never less.
    orders = [order("a", "b1", 4), order("b", "b2", 3)]
    outcomes = [ok("b1", orders[0]), ok("b2", orders[1]), info("b3")]

    result = check(5, outcomes, remaining=remaining, recorded=orders)

    if remaining == 2:
        assert result.count_out_of_bounds is None
        assert not result.lost_orders and not result.unexpected_orders
    else:
        assert result.count_out_of_bounds is not None
        assert any("outside what the buyers allow" in anomaly for anomaly in result.anomalies)


def test_a_count_above_the_tickets_is_out_of_bounds() -> None:
    result = check(3, [fail("b1")], remaining=4, recorded=[])
    assert result.count_out_of_bounds is not None


def test_orders_beyond_the_tickets_are_flagged_even_when_their_buyers_heard_nothing() -> None:
    # One ticket; b1's answer was lost (500) but its order was recorded, and b2 was sold the same ticket.
    orders = [order("a", "b1", 0), order("b", "b2", 0, pid=2)]

    result = check(1, [info("b1"), ok("b2", orders[1])], remaining=0, recorded=orders)

    assert result.oversold == 0  # nobody was *told* more than existed ...
    assert not result.correct  # ... but the store holds two orders for one ticket
    assert any("recorded 2 tickets sold, only 1 existed" in anomaly for anomaly in result.anomalies)


def test_recorded_sales_the_count_does_not_reflect_are_flagged() -> None:
    # 5 tickets, count says 1 sold, but two orders are recorded (one of them by a buyer who heard nothing).
    orders = [order("a", "b1", 4), order("b", "b2", 4, pid=2)]

    result = check(5, [ok("b1", orders[0]), info("b2")], remaining=4, recorded=orders)

    assert any("recorded tickets the remaining count does not reflect" in anomaly for anomaly in result.anomalies)
