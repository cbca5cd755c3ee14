"""The picture of the race: one lane per worker, one bar per sale, from reading the count to writing it back.

Drawn from what the server recorded in each order (``timing``, ``host`` and ``worker_pid``), as plain text for
the terminal and as a self-contained SVG file; with several hosts, each lane is one worker of one host.
Unlocked, bars of different workers overlap and several read the same count (each then wrote count - 1: one
ticket, sold several times); locked, they follow one another.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

TEXT_WIDTH = 64


@dataclass(frozen=True)
class Bar:
    """One sale's critical section, in epoch seconds."""

    host: str
    worker_pid: int
    buyer: str
    started_at: float
    read_at: float
    wrote_at: float
    count_read: int


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
                )
            )
        except (KeyError, TypeError, ValueError):
            continue
    return sorted(result, key=lambda bar: bar.read_at)


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
        by_count[bar.count_read].append(bar)
    return {count: group for count, group in sorted(by_count.items(), reverse=True) if len(group) > 1}


def lanes(bars: Sequence[Bar]) -> dict[str, list[Bar]]:
    """Bars grouped by worker, workers in the order of their first read, each named by its pid (and host)."""
    several_hosts = len({bar.host for bar in bars}) > 1
    grouped: dict[str, list[Bar]] = {}
    for bar in bars:
        name = f"{bar.host} pid {bar.worker_pid}" if several_hosts else f"pid {bar.worker_pid}"
        grouped.setdefault(name, []).append(bar)
    return grouped


def render_text(title: str, bars: Sequence[Bar], width: int = TEXT_WIDTH) -> str:
    """The timeline as ASCII: ``[N===]`` is a sale that read N; ``^N`` marks where several workers read N."""
    if not bars:
        return f"{title}: no sales to draw"
    start = min(bar.read_at for bar in bars)
    span = max(max(bar.wrote_at for bar in bars) - start, 1e-9)

    def column(moment: float) -> int:
        return round((moment - start) / span * (width - 1))

    lines = [f"{title}: one row per worker, one bar per sale, [N===] read N and wrote N-1 ({span * 1000:.0f} ms)"]
    grouped = lanes(bars)
    name_width = max(11, *(len(name) for name in grouped))
    for name, lane in grouped.items():
        row = ""
        for bar in lane:
            label = str(bar.count_read)
            begin = max(column(bar.read_at), len(row))
            length = max(column(bar.wrote_at) - begin + 1, len(label) + 2)
            row = row.ljust(begin) + "[" + label.ljust(length - 2, "=") + "]"
        lines.append(f"  {name:>{name_width}} |{row}")
    shared = shared_reads(bars)
    if shared:
        marks = ""
        for count, group in sorted(shared.items(), key=lambda item: item[1][0].read_at):
            marks = marks.ljust(max(column(group[0].read_at), len(marks) + 1 if marks else 0)) + f"^{count}"
        lines.append(f"  {'same read':>{name_width}} |{marks}")
        lines.append(
            f"  ^N: {len(shared)} counts were read by several workers at once; each of them wrote N-1, "
            "so one ticket was sold several times."
        )
    elif overlapping_pairs(bars):
        lines.append("  Sales overlapped, yet each decremented a different count: the store checked every write.")
    else:
        lines.append("  No two sales overlapped: each one read the count the previous one wrote.")
    return "\n".join(lines)


_PALETTE = ("#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#2ca02c")


def render_svg(sections: Sequence[tuple[str, Sequence[Bar]]]) -> str:
    """A self-contained SVG with one timeline per (title, bars) section, stacked top to bottom."""
    width, left, right, lane_height = 960, 150, 20, 26
    plot = width - left - right
    parts: list[str] = []
    y = 10
    for title, bars in sections:
        parts.append(f'<text x="10" y="{y + 16}" font-size="15" font-weight="bold">{escape(title)}</text>')
        y += 40
        if not bars:
            parts.append(f'<text x="{left}" y="{y + 14}" font-size="12">no sales to draw</text>')
            y += 30
            continue
        start = min(bar.started_at for bar in bars)
        span = max(max(bar.wrote_at for bar in bars) - start, 1e-9)

        def x(moment: float, start: float = start, span: float = span) -> float:
            return left + (moment - start) / span * plot

        shared = shared_reads(bars)
        colour = {count: _PALETTE[index % len(_PALETTE)] for index, count in enumerate(shared)}
        top = y
        for name, lane in lanes(bars).items():
            parts.append(f'<text x="10" y="{y + 17}" font-size="12">{escape(name)}</text>')
            parts.append(f'<line x1="{left}" x2="{left + plot}" y1="{y + 13}" y2="{y + 13}" stroke="#eee"/>')
            for bar in lane:
                fill = colour.get(bar.count_read, "#4878a8")
                begin, end = x(bar.read_at), max(x(bar.wrote_at), x(bar.read_at) + 2)
                parts.append(
                    f'<line x1="{x(bar.started_at):.1f}" x2="{begin:.1f}" y1="{y + 13}" y2="{y + 13}" '
                    'stroke="#999" stroke-dasharray="2,2"/>'
                )
                parts.append(
                    f'<rect x="{begin:.1f}" y="{y + 4}" width="{end - begin:.1f}" height="18" fill="{fill}" rx="2">'
                    f"<title>{escape(bar.buyer)}: read {bar.count_read}, wrote {bar.count_read - 1}</title></rect>"
                )
                if end - begin > 16:
                    parts.append(
                        f'<text x="{(begin + end) / 2:.1f}" y="{y + 17}" font-size="11" fill="white" '
                        f'text-anchor="middle">{bar.count_read}</text>'
                    )
            y += lane_height
        for count, group in shared.items():
            moment = x(min(bar.read_at for bar in group))
            parts.append(
                f'<line x1="{moment:.1f}" x2="{moment:.1f}" y1="{top - 4}" y2="{y}" stroke="{colour[count]}" '
                'stroke-dasharray="4,3"/>'
            )
            parts.append(
                f'<text x="{moment + 2:.1f}" y="{top - 6}" font-size="10" fill="{colour[count]}">'
                f"{len(group)}x read {count}</text>"
            )
        parts.append(
            f'<text x="{left}" y="{y + 14}" font-size="11" fill="#555">0 ms</text>'
            f'<text x="{left + plot}" y="{y + 14}" font-size="11" fill="#555" text-anchor="end">'
            f"{span * 1000:.0f} ms</text>"
        )
        legend = (
            f"{len(shared)} counts were read by several workers at once (same colour, dashed line): "
            "each wrote count - 1, so one ticket went to several buyers."
            if shared
            else "Sales overlapped, yet each decremented a different count: the store checked every write."
            if overlapping_pairs(bars)
            else "Bars never overlap: every sale read the count the previous sale wrote."
        )
        parts.append(f'<text x="{left}" y="{y + 30}" font-size="12">{escape(legend)}</text>')
        y += 50
    body = "\n".join(parts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y + 10}" '
        f'font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n{body}\n</svg>\n'
    )
