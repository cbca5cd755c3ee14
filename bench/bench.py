"""Issue #6's four performance measurements, side by side in one run, printed as one table.

Run it by hand, with the project installed (``pip install -e .``); it is not part of the test suite and takes
about two minutes:

    python bench/bench.py                 # everything
    python bench/bench.py --only 1,3      # just the lock cost and the load generator
    python bench/bench.py --help          # run length, rounds, orders

1. Lock cost: the same 4-worker server, race window 0, fsync on, alternately unlocked and locked, each round
   measured by ``wrk``; locked throughput must be at least 0.85x unlocked, locked p99 at most 2x unlocked.
2. Flat history: two servers, one with 0 orders recorded and one with 100,000, timed in alternating batches
   of sequential requests (one connection, nothing queued); POST /orders and GET /tickets p50 with 100,000
   orders at most 1.25x their p50 with 0, and a worker's memory at most 1.1x (allocator noise, no growth).
3. Honest load generator: ``loadtest.throughput`` against the locked server of 1, alternating with ``wrk``
   with the same number of threads/processes and connections; at least 0.8x wrk's requests per second.
4. Fast demo: ``python -m loadtest`` (service start, both phases, report, shutdown) within 5 s wall.

Absolute figures drift with whatever else the machine runs; each ratio compares runs that alternate within
this one run, and the table says how much CPU other programs took meanwhile. ``wrk`` is the reference client
(Debian's package: ``apt-get install wrk``); without it, 1 uses ``loadtest.throughput`` and 3 is skipped.
Every process the bench starts is stopped before it exits, and it checks that none is left.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from loadtest.client import ServiceClient
from loadtest.embedded import EmbeddedService, descendants, processes_in_group
from loadtest.throughput import DEFAULT_BODY, ThroughputOptions, ThroughputResult
from loadtest.throughput import run as run_throughput
from service.store import Inventory, PurchaseSettings, Store

WORKERS = 4
TICKETS = 1_000_000_000  # never sold out during a throughput run
CLIENT_THREADS = 2  # wrk -t, and loadtest.throughput's processes: one per core of the 2-core reference machine
CLIENT_CONNECTIONS = 16  # 4 requests in service, 12 queued, so no worker ever waits for the client
WRK_INSTALL_HINT = "wrk is not installed; install the Debian/Ubuntu package: sudo apt-get install wrk"
WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = '{"buyer": "bench"}'
wrk.headers["Content-Type"] = "application/json"
"""

# --- Targets, from the issue ---------------------------------------------------------------------------------
LOCKED_THROUGHPUT_AT_LEAST = 0.85
LOCKED_P99_AT_MOST = 2.0
HISTORY_LATENCY_AT_MOST = 1.25
HISTORY_MEMORY_AT_MOST = 1.10  # "does not grow": allow a few MB of allocator noise on ~40 MB workers
LOAD_GENERATOR_AT_LEAST = 0.8
DEMO_SECONDS_AT_MOST = 5.0


@dataclass(frozen=True)
class Row:
    """One line of the table: a figure, its ratio against its target, and the command that measured it."""

    target: str
    measured: str
    figure: str
    ratio: float | None
    goal: str
    passed: bool | None  # None: not measured
    command: str


@dataclass(frozen=True)
class ClientFigures:
    """What one load run measured, whichever client ran it."""

    requests_per_s: float
    p99_ms: float
    problems: int  # non-2xx answers plus requests that got no answer
    cpu_us_per_request: float  # the client's own CPU time (all its threads or processes) per answered request

    def __str__(self) -> str:
        problems = f", {self.problems} errors" if self.problems else ""
        return f"{self.requests_per_s:.0f} req/s, p99 {self.p99_ms:.1f} ms{problems}"


@dataclass
class Bench:
    """The run's settings and what it gathered: the rows, the commands they cite, and the other CPU load."""

    seconds: float
    rounds: int
    orders: int
    workdir: Path
    wrk: str | None
    rows: list[Row] = field(default_factory=list)
    commands: dict[str, str] = field(default_factory=dict)

    def command(self, text: str) -> str:
        """A short key (c1, c2, ...) for ``text``, listed under the table."""
        for key, known in self.commands.items():
            if known == text:
                return key
        key = f"c{len(self.commands) + 1}"
        self.commands[key] = text
        return key


# --- Clients ------------------------------------------------------------------------------------------------


