"""ticketlock's load tester: concurrent buyers against the booking API, and a checker for what they were told."""

from __future__ import annotations

from loadtest.checker import Check, Outcome, check
from loadtest.runner import LoadOptions, PhaseResult, RunResult, run

__all__ = ["Check", "LoadOptions", "Outcome", "PhaseResult", "RunResult", "check", "run"]
