"""The picture of the race: one lane per worker, one bar per sale, from reading the count to writing it back.

Drawn from what the server recorded in each order (``timing``, ``host`` and ``worker_pid``), as plain text for
the terminal and as a self-contained SVG file; when several hosts ran, each lane is one worker of one host.
Unlocked, bars of different workers overlap and several read the same count (each then wrote count - 1: one
ticket, sold several times); locked, they follow one another. In the memory mode each worker counts down its
own copy, and the words say so: the store's count never moved. Under a lease, a sale that wrote after its lease
ran out is marked, and so is a stale write that a fencing store refused (``refused_bars``, from GET /refusals).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

from service.modes import MODES, Read

TEXT_WIDTH = 64
CHECKED_OVERLAP = "Sales overlapped, yet each decremented a different count: the store checked every write."
# What a bar is, and what several bars that read the same count mean: for the store's count, and for the memory
# mode's own copies (mode_words picks one).
COUNT_WORDS = ("read N and wrote N-1", "each of them wrote N-1, so one ticket was sold several times")
COPY_WORDS = (
    "sold ticket N from the worker's own copy of the count",
    "each sold ticket N from its own copy of the count, so one ticket was sold several times; the store's count "
    "never moved",
)


@dataclass(frozen=True)
class Bar:
    """One sale's critical section, in epoch seconds (for a refused write, ``wrote_at`` is when it was refused)."""

    host: str
    worker_pid: int
    buyer: str
    started_at: float
    read_at: float
    wrote_at: float
    count_read: int
    lease_until: float | None = None  # when the sale's lease ran out, under a lease
    refused: bool = False  # a stale write the store refused: nothing was sold

    @property
    def outlived_lease(self) -> bool:
        """Whether the sale wrote after its lease had run out: another holder may have had it meanwhile."""
        return not self.refused and self.lease_until is not None and self.wrote_at > self.lease_until


def bars_from_orders(orders: Iterable[dict[str, Any]]) -> list[Bar]:
    """The bars of every recorded order that carries timing, earliest read first."""
    result = []
    for order in orders:
        timing = order.get("timing") or {}
        try:
            result.append(
                Bar(
                    host=str(order.get("host", "")),
                    worker_pid=int(order["worker_pid"]),
                    buyer=str(order.get("buyer", "")),
                    started_at=float(timing["started_at"]),
                    read_at=float(timing["read_at"]),
                    wrote_at=float(timing["wrote_at"]),
                    count_read=int(order["remaining"]) + int(order.get("quantity", 1)),
                    lease_until=timing.get("lease_until"),
                )
            )
        except (KeyError, TypeError, ValueError):
            continue
    return sorted(result, key=lambda bar: bar.read_at)


def refused_bars(refusals: Iterable[dict[str, Any]]) -> list[Bar]:
    """The bars of the stale writes a fencing store refused (GET /refusals): from the read to the refusal."""
    return [
        Bar(
            host=str(refusal["host"]),
            worker_pid=int(refusal["worker_pid"]),
            buyer=str(refusal["buyer"]),
            started_at=float(refusal["started_at"]),
            read_at=float(refusal["read_at"]),
            wrote_at=float(refusal["refused_at"]),
            count_read=int(refusal["remaining"]) + int(refusal["quantity"]),
            lease_until=refusal.get("lease_until"),
            refused=True,
        )
        for refusal in refusals
    ]


def overlapping_pairs(bars: Sequence[Bar]) -> list[tuple[Bar, Bar]]:
    """Pairs of sales by different workers whose read -> write intervals intersect."""
    pairs = []
    for index, first in enumerate(bars):
        for second in bars[index + 1 :]:
            if second.read_at > first.wrote_at:
                break  # sorted by read_at: no later bar can overlap ``first``
            if (second.host, second.worker_pid) != (first.host, first.worker_pid):
                pairs.append((first, second))
    return pairs


def shared_reads(bars: Sequence[Bar]) -> dict[int, list[Bar]]:
    """For each count that more than one sale read, those sales: the lost updates, made visible."""
    by_count: dict[int, list[Bar]] = defaultdict(list)
    for bar in bars:
        if not bar.refused:
            by_count[bar.count_read].append(bar)
    return {count: group for count, group in sorted(by_count.items(), reverse=True) if len(group) > 1}


def mode_words(mode: str) -> tuple[str, str]:
    """(what a bar ``[N===]`` is, what several that read N mean) in ``mode``."""
    return COPY_WORDS if mode in MODES and MODES[mode].read is Read.MEMORY else COUNT_WORDS


