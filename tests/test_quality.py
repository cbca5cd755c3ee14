"""The code checks, run as part of the suite so that CI and `make setup && .venv/bin/python -m pytest` agree."""

from __future__ import annotations

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
