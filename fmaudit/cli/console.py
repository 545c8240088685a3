"""The CLI's two consoles (results on stdout, everything else on stderr) and its messages about a recipe
or a run that did not go through: recipe problems, code a recipe runs, crashes, interruptions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:  # pragma: no cover
    from fmaudit.recipe import LoadedRecipe, RecipeError

out = Console()
err = Console(stderr=True)


def print_problems(exc: RecipeError) -> None:
    """Every problem of an invalid recipe, with its path and line, and what to do next."""
    err.print(f"[bold red]Invalid recipe[/] {exc.source or ''} — {len(exc.problems)} problem(s):")
    for p in exc.problems:
        where = p.path or "<recipe>"
        line = f" (line {p.line})" if p.line is not None else ""
        err.print(f"  [yellow]{escape(where)}[/]{line}: {escape(p.message)}", highlight=False)
    err.print("Fix these and run `fmaudit validate` again; `fmaudit schema recipe` prints the full recipe schema.")


def print_code(loaded: LoadedRecipe, console: Console) -> None:
    """Say that the recipe runs code, which, and from where (python: targets)."""
    for name, code in loaded.code.items():
        console.print(
            f"[bold yellow]this recipe runs code:[/] {escape(code.ref)} (target {escape(name)}, from "
            f"{escape(str(code.file))}; allowed: {escape(code.allowed_by or '?')})",
            highlight=False,
            soft_wrap=True,
        )
    for name, spec in loaded.recipe.targets.items():
        if spec.trust_remote_code:
            console.print(
                f"[bold yellow]this recipe runs code:[/] the Python files shipped with {escape(spec.model)} "
                f"(target {escape(name)}, trust_remote_code: true)",
                highlight=False,
                soft_wrap=True,
            )


def print_interrupted(recipe: Path, run_dir: Path | None) -> None:
    """Where the partial results of an interrupted run are and how to continue it."""
    if run_dir is not None and (Path(run_dir) / "report.json").is_file():
        err.print(
            f"[yellow]Interrupted.[/] Partial report (the units that finished): "
            f"{escape(str(Path(run_dir) / 'report.json'))}; continue with "
            f"`fmaudit run {escape(str(recipe))} --resume`.",
            highlight=False,
            soft_wrap=True,
        )
    elif run_dir is not None:
        err.print(
            f"[yellow]Interrupted.[/] Partial results are in {escape(str(run_dir))}/events.jsonl; continue with "
            f"`fmaudit run {escape(str(recipe))} --resume`.",
            highlight=False,
            soft_wrap=True,
        )
    else:
        err.print(
            "[yellow]Interrupted[/] before the run folder was created: nothing was written.",
            highlight=False,
            soft_wrap=True,
        )


def print_crash(exc: BaseException, debug: bool, run_dir: Path | None) -> None:
    """One line for an unexpected error (and where it was recorded); the traceback too with `debug`."""
    msg = " ".join((str(exc) or type(exc).__name__).split())[:300]
    where = f"; recorded in {run_dir / 'report.json'}" if run_dir is not None else ""
    err.print(
        f"[bold red]fmaudit failed:[/] {escape(type(exc).__name__)}: {escape(msg)}{escape(where)}"
        + ("" if debug else " (run with --debug for the traceback)"),
        highlight=False,
        soft_wrap=True,
    )
    if debug:
        import traceback

        err.print(
            escape("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))),
            highlight=False,
            soft_wrap=True,
        )