def wrk_command(bench: Bench, url: str, script: Path) -> list[str]:
    """The reference client: C, epoll, reconnects when the server closes (gunicorn's sync workers do)."""
    assert bench.wrk is not None
    return [
        bench.wrk,
        f"-t{CLIENT_THREADS}",
        f"-c{CLIENT_CONNECTIONS}",
        f"-d{bench.seconds:g}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"{url}/orders",
    ]


def shown_wrk(command: list[str], script: Path) -> str:
    """The wrk command as typed, with the contents of its temporary Lua script."""
    return shlex.join(command) + f"   # {script.name}: {' '.join(WRK_SCRIPT.split())}"


def run_wrk(command: list[str], seconds: float) -> ClientFigures:
    """Run wrk and read its Requests/sec, 99th percentile and error lines."""
    before = os.times()
    output = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    after = os.times()
    cpu_s = (after.children_user + after.children_system) - (before.children_user + before.children_system)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    answered = re.search(r"(\d+) requests in", output)
    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
    if not rate or not p99 or not answered:
        raise RuntimeError(f"cannot read wrk's output:\n{output}")
    unit_ms = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[p99.group(2)]
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    problems = int(non_2xx.group(1)) if non_2xx else 0
    problems += sum(int(count) for count in socket_errors.groups()) if socket_errors else 0
    cpu_us = cpu_s / max(1, int(answered.group(1))) * 1e6
    return ClientFigures(float(rate.group(1)), float(p99.group(1)) * unit_ms, problems, cpu_us)


def throughput_options(url: str, seconds: float) -> ThroughputOptions:
    """loadtest.throughput set up like wrk above: as many processes as wrk threads, as many connections."""
    return ThroughputOptions(url, duration_s=seconds, processes=CLIENT_THREADS, connections=CLIENT_CONNECTIONS)


def describe_options(options: ThroughputOptions) -> str:
    """A reproducible Python call for the table's command list."""
    amount = f"duration_s={options.duration_s:g}" if options.duration_s is not None else f"requests={options.requests}"
    call = f"ThroughputOptions({options.url!r}, {amount}, processes={options.processes}, "
    call += f"connections={options.connections}"
    if options.method != "POST" or options.path != "/orders":
        call += f", method={options.method!r}, path={options.path!r}, body=None"
    return f"loadtest.throughput.run({call}))"


def figures_of(result: ThroughputResult) -> ClientFigures:
    problems = result.failed + sum(count for status, count in result.statuses.items() if not 200 <= status < 300)
    cpu_us = result.client_cpu_s / max(1, result.answered) * 1e6
    return ClientFigures(result.requests_per_s, result.latency_ms.p99, problems, cpu_us)


# --- Other load on the machine ----------------------------------------------------------------------------


def _cpu_seconds_of_machine() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores, /proc/stat)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(value) for value in Path("/proc/stat").read_text().split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds_of_ours() -> float:
    """CPU seconds of this process, its finished children, and every live descendant (gunicorn, clients)."""
    own = os.times()
    total = own.user + own.system + own.children_user + own.children_system
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in descendants(os.getpid()):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime of the process itself
    return total


@contextmanager
def other_load(into: list[float]) -> Iterator[None]:
    """Append to ``into`` the cores other programs kept busy on average while the block ran."""
    started, machine, ours = time.monotonic(), _cpu_seconds_of_machine(), _cpu_seconds_of_ours()
    yield
    elapsed = time.monotonic() - started
    others = (_cpu_seconds_of_machine() - machine) - (_cpu_seconds_of_ours() - ours)
    into.append(max(0.0, others) / elapsed if elapsed > 0 else 0.0)


def leftovers() -> list[int]:
    """Processes this bench started that are still alive, except multiprocessing's own resource tracker.

    The tracker (started with the spawn start method) is the interpreter's helper and ends with it.
    """
    left = []
    for pid in descendants(os.getpid()):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"multiprocessing.resource_tracker" not in command:
            left.append(pid)
    return left


# --- 1 and 3: lock cost, and the load generator against wrk -------------------------------------------------


def measure_lock_cost_and_client(bench: Bench, only: set[int]) -> None:
    """1 and 3 share one server: alternate unlocked/locked under wrk, then wrk/loadtest against locked."""
    script = bench.workdir / "post.lua"
    script.write_text(WRK_SCRIPT)
    with EmbeddedService(workers=WORKERS, race_window_ms=0) as service:
        client = ServiceClient(service.url)
        if 1 in only:
            _lock_cost(bench, service.url, client, script)
        if 3 in only:
            _load_generator(bench, service.url, client, script)


