"""What a demo's load tester must print: one verdict per mode, expected from the modes table (service/modes.py).

A mode that keeps every buyer of the demo apart (``Mode.holds_for`` its hosts and worker processes, and whether its
race window outlives a lease) must be correct, any other must oversell, and the load tester must say either was as
expected (its own "NOT as expected" fails the check). A mode added to the table needs nothing here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from service.modes import TABLE

VERDICT = re.compile(r"^(?P<mode>[A-Z-]+): \d+ buyers.*$", re.MULTILINE)
OUTCOME = {  # by whether the mode holds: what it must be, and how the load tester says so
    True: ("correct", re.compile(r": correct, nothing oversold, as expected \(")),
    False: ("oversold", re.compile(r" oversold by \d+, as expected \(")),
}


def verdict_lines(report: str) -> dict[str, str]:
    """The load tester's verdict line for each mode in ``report``, by the mode's name in the table."""
    return {match["mode"].lower(): match[0] for match in VERDICT.finditer(report)}


def expected_outcome(mode: str, hosts: int, workers: int, lapsed: bool) -> tuple[str, re.Pattern[str]]:
    """What ``mode`` must be on ``hosts`` hosts of ``workers`` worker processes each (a lease holder outliving its
    lease when ``lapsed``), and how a verdict says so."""
    rows = {row.name: row for row in TABLE}
    assert mode in rows, f"the load tester ran {mode}, a mode that service/modes.py does not list"
    return OUTCOME[rows[mode].holds_for(hosts, hosts * workers, lapsed=lapsed)]


def check_verdicts(report: str, required: Iterable[str], hosts: int, workers: int, lapsed: bool) -> None:
    """Every mode of ``required`` has a verdict in ``report``, and every verdict is the one the table expects."""
    lines = verdict_lines(report)
    print(f"  verdicts on {hosts} host(s) of {workers} workers:", *lines.values(), sep="\n  ")
    missing = [mode for mode in required if mode not in lines]
    assert not missing, f"the load tester printed no verdict for {', '.join(missing)}"
    for mode, line in lines.items():
        outcome, says_so = expected_outcome(mode, hosts, workers, lapsed)
        assert says_so.search(line), (
            f"{mode.upper()} was not {outcome} as expected on {hosts} host(s) of {workers} workers: {line}"
        )
