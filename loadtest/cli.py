"""The ``ticketlock-loadtest`` command line: parse arguments, run, report, and exit with a meaningful status.

Exit status: 0 when every mode that protects the deployment (service/modes.py) was correct; 1 when one of them
shows an anomaly (or, with ``--require-oversell``, when a mode that does not protect it did not oversell);
2 for usage errors or an unreachable service.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from loadtest.client import ServiceError, ServiceUnreachable
from loadtest.cluster import STORES
from loadtest.report import as_expected, print_report, print_verdicts, svg_sections, throughput_table, to_json
from loadtest.runner import LoadOptions, RunResult, modes_to_run, open_target, run
from loadtest.throughput import ThroughputOptions, measure_modes
from loadtest.timeline import render_svg
from service.config import MAX_RACE_WINDOW_MS
from service.modes import MODES

EXIT_CORRECT, EXIT_ANOMALY, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``ticketlock-loadtest`` and ``python -m loadtest``."""
    # SIGTERM unwinds like Ctrl-C, so the embedded service is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(cli(argv, sys.stdout, sys.stderr))


def cli(argv: Sequence[str] | None, out: TextIO, err: TextIO) -> int:
    """Run the command line and return its exit status (``main`` without ``sys.exit``, for tests)."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    try:
        options = options_from(arguments)
    except ValueError as error:
        parser.error(str(error))
    if arguments.throughput is not None:
        return throughput_cli(arguments, options, out, err)
    progress = None if arguments.quiet or arguments.json else Progress(err)
    try:
        result = run(options, progress, starting=lambda: say_it_resets(options, err))
    except (ServiceUnreachable, ServiceError, RuntimeError, ValueError) as error:
        print(f"ticketlock-loadtest: {error}", file=err)
        return EXIT_USAGE
    status = exit_status(result, require_oversell=arguments.require_oversell)
    for reason in failure_reasons(result, require_oversell=arguments.require_oversell):
        print(f"ticketlock-loadtest: {reason}", file=err)
    if arguments.svg:
        try:
            arguments.svg.write_text(render_svg(svg_sections(result), hosts=result.deployment.hosts))
        except OSError as error:
            print(f"ticketlock-loadtest: cannot write {arguments.svg}: {error.strerror}", file=err)
            return EXIT_USAGE
    if arguments.json:
        json.dump(to_json(result, status), out, indent=2, ensure_ascii=False)
        out.write("\n")
    elif arguments.quiet:
        print_verdicts(result, out)
    else:
        print_report(result, out, show_timeline=not arguments.no_timeline, verbose=arguments.verbose)
        if arguments.svg:
            print(f"\ntimeline written to {arguments.svg}", file=out)
    return status


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; ``--help`` documents every option."""
    parser = argparse.ArgumentParser(
        prog="ticketlock-loadtest",
        description="Fire concurrent buyers at the booking API, one phase per mode, and check every outcome. "
        "Without --url it starts its own service (gunicorn, 4 workers, a temporary db.json) and stops it after; "
        "with --hosts 3 --store postgres, three such hosts on one throwaway PostgreSQL.",
        epilog="Exit status: 0 when every mode that protects the deployment was correct; 1 when one of them shows "
        "an anomaly, or with --require-oversell when a mode that does not protect it did not oversell; 2 for "
        "usage errors and an unreachable service. With --url, each phase resets that service's store "
        "(POST /reset) and sets its mode.",
    )
    _add_target_arguments(parser)
    _add_load_arguments(parser)
    _add_output_arguments(parser)
    parser.add_argument(
        "--require-oversell",
        action="store_true",
        help="exit 1 if a mode that does not protect the deployment (unlocked; locked across hosts; ...) did not "
        "oversell",
    )
    _add_throughput_arguments(parser)
    return parser