def alternate(
    bench: Bench,
    label: str,
    first: tuple[str, Callable[[], ClientFigures]],
    second: tuple[str, Callable[[], ClientFigures]],
    load: list[float],
) -> tuple[list[ClientFigures], list[ClientFigures]]:
    """Measure ``first`` and ``second`` in ``bench.rounds`` rounds, swapping which goes first every round."""
    runs: dict[str, list[ClientFigures]] = {first[0]: [], second[0]: []}
    for round_number in range(bench.rounds):
        # Swapping the order means neither side always runs on a machine just warmed up (or slowed) by the other.
        for name, measure in (first, second) if round_number % 2 == 0 else (second, first):
            with other_load(load):
                figures = measure()
            runs[name].append(figures)
            progress(f"{label} {name:<8} round {round_number + 1}: {figures}")
    return runs[first[0]], runs[second[0]]


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """The ratio of each round's two runs, which ran next to each other in time."""
    return [top / bottom for top, bottom in zip(numerators, denominators, strict=True)]


def per_round(ratios: Sequence[float]) -> str:
    """The per-round ratios, for the table: their median is the figure, so one spoilt round cannot move it."""
    return "rounds " + " ".join(f"{ratio:.2f}" for ratio in ratios)


def _lock_cost(bench: Bench, url: str, client: ServiceClient, script: Path) -> None:
    if bench.wrk:
        command = wrk_command(bench, url, script)
        measure: Callable[[], ClientFigures] = lambda: run_wrk(command, bench.seconds)  # noqa: E731
        shown = shown_wrk(command, script)
    else:
        options = throughput_options(url, bench.seconds)
        measure = lambda: figures_of(run_throughput(options))  # noqa: E731
        shown = describe_options(options) + f"   # {WRK_INSTALL_HINT}"

    def in_mode(mode: str) -> Callable[[], ClientFigures]:
        def run_in_mode() -> ClientFigures:
            client.reset(TICKETS)
            client.set_mode(mode, race_window_ms=0)
            return measure()

        return run_in_mode

    load: list[float] = []
    unlocked, locked = alternate(bench, "1", ("unlocked", in_mode("unlocked")), ("locked", in_mode("locked")), load)
    rates = paired_ratios([f.requests_per_s for f in locked], [f.requests_per_s for f in unlocked])
    p99s = paired_ratios([f.p99_ms for f in locked], [f.p99_ms for f in unlocked])
    errors = sum(f.problems for f in [*unlocked, *locked])
    note = f"; {errors} errors" if errors else ""
    key = bench.command(shown)
    bench.rows.append(
        Row(
            "1 lock cost",
            "locked / unlocked req/s",
            f"{mean_of(locked, 'rate'):.0f} / {mean_of(unlocked, 'rate'):.0f} req/s; {per_round(rates)}{note}",
            statistics.median(rates),
            f">= {LOCKED_THROUGHPUT_AT_LEAST}",
            statistics.median(rates) >= LOCKED_THROUGHPUT_AT_LEAST and not errors,
            key,
        )
    )
    bench.rows.append(
        Row(
            "1 lock cost",
            "locked / unlocked p99",
            f"{mean_of(locked, 'p99'):.1f} / {mean_of(unlocked, 'p99'):.1f} ms; {per_round(p99s)}",
            statistics.median(p99s),
            f"<= {LOCKED_P99_AT_MOST:g}",
            statistics.median(p99s) <= LOCKED_P99_AT_MOST and not errors,
            key,
        )
    )
    bench.rows.append(_load_row("1 lock cost", load))


