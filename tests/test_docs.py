"""The README and docs/ say what the code does: the configuration table is the declared settings, and every
link leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.config import configuration_table
from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_readme_configuration_table_is_the_declared_settings() -> None:
    # To refresh it: .venv/bin/python -c 'from service.config import configuration_table; print(configuration_table())'
    readme = (ROOT / "README.md").read_text()

    assert configuration_table() in readme, configuration_table()


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
