"""The store contract: what every store guarantees, written once and run against each store the service has.

Each test runs once per store of ``service.stores.STORES`` (the file store on a temporary db.json, the postgres
store on the session's throwaway PostgreSQL), in process, through the store's own interface and ``purchase``,
each with the session's throwaway Redis as its lock service, so that the lease modes run wherever they can
(without redis-server, outside CI, their tests skip and the others run). A
test that needs something only some stores can do skips on the others by what they declare (``Store.features``,
``Store.supports``), never by their name, as Django's shared backend tests do with ``skipUnlessDBFeature``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from loadtest.postgres import ThrowawayPostgres
from loadtest.redis_server import ThrowawayRedis
from service.config import load_config
from service.deadline import Deadline
from service.errors import Conflict, IdempotencyKeyReused, SoldOut, StaleFence
from service.guards import SERVICES, Ability, Holding
from service.modes import MODES, TABLE, Feature, Mode, Read, Write
from service.purchase import PurchaseRequest, purchase
from service.stores import STORES, Inventory, Order, RuntimeSettings, Store
from service.stores.base import Sale
from tests.conftest import release_together

WINDOW_MS = 150  # long enough that concurrent sales surely overlap in their race windows

# How a test makes each kind of store: a store added to the service without a way here fails every test below.
StoreMaker = Callable[[pytest.FixtureRequest, Path], Store]


def _file_store(request: pytest.FixtureRequest, folder: Path) -> Store:
    return _open(request, "file", {"db_path": folder / "db.json"})


def _postgres_store(request: pytest.FixtureRequest, folder: Path) -> Store:
    database: ThrowawayPostgres = request.getfixturevalue("postgres")
    return _open(request, "postgres", {"db_path": folder / "db.json", "database_url": database.url})


MAKERS: dict[str, StoreMaker] = {"file": _file_store, "postgres": _postgres_store}


def _open(request: pytest.FixtureRequest, kind: str, overrides: dict[str, object]) -> Store:
    settings = {**overrides, "tickets": 10, "race_window_ms": 0, "redis_url": _lock_service_url(request)}
    store = next(store for store in STORES if store.kind == kind)(load_config(settings))
    store.prepare()
    return store


def _lock_service_url(request: pytest.FixtureRequest) -> str | None:
    """The session's Redis; without redis-server (outside CI), None: then only the lease modes' tests skip."""
    try:
        lock_service: ThrowawayRedis = request.getfixturevalue("redis_server")
    except pytest.skip.Exception:
        return None
    return lock_service.url


@pytest.fixture(scope="module", params=[store.kind for store in STORES])
def any_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Store:
    """One store of each kind for the module (a database's connections are kept for it)."""
    maker = MAKERS.get(request.param)
    assert maker is not None, f"tests/test_store_contract.py has no way to make a {request.param} store"
    return maker(request, tmp_path_factory.mktemp(request.param))


@pytest.fixture
def store(any_store: Store) -> Iterator[Store]:
    """The store, reset to 10 tickets in the configured mode with no race window."""
    any_store.change_settings({"mode": "locked", "race_window_ms": 0})
    any_store.reset(tickets=10, event="contract night")
    yield any_store


def needs(store: Store, *features: Feature) -> None:
    """Skip unless the store declares every one of ``features`` (or its configuration gives it)."""
    missing = [feature for feature in features if feature not in store.features | store.services]
    if not_configured := [str(feature) for feature in missing if feature in SERVICES]:
        pytest.skip(f"the {store.kind} store was given no {', '.join(not_configured)} (redis-server is missing)")
    if missing:
        pytest.skip(f"the {store.kind} store does not declare {', '.join(str(feature) for feature in missing)}")


def runs(store: Store, mode: Mode) -> None:
    """Skip unless the store can run ``mode``."""
    needs(store, *mode.needs())


def buy(store: Store, mode: str, buyer: str = "ana", quantity: int = 1, key: str | None = None) -> Order:
    """One purchase in ``mode`` through the service's own critical section."""
    store.change_settings({"mode": mode})
    return purchase(store, PurchaseRequest(buyer, quantity, key), store.config).order


# --- The inventory, the orders and the settings ------------------------------------------------------------------


def test_a_reset_store_has_every_ticket_and_no_order(store: Store) -> None:
    inventory = store.read_inventory()

    assert (inventory.event, inventory.total, inventory.remaining, inventory.sold) == ("contract night", 10, 10, 0)
    assert store.orders_page(limit=10, offset=0) == (0, [])


@pytest.mark.parametrize("mode", [mode.name for mode in TABLE])
def test_a_sale_in_every_mode_records_its_order_and_the_count_says_so(store: Store, mode: str) -> None:
    runs(store, MODES[mode])

    order = buy(store, mode, quantity=2)

    assert store.find_order(order["order_id"]) == order
    assert store.orders_page(limit=10, offset=0) == (1, [order])
    assert (order["mode"], order["store"], order["quantity"], order["remaining"]) == (mode, store.kind, 2, 8)
    # The memory mode sells from the worker's own copy: the store's count never moves (its lesson).
    expected = 10 if MODES[mode].write is Write.MEMORY else 8
    assert store.read_inventory().remaining == expected


def test_a_sale_beyond_the_count_is_sold_out_and_records_nothing(store: Store) -> None:
    store.reset(tickets=1, event=None)

    with pytest.raises(SoldOut):
        buy(store, "locked", quantity=2)

    assert store.read_inventory().remaining == 1
    assert store.orders_page(limit=10, offset=0) == (0, [])


def test_a_reset_clears_the_orders_restores_the_count_and_moves_the_version(store: Store) -> None:
    buy(store, "locked")
    before = store.read_inventory()

    fresh = store.reset(tickets=None, event=None)

    assert fresh == store.read_inventory()
    assert (fresh.total, fresh.remaining, fresh.event) == (10, 10, "contract night")
    assert fresh.version > before.version
    assert store.orders_page(limit=10, offset=0) == (0, [])


def test_a_settings_change_is_what_every_later_read_sees(store: Store) -> None:
    changed = store.change_settings({"mode": "unlocked", "race_window_ms": 7})

    assert (changed.mode, changed.race_window_ms) == ("unlocked", 7)
    assert store.read_settings() == changed
    assert store.change_settings({"race_window_ms": 0}).mode == "unlocked"  # a partial change keeps the rest


def test_pages_of_orders_count_them_all_and_keep_their_order(store: Store) -> None:
    orders = [buy(store, "locked", buyer=f"buyer-{n}") for n in range(5)]

    assert store.orders_page(limit=2, offset=0) == (5, orders[:2])
    assert store.orders_page(limit=10, offset=3) == (5, orders[3:])


def test_the_feed_gives_every_order_once_in_order_and_says_when_the_store_was_reset(store: Store) -> None:
    first = buy(store, "locked", buyer="first")
    opening = store.feed("", limit=10)
    second = buy(store, "locked", buyer="second")
    following = store.feed(opening.cursor, limit=10)
    nothing_new = store.feed(following.cursor, limit=10)
    store.reset(tickets=None, event=None)
    after_reset = store.feed(nothing_new.cursor, limit=10)

    assert (opening.reset, opening.orders) == (False, [first])
    assert (following.reset, following.orders) == (False, [second])
    assert (nothing_new.reset, nothing_new.orders) == (False, [])
    assert (after_reset.reset, after_reset.orders) == (True, [])


def test_an_idempotency_key_replays_its_order_and_refuses_another_body(store: Store) -> None:
    first = buy(store, "locked", buyer="bo", key="retry-me")
    replay = purchase(store, PurchaseRequest("bo", 1, "retry-me"), store.config)

    assert (replay.order, replay.replayed) == (first, True)
    with pytest.raises(IdempotencyKeyReused):
        buy(store, "locked", buyer="someone else", key="retry-me")
    assert store.read_inventory().remaining == 9


# --- Sales that meet -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [mode.name for mode in TABLE if mode.holds_for(hosts=1, processes=1)])
def test_every_mode_that_keeps_threads_apart_sells_each_ticket_once(store: Store, mode: str) -> None:
    runs(store, MODES[mode])
    store.reset(tickets=2, event=None)
    store.change_settings({"mode": mode, "race_window_ms": WINDOW_MS})

    told = _buy_together(store, buyers=6)

    orders = store.orders_page(limit=10, offset=0)[1]
    assert len(told) == len(orders) == 2
    assert sorted(order["order_id"] for order in told) == sorted(order["order_id"] for order in orders)
    assert store.read_inventory().remaining == 0


def test_a_version_checked_write_refuses_a_count_that_moved_since_the_read(store: Store) -> None:
    needs(store, Write.IF_VERSION)
    optimistic = MODES["optimistic"]
    store.change_settings({"mode": optimistic.name})

    with _begin(store, optimistic) as sale:
        before = sale.read(Read.PLAIN, holding := Holding())
        _in_another_thread(lambda: _write_blind(store, optimistic))
        with pytest.raises(Conflict):
            sale.write(Write.IF_VERSION, before, _order(before, "late"), None, holding)

    assert store.read_inventory().remaining == 9


def test_a_conditional_write_never_sells_what_another_sale_took_since_the_read(store: Store) -> None:
    needs(store, Write.CONDITIONAL)
    atomic = MODES["atomic"]
    store.reset(tickets=1, event=None)
    store.change_settings({"mode": atomic.name})

    with _begin(store, atomic) as sale:
        before = sale.read(Read.PLAIN, holding := Holding())
        _in_another_thread(lambda: _write_blind(store, atomic))
        with pytest.raises(SoldOut):
            sale.write(Write.CONDITIONAL, before, _order(before, "late"), None, holding)

    assert store.read_inventory().remaining == 0


def test_a_fenced_write_is_refused_once_a_newer_token_claimed_the_count(store: Store) -> None:
    needs(store, Read.CLAIM, Write.FENCED)
    fenced = MODES["fenced-lease"]
    store.change_settings({"mode": fenced.name})
    older, newer = Holding(fence=time.time_ns()), Holding(fence=time.time_ns() + 1)

    with _begin(store, fenced) as sale:
        before = sale.read(Read.CLAIM, older)
        _in_another_thread(lambda: _sell(store, fenced, newer))  # a newer holder claims, and sells
        with pytest.raises(StaleFence) as refused:
            sale.write(Write.FENCED, before, _order(before, "stale", older), None, older)

    assert refused.value.newest == newer.fence
    assert store.read_inventory().remaining == 9
    assert [(refusal["buyer"], refusal["fence"]) for refusal in store.refusals()] == [("stale", older.fence)]
    with _begin(store, fenced) as sale, pytest.raises(StaleFence):
        sale.read(Read.CLAIM, older)  # and an older token cannot claim it again


def test_a_reset_waits_for_the_sales_in_flight(store: Store) -> None:
    unlocked = MODES["unlocked"]
    store.change_settings({"mode": unlocked.name})
    in_window = threading.Event()

    def slow_sale() -> None:
        with _begin(store, unlocked) as sale:
            before = sale.read(Read.PLAIN, holding := Holding())
            in_window.set()
            time.sleep(WINDOW_MS / 1000)
            sale.write(Write.BLIND, before, _order(before, "straggler"), None, holding)

    straggler = threading.Thread(target=slow_sale)
    straggler.start()
    assert in_window.wait(timeout=10)
    fresh = store.reset(tickets=5, event=None)
    straggler.join(timeout=10)

    # The straggler wrote before the reset, never after it: the reset's count stands.
    assert store.read_inventory() == fresh
    assert store.orders_page(limit=10, offset=0) == (0, [])


# --- The count split into buckets ------------------------------------------------------------------------------


def test_buckets_hold_the_tickets_between_them_and_a_reset_spreads_them(store: Store) -> None:
    needs(store, Ability.BUCKETS)
    store.change_settings({"mode": "buckets"})

    fresh = store.reset(tickets=20, event=None)

    assert len(fresh.buckets) == store.config.buckets == 8
    assert (fresh.remaining, sum(fresh.buckets), max(fresh.buckets) - min(fresh.buckets)) == (20, 20, 1)
    assert store.read_inventory() == fresh


def test_a_switch_to_and_from_buckets_keeps_the_count(store: Store) -> None:
    needs(store, Ability.BUCKETS)
    buy(store, "locked", quantity=3)

    store.change_settings({"mode": "buckets"})
    in_buckets = store.read_inventory()
    buy(store, "buckets", quantity=2)
    store.change_settings({"mode": "row-lock"})
    back = store.read_inventory()
    buy(store, "row-lock")

    assert (in_buckets.remaining, sum(in_buckets.buckets), len(in_buckets.buckets)) == (7, 7, 8)
    assert (back.remaining, back.buckets) == (5, ())
    assert store.read_inventory().remaining == 4
    assert sum(order["quantity"] for order in store.orders_page(limit=10, offset=0)[1]) == 6


def test_a_quantity_larger_than_any_one_bucket_sells_while_the_buckets_together_hold_it(store: Store) -> None:
    needs(store, Ability.BUCKETS)
    store.change_settings({"mode": "buckets"})
    store.reset(tickets=10, event=None)  # 2, 2, 1, 1, 1, 1, 1, 1

    order = buy(store, "buckets", quantity=5)
    with pytest.raises(SoldOut):
        buy(store, "buckets", quantity=6)
    last = buy(store, "buckets", quantity=5)

    assert (order["remaining"], last["remaining"]) == (5, 0)
    assert store.read_inventory().buckets == (0,) * 8


def test_no_ticket_is_stranded_in_a_busy_bucket(store: Store) -> None:
    # One ticket, in one bucket. A sale holds that bucket and rolls back; a buyer who found it busy meanwhile must
    # get the ticket, never "sold out" from an empty skip.
    needs(store, Ability.BUCKETS)
    store.change_settings({"mode": "buckets"})
    store.reset(tickets=1, event=None)
    buckets = MODES["buckets"]
    waiting: list[Order] = []

    with _begin(store, buckets) as sale, buckets.guard.held(sale, 5) as holding:
        assert sale.read(buckets.read, holding).remaining == 1
        patient = PurchaseRequest("patient", 1)
        buyer = threading.Thread(target=lambda: waiting.append(purchase(store, patient, store.config).order))
        buyer.start()
        time.sleep(WINDOW_MS / 1000)  # the buyer finds the one bucket with a ticket busy, and waits for it
    buyer.join(timeout=10)  # the sale above ended without writing: rolled back

    assert [order["buyer"] for order in waiting] == ["patient"]
    assert store.read_inventory().remaining == 0
    with pytest.raises(SoldOut):
        buy(store, "buckets")  # and now, every bucket checked, none has one


# --- Helpers --------------------------------------------------------------------------------------------------


def _buy_together(store: Store, buyers: int) -> list[Order]:
    """``buyers`` threads buying at once through ``purchase``: the orders they were told they got."""

    def buyer(index: int) -> Order | None:
        try:
            return purchase(store, PurchaseRequest(f"buyer-{index}", 1), store.config).order
        except SoldOut:
            return None

    return [order for order in release_together(buyers, buyer) if order is not None]


def _in_another_thread(action: Callable[[], None]) -> None:
    """Run ``action`` to its end in another thread (its own descriptors, its own database connection)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive() and not errors, errors


def _write_blind(store: Store, mode: Mode) -> None:
    """A whole sale of one ticket that writes the count read minus one, whatever the mode's own write is (no guard
    is taken: these tests race on purpose)."""
    with _begin(store, mode) as sale:
        before = sale.read(Read.PLAIN, holding := Holding())
        sale.write(Write.BLIND, before, _order(before, "meddler"), None, holding)


def _sell(store: Store, mode: Mode, holding: Holding) -> None:
    """A whole sale of one ticket in ``mode``'s own read and write, as a guard that handed out ``holding`` would."""
    with _begin(store, mode) as sale:
        before = sale.read(mode.read, holding)
        sale.write(mode.write, before, _order(before, "newer", holding), None, holding)


def _begin(store: Store, mode: Mode) -> AbstractContextManager[Sale]:
    """A sale of one ticket in ``mode`` (the mode in force), with a deadline as ``purchase`` sets it."""
    settings = RuntimeSettings(mode.name, store.read_settings().race_window_ms)
    return store.begin_sale(settings, 1, Deadline.after(store.config.lock_timeout_s))


def _order(before: Inventory, buyer: str, holding: Holding | None = None) -> Order:
    return {
        "order_id": f"{buyer}-{time.time_ns()}",
        "buyer": buyer,
        "quantity": 1,
        "remaining": before.remaining - 1,
        "mode": "contract",
        "attempts": 1,
        "fence": holding.fence if holding else None,
        "worker_pid": 0,
        "host": "contract",
        "store": "contract",
        "timing": {"started_at": 0.0, "read_at": 0.0, "lease_until": None},
    }
