"""Presenting a run: one verdict line per mode, a side-by-side table, the timelines, and the JSON document."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, TextIO

from loadtest.runner import Deployment, PhaseResult, RunResult
from loadtest.throughput import ThroughputResult
from loadtest.timeline import bars_from_orders, overlapping_pairs, render_text, shared_reads
from service.modes import MODES

CELL_WIDTH = 16  # "repeatable-read" and a space
TABLE_WIDTH = 120  # a side-by-side table wider than this is printed in blocks of modes


def modes_in(result: RunResult) -> list[str]:
    """The modes of the run, in the order they ran."""
    return list(dict.fromkeys(phase.mode for phase in result.phases))


def verdict(mode: str, phases: Sequence[PhaseResult], deployment: Deployment) -> str:
    """One line a learner can read: what the buyers were told, whether the store agrees, and whether that is what
    the mode promises where it ran (with the mode's lesson, the one-line why)."""
    first = phases[0].check
    head = f"{mode.upper()}: {_count(first.buyers, 'buyer')}, {_count(first.tickets, 'ticket')}"
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
        return f"{head} -> {outcome}, {_expectation(mode, phases, deployment)}"
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
    return f"{head} -> {told}: {outcome}, {_expectation(mode, phases, deployment)}"


def as_expected(phase: PhaseResult, deployment: Deployment) -> bool:
    """A mode that protects this deployment must be correct; one that does not is expected to oversell."""
    return phase.check.correct if deployment.expects_correct(phase.mode) else phase.check.oversold > 0


def _expectation(mode: str, phases: Sequence[PhaseResult], deployment: Deployment) -> str:
    lesson = MODES[mode].lesson
    if all(as_expected(phase, deployment) for phase in phases):
        return f"as expected ({lesson})."
    if deployment.expects_correct(mode):
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


def table(result: RunResult) -> str:
    """Every figure, one column per mode, in blocks that fit a terminal; several trials show ``min-max``."""
    modes = modes_in(result)
    per_block = max(1, (TABLE_WIDTH - max(len(label) for label, _ in ROWS)) // CELL_WIDTH)
    blocks = [modes[start : start + per_block] for start in range(0, len(modes), per_block)]
    return "\n\n".join(_table_block(result, block) for block in blocks)


def _table_block(result: RunResult, modes: list[str]) -> str:
    label_width = max(len(label) for label, _ in ROWS)
    header = " " * label_width + "".join(f"{mode:>{CELL_WIDTH}}" for mode in modes)
    lines = [header]
    for label, figure in ROWS:
        cells = [_span([figure(phase) for phase in result.phases_for(mode)]) for mode in modes]
        lines.append(f"{label:<{label_width}}" + "".join(f"{cell:>{CELL_WIDTH}}" for cell in cells))
    expected = ["correct" if result.deployment.expects_correct(mode) else "OVERSOLD" for mode in modes]
    lines.append(f"{'expected':<{label_width}}" + "".join(f"{cell:>{CELL_WIDTH}}" for cell in expected))
    return "\n".join(lines)


def timelines(result: RunResult) -> str:
    """The text timeline of each mode's first trial."""
    pictures = []
    for mode in modes_in(result):
        phases = result.phases_for(mode)
        title = mode.upper() if len(phases) == 1 else f"{mode.upper()} (trial 1 of {len(phases)})"
        bars = bars_from_orders(phases[0].orders)
        pictures.append(render_text(title, bars, mode=mode, hosts=result.deployment.hosts))
    return "\n\n".join(pictures)


def svg_sections(result: RunResult) -> list[tuple[str, Any, str]]:
    """(title, bars, mode) of each mode's first trial, for ``timeline.render_svg``."""
    sections = []
    for mode in modes_in(result):
        phase = result.phases_for(mode)[0]
        check = phase.check
        title = (
            f"{mode.upper()}: {check.buyers} buyers, {check.tickets} tickets -> {check.ok} told success, "
            f"oversold by {check.oversold}, {len(check.sellers)} workers"
        )
        sections.append((title, bars_from_orders(phase.orders), mode))
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
            print(f"\n{phase.mode} #{phase.trial}: errors {phase.errors or 'none'}", file=out)
            for anomaly in phase.check.anomalies:
                print(f"  - {anomaly}", file=out)


def print_verdicts(result: RunResult, out: TextIO) -> None:
    """One verdict line per mode."""
    for mode in modes_in(result):
        print(verdict(mode, result.phases_for(mode), result.deployment), file=out)


def to_json(result: RunResult, exit_status: int) -> dict[str, Any]:
    """The whole result as plain JSON data: options, every phase with its histories, and a summary per mode."""
    phases = []
    for phase in result.phases:
        data = asdict(phase)
        data["check"]["correct"] = phase.check.correct
        bars = bars_from_orders(phase.orders)
        data["timeline"] = {
            "overlapping_pairs": len(overlapping_pairs(bars)),
            "shared_reads": {str(count): len(group) for count, group in shared_reads(bars).items()},
        }
        phases.append(data)
    summary = {
        mode: {
            "trials": len(result.phases_for(mode)),
            "correct_trials": sum(1 for phase in result.phases_for(mode) if phase.check.correct),
            "oversold_trials": sum(1 for phase in result.phases_for(mode) if phase.check.oversold),
            "expected": "correct" if result.deployment.expects_correct(mode) else "oversold",
            "as_expected": all(as_expected(phase, result.deployment) for phase in result.phases_for(mode)),
            "verdict": verdict(mode, result.phases_for(mode), result.deployment),
        }
        for mode in modes_in(result)
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
