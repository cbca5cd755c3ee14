"""Running the load test: for each phase reset the store, set the mode, release every buyer at once, check.

``run`` is the library entry point: it takes ``LoadOptions`` and returns a ``RunResult`` of plain data, with
no printing except through the optional ``progress`` callback. With several URLs (or several embedded hosts)
the buyers are spread over them round-robin; the store is reset, switched and read back through one of them,
since every host sells from the same store.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from loadtest.checker import INFO, Check, Outcome, check
from loadtest.client import Buyer, ServiceClient
from loadtest.cluster import Cluster
from loadtest.embedded import STARTUP_TIMEOUT_S
from loadtest.pause import HolderPause, Pause
from loadtest.timeline import bars_from_orders
from service.config import load_server_settings
from service.modes import FIRST_LESSON, MODES

SETTLE_S = 1.0

ProgressCallback = Callable[[str, int, int], None]  # (phase label, answered so far, buyers)


@dataclass(frozen=True)
class LoadOptions:
    """What to run. Without ``urls``, ``hosts`` embedded hosts of ``workers`` workers are started and stopped."""

    urls: Sequence[str] = ()
    token: str | None = None
    hosts: int = 1
    store: str = "file"  # of the embedded hosts: "file" (db.json) or "postgres" (a throwaway PostgreSQL)
    workers: int = 4
    buyers: int = 100
    tickets: int = 10
    concurrency: int | None = None  # buyers in flight at once; None: all of them
    modes: Sequence[str] = ()  # (): unlocked and locked on the file store, every mode on postgres; ("all",): all
    trials: int = 1
    race_window_ms: int | None = None  # None: keep the service's own
    timeout_s: float = 10.0
    pause_holder_ms: int | None = None  # stop the lease holder this long in each lease phase (embedded hosts)


@dataclass(frozen=True)
class Latency:
    """Latency figures in milliseconds: the median, two nearest-rank percentiles and the slowest."""

    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of_seconds(cls, seconds: Iterable[float]) -> Latency:
        """The figures of these durations, given in seconds (all zero when there are none)."""
        values = sorted(duration * 1000 for duration in seconds)
        if not values:
            return cls(0.0, 0.0, 0.0, 0.0)
        return cls(statistics.median(values), _percentile(values, 90), _percentile(values, 99), values[-1])


@dataclass(frozen=True)
class Phase:
    """One phase to run: a mode, and how long to stop its lease holder (None: no pause)."""

    mode: str
    pause_ms: int | None = None

    @property
    def label(self) -> str:
        """How the report names the phase: the mode, and "+pause" when its lease holder is stopped."""
        return self.mode if self.pause_ms is None else f"{self.mode}+pause"


@dataclass(frozen=True)
class PhaseResult:
    """One phase (one mode, one trial): the check, its speed, and the raw material behind them."""

    mode: str
    trial: int
    race_window_ms: int
    check: Check
    duration_s: float
    throughput_rps: float
    send_spread_ms: float  # how far apart the buyers released together sent their first requests
    latency_ms: Latency
    errors: dict[str, int]
    outcomes: list[Outcome] = field(repr=False)
    orders: list[dict[str, Any]] = field(repr=False)
    label: str = ""  # the mode, or the mode and "+pause"
    lease_ms: int | None = None  # the service's lease, when it has a lock service
    pause: Pause | None = None  # the lease holder stopped during the phase, if any
    refusals: list[dict[str, Any]] = field(default_factory=list, repr=False)  # stale writes the store refused

    @property
    def lapsed(self) -> bool:
        """Whether a lease holder outlived its lease: its race window, or the pause, was longer than the lease, or
        a recorded sale wrote after its lease ran out (a worker the machine left waiting, say)."""
        if self.lease_ms is None or MODES[self.mode].lapse is None:
            return False  # no lease: nothing to outlive
        if self.race_window_ms >= self.lease_ms or (self.pause is not None and self.pause.ms > self.lease_ms):
            return True
        return any(bar.outlived_lease for bar in bars_from_orders(self.orders))


@dataclass(frozen=True)
class Deployment:
    """How the buyers were served: by how many hosts, and how many worker processes in all."""

    hosts: int
    processes: int

    def expects_correct(self, phase: PhaseResult) -> bool:
        """Whether the phase's mode keeps every buyer of this deployment apart, given whether a holder outlived
        its lease (service/modes.py, ``Mode.holds_for``)."""
        return MODES[phase.mode].holds_for(self.hosts, self.processes, lapsed=phase.lapsed)


@dataclass(frozen=True)
class RunResult:
    """A whole run: where it ran, with what options, and every phase in order."""

    urls: list[str]
    embedded: bool
    store: str  # "file" or "postgres", as the service says
    options: LoadOptions
    phases: list[PhaseResult]
    service_pids: list[int] = field(default_factory=list)  # embedded: the masters and workers, all stopped

    def labels(self) -> list[str]:
        """The phases' labels (a mode, or a mode and "+pause"), in the order they ran."""
        return list(dict.fromkeys(phase.label for phase in self.phases))

    def phases_for(self, label: str) -> list[PhaseResult]:
        """The trials of one phase."""
        return [phase for phase in self.phases if phase.label == label]

    @property
    def deployment(self) -> Deployment:
        """The hosts and worker processes that sold in any phase (at least the embedded hosts started)."""
        sellers = {seller for phase in self.phases for seller in phase.check.sellers}
        hosts = len({host for host, _ in sellers})
        return Deployment(hosts=max(hosts, self.options.hosts if self.embedded else 1), processes=len(sellers))


