"""What `fmaudit run` does between parsing its options and exiting: progress bars, SIGTERM handled like
Ctrl+C, the executor choice, the runner, and the summary. Heavy libraries load only in here, once called."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from fmaudit.cli.console import err, out, print_code, print_problems
from fmaudit.cli.summary import print_summary


class RichProgress:
    """The runner's progress callback `(description, total) -> handle` as one rich progress bar per call."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress

    def __call__(self, description: str, total: int) -> Any:
        bar_id = self.progress.add_task(description, total=total)
        progress = self.progress

        class Handle:
            def advance(self, n: int = 1) -> None:
                progress.advance(bar_id, n)

            def close(self) -> None:
                progress.update(bar_id, completed=progress.tasks[bar_id].total, visible=False)

        return Handle()


def sigterm_as_interrupt() -> Any:
    """SIGTERM (a CI timeout, `kill`, a container stop) handled like Ctrl+C for the whole command. Returns
    the previous handler (None when it could not be changed)."""
    import signal
    import threading

    if not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread():
        return None

    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt("SIGTERM")

    try:
        old = signal.getsignal(signal.SIGTERM)
        if old is signal.SIG_IGN:
            return None
        signal.signal(signal.SIGTERM, _raise)
        return old if old is not None else signal.SIG_DFL
    except (ValueError, OSError):
        return None


def restore_sigterm(old: Any) -> None:
    """Put back the SIGTERM handler that sigterm_as_interrupt replaced."""
    import signal

    if old is not None:
        try:
            signal.signal(signal.SIGTERM, old)
        except (ValueError, OSError, TypeError):
            pass


def execute_run(
    recipe: Path,
    *,
    output_dir: Path | None,
    resume: bool,
    resume_from: Path | None,
    quiet: bool,
    executor: str | None,
    state: dict[str, Any],
    allow_code_from: Sequence[Path] = (),
) -> None:
    """Validate, run and summarize a recipe; always ends in typer.Exit with the run's exit code (2 for an
    invalid recipe, executor or preparation). `state["runner"]` holds the runner once there is one, so the
    caller can write a failure report or say where partial results are."""
    from fmaudit.recipe import RecipeError, load_recipe

    try:
        loaded = load_recipe(recipe, allow_code_from=allow_code_from)
    except RecipeError as exc:
        print_problems(exc)
        raise typer.Exit(2) from None
    print_code(loaded, err)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fmaudit.run_errors import PreparationError
    from fmaudit.runner import Runner, latest_run

    out_dir = output_dir or (Path(loaded.recipe.output_dir) if loaded.recipe.output_dir else Path("reports"))
    resume_dir = resume_from
    if resume and resume_dir is None:
        resume_dir = latest_run(out_dir, loaded.recipe.sha256)
        if resume_dir is None:
            err.print(f"[yellow]No earlier run of this recipe in {out_dir}; starting a new one.[/]")
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=quiet,
        transient=False,
    )
    from fmaudit.executor_factory import EXECUTOR_KINDS, make_executor

    spec = loaded.recipe.executor
    if executor is not None and executor not in EXECUTOR_KINDS:
        err.print(f"[bold red]Unknown executor {executor!r}[/]: use one of {', '.join(EXECUTOR_KINDS)}")
        raise typer.Exit(2)
    try:
        chosen = make_executor(spec if executor in (None, spec.kind) else spec.model_copy(update={"kind": executor}))
    except ValueError as exc:  # ExecutorUnavailable: the optional extra is not installed
        err.print(f"[bold red]Cannot use the {executor or spec.kind} executor:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    runner = Runner(
        loaded,
        output_dir=out_dir,
        resume=resume_dir,
        progress=RichProgress(progress),
        log=lambda m: None,
        executor=chosen,
    )
    state["runner"] = runner
    # fmaudit's own progress writes to the terminal stream as it is now: while a unit runs, sys.stderr goes to
    # run.log (fmaudit.quiet), and a console that looked sys.stderr up on each write would follow it there.
    err.file = sys.stderr
    try:
        with progress:
            report = runner.run()
    except RecipeError as exc:
        print_problems(exc)
        raise typer.Exit(2) from None
    except PreparationError as exc:
        err.print(f"[bold red]Cannot prepare the run:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    finally:
        err.file = None  # type: ignore[assignment]  # rich: None means follow sys.stderr again
    print_summary(report)
    if report.error is not None:
        err.print(
            f"[bold red]The run failed:[/] {escape(report.error.type)}: {escape(report.error.message)} "
            "(results before the failure are kept; the traceback is in the report)",
            soft_wrap=True,
        )
    out.print(f"Report: [bold]{Path(runner.run_dir or '.') / 'report.json'}[/]")
    raise typer.Exit(report.exit_code or 0)