def lanes(bars: Sequence[Bar], hosts: int | None = None) -> dict[str, list[Bar]]:
    """Bars grouped by worker, workers in the order of their first read, each named by its pid, and by its host
    when several hosts ran (``hosts``; None: when the bars come from several)."""
    several_hosts = (hosts or len({bar.host for bar in bars})) > 1
    grouped: dict[str, list[Bar]] = {}
    for bar in bars:
        name = f"{bar.host} pid {bar.worker_pid}" if several_hosts else f"pid {bar.worker_pid}"
        grouped.setdefault(name, []).append(bar)
    return grouped


def render_text(
    title: str, bars: Sequence[Bar], width: int = TEXT_WIDTH, *, mode: str = "", hosts: int | None = None
) -> str:
    """The timeline as ASCII: ``[N===]`` is a sale that read N; ``^N`` marks where several workers read N. The words
    fit ``mode``; a host column is drawn when ``hosts`` ran (None: when the bars come from several)."""
    if not bars:
        return f"{title}: no sales to draw"
    start = min(bar.read_at for bar in bars)
    span = max(max(bar.wrote_at for bar in bars) - start, 1e-9)
    bar_words, shared_words = mode_words(mode)

    def column(moment: float) -> int:
        return round((moment - start) / span * (width - 1))

    lines = [f"{title}: one row per worker, one bar per sale, [N===] {bar_words} ({span * 1000:.0f} ms)"]
    grouped = lanes(bars, hosts)
    name_width = max(11, *(len(name) for name in grouped))
    for name, lane in grouped.items():
        row = ""
        for bar in lane:
            label = str(bar.count_read)
            begin = max(column(bar.read_at), len(row))
            length = max(column(bar.wrote_at) - begin + 1, len(label) + 2)
            body, end = ("-", "x") if bar.refused else ("=", "!" if bar.outlived_lease else "]")
            row = row.ljust(begin) + "[" + label.ljust(length - 2, body) + end
        lines.append(f"  {name:>{name_width}} |{row}")
    lines += _lease_notes(bars)
    shared = shared_reads(bars)
    if shared:
        marks = ""
        for count, group in sorted(shared.items(), key=lambda item: item[1][0].read_at):
            marks = marks.ljust(max(column(group[0].read_at), len(marks) + 1 if marks else 0)) + f"^{count}"
        lines.append(f"  {'same read':>{name_width}} |{marks}")
        lines.append(f"  ^N: {_counts_were(len(shared))} read by several workers at once; {shared_words}.")
    elif overlapping_pairs(bars):
        lines.append(f"  {CHECKED_OVERLAP}")
    else:
        lines.append("  No two sales overlapped: each one read the count the previous one wrote.")
    return "\n".join(lines)


def _lease_notes(bars: Sequence[Bar]) -> list[str]:
    """The key to a lease's marks, for the marks the picture shows."""
    notes = []
    if any(bar.outlived_lease for bar in bars):
        notes.append("  [N===!: wrote after its lease ran out, while another worker held the lease.")
    if any(bar.refused for bar in bars):
        notes.append("  [N---x: a stale write the store refused: a newer lease token had claimed the count since.")
    return notes


_PALETTE = ("#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#2ca02c")
_UNSHARED = "#4878a8"  # a bar whose count no other sale read
_REFUSED = "#bbbbbb"  # a stale write the store refused
SVG_WIDTH, SVG_LEFT, SVG_RIGHT, SVG_LANE_HEIGHT = 960, 150, 20, 26
SVG_PLOT = SVG_WIDTH - SVG_LEFT - SVG_RIGHT


@dataclass(frozen=True)
class _TimeAxis:
    """A section's time axis: from its first sale's start to its last write, across the plot."""

    start: float
    span: float

    @classmethod
    def of(cls, bars: Sequence[Bar]) -> _TimeAxis:
        start = min(bar.started_at for bar in bars)
        return cls(start, max(max(bar.wrote_at for bar in bars) - start, 1e-9))

    def x(self, moment: float) -> float:
        """The x coordinate of ``moment`` (epoch seconds)."""
        return SVG_LEFT + (moment - self.start) / self.span * SVG_PLOT


def render_svg(sections: Sequence[tuple[str, Sequence[Bar], str]], hosts: int | None = None) -> str:
    """A self-contained SVG with one timeline per (title, bars, mode) section, stacked top to bottom; a lane's
    name has its host when ``hosts`` ran (None: when its section's bars come from several)."""
    parts: list[str] = []
    y = 10
    for title, bars, mode in sections:
        drawn, y = _svg_section(title, bars, mode, hosts, y)
        parts += drawn
    body = "\n".join(parts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_WIDTH}" height="{y + 10}" '
        f'font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n{body}\n</svg>\n'
    )