def run(
    options: LoadOptions, progress: ProgressCallback | None = None, starting: Callable[[], None] | None = None
) -> RunResult:
    """Run every phase of ``options`` and return the results; starts and stops embedded hosts if needed.

    ``starting`` is called once the services answered, before the first phase resets them.
    """
    service_pids: list[int] = []
    with open_target(options, service_pids) as target:
        offered = target.clients[0].modes()
        store, modes = modes_to_run(offered, options.modes)
        plan = phases_to_run(modes, options, offered.get("lease_ms"), target.can_pause)
        if starting:
            starting()
        phases = [
            run_phase(target, options, phase, trial, offered.get("lease_ms"), progress)
            for phase in plan
            for trial in range(1, options.trials + 1)
        ]
    urls = [client.base_url for client in target.clients]
    return RunResult(urls, not options.urls, store, options, phases, service_pids)


@dataclass
class Target:
    """The hosts a run sends buyers to: a client for each, and the embedded cluster when it started them."""

    clients: list[ServiceClient]
    cluster: Cluster | None = None

    @property
    def can_pause(self) -> bool:
        """Whether a lease holder can be stopped: the workers are this program's, and so is the lock service."""
        return self.cluster is not None and self.cluster.redis_url is not None


@contextmanager
def open_target(options: LoadOptions, service_pids: list[int] | None = None) -> Iterator[Target]:
    """Clients for ``options.urls``, or for embedded hosts started now and stopped when the block ends.

    The embedded hosts' PIDs (masters and workers) are appended to ``service_pids`` as they stop.
    """
    if options.urls:
        clients = [ServiceClient(url, token=options.token, timeout_s=options.timeout_s) for url in options.urls]
        for client in clients:
            client.health()
        yield Target(clients)
        return
    with Cluster(hosts=options.hosts, workers=options.workers, store=options.store) as cluster:
        try:
            yield Target([ServiceClient(url, timeout_s=options.timeout_s) for url in cluster.urls], cluster)
        finally:
            if service_pids is not None:
                service_pids += cluster.service_pids()


def modes_to_run(offered: dict[str, Any], asked: Sequence[str]) -> tuple[str, list[str]]:
    """The service's store, and the modes to run: ``asked``, every mode it offers for "all", or its default."""
    store = str(offered["store"])
    available = [str(mode["name"]) for mode in offered["modes"] if mode["available"]]
    if not asked:
        return store, list(FIRST_LESSON) if store == "file" else available
    if list(asked) == ["all"]:
        return store, available
    missing = [mode for mode in asked if mode not in available]
    if missing:
        raise ValueError(f"the service's {store} store cannot run {', '.join(missing)}; it runs {', '.join(available)}")
    return store, list(asked)


