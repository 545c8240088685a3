"""Verdict levels and the two records the verdict rules produce: a `Part` (what one unit says) and a
`Verdict` (one area's line). Standard library only."""

from __future__ import annotations

from dataclasses import dataclass, field

AREAS = ("privacy", "robustness", "explainability", "utility")
AREA_OF_CATEGORY = {
    "privacy": "privacy",
    "robustness": "robustness",
    "explain": "explainability",
    "explainability": "explainability",
    "utility": "utility",
}

# Levels, worst first. critical..low are the report's severities; ok = assessed and nothing found;
# error = every unit of the area errored; none = no module covered the area.
LEVELS = ("critical", "high", "medium", "low", "error", "ok", "none")
LEVEL_RANK = {lvl: i for i, lvl in enumerate(LEVELS)}
COLOURS = {
    "critical": "#8b0000",
    "high": "#d62728",
    "medium": "#ff7f0e",
    "low": "#c9a227",
    "error": "#6b21a8",
    "ok": "#2ca02c",
    "none": "#8c8c8c",
}
# Colour of the level in a terminal (rich markup styles).
TERMINAL_STYLES = {
    "critical": "bold white on red",
    "high": "bold red",
    "medium": "dark_orange",
    "low": "yellow",
    "error": "magenta",
    "ok": "green",
    "none": "dim",
}
LEVEL_WORDS = {
    "critical": "CRITICAL",
    "high": "HIGH",
    "medium": "MEDIUM",
    "low": "LOW",
    "error": "ERROR",
    "ok": "OK",
    "none": "—",
}


@dataclass(frozen=True)
class Part:
    """What one unit (or a group of units on one target) says."""

    level: str
    text: str
    headline: str | None = None  # the phrase that leads the area's line when this part is its worst
    units: tuple[str, ...] = ()
    weight: float = 0.0  # among parts of one level and key, the largest is the worst (e.g. TPR, share flipped)
    key: tuple[str, ...] = ()  # parts with the same key (module, target[, attack]) are merged: the worst is shown


@dataclass(frozen=True)
class Verdict:
    area: str
    level: str
    headline: str
    text: str  # one line: the headline, then the numbers behind it
    parts: tuple[Part, ...] = field(default_factory=tuple)

    @property
    def colour(self) -> str:
        return COLOURS[self.level]

    @property
    def line(self) -> str:
        return f"{self.area}: {self.text}"


def worse(*levels: str) -> str:
    """The worst of some levels (critical first)."""
    return min(levels, key=lambda lvl: LEVEL_RANK.get(lvl, len(LEVELS)))
