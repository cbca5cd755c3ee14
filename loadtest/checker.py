"""The checker: compare what every buyer was told with what the store recorded, and name each anomaly.

Each buyer's history is one operation, invoked and then completed as one of:

- ``ok``:   201 with an order; the buyer holds those tickets.
- ``fail``: a definite refusal (409 sold out, or another 4xx); the buyer holds nothing.
- ``info``: a timeout, a connection error or a 5xx; the outcome is unknown, the buyer may or may not hold one.

As a Jepsen checker would, ``check`` accepts a store only if some outcome of the ``info`` operations explains it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

OK, FAIL, INFO = "ok", "fail", "info"


@dataclass(frozen=True)
class Outcome:
    """One buyer's history: what was asked, when, and what the buyer was told."""

    buyer: str
    quantity: int
    kind: str  # OK, FAIL or INFO
    invoked_at: float
    completed_at: float
    status: int | None = None
    error: str | None = None
    order: dict[str, Any] | None = None

    @property
    def latency_s(self) -> float:
        """Seconds from sending the request to the end of the answer (or the failure)."""
        return self.completed_at - self.invoked_at


@dataclass(frozen=True)
class Check:
    """Every figure the checker derives, and the anomalies it found (an empty list means correct)."""

    buyers: int
    tickets: int
    ok: int
    fail: int
    info: int
    tickets_told_sold: int
    remaining: int
    orders_recorded: int
    oversold: int
    lost_updates: int
    lost_orders: list[str]
    unexpected_orders: list[str]
    duplicate_ids: list[str]
    count_out_of_bounds: str | None
    worker_pids: list[int]
    sellers: list[tuple[str, int]]  # every (host, worker pid) that sold: the processes that took part
    retries: int  # attempts beyond the first, over the recorded orders (optimistic, repeatable-read)
    gave_up: int  # buyers told too_many_conflicts: every attempt met a concurrent write
    anomalies: list[str] = field(default_factory=list)

    @property
    def correct(self) -> bool:
        """True when no anomaly was found."""
        return not self.anomalies


def check(tickets: int, outcomes: Sequence[Outcome], remaining: int, recorded: Sequence[dict[str, Any]]) -> Check:
    """Check one phase: ``tickets`` at the start, every buyer's outcome, then the store's count and orders."""
    ok = [outcome for outcome in outcomes if outcome.kind == OK]
    info = [outcome for outcome in outcomes if outcome.kind == INFO]
    told_sold = sum(outcome.quantity for outcome in ok)
    sold_by_count = tickets - remaining
    recorded_sold = sum(int(order.get("quantity", 1)) for order in recorded)

    oversold = max(0, told_sold - tickets)
    lost_updates = max(0, told_sold - sold_by_count)

    # The count must be explained by the ok sales plus some of the info ones (each of which may have happened).
    lowest_remaining = tickets - told_sold - sum(outcome.quantity for outcome in info)
    out_of_bounds = None
    if not 0 <= remaining <= tickets or remaining < lowest_remaining:
        out_of_bounds = (
            f"remaining {remaining} is outside what the buyers allow "
            f"({max(lowest_remaining, 0)}..{tickets}): tickets vanished that no buyer can hold"
        )

    recorded_ids = [str(order.get("order_id")) for order in recorded]
    duplicate_ids = sorted(order_id for order_id, seen in Counter(recorded_ids).items() if seen > 1)
    told_ids = [str(outcome.order.get("order_id")) for outcome in ok if outcome.order]
    duplicate_ids += sorted(order_id for order_id, seen in Counter(told_ids).items() if seen > 1)

    lost_orders = sorted(set(told_ids) - set(recorded_ids))
    unexpected_orders = _unexplained(recorded, set(told_ids), {outcome.buyer for outcome in info})

    sold = [outcome.order for outcome in ok if outcome.order] + list(recorded)
    sellers = sorted({(str(order.get("host", "")), order["worker_pid"]) for order in sold if _has_pid(order)})
    worker_pids = sorted({pid for _, pid in sellers})
    retries = sum(max(0, int(order.get("attempts", 1)) - 1) for order in recorded)

    anomalies = []
    if oversold:
        anomalies.append(f"oversold by {oversold}: {told_sold} tickets promised, only {tickets} existed")
    if lost_updates:
        anomalies.append(f"{lost_updates} lost updates: sales the remaining count ({remaining}) does not reflect")
    if lost_orders:
        anomalies.append(f"{len(lost_orders)} lost orders: buyers were told success but the store has no record")
    if unexpected_orders:
        anomalies.append(f"{len(unexpected_orders)} unexpected orders: recorded, but no buyer can hold them")
    if duplicate_ids:
        anomalies.append(f"{len(duplicate_ids)} duplicated order ids")
    # Orders that buyers with unknown outcomes may hold must still fit in the tickets and in the count.
    if recorded_sold > max(tickets, told_sold):
        anomalies.append(f"the store recorded {recorded_sold} tickets sold, only {tickets} existed")
    if recorded_sold - sold_by_count > lost_updates:
        anomalies.append(f"{recorded_sold - sold_by_count} recorded tickets the remaining count does not reflect")
    if out_of_bounds:
        anomalies.append(out_of_bounds)

    return Check(
        buyers=len(outcomes),
        tickets=tickets,
        ok=len(ok),
        fail=sum(1 for outcome in outcomes if outcome.kind == FAIL),
        info=len(info),
        tickets_told_sold=told_sold,
        remaining=remaining,
        orders_recorded=len(recorded),
        oversold=oversold,
        lost_updates=lost_updates,
        lost_orders=lost_orders,
        unexpected_orders=unexpected_orders,
        duplicate_ids=duplicate_ids,
        count_out_of_bounds=out_of_bounds,
        worker_pids=worker_pids,
        sellers=sellers,
        retries=retries,
        gave_up=sum(1 for outcome in outcomes if outcome.error == "too_many_conflicts"),
        anomalies=anomalies,
    )


def _has_pid(order: dict[str, Any]) -> bool:
    return isinstance(order.get("worker_pid"), int)


def _unexplained(recorded: Sequence[dict[str, Any]], told_ids: set[str], info_buyers: set[str]) -> list[str]:
    """Recorded orders that no buyer was told about, beyond one per buyer whose outcome is unknown."""
    unexplained = []
    explained_info_buyers: set[str] = set()
    for order in recorded:
        order_id, buyer = str(order.get("order_id")), order.get("buyer")
        if order_id in told_ids:
            continue
        if buyer in info_buyers and buyer not in explained_info_buyers:
            explained_info_buyers.add(str(buyer))
            continue
        unexplained.append(order_id)
    return sorted(unexplained)