def phases_to_run(modes: list[str], options: LoadOptions, lease_ms: int | None, can_pause: bool) -> list[Phase]:
    """One phase per mode; with ``--pause-holder``, the lease modes' holders are stopped. By default, on embedded
    hosts with a lock service, the lease modes run once more with a pause twice the lease: the lease's lesson."""
    leases = [mode for mode in modes if MODES[mode].lapse is not None]
    pause_ms = options.pause_holder_ms
    if pause_ms is None:
        if options.modes or not can_pause or not leases or lease_ms is None:
            return [Phase(mode) for mode in modes]
        return [Phase(mode) for mode in modes] + [Phase(mode, 2 * lease_ms) for mode in leases]
    if not can_pause:
        raise ValueError("--pause-holder stops a worker: it needs the embedded hosts and their lock service")
    check_pause(pause_ms, lease_ms)
    return [Phase(mode, pause_ms if mode in leases else None) for mode in modes]


def check_pause(pause_ms: int, lease_ms: int | None) -> None:
    """The pause must outlive the lease (or it shows nothing), and end before gunicorn's worker timeout (or
    gunicorn kills the stopped worker, and the stale write never happens)."""
    worker_timeout_ms = 1000 * load_server_settings(environ={}).worker_timeout_s
    if lease_ms is None or not lease_ms < pause_ms < worker_timeout_ms:
        raise ValueError(
            f"--pause-holder {pause_ms} must be longer than the lease ({lease_ms} ms) and shorter than gunicorn's "
            f"worker timeout ({worker_timeout_ms} ms)"
        )


def run_phase(
    target: Target,
    options: LoadOptions,
    phase: Phase,
    trial: int,
    lease_ms: int | None = None,
    progress: ProgressCallback | None = None,
) -> PhaseResult:
    """Reset to ``options.tickets``, switch to the phase's mode, release all buyers together (stopping the lease
    holder for the phase's pause), then read back and check."""
    clients = target.clients
    admin = clients[0]
    admin.reset(options.tickets)
    settings = admin.set_mode(phase.mode, options.race_window_ms)
    label = phase.label if options.trials == 1 else f"{phase.label} #{trial}"
    if progress:
        progress(label, 0, options.buyers)
    started = time.monotonic()
    with pausing(target, phase.pause_ms) as pause:
        release = release_buyers(clients, options.buyers, options.concurrency or options.buyers, label, progress)
    duration_s = time.monotonic() - started
    outcomes = release.outcomes
    if any(outcome.kind == INFO for outcome in outcomes):
        # A buyer who gave up may still be queued at the server: let it finish before reading back.
        time.sleep(SETTLE_S + settings["race_window_ms"] / 1000)
    remaining = admin.tickets()["remaining"]
    orders = clients[-1].all_orders()  # any host: they all read the same store
    return PhaseResult(
        mode=phase.mode,
        trial=trial,
        race_window_ms=settings["race_window_ms"],
        check=check(options.tickets, outcomes, remaining, orders),
        duration_s=duration_s,
        throughput_rps=len(outcomes) / duration_s if duration_s > 0 else 0.0,
        send_spread_ms=release.send_spread_ms,
        latency_ms=Latency.of_seconds(outcome.latency_s for outcome in outcomes),
        errors=_errors(outcomes),
        outcomes=outcomes,
        orders=orders,
        label=phase.label,
        lease_ms=lease_ms,
        pause=pause.pause if pause else None,
        refusals=admin.refusals(),
    )


@contextmanager
def pausing(target: Target, pause_ms: int | None) -> Iterator[HolderPause | None]:
    """Stop the lease holder for ``pause_ms`` during the block (nothing when None)."""
    cluster = target.cluster
    if pause_ms is None or cluster is None or cluster.redis_url is None or cluster.database_url is None:
        yield None
        return
    masters = [host.master_pid for host in cluster.hosts if host.master_pid]
    with HolderPause(cluster.redis_url, cluster.database_url, masters, pause_ms / 1000) as pause:
        yield pause


