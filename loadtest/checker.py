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
from dataclasses import dataclass, field, replace
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
    told_ids = [str(outcome.order.get("order_id")) for outcome in ok if outcome.order]
    recorded_ids = [str(order.get("order_id")) for order in recorded]
    could_have_sold = told_sold + sum(outcome.quantity for outcome in info)
    sellers = _sellers([outcome.order for outcome in ok if outcome.order] + list(recorded))
    figures = Check(
        buyers=len(outcomes),
        tickets=tickets,
        ok=len(ok),
        fail=sum(1 for outcome in outcomes if outcome.kind == FAIL),
        info=len(info),
        tickets_told_sold=told_sold,
        remaining=remaining,
        orders_recorded=len(recorded),
        oversold=max(0, told_sold - tickets),
        lost_updates=max(0, told_sold - (tickets - remaining)),
        lost_orders=sorted(set(told_ids) - set(recorded_ids)),
        unexpected_orders=_unexplained(recorded, set(told_ids), {outcome.buyer for outcome in info}),
        duplicate_ids=_repeated(recorded_ids) + _repeated(told_ids),
        count_out_of_bounds=_count_out_of_bounds(tickets, remaining, could_have_sold),
        worker_pids=sorted({pid for _, pid in sellers}),
        sellers=sellers,
        retries=sum(max(0, int(order.get("attempts", 1)) - 1) for order in recorded),
        gave_up=sum(1 for outcome in outcomes if outcome.error == "too_many_conflicts"),
    )
    recorded_sold = sum(int(order.get("quantity", 1)) for order in recorded)
    return replace(figures, anomalies=_anomalies(figures, recorded_sold))


def _anomalies(figures: Check, recorded_sold: int) -> list[str]:
    """One sentence per anomaly in ``figures``, given the tickets the recorded orders add up to."""
    tickets, remaining, told_sold = figures.tickets, figures.remaining, figures.tickets_told_sold
    anomalies = []
    if figures.oversold:
        anomalies.append(f"oversold by {figures.oversold}: {told_sold} tickets promised, only {tickets} existed")
    if figures.lost_updates:
        anomalies.append(
            f"{figures.lost_updates} lost updates: sales the remaining count ({remaining}) does not reflect"
        )
    if figures.lost_orders:
        anomalies.append(
            f"{len(figures.lost_orders)} lost orders: buyers were told success but the store has no record"
        )
    if figures.unexpected_orders:
        anomalies.append(f"{len(figures.unexpected_orders)} unexpected orders: recorded, but no buyer can hold them")
    if figures.duplicate_ids:
        anomalies.append(f"{len(figures.duplicate_ids)} duplicated order ids")
    # Orders that buyers with unknown outcomes may hold must still fit in the tickets and in the count.
    if recorded_sold > max(tickets, told_sold):
        anomalies.append(f"the store recorded {recorded_sold} tickets sold, only {tickets} existed")
    unreflected = recorded_sold - (tickets - remaining)
    if unreflected > figures.lost_updates:
        anomalies.append(f"{unreflected} recorded tickets the remaining count does not reflect")
    if figures.count_out_of_bounds:
        anomalies.append(figures.count_out_of_bounds)
    return anomalies


def _count_out_of_bounds(tickets: int, remaining: int, could_have_sold: int) -> str | None:
    """Why ``remaining`` is impossible, or None: the ok sales plus some of the info ones (each of which may have
    happened) must explain the count."""
    lowest_remaining = tickets - could_have_sold
    if 0 <= remaining <= tickets and remaining >= lowest_remaining:
        return None
    return (
        f"remaining {remaining} is outside what the buyers allow "
        f"({max(lowest_remaining, 0)}..{tickets}): tickets vanished that no buyer can hold"
    )


def _repeated(order_ids: Sequence[str]) -> list[str]:
    """The ids that appear more than once, sorted."""
    return sorted(order_id for order_id, seen in Counter(order_ids).items() if seen > 1)


def _sellers(orders: Sequence[dict[str, Any]]) -> list[tuple[str, int]]:
    """Every (host, worker pid) that sold one of ``orders``, sorted."""
    return sorted({(str(order.get("host", "")), order["worker_pid"]) for order in orders if _has_pid(order)})


def _has_pid(order: dict[str, Any]) -> bool:
    """Whether the order names the worker that sold it."""
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
