"""Throughput mode: fire one request as fast as the service answers, for a fixed time or count, and time each one.

The buyers of ``loadtest.runner`` are about correctness: each is one person, released together, checked one by
one. This module is about speed, the way ``wrk`` measures it: a few client processes (so the load generator is
not held to one core by Python's GIL, issue #6), each driving several connections from its own threads, each
connection sending its next request the moment the previous answer is read. Every connection is an
``http.client.HTTPConnection``, which keeps the socket open when the server allows keep-alive and reconnects
by itself when the server closes it (gunicorn's sync workers close after every response). Not ``requests``, as
the buyers: here the client's CPU is what limits the figure, and requests spends several times as much of it per
request (measured in docs/load-tester.md).

``run`` takes ``ThroughputOptions`` and returns a ``ThroughputResult`` of plain data; it never raises for a
failed request: refused connections, resets and timeouts are counted by name in ``errors``.
"""

from __future__ import annotations

import http.client
import math
import multiprocessing
import queue
import threading
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as ProcessEvent
from typing import Any

from loadtest.client import ServiceClient, describe
from loadtest.runner import Latency
from service.config import MAX_TICKETS

DEFAULT_BODY = b'{"buyer": "throughput"}'
DEFAULT_DURATION_S = 10.0
START_TIMEOUT_S = 30.0  # how long the client processes may take to start (spawn imports the package anew)


@dataclass(frozen=True)
class ThroughputOptions:
    """What to send, where, for how long, and from how many processes and connections.

    Give ``duration_s`` or ``requests``, not both; with neither, the run lasts ``DEFAULT_DURATION_S``.
    ``connections`` is the total across all processes, spread over them as evenly as it goes; a ``requests``
    count is spread over the connections the same way.
    """

    url: str
    duration_s: float | None = None
    requests: int | None = None
    processes: int = 2
    connections: int = 16
    method: str = "POST"
    path: str = "/orders"
    body: bytes | None = DEFAULT_BODY
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.duration_s is not None and self.requests is not None:
            raise ValueError("give duration_s or requests, not both")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError("duration_s must be positive")
        if self.requests is not None and self.requests < 1:
            raise ValueError("requests must be at least 1")
        if self.processes < 1 or self.connections < self.processes:
            raise ValueError("processes must be at least 1, and connections at least processes")
        if not self.timeout_s > 0:
            raise ValueError("timeout_s must be positive")
        ServiceClient(self.url)  # ValueError if it is not an http(s) URL

    @property
    def seconds(self) -> float:
        """How long a timed run sends requests (a run with a request count stops when they are sent)."""
        return DEFAULT_DURATION_S if self.duration_s is None else self.duration_s


@dataclass(frozen=True)
class ThroughputResult:
    """What the run measured. ``answered`` got an HTTP answer (any status); ``errors`` got none.

    ``requests_per_s`` counts answered requests over ``duration_s``, the time from the start signal to the
    last answer, the way ``wrk`` reports Requests/sec. ``connections_opened`` shows whether keep-alive was used:
    equal to ``answered`` + ``failed`` when the server closes every connection, close to ``connections`` when
    it keeps them open. Latency is measured from the start of the request (including any reconnect) to the
    end of its answer, over answered requests only. ``client_cpu_s`` is the CPU time the client processes
    spent during the run: a load generator that needs a core per request it sends measures itself, not the
    server (issue #6).
    """

    url: str
    method: str
    path: str
    processes: int
    connections: int
    duration_s: float
    answered: int
    failed: int
    statuses: dict[int, int]
    errors: dict[str, int]
    connections_opened: int
    requests_per_s: float
    latency_ms: Latency
    client_cpu_s: float

    @property
    def requests(self) -> int:
        """Every request sent, answered or not."""
        return self.answered + self.failed


def run(options: ThroughputOptions) -> ThroughputResult:
    """Send requests from ``options.processes`` client processes and gather what they measured.

    The processes are started with multiprocessing's "spawn" method (no fork of a parent that may hold
    threads or locks), so a script that calls this must guard its own start with ``if __name__ ==
    "__main__":``, as the multiprocessing documentation asks. RuntimeError if they cannot start. Every process
    started is gone when this returns or raises; one that dies mid-run is counted in ``errors`` as
    ``client_process_died``.
    """
    context = multiprocessing.get_context("spawn")
    shares = _spread(options.connections, options.processes)
    ready, results, go = context.Queue(), context.Queue(), context.Event()
    processes = [
        context.Process(
            target=_client_process,
            args=(options, connections, _quota(options, shares, index), ready, go, results),
            name=f"throughput-{index}",
            daemon=True,
        )
        for index, connections in enumerate(shares)
    ]
    try:
        for process in processes:
            process.start()
        _wait_until_ready(ready, processes)
        go.set()  # every connection of every process starts now
        reports = _collect(results, processes, _deadline(options))
    finally:
        _end(processes)
    return _merge(options, reports, died=len(processes) - len(reports))


def _wait_until_ready(ready: Any, processes: list[Any]) -> None:
    """Wait until every process has its threads waiting for the start signal; fail fast if one died."""
    deadline = time.monotonic() + START_TIMEOUT_S
    waiting_for = len(processes)
    while waiting_for:
        try:
            ready.get(timeout=0.1)
            waiting_for -= 1
        except queue.Empty:
            dead = [process for process in processes if process.exitcode is not None]
            if dead:
                raise RuntimeError(f"client process {dead[0].name} exited with {dead[0].exitcode} at start") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"the client processes did not start within {START_TIMEOUT_S:g} s") from None