def _add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the buyers go: running services (--url), or embedded hosts and their store."""
    where = parser.add_argument_group("target")
    where.add_argument(
        "--url",
        nargs="+",
        default=[],
        metavar="URL",
        help="running services, e.g. http://127.0.0.1:8000, whose store it resets: several hosts of one store, or "
        "a load balancer; buyers go to them round-robin (default: start embedded hosts)",
    )
    where.add_argument("--token", help="admin token for PUT /mode and POST /reset, if the service needs one")
    where.add_argument("--hosts", type=int, default=1, help="embedded hosts, each its own gunicorn (default 1)")
    where.add_argument(
        "--store",
        choices=STORES,
        default="file",
        help="store of the embedded hosts: db.json, or a throwaway PostgreSQL from the OS's binaries (default file)",
    )
    where.add_argument("--workers", type=int, default=4, help="workers of each embedded host (default 4)")


def _add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """How many buyers, tickets and trials, in which modes, with which race window."""
    load = parser.add_argument_group("load")
    load.add_argument("--buyers", type=int, default=100, help="buyers per phase (default 100)")
    load.add_argument("--tickets", type=int, default=10, help="tickets per phase (default 10)")
    load.add_argument("--concurrency", type=int, help="buyers in flight at once (default: all of them)")
    load.add_argument(
        "--modes",
        default="",
        help=f"phases to run, comma-separated, or 'all' (of {', '.join(MODES)}; "
        "default: unlocked,locked on the file store, all on postgres)",
    )
    load.add_argument("--trials", type=int, default=1, help="repeat each phase and aggregate (default 1)")
    load.add_argument("--race-window-ms", type=int, help="set the service's race window (default: keep its own)")
    load.add_argument(
        "--timeout", type=float, default=10.0, help="seconds before a request counts as unknown (default 10)"
    )
    load.add_argument(
        "--pause-holder",
        type=int,
        metavar="MS",
        help="in each lease phase, stop the worker holding the lease with SIGSTOP for MS ms, then SIGCONT (embedded "
        "hosts only; longer than the lease, shorter than gunicorn's worker timeout; default on embedded hosts with "
        "a lock service: the lease modes once more, paused twice the lease)",
    )


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """What is printed or written: JSON, an SVG, the timelines, the verdicts only, or more detail."""
    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print the whole result as one JSON document")
    output.add_argument("--svg", type=Path, help="also write the timeline of each phase to this SVG file")
    output.add_argument("--no-timeline", action="store_true", help="leave the text timelines out")
    output.add_argument("-q", "--quiet", action="store_true", help="print only the verdict lines")
    output.add_argument("-v", "--verbose", action="store_true", help="also print errors and anomalies per phase")


def _add_throughput_arguments(parser: argparse.ArgumentParser) -> None:
    """``--throughput``: each mode's requests/s instead of the buyers' phases, and the connections that send them."""
    speed = parser.add_argument_group("throughput (instead of the buyers' phases)")
    speed.add_argument(
        "--throughput",
        type=float,
        metavar="SECONDS",
        help="measure requests/s of each mode for SECONDS, on a store that cannot sell out, with the race "
        "window at 0 unless --race-window-ms is given",
    )
    speed.add_argument("--connections", type=int, default=16, help="connections in all (default 16)")
    speed.add_argument("--processes", type=int, default=2, help="client processes (default 2)")


def throughput_cli(arguments: argparse.Namespace, options: LoadOptions, out: TextIO, err: TextIO) -> int:
    """``--throughput``: each mode's requests/s and latency, measured like wrk, from several processes."""
    window = 0 if options.race_window_ms is None else options.race_window_ms
    try:
        with open_target(options) as target:
            client = target.clients[0]
            _, modes = modes_to_run(client.modes(), options.modes)
            say_it_resets(options, err)
            speed = ThroughputOptions(
                client.base_url,
                duration_s=arguments.throughput,
                processes=arguments.processes,
                connections=arguments.connections,
                timeout_s=options.timeout_s,
            )
            if not arguments.quiet and not arguments.json:
                print(f"measuring {', '.join(modes)} for {arguments.throughput:g} s each", file=err)
            results = measure_modes(client, modes, speed, window)
    except (ServiceUnreachable, ServiceError, RuntimeError, ValueError) as error:
        print(f"ticketlock-loadtest: {error}", file=err)
        return EXIT_USAGE
    if arguments.json:
        document = {"url": speed.url, "race_window_ms": window, "modes": {m: asdict(r) for m, r in results}}
        json.dump(document, out, indent=2)
        out.write("\n")
    else:
        print(throughput_table(results, window), file=out)
    return EXIT_CORRECT


def say_it_resets(options: LoadOptions, err: TextIO) -> None:
    """Before the first phase, against running services: what the run does to them."""
    if options.urls:
        print(
            f"ticketlock-loadtest: this resets {', '.join(options.urls)} before each phase (POST /reset): every "
            "order recorded there is cleared, and its mode is switched",
            file=err,
            flush=True,
        )


