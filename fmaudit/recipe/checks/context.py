"""What the section checks of pass 2 share: the recipe, its YAML lines, and what earlier sections found."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmaudit.recipe.code_refs import CodeRef
from fmaudit.recipe.problems import Lines, Problem, problem_at
from fmaudit.recipe.schema import Recipe


@dataclass
class CheckContext:
    """One validation pass over a parsed recipe. Sections run in order and append to `problems`; the data
    section fills `table_rows`, the targets section `target_tasks`, which later sections read."""

    recipe: Recipe
    lines: Lines
    base_dir: Path
    allow_code_from: Sequence[str | Path] = ()
    code: dict[str, CodeRef] | None = None  # receives the code each `python:` target would import
    problems: list[Problem] = field(default_factory=list)
    table_rows: dict[str, int] = field(default_factory=dict)  # rows of CSV / JSONL datasets (after `limit`)
    target_tasks: dict[str, str | None] = field(default_factory=dict)  # target -> model task (None: unknown)

    def add(self, loc: tuple[Any, ...], message: str) -> None:
        """Record a problem at path `loc` (with its YAML line)."""
        self.problems.append(problem_at(loc, message, self.lines))

    def resolve(self, path: str) -> Path:
        """A path from the recipe: `~` expanded, relative ones taken from the recipe's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p