def _load_generator(bench: Bench, url: str, client: ServiceClient, script: Path) -> None:
    options = throughput_options(url, bench.seconds)
    if not bench.wrk:
        bench.rows.append(
            Row(
                "3 load generator",
                "loadtest / wrk req/s",
                "not measured",
                None,
                f">= {LOAD_GENERATOR_AT_LEAST}",
                None,
                bench.command(WRK_INSTALL_HINT),
            )
        )
        return
    command = wrk_command(bench, url, script)
    client.reset(TICKETS)
    client.set_mode("locked", race_window_ms=0)
    load: list[float] = []
    wrk, ours = alternate(
        bench,
        "3",
        ("wrk", lambda: run_wrk(command, bench.seconds)),
        ("loadtest", lambda: figures_of(run_throughput(options))),
        load,
    )
    rates = paired_ratios([f.requests_per_s for f in ours], [f.requests_per_s for f in wrk])
    errors = sum(f.problems for f in [*wrk, *ours])
    note = f"; {errors} errors" if errors else ""
    bench.rows.append(
        Row(
            "3 load generator",
            "loadtest / wrk req/s, locked",
            f"{mean_of(ours, 'rate'):.0f} / {mean_of(wrk, 'rate'):.0f} req/s; {per_round(rates)}{note}",
            statistics.median(rates),
            f">= {LOAD_GENERATOR_AT_LEAST}",
            statistics.median(rates) >= LOAD_GENERATOR_AT_LEAST and not errors,
            bench.command(describe_options(options)) + "," + bench.command(shown_wrk(command, script)),
        )
    )
    bench.rows.append(
        Row(
            "3 load generator",
            "client CPU per request",
            f"loadtest {mean_of(ours, 'cpu'):.0f} us, wrk {mean_of(wrk, 'cpu'):.0f} us",
            None,
            "(context)",
            None,
            "process CPU time of the client during the run",
        )
    )
    bench.rows.append(_load_row("3 load generator", load))


def mean_of(runs: Sequence[ClientFigures], figure: str) -> float:
    """The mean over runs of one figure: ``rate`` (req/s), ``p99`` (ms) or ``cpu`` (client us per request)."""
    pick: dict[str, Callable[[ClientFigures], float]] = {
        "rate": lambda figures: figures.requests_per_s,
        "p99": lambda figures: figures.p99_ms,
        "cpu": lambda figures: figures.cpu_us_per_request,
    }
    return statistics.mean(pick[figure](figures) for figures in runs)


# --- 2: flat history ---------------------------------------------------------------------------------------------


def preload(directory: Path, orders: int) -> None:
    """Record ``orders`` sales in a fresh store in ``directory`` through the Store API, before any server starts.

    ``Store.record_sale`` journals each order exactly as a purchase does; only the db.json count is written once
    at the end rather than once per order (each rewrite replaces a file: about a millisecond here).
    """

    class CountOnce(Store):
        def write_inventory(self, inventory: Inventory, **options: Any) -> None:
            self.final = inventory

    store = CountOnce(directory / "db.json")
    inventory = Inventory(event="bench", total=TICKETS, remaining=TICKETS)
    store.create_missing(inventory, PurchaseSettings(mode="locked", race_window_ms=0))
    for number in range(orders):
        now = time.time()
        order: dict[str, Any] = {
            "order_id": uuid.uuid4().hex,
            "buyer": f"preloaded-{number + 1}",
            "quantity": 1,
            "remaining": inventory.remaining - 1,
            "mode": "locked",
            "worker_pid": os.getpid(),
            "timing": {"started_at": now, "read_at": now, "wrote_at": now},
        }
        store.record_sale(inventory, order)
        inventory = Inventory(inventory.event, inventory.total, order["remaining"])
    Store.write_inventory(store, inventory)


