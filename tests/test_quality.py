"""The code checks, run as part of the suite so that CI and `make setup && .venv/bin/python -m pytest` agree."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SOURCES = ["service", "loadtest", "tests", "bench"]


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", *SOURCES],
        ["ruff", "format", "--check", *SOURCES],
        ["mypy", "service", "loadtest"],  # strict, from pyproject.toml
    ],
    ids=["ruff check", "ruff format", "mypy"],
)
def test_the_code_passes(command: list[str]) -> None:
    completed = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_the_bench_starts() -> None:
    # Speed targets live in bench/ (never as timing asserts here); this only keeps the bench runnable as the code moves.
    completed = subprocess.run(
        [sys.executable, "bench/bench.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stderr
    assert "--sections" in completed.stdout


def _imports_of(package: str) -> dict[str, set[str]]:
    """Each module of ``package`` (by dotted name) and the modules of the project it imports."""
    paths = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for path in (ROOT / package).rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                # ``from service import flock`` imports the module service.flock; ``from service.x import y``, x.
                submodules = {f"{node.module}.{alias.name}" for alias in node.names} & paths.keys()
                imported |= submodules or {node.module}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        graph[name] = {module for module in imported if module.split(".")[0] in PACKAGES} - {name}
    return graph


PACKAGES = ("service", "loadtest", "bench", "tests")


def test_the_imports_run_one_way_and_never_in_a_circle() -> None:
    # service below loadtest below bench and tests: no module imports one of a layer above its own.
    graph = {**_imports_of("service"), **_imports_of("loadtest")}
    for module, imported in graph.items():
        above = PACKAGES[PACKAGES.index(module.split(".")[0]) + 1 :]
        assert not {name for name in imported if name.split(".")[0] in above}, module

    def circle_from(module: str, path: list[str]) -> list[str] | None:
        for name in sorted(graph.get(module, set()) & graph.keys()):
            if name in path:
                return [*path[path.index(name) :], name]
            if found := circle_from(name, [*path, name]):
                return found
        return None

    for module in graph:
        assert circle_from(module, [module]) is None