def _svg_section(title: str, bars: Sequence[Bar], mode: str, hosts: int | None, y: int) -> tuple[list[str], int]:
    """One section drawn from height ``y`` down: its title, a lane per worker, a dashed line at each count that
    several sales read, the time axis and a legend; and the height where the next section starts."""
    parts = [f'<text x="10" y="{y + 16}" font-size="15" font-weight="bold">{escape(title)}</text>']
    y += 40
    if not bars:
        parts.append(f'<text x="{SVG_LEFT}" y="{y + 14}" font-size="12">no sales to draw</text>')
        return parts, y + 30
    axis = _TimeAxis.of(bars)
    shared = shared_reads(bars)
    colour = {count: _PALETTE[index % len(_PALETTE)] for index, count in enumerate(shared)}
    top = y
    for name, lane in lanes(bars, hosts).items():
        parts.append(f'<text x="10" y="{y + 17}" font-size="12">{escape(name)}</text>')
        parts.append(f'<line x1="{SVG_LEFT}" x2="{SVG_LEFT + SVG_PLOT}" y1="{y + 13}" y2="{y + 13}" stroke="#eee"/>')
        for bar in lane:
            parts += _svg_bar(bar, axis, y, colour.get(bar.count_read, _UNSHARED))
        y += SVG_LANE_HEIGHT
    for count, group in shared.items():
        parts += _svg_shared_read(count, group, axis.x(min(bar.read_at for bar in group)), colour[count], top, y)
    parts.append(
        f'<text x="{SVG_LEFT}" y="{y + 14}" font-size="11" fill="#555">0 ms</text>'
        f'<text x="{SVG_LEFT + SVG_PLOT}" y="{y + 14}" font-size="11" fill="#555" text-anchor="end">'
        f"{axis.span * 1000:.0f} ms</text>"
    )
    legend = _svg_legend(bars, shared, mode)
    parts.append(f'<text x="{SVG_LEFT}" y="{y + 30}" font-size="12">{escape(legend)}</text>')
    return parts, y + 50


def _svg_bar(bar: Bar, axis: _TimeAxis, y: int, fill: str) -> list[str]:
    """One sale in its lane at height ``y``: a dotted wait from its start to its read, then a bar to its write,
    labelled with the count it read when there is room."""
    begin, end = axis.x(bar.read_at), max(axis.x(bar.wrote_at), axis.x(bar.read_at) + 2)
    if bar.refused:
        fill, what = _REFUSED, "its write was refused: a newer lease token had claimed the count"
    else:
        what = f"wrote {bar.count_read - 1}" + (", after its lease ran out" if bar.outlived_lease else "")
    outline = ' stroke="#d62728" stroke-width="2"' if bar.outlived_lease or bar.refused else ""
    parts = [
        f'<line x1="{axis.x(bar.started_at):.1f}" x2="{begin:.1f}" y1="{y + 13}" y2="{y + 13}" '
        'stroke="#999" stroke-dasharray="2,2"/>',
        f'<rect x="{begin:.1f}" y="{y + 4}" width="{end - begin:.1f}" height="18" fill="{fill}" rx="2"{outline}>'
        f"<title>{escape(bar.buyer)}: read {bar.count_read}, {what}</title></rect>",
    ]
    if end - begin > 16:
        parts.append(
            f'<text x="{(begin + end) / 2:.1f}" y="{y + 17}" font-size="11" fill="white" '
            f'text-anchor="middle">{bar.count_read}</text>'
        )
    return parts


def _svg_shared_read(count: int, group: Sequence[Bar], moment: float, colour: str, top: int, bottom: int) -> list[str]:
    """A dashed line across the lanes at ``moment``, where the first of ``group`` read ``count``, and its label."""
    return [
        f'<line x1="{moment:.1f}" x2="{moment:.1f}" y1="{top - 4}" y2="{bottom}" stroke="{colour}" '
        'stroke-dasharray="4,3"/>',
        f'<text x="{moment + 2:.1f}" y="{top - 6}" font-size="10" fill="{colour}">{len(group)}x read {count}</text>',
    ]


def _svg_legend(bars: Sequence[Bar], shared: dict[int, list[Bar]], mode: str) -> str:
    """What the section shows, in one sentence."""
    if shared:
        return (
            f"{_counts_were(len(shared))} read by several workers at once (same colour, dashed line): "
            f"{mode_words(mode)[1].replace('N-1', 'count - 1')}."
        )
    if overlapping_pairs(bars):
        return CHECKED_OVERLAP
    return "Bars never overlap: every sale read the count the previous sale wrote."


def _counts_were(number: int) -> str:
    return "1 count was" if number == 1 else f"{number} counts were"
