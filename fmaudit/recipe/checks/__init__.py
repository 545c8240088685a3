"""Pass 2 of recipe validation, one section at a time (`SECTIONS`), over a recipe that passed pass 1.

Each section appends every problem it finds (with its path) to a shared CheckContext and never stops early,
so one `validate` lists them all; nothing heavy is loaded (no model, no dataset, no `python:` code)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from fmaudit.recipe.checks.audits import check_audits, check_audits_loose, check_module_params
from fmaudit.recipe.checks.context import CheckContext
from fmaudit.recipe.checks.data import check_data
from fmaudit.recipe.checks.targets import check_targets
from fmaudit.recipe.code_refs import CodeRef
from fmaudit.recipe.problems import Lines, Problem, dedupe
from fmaudit.recipe.schema import Recipe

# Recipe section -> its check, in the order they run: later sections read what earlier ones recorded
# (row counts of data files, the model task of each target).
SECTIONS: dict[str, Callable[[CheckContext], None]] = {
    "data": check_data,
    "targets": check_targets,
    "audits": check_audits,
}


def check_recipe(
    recipe: Recipe,
    *,
    lines: Lines | None = None,
    base_dir: Path | None = None,
    allow_code_from: Sequence[str | Path] = (),
    code: dict[str, CodeRef] | None = None,
) -> list[Problem]:
    """Pass 2: module params, names, cross-references, files and capabilities. The code of `python:` targets
    is located (not imported) and refused outside the allowed places; `code` receives what would run."""
    ctx = CheckContext(recipe, lines or {}, base_dir or Path.cwd(), allow_code_from, code)
    for check in SECTIONS.values():
        check(ctx)
    return dedupe(ctx.problems)


__all__ = ["SECTIONS", "CheckContext", "check_audits_loose", "check_module_params", "check_recipe"]
