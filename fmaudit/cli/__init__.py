"""The `fmaudit` command line: its commands and their options. Heavy libraries load only inside `run`.

The commands are thin: `running` runs a recipe, `summary` prints a run in the terminal, `console` holds the
consoles and the messages about recipes and runs that did not go through."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from fmaudit.cli.console import err, out, print_code, print_crash, print_interrupted, print_problems
from fmaudit.cli.running import execute_run, restore_sigterm, sigterm_as_interrupt
from fmaudit.cli.summary import print_summary

app = typer.Typer(
    name="fmaudit",
    help="Privacy and robustness audits for foundation models, driven by a YAML recipe.\n\n"
    "Start with:  fmaudit run recipes/quickstart.yaml\n\n"
    "Exit codes: 0 all gates pass, 1 a gate failed, 2 invalid recipe, input or usage, 3 a module, a target "
    "or the run errored (recorded in the report), 130 interrupted.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ALLOW_CODE_HELP = (
    "Also allow python: targets to import code from this folder (or file); repeatable. By default "
    "only the recipe's folder and installed packages are allowed."
)


@app.command()
def validate(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    allow_code_from: list[Path] | None = typer.Option(None, "--allow-code-from", help=ALLOW_CODE_HELP),
    debug: bool = typer.Option(False, "--debug", help="Print the traceback of an unexpected error."),
) -> None:
    """Check a recipe without loading any model: lists every problem with its path and line (exit 2)."""
    from fmaudit.recipe import RecipeError, load_recipe

    try:
        loaded = load_recipe(recipe, allow_code_from=allow_code_from or ())
    except RecipeError as exc:
        print_problems(exc)
        raise typer.Exit(2) from None
    except Exception as exc:  # a bug in a check: exit 3 with one line, never a traceback or exit 1
        print_crash(exc, debug, None)
        raise typer.Exit(3) from None
    r = loaded.recipe
    n_units = sum(len(a.target) for a in r.audits)
    out.print(
        f"[green]OK[/] {recipe}: {len(r.data)} dataset(s), {len(r.targets)} target(s), "
        f"{len(r.audits)} audit(s) ({n_units} unit(s)); recipe sha256 {r.sha256[:12]}"
    )
    print_code(loaded, out)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    output_dir: Path | None = typer.Option(
        None, "--output-dir", "-o", help="Where run folders go (default: the recipe's output_dir, else ./reports)."
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the latest run of this recipe in the output folder, skipping modules already complete.",
    ),
    resume_from: Path | None = typer.Option(None, "--resume-from", help="Continue this run folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    executor: str | None = typer.Option(
        None,
        "--executor",
        help="Where independent units run: local | ray "
        "(default: the recipe's executor; ray needs "
        "`pip install 'fmaudit\\[ray]'`).",
    ),
    allow_code_from: list[Path] | None = typer.Option(None, "--allow-code-from", help=ALLOW_CODE_HELP),
    debug: bool = typer.Option(False, "--debug", help="Print the full traceback of an unexpected error."),
) -> None:
    """Run a recipe: fine-tune targets (cached), run each audit, write reports/<run-id>/report.json.
    SIGINT (Ctrl+C) and SIGTERM stop it the same way: a partial report, exit 130, `--resume` continues."""
    state: dict[str, Any] = {}
    old_term = sigterm_as_interrupt()
    try:
        execute_run(
            recipe,
            output_dir=output_dir,
            resume=resume,
            resume_from=resume_from,
            quiet=quiet,
            executor=executor,
            state=state,
            allow_code_from=allow_code_from or (),
        )
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except KeyboardInterrupt:
        runner = state.get("runner")
        print_interrupted(recipe, getattr(runner, "run_dir", None))
        raise typer.Exit(130) from None
    except BaseException as exc:  # anything uncaught: exit 3 (never 1, which means a gate failed)
        runner = state.get("runner")
        run_dir = runner.write_failure_report(exc) if runner is not None else None
        print_crash(exc, debug, run_dir)
        raise typer.Exit(3) from None
    finally:
        restore_sigterm(old_term)


@app.command("list")
def list_modules(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show each module's params.")) -> None:
    """List the audit modules (built-in and plugins), their category and what they need."""
    from fmaudit.registry import RegistryError, registry

    table = Table(title="fmaudit audit modules", caption="`fmaudit list -v` adds descriptions and params")
    for col in ("name", "category", "needs", "from"):
        table.add_column(col, overflow="fold")
    for name in registry.names():
        try:
            cls = registry.get(name)
        except RegistryError as exc:
            table.add_row(name, "?", f"[red]{escape(str(exc))}[/]", registry.origin(name))
            continue
        model_tasks = f"({'/'.join(cls.tasks)})" if cls.tasks else ""
        needs = " ".join(filter(None, [", ".join(sorted(cls.requires)), model_tasks]))
        table.add_row(name, cls.category, needs or "—", registry.origin(name))
    out.print(table)
    if verbose:
        for name in registry.names():
            try:
                cls = registry.get(name)
            except RegistryError:
                continue
            out.print(f"\n[bold]{name}[/] ({cls.category}): {escape(cls.description)}", highlight=False)
            for fname, field in cls.Params.model_fields.items():
                default = field.get_default(call_default_factory=True, validated_data={})
                out.print(f"  {fname} = {escape(repr(default))}: {escape(field.description or '')}", highlight=False)


def _recipe_schema() -> dict[str, Any]:
    from fmaudit.recipe import recipe_json_schema

    return recipe_json_schema()


def _report_schema() -> dict[str, Any]:
    from fmaudit.report import report_json_schema

    return report_json_schema()


# `fmaudit schema NAME` -> the JSON Schema it prints
SCHEMAS: dict[str, Callable[[], dict[str, Any]]] = {"recipe": _recipe_schema, "report": _report_schema}


@app.command()
def schema(which: str = typer.Argument("recipe", help="recipe | report")) -> None:
    """Print the JSON Schema of recipes (for editor completion) or of reports."""
    if which not in SCHEMAS:
        err.print(f"[red]unknown schema {which!r}[/]: use `fmaudit schema recipe` or `fmaudit schema report`")
        raise typer.Exit(2)
    print(json.dumps(SCHEMAS[which](), indent=2))


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run folder (or its report.json)."),
    html: Path | None = typer.Option(
        None,
        "--html",
        help="Also write the dashboard's views of this run as one "
        "self-contained HTML file (plots, images and scripts inlined).",
    ),
    full: bool = typer.Option(False, "--full", help="Print every metric of every unit (and its findings)."),
) -> None:
    """Summarize a finished run's report in the terminal (and export it as HTML with --html)."""
    from fmaudit.report import ReportError, load_report

    def refuse(message: str) -> None:  # one line, exit 2 (a broken input, not a crash)
        err.print(f"[red]{escape(' '.join(message.split()))}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(2)

    try:
        rep = load_report(run_dir)
    except FileNotFoundError:
        if not run_dir.exists():
            refuse(f"{run_dir}: no such run folder")
        folder = run_dir if run_dir.is_dir() else run_dir.parent
        if (folder / "events.jsonl").is_file():
            refuse(
                f"no report.json in {run_dir}: the run was interrupted before it wrote one; its finished units "
                f"are in events.jsonl, and `fmaudit run RECIPE --resume-from {folder}` completes it"
            )
        refuse(f"no report.json in {run_dir}: not an fmaudit run folder (it has neither report.json nor events.jsonl)")
    except ReportError as exc:
        refuse(str(exc))
    except (OSError, UnicodeError) as exc:  # a folder where report.json should be, no permission...
        refuse(f"cannot read the report in {run_dir}: {exc}")
    print_summary(rep, full=full)
    if html is not None:
        _dashboard_package()
        from dashboard.export import ExportError, export_html

        try:
            path = export_html(run_dir, html)
        except (ExportError, FileNotFoundError) as exc:
            err.print(f"[red]{exc}[/]")
            raise typer.Exit(2) from None
        except OSError as exc:
            err.print(f"[red]cannot write {html}: {exc}[/]")
            raise typer.Exit(2) from None
        out.print(f"HTML report: [bold]{path}[/] ({path.stat().st_size / 2**20:.1f} MiB, self-contained)")


def _dashboard_package() -> Path:
    """The folder of the `dashboard` package (it lives beside `fmaudit/` in the source tree), importable."""
    here = Path(__file__).resolve().parents[2] / "dashboard"
    if (here / "app.py").is_file() and (here / "export.py").is_file():
        if str(here.parent) not in sys.path:
            sys.path.insert(0, str(here.parent))
        return here
    try:
        import dashboard.export  # noqa: F401  (installed as a package)

        return Path(dashboard.export.__file__).resolve().parent
    except ImportError:
        err.print(
            "[red]The dashboard is not installed:[/] it ships in fmaudit's source tree (dashboard/); "
            "install fmaudit from a checkout with `pip install -e .`."
        )
        raise typer.Exit(2) from None


@app.command()
def dashboard(
    reports_dir: Path = typer.Argument(Path("reports"), help="Folder of run folders (default ./reports)."),
    port: int = typer.Option(8501, "--port", help="Port on localhost."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
    open_browser: bool = typer.Option(False, "--open/--no-open", help="Open a browser tab."),
) -> None:
    """Start the review dashboard (Streamlit) on localhost for the runs in REPORTS_DIR."""
    import os
    import subprocess

    if not reports_dir.is_dir():
        err.print(f"[red]{reports_dir} is not a folder[/]; `fmaudit run RECIPE -o {reports_dir}` creates runs there")
        raise typer.Exit(2)
    app_py = _dashboard_package() / "app.py"
    env = dict(os.environ, FMAUDIT_REPORTS_DIR=str(reports_dir.resolve()))
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app_py),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "false" if open_browser else "true",
        "--browser.gatherUsageStats",
        "false",
        "--",
        str(reports_dir.resolve()),
    ]
    out.print(f"fmaudit dashboard on http://{host}:{port} for {reports_dir.resolve()} (Ctrl+C stops it)")
    try:
        raise typer.Exit(subprocess.call(cmd, env=env))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def main() -> None:
    """Entry point. Exit codes keep one meaning each: an exception that escapes a command is a one-line
    message and exit 3 (with `run --debug` / `validate --debug`, the traceback too), never Python's exit 1,
    which fmaudit reserves for failed gates. SIGTERM is handled like Ctrl+C from here on."""
    sigterm_as_interrupt()
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        print_crash(exc, "--debug" in sys.argv[1:], None)
        sys.exit(3)
