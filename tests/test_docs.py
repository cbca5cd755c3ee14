"""The README and docs/ say what the code does: the configuration table is the declared settings, every link
leads somewhere, and the transcripts shown are what a real run prints today."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from loadtest.embedded import EmbeddedService
from service.config import configuration_table
from service.modes import MODES
from tests.conftest import ROOT, run_cli

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_readme_configuration_table_is_the_declared_settings() -> None:
    # To refresh it: .venv/bin/python -c 'from service.config import configuration_table; print(configuration_table())'
    readme = (ROOT / "README.md").read_text()

    assert configuration_table() in readme, configuration_table()


def test_the_readmes_critical_section_is_the_code_and_names_every_guard() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## From the route to the critical section") :]
    snippet = section[section.index("```python") : section.index("```", section.index("```python") + 3)]
    code = (ROOT / "service" / "purchase.py").read_text()
    code_lines = {line.strip() for line in code.splitlines()}
    listed = set(re.findall(r"`(\w+)`", section[: section.index("| file |")]))

    missing = [line.strip() for line in snippet.splitlines()[1:] if line.strip() and "..." not in line]
    assert [line for line in missing if line not in code_lines] == []
    assert {type(mode.guard).__name__ for mode in MODES.values()} <= listed


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page: Path) -> None:
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor:
            assert anchor in _anchors(linked), f"{page.name} links to #{anchor}, not a heading of {linked.name}"


def test_the_readme_links_every_docs_page() -> None:
    readme = (ROOT / "README.md").read_text()

    assert {page.name for page in PAGES[1:]} <= {Path(target).name for target in LINK.findall(readme)}


# --- Transcripts: what the pages show is what a real run prints ------------------------------------------------------

VOLATILE = {"order_id", "worker_pid", "host", "started_at", "read_at", "wrote_at"}  # differ from run to run


def _console_steps(page: Path) -> list[tuple[str, list[str]]]:
    """Each ``$ command`` of the page's console blocks, with the lines shown as its output."""
    steps: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", page.read_text(), re.DOTALL):
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append((line.removeprefix("$ "), []))
            else:
                steps[-1][1].append(line)
    return steps


def _masked(value: Any) -> Any:
    """A JSON answer with what differs from run to run masked, each object as its (key, value) pairs in order."""
    if isinstance(value, dict):
        return [(key, "..." if key in VOLATILE else _masked(item)) for key, item in value.items()]
    if isinstance(value, list):
        return [_masked(item) for item in value]
    return value


def test_the_curl_session_of_the_api_page_is_what_a_live_service_answers(tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        reason = "curl is not installed (apt-get install curl): the API page's session cannot be run again"
        pytest.fail(f"CI=true: {reason}") if os.environ.get("CI") == "true" else pytest.skip(reason)
    steps = _console_steps(ROOT / "docs" / "api.md")
    with EmbeddedService(workers=4, directory=tmp_path) as service:  # the defaults, as `make serve` starts
        address = service.url.removeprefix("http://")
        for command, shown in steps:
            arguments = shlex.split(command.replace("localhost:8000", address))
            output = subprocess.run(arguments, capture_output=True, text=True, timeout=30, check=True).stdout
            answer = output.replace("\r", "").splitlines()
            bodies = [_masked(json.loads(line)) for line in answer if line.startswith("{")]
            assert bodies == [_masked(json.loads(line)) for line in shown if line.startswith("{")], command
            assert {line for line in shown if not line.startswith("{")} <= set(answer), command  # curl -i's lines
    assert len(steps) >= 15


LANE = re.compile(r"^ +[\w -]+ \|")  # a timeline's row ("    pid 20535 |[10==] ..."): drawn differently every run


def _figures_aside(lines: list[str]) -> list[str]:
    """The lines without their figures (every number N, one space for many), and without the timelines' rows."""
    return [re.sub(r" +", " ", re.sub(r"\d+", "N", line)).strip() for line in lines if not LANE.match(line)]


def test_the_readme_demo_output_is_what_make_demo_prints(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    shown = re.search(r"A real run.*?```text\n(.*?)```", readme, re.DOTALL)
    assert shown, "the README shows no demo output after 'A real run'"

    completed = run_cli(cwd=tmp_path)  # `make demo` is ticketlock-loadtest with its defaults

    assert completed.returncode == 0, completed.stderr
    assert _figures_aside(shown[1].splitlines()) == _figures_aside(completed.stdout.splitlines())