def options_from(arguments: argparse.Namespace) -> LoadOptions:
    """Check the arguments and turn them into LoadOptions (ValueError with a clear message)."""
    modes = tuple(mode.strip() for mode in arguments.modes.split(",") if mode.strip())
    if modes != ("all",) and any(mode not in MODES for mode in modes):
        raise ValueError(f"--modes takes 'all' or a comma-separated list of {', '.join(MODES)}")
    for name in ("buyers", "trials", "workers", "hosts"):
        if getattr(arguments, name) < 1:
            raise ValueError(f"--{name} must be at least 1")
    if arguments.tickets < 0:
        raise ValueError("--tickets must not be negative")
    if arguments.concurrency is not None and arguments.concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    if arguments.race_window_ms is not None and not 0 <= arguments.race_window_ms <= MAX_RACE_WINDOW_MS:
        raise ValueError(f"--race-window-ms must be 0..{MAX_RACE_WINDOW_MS}")
    if arguments.timeout <= 0:
        raise ValueError("--timeout must be positive")
    if arguments.throughput is not None and arguments.throughput <= 0:
        raise ValueError("--throughput must be a positive number of seconds")
    if arguments.processes < 1 or arguments.connections < arguments.processes:
        raise ValueError("--processes must be at least 1 and --connections at least --processes")
    if any(not url.startswith(("http://", "https://")) for url in arguments.url):
        raise ValueError("--url must start with http:// or https://")
    if arguments.url and (arguments.hosts != 1 or arguments.store != "file"):
        raise ValueError("--hosts and --store describe embedded hosts: leave them out with --url")
    if arguments.hosts > 1 and arguments.store != "postgres":
        raise ValueError("--hosts above 1 needs --store postgres: hosts share one database, never one db.json")
    if arguments.pause_holder is not None and (arguments.url or arguments.pause_holder < 1):
        raise ValueError("--pause-holder takes a positive number of ms, and stops a worker of the embedded hosts only")
    if arguments.svg is not None and not arguments.svg.resolve().parent.is_dir():
        raise ValueError(f"--svg: the folder of {arguments.svg} does not exist")
    return LoadOptions(
        urls=tuple(arguments.url),
        token=arguments.token,
        hosts=arguments.hosts,
        store=arguments.store,
        workers=arguments.workers,
        buyers=arguments.buyers,
        tickets=arguments.tickets,
        concurrency=arguments.concurrency,
        modes=modes,
        trials=arguments.trials,
        race_window_ms=arguments.race_window_ms,
        timeout_s=arguments.timeout,
        pause_holder_ms=arguments.pause_holder,
    )


def exit_status(result: RunResult, *, require_oversell: bool = False) -> int:
    """0 if every protecting mode is correct (and, if required, every other mode oversold), else 1."""
    return EXIT_ANOMALY if failure_reasons(result, require_oversell=require_oversell) else EXIT_CORRECT


def failure_reasons(result: RunResult, *, require_oversell: bool = False) -> list[str]:
    """Why the run fails, one sentence per failing phase; empty when it passes."""
    deployment = result.deployment
    where = f"{deployment.processes} worker processes on {deployment.hosts} host(s)"
    reasons = []
    for phase in result.phases:
        if as_expected(phase, deployment):
            continue
        if deployment.expects_correct(phase):
            reasons.append(
                f"{phase.label} trial {phase.trial} is not correct with {where}: {'; '.join(phase.check.anomalies)}"
            )
        elif require_oversell:
            reasons.append(
                f"--require-oversell: {phase.label} trial {phase.trial} did not oversell with {where} "
                "(one worker hides the race: use more --workers, or a longer --race-window-ms)"
            )
    return reasons


class Progress:
    """Shows how many buyers have answered: a live counter on a terminal, plain lines otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.started: dict[str, float] = {}
        self.shown_at = 0.0
        self.lock = threading.Lock()  # buyer threads report at the same time

    def __call__(self, label: str, answered: int, buyers: int) -> None:
        with self.lock:
            self._show(label, answered, buyers)

    def _show(self, label: str, answered: int, buyers: int) -> None:
        now = time.monotonic()
        if answered == 0:
            self.started[label] = now
            if not self.live:
                print(f"{label}: releasing {buyers} buyers", file=self.stream, flush=True)
            return
        finished = answered == buyers
        if self.live and (finished or now - self.shown_at > 0.1):
            self.shown_at = now
            self.stream.write(f"\r{label}: {answered}/{buyers} buyers answered")
            if finished:
                self.stream.write("\n")
            self.stream.flush()
        elif finished:
            elapsed = now - self.started.get(label, now)
            print(f"{label}: {buyers} buyers answered in {elapsed:.2f} s", file=self.stream, flush=True)