def measure_history(bench: Bench) -> None:
    """Sequential POST /orders and GET /tickets against 0 and ``bench.orders`` recorded orders, batch by batch."""
    empty_dir, full_dir = bench.workdir / "history-0", bench.workdir / f"history-{bench.orders}"
    empty_dir.mkdir()
    full_dir.mkdir()
    started = time.monotonic()
    preload(full_dir, bench.orders)
    progress(f"2  preloaded {bench.orders} orders in {time.monotonic() - started:.1f} s")
    requests = 150
    latencies: dict[tuple[str, str], list[float]] = {}
    load: list[float] = []
    commands: dict[str, str] = {}
    with (
        EmbeddedService(workers=WORKERS, race_window_ms=0, directory=empty_dir) as empty,
        EmbeddedService(workers=WORKERS, race_window_ms=0, directory=full_dir) as full,
    ):
        servers = {"0": empty, f"{bench.orders}": full}
        ServiceClient(empty.url).reset(TICKETS)
        for service in servers.values():
            ServiceClient(service.url).set_mode("locked", race_window_ms=0)
        for batch in range(bench.rounds):
            names = list(servers) if batch % 2 == 0 else list(reversed(servers))
            for name in names:
                for endpoint, method in (("/orders", "POST"), ("/tickets", "GET")):
                    options = ThroughputOptions(
                        servers[name].url,
                        duration_s=None,
                        requests=requests,
                        processes=1,
                        connections=1,
                        method=method,
                        path=endpoint,
                        body=None if method == "GET" else DEFAULT_BODY,
                        headers={} if method == "GET" else {"Content-Type": "application/json"},
                    )
                    commands[endpoint] = describe_options(options).replace(servers[name].url, "URL")
                    with other_load(load):
                        result = run_throughput(options)
                    if result.failed or set(result.statuses) - {200, 201}:
                        raise RuntimeError(f"{method} {endpoint} on {name} orders: {result.statuses} {result.errors}")
                    latencies.setdefault((name, endpoint), []).append(result.latency_ms.p50)
                    progress(f"2  {name:>6} orders, {method} {endpoint}: p50 {result.latency_ms.p50:.2f} ms")
        # A worker that pages through the whole journal must not keep it: one GET /orders per worker, at the end.
        for service in servers.values():
            client = ServiceClient(service.url, timeout_s=60)
            count = client.request("GET", "/orders?limit=1").body["count"]
            for _ in range(WORKERS):
                client.request("GET", f"/orders?limit=100&offset={max(0, count - 100)}")
        memory = {name: max(_rss_mb(pid) for pid in service.worker_pids()) for name, service in servers.items()}
    small, large = "0", f"{bench.orders}"
    for endpoint, method in (("/orders", "POST"), ("/tickets", "GET")):
        before, after = latencies[(small, endpoint)], latencies[(large, endpoint)]
        ratios = paired_ratios(after, before)
        bench.rows.append(
            Row(
                "2 flat history",
                f"{method} {endpoint} p50, {large} / 0 orders",
                f"{statistics.median(after):.2f} / {statistics.median(before):.2f} ms "
                f"({requests} sequential per round); {per_round(ratios)}",
                statistics.median(ratios),
                f"<= {HISTORY_LATENCY_AT_MOST}",
                statistics.median(ratios) <= HISTORY_LATENCY_AT_MOST,
                bench.command(commands[endpoint]),
            )
        )
    bench.rows.append(
        Row(
            "2 flat history",
            f"worker RSS, {large} / 0 orders",
            f"{memory[large]:.1f} / {memory[small]:.1f} MB (largest of {WORKERS} workers, after GET /orders paging)",
            memory[large] / memory[small],
            f"<= {HISTORY_MEMORY_AT_MOST}",
            memory[large] / memory[small] <= HISTORY_MEMORY_AT_MOST,
            bench.command("VmRSS in /proc/<worker pid>/status"),
        )
    )
    bench.rows.append(_load_row("2 flat history", load))


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --- 4: the demo -------------------------------------------------------------------------------------------------


def measure_demo(bench: Bench) -> None:
    """Time the default one-command demo, in its own process group so that nothing of it can outlive a timeout."""
    command = [sys.executable, "-m", "loadtest"]
    durations: list[float] = []
    load: list[float] = []
    failures: list[str] = []
    for run_number in range(bench.rounds):
        started = time.monotonic()
        with other_load(load):
            process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, text=True
            )
            try:
                _, stderr = process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                _, stderr = process.communicate()
                failures.append("timed out after 60 s")
        durations.append(time.monotonic() - started)
        if process.returncode != 0:
            failures.append(f"exit {process.returncode}: {stderr.strip()[-200:]}")
        _kill_group_leftovers(process.pid)
        progress(f"4  demo run {run_number + 1}: {durations[-1]:.2f} s, exit {process.returncode}")
    slowest = max(durations)
    note = f"; {failures[0]}" if failures else ""
    bench.rows.append(
        Row(
            "4 fast demo",
            "wall seconds / 5 s",
            f"slowest {slowest:.2f} s, median {statistics.median(durations):.2f} s of {bench.rounds}{note}",
            slowest / DEMO_SECONDS_AT_MOST,
            "<= 1 (5 s)",
            slowest <= DEMO_SECONDS_AT_MOST and not failures,
            bench.command(shlex.join(["python", "-m", "loadtest"])),
        )
    )
    bench.rows.append(_load_row("4 fast demo", load))


def _kill_group_leftovers(group: int) -> None:
    survivors = processes_in_group(group)
    if survivors:
        os.killpg(group, signal.SIGKILL)