@dataclass(frozen=True)
class Release:
    """What the buyers of one phase were told, and how close together the first of them sent their requests."""

    outcomes: list[Outcome]
    send_spread_ms: float  # the first request of each buyer thread: the latest send minus the earliest


def release_buyers(
    clients: Sequence[ServiceClient],
    buyers: int,
    concurrency: int,
    label: str,
    progress: ProgressCallback | None = None,
) -> Release:
    """Send ``buyers`` purchases from ``concurrency`` threads, all starting together behind a barrier.

    Thread N buys from ``clients[N % len(clients)]``: the buyers are spread over the hosts round-robin. Each buyer
    has a ``requests.Session`` of its own; the first buyer of each thread prepares its request before the start
    line, so that after it only the sending is left.
    """
    concurrency = max(1, min(concurrency, buyers))
    queue = _BuyerQueue(buyers, label, progress)
    start_line = threading.Barrier(concurrency)
    threads = [
        threading.Thread(target=_buy_in_turn, args=(clients[n % len(clients)], queue, start_line), name=f"buyer-{n}")
        for n in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return queue.released()


class _BuyerQueue:
    """The buyers of one phase, handed to the threads one at a time, and what each of them was told."""

    def __init__(self, buyers: int, label: str, progress: ProgressCallback | None) -> None:
        self.outcomes: list[Outcome | None] = [None] * buyers
        self.first_sends: list[float] = []  # when the first buyer of each thread sent, after the start line
        self.label = label
        self.progress = progress
        self._next = iter(range(buyers))
        self._answered = 0
        self._lock = threading.Lock()

    def take(self) -> int | None:
        """The next buyer's index, or None when every buyer was taken."""
        with self._lock:
            return next(self._next, None)

    def report(self, index: int, outcome: Outcome, first: bool) -> None:
        """Keep what buyer ``index`` was told (``first``: the first send of its thread), and show the progress."""
        self.outcomes[index] = outcome
        with self._lock:
            self._answered += 1
            answered = self._answered
            if first:
                self.first_sends.append(outcome.invoked_at)
        if self.progress:
            self.progress(self.label, answered, len(self.outcomes))

    def released(self) -> Release:
        """Every buyer's outcome, and how far apart the threads' first sends left; RuntimeError if one is missing."""
        missing = [index for index, outcome in enumerate(self.outcomes) if outcome is None]
        if missing:
            raise RuntimeError(f"{len(missing)} buyers were never sent (a buyer thread failed)")
        sends = self.first_sends
        spread_ms = (max(sends) - min(sends)) * 1000 if sends else 0.0
        return Release([outcome for outcome in self.outcomes if outcome is not None], spread_ms)


def _buy_in_turn(client: ServiceClient, queue: _BuyerQueue, start_line: threading.Barrier) -> None:
    """One buyer thread: its first buyer made ready before the start line (every thread waits there, so that the
    first requests leave together), then one buyer after another until none is left."""
    index = queue.take()
    buyer = _ready(client, index)
    # The timeout keeps a thread that could not start from holding the others back forever.
    with suppress(threading.BrokenBarrierError):
        start_line.wait(timeout=STARTUP_TIMEOUT_S)
    first = True
    while index is not None and buyer is not None:
        queue.report(index, buyer.buy(), first)
        first = False
        index = queue.take()
        buyer = _ready(client, index)


def _ready(client: ServiceClient, index: int | None) -> Buyer | None:
    """Buyer ``index``, its request to ``client`` prepared; None when there is no buyer left."""
    if index is None:
        return None
    return Buyer(client.base_url + "/orders", f"buyer-{index + 1}", timeout_s=client.timeout_s)


def _percentile(sorted_values: Sequence[float], percent: float) -> float:
    """Nearest-rank percentile: the smallest value with at least ``percent`` % of the values at or below it."""
    rank = max(1, -(-len(sorted_values) * percent // 100))
    return sorted_values[int(rank) - 1]


def _errors(outcomes: Sequence[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        if outcome.error:
            key = f"{outcome.error} ({outcome.kind})" if outcome.kind == INFO else outcome.error
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
