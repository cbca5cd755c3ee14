"""Issue #20's benchmark: the database path near its bound, the hot row split, the file path against the framework.

    python bench/bench.py                      # every section (make bench)
    python bench/bench.py --sections file      # goal 4 only
    python bench/bench.py --seconds 3 --rounds 2 --sections round-trips,postgres   # shorter

What: a purchase's round trips to PostgreSQL, counted by a proxy between the service and the database (goal 1);
every mode of both stores at race window 0 and 20 ms, the postgres modes on 3 hosts x 4 workers (goal 2: each
correct mode against unlocked; goal 5: buckets against row-lock at 20 ms), pgbench on the same database (goal 3),
and the file store beside the framework floor with a CPU profile of a locked request (goal 4); each table's notes
say how its goal is judged. Why one run: every figure is Debian's ``wrk``
against real gunicorn servers on loopback, side by side, so that a ratio compares runs made minutes apart on
one machine. Every server started is stopped and checked gone by PID. Figures, with the machine and commit
they come from: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask.testing import FlaskClient

from loadtest.client import ServiceClient
from loadtest.cluster import Cluster
from loadtest.database_proxy import DatabaseProxy
from loadtest.embedded import EmbeddedService
from loadtest.postgres import DATABASE, USER, ThrowawayPostgres, find_binaries
from loadtest.redis_server import ThrowawayRedis
from service import create_app, prepare_for_start
from service.guards import SERVICES, Ability
from service.modes import MODES, Mode
from service.stores.file import FileStore
from service.stores.postgres import INVENTORY_LOCK, LOCK_CLASS, PostgresStore

HERE = Path(__file__).resolve().parent
TICKETS = 1_000_000_000  # never sold out during a run
WORKERS = 4
REFERENCE_CONNECTIONS = 32
WINDOWS_MS = (0, 20)
HOSTS = 3
CONNECTIONS_PER_HOST = 16
PGBENCH_CLIENTS = (4, HOSTS * WORKERS)  # the pgbench figure had 4; the service has 12 workers
CPU_BOUND_AT = 0.90  # of every core busy
COUNTED_PURCHASES = 20  # per mode, for the round trips, after as many to warm up

ROUND_TRIPS_AT_MOST = {"atomic": 1}  # goal 1: any other mode at most 2
ROUND_TRIPS_OTHERWISE = 2
SHARE_OF_UNLOCKED_AT_LEAST = {"optimistic": 0.8, "repeatable-read": 0.8}  # goal 2: any other correct mode 0.9
SHARE_OF_UNLOCKED_OTHERWISE = 0.9
SHARE_OF_PGBENCH_AT_LEAST = 0.5  # goal 3
LOCKED_FLOOR_AT_LEAST = 0.5  # goal 4
BUCKETS_OVER_ROW_LOCK_AT_LEAST = 5.0  # goal 5, at the 20 ms window
SPLIT_WINDOW_MS = 20

WRK_INSTALL_HINT = "wrk is not installed: sudo apt-get install wrk"
WRK_POST = """\
wrk.method = "POST"
wrk.body = '{"buyer": "bench"}'
wrk.headers["Content-Type"] = "application/json"
"""
# Several hosts: each wrk thread sends to one of them, in turn (wrk's setup() may set a thread's address).
WRK_HOSTS = """\
local hosts = {%s}
local started = 0
function setup(thread)
  local host = hosts[started %% #hosts + 1]
  started = started + 1
  thread.addr = wrk.lookup(host[1], host[2])[1]
end
"""
PGBENCH_ORDER = (
    "INSERT INTO orders (order_id, buyer, quantity, remaining, mode, attempts, worker_pid, host, started_at, "
    "read_at, wrote_at) VALUES (gen_random_uuid()::text, 'pgbench', 1, 0, 'pgbench', 1, 0, 'pgbench', 0, 0, 0);"
)
PGBENCH_SCRIPTS = {
    "atomic": f"""\
BEGIN;
UPDATE inventory SET remaining = remaining - 1, version = version + 1 WHERE id = 1 AND remaining >= 1;
{PGBENCH_ORDER}
COMMIT;
""",
    "row-lock": f"""\
BEGIN;
SELECT remaining FROM inventory WHERE id = 1 FOR UPDATE \\gset
UPDATE inventory SET remaining = :remaining - 1, version = version + 1 WHERE id = 1;
{PGBENCH_ORDER}
COMMIT;
""",
    "advisory-lock": f"""\
BEGIN;
SELECT pg_advisory_xact_lock({LOCK_CLASS}, {INVENTORY_LOCK});
SELECT remaining FROM inventory WHERE id = 1 \\gset
UPDATE inventory SET remaining = :remaining - 1, version = version + 1 WHERE id = 1;
{PGBENCH_ORDER}
COMMIT;
""",
}

# Where a request's CPU goes: (step, the functions whose cumulative CPU it is), from the workers' profiles.
# Each function is (the end of its file's path, its name).
Function = tuple[str, str]
REQUEST = ("gunicorn/workers/sync.py", "handle")
FLASK = ("flask/app.py", "__call__")
ROUTE = ("service/routes.py", "create_order")
PURCHASE = ("service/purchase.py", "purchase")
FSYNC = ("~", "<built-in method posix.fsync>")
ROUTE_STEPS: list[tuple[str, list[Function]]] = [
    (
        "route: body parsed and checked",
        [("service/validation.py", "json_object"), ("service/validation.py", "order_request")],
    ),
    ("route: the answer's JSON", [("flask/json/__init__.py", "jsonify")]),
]
FILE_STORE = "service/stores/file/__init__.py"
PURCHASE_STEPS: list[tuple[str, list[Function]]] = [
    ("settings read (mode, race window)", [(FILE_STORE, "read_settings")]),
    ("the sale's shared hold (flock)", [(FILE_STORE, "begin_sale")]),
    ("the guard taken and released (flock)", [("service/guards/base.py", "held")]),
    ("1. read db.json", [(FILE_STORE, "read_db")]),
    ("4. write db.json (a new file swapped in)", [("service/stores/file/atomic.py", "replace_json")]),
    ("4. write the order's journal line", [("service/stores/file/journal.py", "append")]),
    ("flush to disk before the 201 (fsync, group commit)", [(FILE_STORE, "make_durable")]),
]
POSTGRES_STORE = "service/stores/postgres.py"
POSTGRES_PURCHASE_STEPS: list[tuple[str, list[Function]]] = [
    ("a connection from the worker's pool, and back", [(POSTGRES_STORE, "_connection")]),
    ("the round trips: psycopg queues the statements, sends them, reads the answers", [(POSTGRES_STORE, "_pipelined")]),
    ("the watchdog armed and disarmed around each round trip", [("service/stores/watchdog.py", "answering_within")]),
]
STATEMENT: Function = ("psycopg/connection.py", "execute")


# --- wrk --------------------------------------------------------------------------------------------------------


@dataclass
class Figures:
    """One wrk run, and what the machine did meanwhile."""

    requests: int
    errors: int  # answers other than 2xx (503s: nothing sold)
    socket_errors: int  # connections refused, reset or timed out: wrk counts no answer for them
    seconds: float
    p50_ms: float
    p99_ms: float
    busy: float = 0.0  # of every core, the whole machine
    iowait: float = 0.0
    worker_cpu: float = 0.0  # per worker, of one core

    @property
    def ok_rps(self) -> float:
        """201s per second."""
        return (self.requests - self.errors) / self.seconds


def wrk_script(urls: Sequence[str], directory: Path) -> Path:
    """The Lua script that POSTs an order, to one host or to several in turn."""
    script = WRK_POST
    if len(urls) > 1:
        hosts = ", ".join(f'{{"{urlsplit(url).hostname}", "{urlsplit(url).port}"}}' for url in urls)
        script += WRK_HOSTS % hosts
    path = directory / f"post-{len(urls)}.lua"
    path.write_text(script)
    return path


def wrk_command(urls: Sequence[str], connections: int, seconds: float, script: Path) -> list[str]:
    """wrk with one thread per host (two for a single host: one per core of the reference machine)."""
    threads = len(urls) if len(urls) > 1 else 2
    wrk = shutil.which("wrk") or "wrk"
    return [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"{urls[0]}/orders",
    ]


def run_wrk(command: list[str]) -> Figures:
    """Run wrk and read its report."""
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    out = completed.stdout
    if completed.returncode != 0 or "requests in" not in out:
        raise RuntimeError(f"wrk failed ({completed.returncode}): {completed.stderr or out}")
    requests, seconds, unit = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out).groups()  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return Figures(
        requests=int(requests),
        errors=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(map(int, socket_errors.groups())) if socket_errors else 0,
        seconds=float(seconds) * {"ms": 0.001, "s": 1, "m": 60}[unit],
        p50_ms=latency_ms(out, "50%"),
        p99_ms=latency_ms(out, "99%"),
    )


def latency_ms(out: str, percentile: str) -> float:
    """A line of wrk's latency distribution, in milliseconds."""
    match = re.search(rf"^\s*{percentile}\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    if match is None:
        return float("nan")
    value, unit = match.groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


# --- What the machine did meanwhile -----------------------------------------------------------------------------


def run_wrk_watching(command: list[str], worker_pids: Sequence[int]) -> Figures:
    """``run_wrk``, with the machine's busy and iowait shares, and the workers' CPU, while it ran."""
    before, workers_before, started = _cpu_times(), _process_ticks(worker_pids), time.monotonic()
    figures = run_wrk(command)
    after, workers_after, wall = _cpu_times(), _process_ticks(worker_pids), time.monotonic() - started
    total = sum(after) - sum(before)
    if total > 0:
        idle, iowait = after[3] - before[3], after[4] - before[4]
        figures.busy = (total - idle - iowait) / total
        figures.iowait = iowait / total
    if worker_pids and wall > 0:
        ticks = os.sysconf("SC_CLK_TCK")
        figures.worker_cpu = (workers_after - workers_before) / ticks / wall / len(worker_pids)
    return figures


def _cpu_times() -> list[int]:
    with open("/proc/stat") as stat:
        return [int(value) for value in stat.readline().split()[1:9]]


def _process_ticks(pids: Sequence[int]) -> int:
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks


def bound(figures: Figures) -> str:
    """What limited a run: every core, or else waiting (for the disk, the lock, or a turn on a core)."""
    if figures.busy >= CPU_BOUND_AT:
        return f"CPU: cores {figures.busy:.0%} busy"
    return (
        f"not CPU: cores {figures.busy:.0%} busy, iowait {figures.iowait:.0%}; each worker busy "
        f"{figures.worker_cpu:.0%} of a core"
    )


# --- Targets: a server, and how to put it in a mode -------------------------------------------------------------


@dataclass
class Target:
    """What wrk sends to: its URLs, its worker PIDs, and how to prepare a run (mode, window, fresh store)."""

    name: str
    urls: list[str]
    worker_pids: Callable[[], list[int]]
    prepare: Callable[[str, int], None] = lambda mode, window: None
    orders: Callable[[], list[dict[str, Any]]] = list


def service_target(name: str, urls: list[str], worker_pids: Callable[[], list[int]]) -> Target:
    client = ServiceClient(urls[0], timeout_s=30.0)

    def prepare(mode: str, window: int) -> None:
        client.set_mode(mode, window)
        client.reset(TICKETS)

    return Target(name, urls, worker_pids, prepare, lambda: every_order(client))


def every_order(client: ServiceClient) -> list[dict[str, Any]]:
    """The orders recorded since the last reset, through the live feed (a cursor, not an offset)."""
    orders: list[dict[str, Any]] = []
    cursor = ""
    while True:
        page = client.expect(client.request("GET", f"/orders?after={cursor}&limit=1000"), 200, "reading orders")
        orders += page["orders"]
        if not page["orders"]:
            return orders
        cursor = page["cursor"]


@dataclass
class Bench:
    """The run's settings, its temporary folder, and every command it ran (the table cites them)."""

    seconds: int
    rounds: int
    directory: Path
    commands: dict[str, str] = field(default_factory=dict)

    def measure(self, target: Target, mode: str, window: int, connections: int) -> Figures:
        """One measured wrk run against ``target`` in ``mode``, after a warm-up."""
        script = wrk_script(target.urls, self.directory)
        target.prepare(mode, window)
        run_wrk(wrk_command(target.urls, connections, 1, script))  # warm-up: connections, caches, page cache
        target.prepare(mode, window)
        command = wrk_command(target.urls, connections, self.seconds, script)
        self.commands.setdefault(f"wrk, {len(target.urls)} host(s), -c{connections}", " ".join(command))
        figures = run_wrk_watching(command, target.worker_pids())
        progress(
            f"{target.name:>9} {mode:<15} window {window:>2} ms -c{connections:<3} {figures.ok_rps:8,.0f} 201/s  "
            f"p99 {figures.p99_ms:6.1f} ms  errors {figures.errors}+{figures.socket_errors}  "
            f"cores {figures.busy:.0%} busy"
        )
        return figures

    def rounds_of(
        self,
        runs: Sequence[tuple[Target, str]],
        window: int,
        connections: int,
        after: Callable[[Target, str], None] = lambda target, mode: None,
    ) -> list[list[Figures]]:
        """``self.rounds`` rounds of every run; each round starts one run later than the round before.

        ``after`` is called after each run, before the next one resets the store.
        """
        results: list[list[Figures]] = [[] for _ in runs]
        for number in range(self.rounds):
            first = number % len(runs)
            for index in [*range(first, len(runs)), *range(first)]:
                target, mode = runs[index]
                results[index].append(self.measure(target, mode, window, connections))
                after(target, mode)
        return results


# --- The sections ---------------------------------------------------------------------------------------------------


@dataclass
class Report:
    """Markdown sections, and one summary line per goal."""

    sections: list[str] = field(default_factory=list)
    goals: list[tuple[str, str, str]] = field(default_factory=list)  # goal, measured, result

    def table(self, title: str, header: Sequence[str], rows: Sequence[Sequence[str]], notes: str = "") -> None:
        lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        self.sections.append("\n".join(lines) + ("\n\n" + notes if notes else ""))


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> tuple[float, list[float]]:
    ratios = [n / d if d else float("nan") for n, d in zip(numerators, denominators, strict=True)]
    return statistics.median(ratios), ratios


def with_rounds(ratio: float, ratios: Sequence[float]) -> str:
    """The median ratio in bold, each round's after it."""
    return f"**{ratio:.2f}** ({' '.join(f'{r:.2f}' for r in ratios)})"


def overall(counted: Sequence[bool]) -> str:
    """PASS when every counted cell passed, and at least one was counted."""
    if not counted:
        return "not measured (no cell counted)"
    return "PASS" if all(counted) else "FAIL"


def verdict(passed: bool, counted: bool = True) -> str:
    if not counted:
        return "not counted (below saturation)"
    return "PASS" if passed else "FAIL"


def file_section(bench: Bench, report: Report) -> None:
    """Goal 4: the file store's unlocked and locked beside the framework floor, in rounds, then a CPU profile."""
    with (
        EmbeddedService(workers=WORKERS, race_window_ms=0) as service,
        EmbeddedService(workers=WORKERS, gunicorn_config=HERE / "floor.conf.py") as floor_server,
    ):
        target = service_target("file", [service.url], service.worker_pids)
        floor = Target("floor", [floor_server.url], floor_server.worker_pids)
        runs = [(target, "unlocked"), (target, "locked"), (floor, "floor")]
        figures = bench.rounds_of(runs, 0, REFERENCE_CONNECTIONS)
    floor_and_profile(bench, report, {mode: figures[index] for index, (_, mode) in enumerate(runs)})


def mean(figures: Sequence[Figures], name: str) -> float:
    return statistics.mean(float(getattr(figure, name)) for figure in figures)


def floor_and_profile(bench: Bench, report: Report, figures: dict[str, list[Figures]]) -> None:
    floor, unlocked, locked = figures["floor"], figures["unlocked"], figures["locked"]
    ratio, ratios = median_ratio([f.ok_rps for f in locked], [f.ok_rps for f in floor])
    rows = [
        [
            name,
            f"{mean(runs, 'ok_rps'):,.0f}",
            f"{mean(runs, 'p99_ms'):.1f}",
            f"{median_ratio([f.ok_rps for f in runs], [f.ok_rps for f in floor])[0]:.2f}",
            f"{mean(runs, 'busy'):.0%}",
        ]
        for name, runs in (
            ("floor: gunicorn + Flask, fixed 201, no store", floor),
            ("unlocked", unlocked),
            ("locked", locked),
        )
    ]
    report.table(
        f"Goal 4: the framework floor (4 sync workers, -c{REFERENCE_CONNECTIONS}, the same rounds)",
        ["server", "201/s", "p99 ms", "/ floor", "cores busy"],
        rows,
        f"Goal: locked at least {LOCKED_FLOOR_AT_LEAST:g} of the floor. Rounds, locked / floor: "
        + " ".join(f"{r:.2f}" for r in ratios),
    )
    report.goals.append(("4 locked / framework floor", f"{ratio:.2f}", verdict(ratio >= LOCKED_FLOOR_AT_LEAST)))
    profile(bench, report)


def profile(bench: Bench, report: Report) -> None:
    """Where a locked request's CPU goes on the file store: cProfile with a CPU clock in each of 4 workers."""
    profiled = profiled_run(bench, "locked", {}, PURCHASE_STEPS)
    requests = profiled.calls(ROUTE)
    fsyncs = profiled.calls(FSYNC)
    profile_table(
        report,
        f"Goal 4: where a locked request's CPU goes ({requests:,} requests, 4 workers profiled)",
        profiled,
        PURCHASE_STEPS,
        f"Group commit: {fsyncs:,} fsyncs for {requests:,} orders ({fsyncs / max(requests, 1):.2f} per order).",
    )


def postgres_profile(report: Report, profiled: Profile) -> None:
    """Where an unlocked request's CPU goes on postgres (one host of 4 profiled workers)."""
    requests = profiled.calls(ROUTE)
    statements = profiled.calls(STATEMENT) / max(requests, 1)
    profile_table(
        report,
        f"Goal 3: where an unlocked request's CPU goes on postgres ({requests:,} requests, 1 host of 4 workers "
        "profiled)",
        profiled,
        POSTGRES_PURCHASE_STEPS,
        f"psycopg ran {statements:.1f} statements per request, in its round trips. The database's own CPU, and "
        "wrk's, are not in this table: they share the same 2 cores.",
    )


def profile_table(
    report: Report, title: str, profiled: Profile, purchase_steps: list[tuple[str, list[Function]]], notes: str
) -> None:
    requests, total = profiled.calls(ROUTE), profiled.cpu(REQUEST)
    rows = [
        [name, f"{1e6 * value / max(requests, 1):.0f}", f"{value / total:.0%}"]
        for name, value in request_steps(profiled, purchase_steps)
    ]
    rows.append(["**every request, in all**", f"**{1e6 * total / max(requests, 1):.0f}**", "100%"])
    report.table(
        title,
        ["step", "CPU µs per request (profiled)", "share"],
        rows,
        "cProfile with a CPU clock in every worker (bench/profiled.conf.py): waiting for a lock, the disk or the "
        "database is not counted, and the profiler's own cost inflates Python code about twofold against system "
        "calls, so read the shares, not the microseconds. " + notes,
    )


class Profile:
    """The workers' cProfile statistics, merged, asked about functions given as (end of file path, name)."""

    def __init__(self, stats: dict[Any, Any]) -> None:
        self.stats = stats

    @staticmethod
    def _is(key: tuple[str, int, str], function: Function) -> bool:
        return key[0].endswith(function[0]) and key[2] == function[1]

    def cpu(self, function: Function, under: Function | None = None) -> float:
        """Cumulative CPU of ``function``: in all, or only in its calls from ``under``."""
        total = 0.0
        for key, (_, _, _, cumulative, callers) in self.stats.items():
            if self._is(key, function):
                if under is None:
                    total += cumulative
                else:
                    total += sum(row[3] for caller, row in callers.items() if self._is(caller, under))
        return total

    def calls(self, function: Function) -> int:
        """How many times ``function`` was called."""
        return sum(row[1] for key, row in self.stats.items() if self._is(key, function))


def profiled_run(
    bench: Bench, mode: str, environment: dict[str, str], purchase_steps: list[tuple[str, list[Function]]]
) -> Profile:
    """One run in ``mode`` on 4 workers that profile themselves (bench/profiled.conf.py), and what they recorded."""
    profiles = Path(tempfile.mkdtemp(prefix="profiles-", dir=bench.directory))
    with EmbeddedService(
        workers=WORKERS,
        race_window_ms=0,
        gunicorn_config=HERE / "profiled.conf.py",
        environment={**environment, "TICKETLOCK_BENCH_PROFILES": str(profiles)},
    ) as service:
        bench.measure(service_target("profiled", [service.url], service.worker_pids), mode, 0, 32)
    written = list(profiles.glob("*.prof"))
    if not written:
        raise RuntimeError(f"the profiled workers wrote no profile into {profiles}")
    profiled = Profile(pstats.Stats(*map(str, written)).stats)  # type: ignore[attr-defined]
    for function in [REQUEST, FLASK, ROUTE, PURCHASE, *(f for _, fs in ROUTE_STEPS + purchase_steps for f in fs)]:
        if not profiled.calls(function):
            raise RuntimeError(f"the profile never saw {function[1]} in {function[0]}: update bench.py's steps")
    return profiled


def request_steps(profiled: Profile, steps: list[tuple[str, list[Function]]]) -> list[tuple[str, float]]:
    """A request's CPU, step by step: HTTP, Flask, the route's steps, the purchase's, and the rest of each."""
    total, flask, route, purchase = (profiled.cpu(f) for f in (REQUEST, FLASK, ROUTE, PURCHASE))
    route_steps = [(name, sum(profiled.cpu(f, under=ROUTE) for f in functions)) for name, functions in ROUTE_STEPS]
    purchase_steps = [(name, sum(map(profiled.cpu, functions))) for name, functions in steps]
    return [
        ("HTTP: gunicorn reads the request, writes the answer, closes", total - flask),
        ("Flask: request and response objects, routing, hooks", flask - route),
        *route_steps,
        *purchase_steps,
        ("the rest of purchase(): the order, checks, bookkeeping", purchase - sum(v for _, v in purchase_steps)),
        ("the rest of the route", route - purchase - sum(value for _, value in route_steps)),
    ]


def round_trips_section(report: Report) -> None:
    """Goal 1: each postgres mode's round trips per purchase, counted from the database's side.

    The app runs in this process (its test client: no HTTP, which the count does not see) on a throwaway PostgreSQL
    reached through a proxy that counts the turns each connection takes (loadtest/database_proxy.py).
    """
    with ExitStack() as stack:
        postgres = stack.enter_context(ThrowawayPostgres())
        redis_url = stack.enter_context(ThrowawayRedis()).url if shutil.which("redis-server") else None
        proxy = stack.enter_context(DatabaseProxy(postgres.socket_folder / ".s.PGSQL.5432"))
        settings = {"database_url": f"postgresql://{USER}@{proxy.url_host}/{DATABASE}", "redis_url": redis_url}
        prepare_for_start(settings)
        client = create_app(settings).test_client()
        modes = PostgresStore.modes(SERVICES if redis_url else frozenset())
        rows, over = [], []
        for mode in modes:
            client.put("/mode", json={"mode": mode.name, "race_window_ms": 0})
            client.post("/reset", json={"tickets": TICKETS})
            counts = [_turns_of(client, proxy, key) for key in (False, True)]
            most = ROUND_TRIPS_AT_MOST.get(mode.name, ROUND_TRIPS_OTHERWISE)
            if counts[0] > most:
                over.append(mode.name)
            rows.append([mode.name, f"{counts[0]:g}", f"{counts[1]:g}", str(most), verdict(counts[0] <= most)])
    report.table(
        "Goal 1: round trips to PostgreSQL per purchase (window 0, counted by a proxy)",
        ["mode", "round trips", "with an Idempotency-Key", "goal: at most", "result"],
        rows,
        f"{COUNTED_PURCHASES} purchases per mode after as many to warm up, one worker, counted by "
        "loadtest/database_proxy.py: the Query and Sync messages a client sends, each the end of a request it waits "
        "on (one statement, or a whole pipeline of them). A key's lookup goes with the read; where no read goes "
        "first (atomic) or the read must go alone (a fenced claim), it takes a round trip of its own.",
    )
    measured = "every mode within its goal" if not over else "over: " + ", ".join(over)
    report.goals.append(("1 round trips per purchase (postgres)", measured, verdict(not over)))


def _turns_of(client: FlaskClient, proxy: DatabaseProxy, key: bool) -> float:
    """The round trips a purchase takes, on average over COUNTED_PURCHASES, with or without an Idempotency-Key."""
    sent = iter(range(2 * COUNTED_PURCHASES))

    def buy() -> None:
        headers = {"Idempotency-Key": f"bench-{key}-{next(sent)}-{time.time_ns()}"} if key else {}
        answer = client.post("/orders", json={"buyer": "bench"}, headers=headers)
        if answer.status_code != 201:
            raise RuntimeError(f"a counted purchase was answered {answer.status_code}: {answer.json}")

    return proxy.turns_per(buy, COUNTED_PURCHASES)


def modes_section(bench: Bench, report: Report, with_postgres: bool) -> None:
    """Goals 2, 3 and 5: every mode of both stores at window 0 and 20 ms, pgbench on the same database, and the
    buckets against row-lock at 20 ms in rounds."""
    with EmbeddedService(workers=WORKERS, race_window_ms=0) as service:
        target = service_target("file", [service.url], service.worker_pids)
        rows = every_mode(bench, target, FileStore.modes(), REFERENCE_CONNECTIONS, "file")[0]
    if not with_postgres:
        report.table("Every mode (file store only)", MODES_HEADER, rows, MODES_NOTES)
        return
    with Cluster(hosts=HOSTS, workers=WORKERS, store="postgres", race_window_ms=0) as cluster:
        target = service_target("postgres", cluster.urls, lambda: [p for h in cluster.hosts for p in h.worker_pids()])
        connections = HOSTS * CONNECTIONS_PER_HOST
        # With a lock service (redis-server installed), the lease modes too: what its round trips cost.
        modes = PostgresStore.modes(SERVICES if cluster.redis_url else frozenset())
        postgres_rows, below, service_rates = every_mode(bench, target, modes, connections, "postgres")
        split = bench.rounds_of([(target, "row-lock"), (target, "buckets")], SPLIT_WINDOW_MS, connections)
        assert cluster.database is not None
        target.prepare("unlocked", 0)  # the count back in the inventory row, which pgbench's statements write
        pgbench_rows = pgbench(bench, cluster.database.socket_folder, service_rates)
        database_url = f"postgresql://{USER}@/{DATABASE}?host={cluster.database.socket_folder}"
        profiled = profiled_run(bench, "unlocked", {"TICKETLOCK_DATABASE_URL": database_url}, POSTGRES_PURCHASE_STEPS)
    report.table("Goal 2: every mode", MODES_HEADER, rows + postgres_rows, MODES_NOTES)
    measured = "every one within its goal" if not below else "below: " + ", ".join(below)
    report.goals.append(("2 correct postgres modes / unlocked", measured, verdict(not below)))
    pgbench_table(report, pgbench_rows)
    postgres_profile(report, profiled)
    split_table(report, *split)


MODES_HEADER = [
    "store",
    "mode",
    "protects",
    "0 ms: 201/s",
    "p99 ms",
    "errors",
    "attempts / order",
    "/ unlocked (rounds)",
    "goal",
    "bound (last round)",
    "20 ms: 201/s",
    "p99 ms",
    "errors",
    "result",
]
MODES_NOTES = (
    f"Goal: every mode that protects every host reaches at least {SHARE_OF_UNLOCKED_OTHERWISE:g} of unlocked's 201/s "
    f"on postgres at window 0 ({', '.join(SHARE_OF_UNLOCKED_AT_LEAST)}: "
    f"{min(SHARE_OF_UNLOCKED_AT_LEAST.values()):g}); the lease modes, which add the lock service's round trips, are "
    "reported, not held to it. Errors: answers other than 201 (503 lock_timeout or too_many_conflicts: nothing "
    "sold), and socket errors if any. Attempts: each order's, at window 0 (a purchase that found the count changed "
    "started again). Bound: CPU when at least "
    f"{CPU_BOUND_AT:.0%} of the machine's cores were busy; else the workers waited (for the disk, a lock, a turn on "
    "a core). 20 ms: every purchase works 20 ms between its read and its write, so a mode that excludes the others "
    "sells at most 50 per second."
)


def every_mode(
    bench: Bench, target: Target, modes: list[Mode], connections: int, store: str
) -> tuple[list[list[str]], list[str], dict[str, float]]:
    """A row per mode, the correct postgres modes below their goal, and each mode's 201/s at 0 ms.

    Window 0 runs in rounds, each mode's ratio to unlocked taken within a round; 20 ms runs once.
    """
    attempts: dict[str, list[int]] = {mode.name: [] for mode in modes}  # each order's, at window 0

    def count_attempts(server: Target, mode: str) -> None:
        attempts[mode] += [order["attempts"] for order in server.orders()]

    runs = [(target, mode.name) for mode in modes]
    zero = dict(zip(modes, bench.rounds_of(runs, 0, connections, count_attempts), strict=True))
    twenty = {mode: bench.measure(target, mode.name, 20, connections) for mode in modes}
    unlocked = zero[MODES["unlocked"]]
    hosts = HOSTS if store == "postgres" else 1
    rows = []
    below = []
    for mode in modes:
        share, shares = median_ratio([f.ok_rps for f in zero[mode]], [f.ok_rps for f in unlocked])
        correct = store == "postgres" and mode.holds_for(hosts=hosts, processes=hosts * WORKERS)
        counted = correct and Ability.LOCK_SERVICE not in mode.needs()
        goal = SHARE_OF_UNLOCKED_AT_LEAST.get(mode.name, SHARE_OF_UNLOCKED_OTHERWISE)
        if counted and share < goal:
            below.append(mode.name)
        rows.append(
            [
                f"{store}, {hosts} x {WORKERS} workers",
                mode.name,
                mode.protects.label,
                f"{mean(zero[mode], 'ok_rps'):,.0f}",
                f"{mean(zero[mode], 'p99_ms'):.1f}",
                errors_of(zero[mode]),
                f"{statistics.mean(attempts[mode.name]):.2f}" if attempts[mode.name] else "-",
                with_rounds(share, shares),
                f"{goal:g}" if counted else "-",
                bound(zero[mode][-1]),
                f"{twenty[mode].ok_rps:,.0f}",
                f"{twenty[mode].p99_ms:.0f}",
                errors_of([twenty[mode]]),
                verdict(share >= goal) if counted else ("reported" if correct else "-"),
            ]
        )
    return rows, below, {mode.name: mean(zero[mode], "ok_rps") for mode in modes}


def pgbench_table(report: Report, rows: list[tuple[str, list[float], float]]) -> None:
    """Goal 3: pgbench's orders/s beside the service's, on the same statements."""
    lines, shares = [], []
    for name, figures, service in rows:
        share = service / figures[-1]
        shares.append(share)
        lines.append(
            [
                name,
                *(f"{figure:,.0f}" for figure in figures),
                f"{service:,.0f}",
                f"**{share:.2f}**",
                verdict(share >= SHARE_OF_PGBENCH_AT_LEAST),
            ]
        )
    report.table(
        "Goal 3: pgbench on the same database, the same one-row statements (orders/s)",
        [
            "statements (as the mode)",
            *(f"pgbench, {clients} clients" for clients in PGBENCH_CLIENTS),
            f"the service, {HOSTS} x {WORKERS} workers, window 0",
            f"service / pgbench, {PGBENCH_CLIENTS[-1]} clients",
            "result",
        ],
        lines,
        "The bound one hot row sets: the database alone, with no HTTP, no Python and no race window. Each "
        "transaction is the mode's own: BEGIN, its guard and read, the UPDATE of the one inventory row, the "
        "order's INSERT, COMMIT (synchronous, as the service's). pgbench runs on the same machine as the service, "
        f"alone; the service shares the 2 cores with its 3 hosts and wrk. Goal: at least {SHARE_OF_PGBENCH_AT_LEAST:g} "
        f"of pgbench with as many clients as the service has workers ({PGBENCH_CLIENTS[-1]}), for each statement set.",
    )
    worst = min(shares)
    report.goals.append(
        ("3 service / pgbench (postgres)", f"{worst:.2f} (the lowest)", verdict(worst >= SHARE_OF_PGBENCH_AT_LEAST))
    )


def split_table(report: Report, row_lock: list[Figures], buckets: list[Figures]) -> None:
    """Goal 5: the hot row split, buckets against row-lock at the 20 ms window, in rounds."""
    ratio, ratios = median_ratio([f.ok_rps for f in buckets], [f.ok_rps for f in row_lock])
    rows = [
        [name, f"{mean(runs, 'ok_rps'):,.0f}", f"{mean(runs, 'p99_ms'):.0f}", errors_of(runs)]
        for name, runs in (("row-lock", row_lock), ("buckets", buckets))
    ]
    report.table(
        f"Goal 5: the hot row split ({HOSTS} x {WORKERS} workers, window {SPLIT_WINDOW_MS} ms, in rounds)",
        ["mode", "201/s", "p99 ms", "errors"],
        rows,
        f"Goal: buckets at least {BUCKETS_OVER_ROW_LOCK_AT_LEAST:g} times row-lock. Rounds, buckets / row-lock: "
        + " ".join(f"{r:.2f}" for r in ratios)
        + f". Row-lock holds the one inventory row across the window: at most {1000 // SPLIT_WINDOW_MS} sales a "
        f"second. Buckets (TICKETLOCK_BUCKETS, default 8) hold one bucket each: at most 8 x {1000 // SPLIT_WINDOW_MS}, "
        f"and {HOSTS * WORKERS} workers can each sell at most {1000 // SPLIT_WINDOW_MS} a second.",
    )
    passed = ratio >= BUCKETS_OVER_ROW_LOCK_AT_LEAST
    report.goals.append(("5 buckets / row-lock at 20 ms", f"{ratio:.2f}", verdict(passed)))


def errors_of(figures: Sequence[Figures]) -> str:
    """Answers other than 201, and socket errors where there were any."""
    answers, sockets = sum(f.errors for f in figures), sum(f.socket_errors for f in figures)
    return f"{answers}" + (f" (+{sockets} socket)" if sockets else "")


def pgbench(bench: Bench, socket_folder: Path, service: dict[str, float]) -> list[tuple[str, list[float], float]]:
    """pgbench with each mode's statements on the service's own database, at two client counts."""
    binary = find_binaries() / "pgbench"
    program = str(binary) if binary.is_file() else shutil.which("pgbench") or "pgbench"
    rows = []
    for name, script in PGBENCH_SCRIPTS.items():
        path = bench.directory / f"pgbench-{name}.sql"
        path.write_text(script)
        figures = []
        for clients in PGBENCH_CLIENTS:
            command = [
                program,
                "-h",
                str(socket_folder),
                "-U",
                "ticketlock",
                "-n",
                "-f",
                str(path),
                "-c",
                str(clients),
                "-j",
                "2",
                "-T",
                f"{bench.seconds:g}",
                "ticketlock",
            ]
            completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
            match = re.search(r"tps = ([\d.]+)", completed.stdout)
            if completed.returncode != 0 or match is None:
                raise RuntimeError(f"pgbench failed ({completed.returncode}): {completed.stderr or completed.stdout}")
            figures.append(float(match.group(1)))
            progress(f"pgbench {name}, {clients} clients: {figures[-1]:,.0f} orders/s")
            shown = " ".join(command).replace(str(bench.directory), "$BENCH").replace(str(socket_folder), "$SOCKET")
            bench.commands.setdefault(f"pgbench, {clients} clients", shown.replace(name, "<mode>"))
        rows.append((name, figures, service.get(name, 0.0)))
    return rows


# --- The run ---------------------------------------------------------------------------------------------------------


def environment_summary(seconds: int, rounds: int) -> str:
    """What the figures depend on: the machine, the versions, the filesystem, the load before the run."""
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.splitlines()[0:1]
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    return "\n".join(
        [
            f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
            f"machine: {os.cpu_count()} cores, {platform.platform()}, load average {load} at start",
            f"python {platform.python_version()}, flask {version('flask')}, gunicorn {version('gunicorn')}, "
            f"psycopg {version('psycopg')}",
            f"wrk: {wrk_version[0] if wrk_version else '?'}",
            f"temporary files on: {_mount_of(Path(tempfile.gettempdir()))}",
            f"each run: {seconds:g} s measured after a 1 s warm-up; {rounds} rounds where rounds are named",
        ]
    )


def _mount_of(path: Path) -> str:
    """The mount holding ``path``: the longest mount point that is ``path`` or one of its parents."""
    folders = {path.resolve(), *path.resolve().parents}
    best = ("", "?")
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _, point, kind, options, *_ = line.split()
            if Path(point) in folders and len(point) > len(best[0]):
                best = (point, f"{point} {kind} ({options})")
    return best[1]


def progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


SECTIONS = ("round-trips", "postgres", "file")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=5, help="measured seconds per run (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the paired runs (default 3)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"some of {', '.join(SECTIONS)} (default all)")
    parser.add_argument(
        "--no-postgres", action="store_true", help="the file store only (goals 2, 3 and 5 need PostgreSQL)"
    )
    arguments = parser.parse_args(argv)
    sections = set(arguments.sections.split(","))
    if not sections <= set(SECTIONS):
        parser.error(f"--sections: choose among {', '.join(SECTIONS)}")
    if shutil.which("wrk") is None:
        print(f"bench: {WRK_INSTALL_HINT}", file=sys.stderr)
        return 2
    started = time.monotonic()
    print(environment_summary(arguments.seconds, arguments.rounds) + "\n")
    report = Report()
    with tempfile.TemporaryDirectory(prefix="ticketlock-bench-") as temporary:
        directory = Path(temporary)
        bench = Bench(arguments.seconds, arguments.rounds, directory)
        if "round-trips" in sections and not arguments.no_postgres:
            round_trips_section(report)
        if "postgres" in sections:
            modes_section(bench, report, with_postgres=not arguments.no_postgres)
        if "file" in sections:
            file_section(bench, report)
    goals = sorted(report.goals)  # by number, whatever order the sections ran in
    summary = ["| goal | measured | result |", "|---|---|---|", *(f"| {g} | {m} | {r} |" for g, m, r in goals)]
    print("## Goals\n\n" + "\n".join(summary) + "\n")
    print("\n\n".join(report.sections) + "\n")
    print("Commands:\n" + "\n".join(f"- {name}: `{command}`" for name, command in bench.commands.items()))
    print(f"\nbench took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