def _spread(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` whole numbers that differ by at most one."""
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


def _quota(options: ThroughputOptions, shares: list[int], process_index: int) -> list[int] | None:
    """How many requests each connection of one process sends, or None when the run is timed."""
    if options.requests is None:
        return None
    per_connection = _spread(options.requests, options.connections)
    first = sum(shares[:process_index])
    return per_connection[first : first + shares[process_index]]


def _deadline(options: ThroughputOptions) -> float:
    """When the parent stops waiting for results: the run, one last timeout, and slack for a busy machine."""
    if options.requests is None:
        longest = options.seconds
    else:
        # A count-based run has no fixed length; allow every request of the busiest connection one timeout.
        longest = math.ceil(options.requests / options.connections) * options.timeout_s
    return time.monotonic() + longest + options.timeout_s + START_TIMEOUT_S


def _collect(results: Any, processes: list[Any], deadline: float) -> list[dict[str, Any]]:
    reports: list[dict[str, Any]] = []
    while len(reports) < len(processes) and time.monotonic() < deadline:
        try:
            reports.append(results.get(timeout=0.2))
        except queue.Empty:
            # A process that died without reporting will never put anything: stop waiting for it.
            alive = sum(1 for process in processes if process.is_alive())
            if alive == 0 and results.empty():
                break
    return reports


def _end(processes: list[Any]) -> None:
    """Join every client process; terminate, then kill, any that does not end by itself."""
    for process in processes:
        if process.pid is not None:
            process.join(timeout=2.0)
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(timeout=2.0)
        if process.is_alive():
            process.kill()
            process.join()


# --- Inside a client process -------------------------------------------------------------------------------


@dataclass
class _Tally:
    """What one connection saw; each thread owns one, so counting needs no lock."""

    latencies_s: array[float] = field(default_factory=lambda: array("d"))
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    connections_opened: int = 0


def _client_process(
    options: ThroughputOptions,
    connections: int,
    quota: list[int] | None,
    ready: Any,
    go: ProcessEvent,
    results: Any,
) -> None:
    """One client process: ``connections`` threads, released together with every other process."""
    tallies = [_Tally() for _ in range(connections)]
    released = threading.Event()
    stop_at: list[float] = []
    threads = [
        threading.Thread(
            target=_connection_loop,
            args=(options, tallies[index], None if quota is None else quota[index], released, stop_at),
            daemon=True,
        )
        for index in range(connections)
    ]
    for thread in threads:
        thread.start()
    ready.put(True)
    if not go.wait(timeout=START_TIMEOUT_S):
        return  # the parent gave up on a sibling; it reports the failure
    started = time.monotonic()  # CLOCK_MONOTONIC is one clock for every process on the machine
    cpu_before = time.process_time()
    stop_at.append(started + options.seconds if options.requests is None else math.inf)
    released.set()
    for thread in threads:
        thread.join()
    finished = time.monotonic()
    cpu_s = time.process_time() - cpu_before
    latencies = array("d")
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    for tally in tallies:
        latencies.extend(tally.latencies_s)
        statuses.update(tally.statuses)
        errors.update(tally.errors)
    results.put(
        {
            "started": started,
            "finished": finished,
            "cpu_s": cpu_s,
            "latencies_s": latencies,
            "statuses": dict(statuses),
            "errors": dict(errors),
            "connections_opened": sum(tally.connections_opened for tally in tallies),
        }
    )


def _connection_loop(
    options: ThroughputOptions, tally: _Tally, quota: int | None, released: threading.Event, stop_at: list[float]
) -> None:
    """Send requests back to back on one connection until the time is up or the quota is spent."""
    client = ServiceClient(options.url, timeout_s=options.timeout_s)
    connection = client.connection()
    path = client.prefix + options.path
    headers = dict(options.headers)
    released.wait()
    deadline = stop_at[0]
    sent = 0
    clock = time.monotonic
    while (quota is None or sent < quota) and (started := clock()) < deadline:
        sent += 1
        if connection.sock is None:
            tally.connections_opened += 1  # request() is about to (re)connect
        try:
            connection.request(options.method, path, body=options.body, headers=headers)
            response = connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as error:
            tally.errors[describe(error)] += 1
            connection.close()
            continue
        tally.latencies_s.append(clock() - started)
        tally.statuses[response.status] += 1
    connection.close()


# --- Back in the parent ---------------------------------------------------------------------------------------


def _merge(options: ThroughputOptions, reports: list[dict[str, Any]], died: int) -> ThroughputResult:
    latencies = array("d")
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    for report in reports:
        latencies.extend(report["latencies_s"])
        statuses.update(report["statuses"])
        errors.update(report["errors"])
    if died:
        errors["client_process_died"] += died
    duration_s = (
        max(report["finished"] for report in reports) - min(report["started"] for report in reports) if reports else 0.0
    )
    answered = len(latencies)
    return ThroughputResult(
        url=options.url,
        method=options.method,
        path=options.path,
        processes=options.processes,
        connections=options.connections,
        duration_s=duration_s,
        answered=answered,
        failed=sum(errors.values()),
        statuses=dict(sorted(statuses.items())),
        errors=dict(sorted(errors.items())),
        connections_opened=sum(report["connections_opened"] for report in reports),
        client_cpu_s=sum(report["cpu_s"] for report in reports),
        requests_per_s=answered / duration_s if duration_s > 0 else 0.0,
        latency_ms=Latency.of_seconds(latencies),
    )


def measure_modes(
    client: ServiceClient, modes: Sequence[str], options: ThroughputOptions, race_window_ms: int = 0
) -> list[tuple[str, ThroughputResult]]:
    """Measure each mode in turn on the same service: a store too large to sell out, that mode, then ``run``."""
    results = []
    for mode in modes:
        client.reset(MAX_TICKETS)
        client.set_mode(mode, race_window_ms)
        results.append((mode, run(options)))
    return results
