"""Presenting a run: one verdict line per phase, a side-by-side table, the timelines, and the JSON document.

A phase is named by its mode, and "+pause" when its lease holder was stopped (``runner.Phase``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, TextIO

from loadtest.runner import Deployment, PhaseResult, RunResult
from loadtest.throughput import ThroughputResult
from loadtest.timeline import Bar, bars_from_orders, overlapping_pairs, refused_bars, render_text, shared_reads
from service.modes import MODES

CELL_WIDTH = 16  # "repeatable-read" and a space; wider when a phase's label is longer
TABLE_WIDTH = 120  # a side-by-side table wider than this is printed in blocks of modes


def verdict(label: str, phases: Sequence[PhaseResult], deployment: Deployment) -> str:
    """One line a learner can read: what the buyers were told, whether the store agrees, and whether that is what
    the mode promises where it ran (with the mode's lesson, the one-line why)."""
    first = phases[0].check
    head = f"{label.upper()}: {_count(first.buyers, 'buyer')}, {_count(first.tickets, 'ticket')}"
    if (pause := phases[0].pause) is not None:
        head += f", {pause.host} pid {pause.worker_pid} stopped {pause.ms:.0f} ms holding the lease"
    if len(phases) > 1:
        oversold = [phase.check.oversold for phase in phases]
        wrong = sum(1 for phase in phases if not phase.check.correct)
        head += f", {len(phases)} trials"
        if not wrong:
            outcome = f"correct in all {len(phases)}: never oversold"
        else:
            outcome = (
                f"anomalies in {wrong} of {len(phases)}; "
                f"oversold in {sum(1 for count in oversold if count)} (by {_span(oversold)})"
            )
        return f"{head} -> {outcome}, {_expectation(phases, deployment)}"
    told = f"{_count(first.ok, 'buyer')} {'was' if first.ok == 1 else 'were'} told they got a ticket"
    sold_out = phases[0].errors.get("sold_out", 0)
    told += f", {sold_out} {'was' if sold_out == 1 else 'were'} told sold out"
    refused = {error: count for error, count in phases[0].errors.items() if error != "sold_out"}
    if refused:
        told += ", " + ", ".join(f"{count} got {error}" for error, count in refused.items())
    if first.correct:
        outcome = "correct, nothing oversold"
    elif first.oversold:
        outcome = f"oversold by {first.oversold}"
    else:
        outcome = "; ".join(first.anomalies)
    return f"{head} -> {told}: {outcome}, {_expectation(phases, deployment)}"


def as_expected(phase: PhaseResult, deployment: Deployment) -> bool:
    """A mode that protects this deployment must be correct; one that does not is expected to oversell."""
    return phase.check.correct if deployment.expects_correct(phase) else phase.check.oversold > 0


def _expectation(phases: Sequence[PhaseResult], deployment: Deployment) -> str:
    lesson = MODES[phases[0].mode].lesson_for(lapsed=phases[0].lapsed)
    if all(as_expected(phase, deployment) for phase in phases):
        return f"as expected ({lesson})."
    if deployment.expects_correct(phases[0]):
        return f"NOT as expected: this mode must keep every buyer apart here ({lesson})."
    return f"not as expected: nothing in this mode prevents an oversell, it just did not happen ({lesson})."


ROWS: list[tuple[str, Callable[[PhaseResult], Any]]] = [
    ("race window (ms)", lambda phase: phase.race_window_ms),
    ("buyers", lambda phase: phase.check.buyers),
    ("tickets", lambda phase: phase.check.tickets),
    ("ok (told: you got one)", lambda phase: phase.check.ok),
    ("fail (told: no ticket)", lambda phase: phase.check.fail),
    ("info (outcome unknown)", lambda phase: phase.check.info),
    ("remaining", lambda phase: phase.check.remaining),
    ("orders recorded", lambda phase: phase.check.orders_recorded),
    ("oversold", lambda phase: phase.check.oversold),
    ("lost updates", lambda phase: phase.check.lost_updates),
    ("lost orders", lambda phase: len(phase.check.lost_orders)),
    ("unexpected orders", lambda phase: len(phase.check.unexpected_orders)),
    ("duplicate ids", lambda phase: len(phase.check.duplicate_ids)),
    ("conflicts retried", lambda phase: phase.check.retries),
    ("gave up (503)", lambda phase: phase.check.gave_up),
    ("hosts (distinct)", lambda phase: len({host for host, _ in phase.check.sellers})),
    ("workers (distinct pids)", lambda phase: len(phase.check.sellers)),
    ("sends spread over (ms)", lambda phase: round(phase.send_spread_ms)),
    ("throughput (req/s)", lambda phase: round(phase.throughput_rps)),
    ("latency p50 (ms)", lambda phase: round(phase.latency_ms.p50)),
    ("latency p90 (ms)", lambda phase: round(phase.latency_ms.p90)),
    ("latency p99 (ms)", lambda phase: round(phase.latency_ms.p99)),
    ("latency max (ms)", lambda phase: round(phase.latency_ms.max)),
    ("verdict", lambda phase: _cell_verdict(phase)),
]
# Shown when a lease phase ran: what the lease's lesson turns on.
LEASE_ROWS: list[tuple[str, Callable[[PhaseResult], Any]]] = [
    ("lease (ms)", lambda phase: phase.lease_ms if MODES[phase.mode].lapse else "-"),
    ("holder stopped (ms)", lambda phase: round(phase.pause.ms) if phase.pause else "-"),
    ("wrote after lease ran out", lambda phase: sum(bar.outlived_lease for bar in bars_from_orders(phase.orders))),
    ("stale writes refused", lambda phase: len(phase.refusals)),
]


def rows_for(result: RunResult) -> list[tuple[str, Callable[[PhaseResult], Any]]]:
    """The table's rows: the lease's own rows too when a lease phase ran."""
    leases = any(MODES[phase.mode].lapse for phase in result.phases)
    return ROWS[:-1] + LEASE_ROWS + ROWS[-1:] if leases else ROWS


def table(result: RunResult) -> str:
    """Every figure, one column per phase, in blocks that fit a terminal; several trials show ``min-max``."""
    labels = result.labels()
    rows = rows_for(result)
    cell_width = max(CELL_WIDTH, *(len(label) + 2 for label in labels))
    per_block = max(1, (TABLE_WIDTH - max(len(name) for name, _ in rows)) // cell_width)
    blocks = [labels[start : start + per_block] for start in range(0, len(labels), per_block)]
    return "\n\n".join(_table_block(result, block, rows, cell_width) for block in blocks)


def _table_block(
    result: RunResult, labels: list[str], rows: list[tuple[str, Callable[[PhaseResult], Any]]], cell_width: int
) -> str:
    name_width = max(len(name) for name, _ in rows)
    lines = [" " * name_width + "".join(f"{label:>{cell_width}}" for label in labels)]
    for name, figure in rows:
        cells = [_span([figure(phase) for phase in result.phases_for(label)]) for label in labels]
        lines.append(f"{name:<{name_width}}" + "".join(f"{cell:>{cell_width}}" for cell in cells))
    expected = ["correct" if _expected(result, label) == "correct" else "OVERSOLD" for label in labels]
    lines.append(f"{'expected':<{name_width}}" + "".join(f"{cell:>{cell_width}}" for cell in expected))
    return "\n".join(lines)


def _expected(result: RunResult, label: str) -> str:
    return "correct" if result.deployment.expects_correct(result.phases_for(label)[0]) else "oversold"


def phase_bars(phase: PhaseResult) -> list[Bar]:
    """The bars of a phase: its sales, and the stale writes its store refused."""
    return sorted(bars_from_orders(phase.orders) + refused_bars(phase.refusals), key=lambda bar: bar.read_at)


def timelines(result: RunResult) -> str:
    """The text timeline of each phase's first trial."""
    pictures = []
    for label in result.labels():
        phases = result.phases_for(label)
        title = label.upper() if len(phases) == 1 else f"{label.upper()} (trial 1 of {len(phases)})"
        bars = phase_bars(phases[0])
        pictures.append(render_text(title, bars, mode=phases[0].mode, hosts=result.deployment.hosts))
    return "\n\n".join(pictures)


def svg_sections(result: RunResult) -> list[tuple[str, Any, str]]:
    """(title, bars, mode) of each phase's first trial, for ``timeline.render_svg``."""
    sections = []
    for label in result.labels():
        phase = result.phases_for(label)[0]
        check = phase.check
        title = (
            f"{label.upper()}: {check.buyers} buyers, {check.tickets} tickets -> {check.ok} told success, "
            f"oversold by {check.oversold}, {len(check.sellers)} workers"
        )
        sections.append((title, phase_bars(phase), phase.mode))
    return sections


def print_report(result: RunResult, out: TextIO, *, show_timeline: bool = True, verbose: bool = False) -> None:
    """The whole human-readable report."""
    options = result.options
    deployment = result.deployment
    where = f"{_count(len(result.urls), 'embedded host')}" if result.embedded else "the service"
    print(f"ticketlock load test against {where} at {', '.join(result.urls)} ({result.store} store)", file=out)
    print(
        f"sold by {_count(deployment.processes, 'worker process', 'worker processes')} "
        f"on {_count(deployment.hosts, 'host')}",
        file=out,
    )
    print(
        f"{options.buyers} buyers released at once for {options.tickets} tickets, per phase; "
        f"{options.trials} trial(s) per mode\n",
        file=out,
    )
    print_verdicts(result, out)
    print("", file=out)
    print(table(result), file=out)
    if show_timeline:
        print("", file=out)
        print(timelines(result), file=out)
    if verbose:
        for phase in result.phases:
            print(f"\n{phase.label} #{phase.trial}: errors {phase.errors or 'none'}", file=out)
            for anomaly in phase.check.anomalies:
                print(f"  - {anomaly}", file=out)


def print_verdicts(result: RunResult, out: TextIO) -> None:
    """One verdict line per phase."""
    for label in result.labels():
        print(verdict(label, result.phases_for(label), result.deployment), file=out)


def to_json(result: RunResult, exit_status: int) -> dict[str, Any]:
    """The whole result as plain JSON data: options, every phase with its histories, and a summary per phase."""
    phases = []
    for phase in result.phases:
        data = asdict(phase)
        data["check"]["correct"] = phase.check.correct
        data["lapsed"] = phase.lapsed
        bars = bars_from_orders(phase.orders)
        data["timeline"] = {
            "overlapping_pairs": len(overlapping_pairs(bars)),
            "shared_reads": {str(count): len(group) for count, group in shared_reads(bars).items()},
        }
        phases.append(data)
    summary = {
        label: {
            "trials": len(result.phases_for(label)),
            "correct_trials": sum(1 for phase in result.phases_for(label) if phase.check.correct),
            "oversold_trials": sum(1 for phase in result.phases_for(label) if phase.check.oversold),
            "expected": _expected(result, label),
            "as_expected": all(as_expected(phase, result.deployment) for phase in result.phases_for(label)),
            "verdict": verdict(label, result.phases_for(label), result.deployment),
        }
        for label in result.labels()
    }
    return {
        "urls": result.urls,
        "embedded": result.embedded,
        "store": result.store,
        "deployment": asdict(result.deployment),
        "service_pids": result.service_pids,
        "options": asdict(result.options),
        "phases": phases,
        "summary": summary,
        "exit_status": exit_status,
    }


def _count(number: int, noun: str, plural: str = "") -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {plural or noun + 's'}"


def _cell_verdict(phase: PhaseResult) -> str:
    if phase.check.correct:
        return "correct"
    return "OVERSOLD" if phase.check.oversold else "ANOMALY"


def _span(values: Sequence[Any]) -> str:
    if not values:
        return "-"
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def throughput_table(results: Sequence[tuple[str, ThroughputResult]], race_window_ms: int) -> str:
    """One column per mode: requests/s, latency and what the requests got; the last mode against the first."""
    rows: list[tuple[str, Callable[[ThroughputResult], Any]]] = [
        ("requests/s", lambda result: round(result.requests_per_s)),
        ("answered", lambda result: result.answered),
        ("failed (no answer)", lambda result: result.failed),
        ("statuses", lambda result: " ".join(f"{code}:{n}" for code, n in sorted(result.statuses.items()))),
        ("latency p50 (ms)", lambda result: f"{result.latency_ms.p50:.1f}"),
        ("latency p90 (ms)", lambda result: f"{result.latency_ms.p90:.1f}"),
        ("latency p99 (ms)", lambda result: f"{result.latency_ms.p99:.1f}"),
        ("latency max (ms)", lambda result: f"{result.latency_ms.max:.1f}"),
        ("connections opened", lambda result: result.connections_opened),
        ("client CPU per request (us)", lambda result: round(result.client_cpu_s / max(result.requests, 1) * 1e6)),
    ]
    first = results[0][1]
    lines = [
        f"throughput of {first.method} {first.path} at {first.url}, race window {race_window_ms} ms, "
        f"{first.processes} client processes, {first.connections} connections, {first.duration_s:.1f} s per mode",
        "",
        " " * 28 + "".join(f"{mode:>16}" for mode, _ in results),
    ]
    lines += [f"{label:<28}" + "".join(f"{figure(result)!s:>16}" for _, result in results) for label, figure in rows]
    if len(results) > 1:
        (first_mode, base), (last_mode, last) = results[0], results[-1]
        ratio = last.requests_per_s / base.requests_per_s if base.requests_per_s else 0.0
        lines += ["", f"{last_mode} / {first_mode}: {ratio:.2f}x the requests/s"]
    return "\n".join(lines)
