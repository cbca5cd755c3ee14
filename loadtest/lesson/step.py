"""What one section of the lesson showed: a line for the README, the story in plain words, and its figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Step:
    """One section's result; ``shown`` is whether it showed what it teaches, ``reason`` why not."""

    section: str
    title: str
    summary: str = ""
    story: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    reason: str = ""  # empty while every check held
    seconds: float = 0.0

    @property
    def shown(self) -> bool:
        """Whether every check held: the section showed what it teaches."""
        return not self.reason

    def say(self, line: str) -> None:
        """One more line of the story."""
        self.story.append(line)

    def check(self, holds: bool, reason: str) -> bool:
        """Record one thing the section must show; the first that does not hold is the reason it failed."""
        if not holds and not self.reason:
            self.reason = reason
        return holds