# --- The table ---------------------------------------------------------------------------------------------------


def _load_row(target: str, load: list[float]) -> Row:
    cores = os.cpu_count() or 1
    return Row(
        target,
        "other programs' CPU meanwhile",
        f"{statistics.mean(load):.2f} of {cores} cores on average, {max(load):.2f} at most",
        None,
        "(context)",
        None,
        "/proc/stat minus this bench's processes",
    )


def render(rows: Sequence[Row], commands: dict[str, str]) -> str:
    """The results as a Markdown table (it reads the same on a terminal), then the commands it cites."""
    header = ("target", "figure", "measured", "ratio", "goal", "result", "command")
    lines = [
        (
            row.target,
            row.measured,
            row.figure,
            "" if row.ratio is None else f"{row.ratio:.2f}",
            row.goal,
            {True: "PASS", False: "FAIL", None: "-"}[row.passed],
            row.command,
        )
        for row in rows
    ]
    widths = [max(len(cells[column]) for cells in [header, *lines]) for column in range(len(header))]

    def format_line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

    table = [format_line(header), "|" + "|".join("-" * (width + 2) for width in widths) + "|"]
    table += [format_line(cells) for cells in lines]
    table += [
        "",
        "ratio: the median of the per-round ratios; each round runs both sides back to back, and the side that",
        "goes first alternates. measured: means (1, 3) or medians (2) of the rounds, then each round's ratio.",
        "",
        "Commands:",
    ]
    table += [f"- {key}: `{text}`" for key, text in commands.items()]
    return "\n".join(table)


def environment_summary(bench: Bench) -> str:
    """What the figures depend on: the machine, the versions, the filesystem holding db.json, the other load."""
    mount = _mount_of(bench.workdir)
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    wrk = bench.wrk and subprocess.run([bench.wrk, "--version"], capture_output=True, text=True).stdout.splitlines()
    return "\n".join(
        [
            f"date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
            f"machine: {os.cpu_count()} cores, {platform.platform()}, load average {load} at start",
            f"python {platform.python_version()}, flask {version('flask')}, gunicorn {version('gunicorn')}, "
            f"filelock {version('filelock')}",
            f"wrk: {wrk[0].strip() if wrk else WRK_INSTALL_HINT}",
            f"db.json on: {mount}",
            f"server: {WORKERS} gunicorn sync workers, race window 0, fsync on; client: {CLIENT_THREADS} "
            f"threads/processes, {CLIENT_CONNECTIONS} connections, {bench.seconds:g} s per run, {bench.rounds} rounds",
        ]
    )


def _mount_of(path: Path) -> str:
    """The filesystem type and mount options of ``path`` (``discard`` makes every file deletion wait for the disk)."""
    best = ("", "?", "?")
    for line in Path("/proc/mounts").read_text().splitlines():
        _device, mount_point, kind, options, *_ = line.split()
        if str(path.resolve()).startswith(mount_point) and len(mount_point) >= len(best[0]):
            best = (mount_point, kind, options)
    return f"{best[0]} {best[1]} ({best[2]})"


def progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


# --- Command line ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each load run (default 5)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per comparison (default 4)")
    parser.add_argument("--orders", type=int, default=100_000, help="orders recorded for target 2 (default 100000)")
    parser.add_argument("--only", default="1,2,3,4", help="targets to measure, comma-separated (default all)")
    arguments = parser.parse_args(argv)
    only = {int(number) for number in arguments.only.split(",")}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ticketlock-bench-") as workdir:
        bench = Bench(arguments.seconds, arguments.rounds, arguments.orders, Path(workdir), shutil.which("wrk"))
        print(environment_summary(bench), flush=True)
        if not bench.wrk:
            print(WRK_INSTALL_HINT, file=sys.stderr)
        try:
            if only & {1, 3}:
                measure_lock_cost_and_client(bench, only)
            if 2 in only:
                measure_history(bench)
            if 4 in only:
                measure_demo(bench)
        finally:
            left = leftovers()
            for pid in left:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    print()
    print(render(sorted(bench.rows, key=lambda row: row.target[0]), bench.commands))
    print(f"\nbench took {time.monotonic() - started:.0f} s; processes left behind: {left or 'none'}")
    return 0 if all(row.passed is not False for row in bench.rows) and not left else 1


if __name__ == "__main__":
    sys.exit(main())
