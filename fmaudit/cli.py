"""The `fmaudit` command line. Heavy libraries load only inside `run`."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

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
out = Console()
err = Console(stderr=True)


def _print_problems(exc) -> None:
    err.print(f"[bold red]Invalid recipe[/] {exc.source or ''} — {len(exc.problems)} problem(s):")
    for p in exc.problems:
        where = p.path or "<recipe>"
        line = f" (line {p.line})" if p.line is not None else ""
        err.print(f"  [yellow]{escape(where)}[/]{line}: {escape(p.message)}", highlight=False)
    err.print("Fix these and run `fmaudit validate` again; `fmaudit schema recipe` prints the full recipe schema.")


ALLOW_CODE_HELP = ("Also allow python: targets to import code from this folder (or file); repeatable. By default "
                   "only the recipe's folder and installed packages are allowed.")


def _print_code(loaded, console: Console) -> None:
    """Say that the recipe runs code, which, and from where (python: targets)."""
    for name, code in loaded.code.items():
        console.print(f"[bold yellow]this recipe runs code:[/] {escape(code.ref)} (target {escape(name)}, from "
                      f"{escape(str(code.file))}; allowed: {escape(code.allowed_by or '?')})", highlight=False,
                      soft_wrap=True)
    for name, spec in loaded.recipe.targets.items():
        if spec.trust_remote_code:
            console.print(f"[bold yellow]this recipe runs code:[/] the Python files shipped with {escape(spec.model)} "
                          f"(target {escape(name)}, trust_remote_code: true)", highlight=False, soft_wrap=True)


@app.command()
def validate(recipe: Path = typer.Argument(..., help="Recipe YAML file."),
             allow_code_from: Optional[List[Path]] = typer.Option(None, "--allow-code-from", help=ALLOW_CODE_HELP),
             debug: bool = typer.Option(False, "--debug", help="Print the traceback of an unexpected error.")) -> None:
    """Check a recipe without loading any model: lists every problem with its path and line (exit 2)."""
    from fmaudit.recipe import RecipeError, load_recipe

    try:
        loaded = load_recipe(recipe, allow_code_from=allow_code_from or ())
    except RecipeError as exc:
        _print_problems(exc)
        raise typer.Exit(2)
    except Exception as exc:  # a bug in a check: exit 3 with one line, never a traceback or exit 1
        _print_crash(exc, debug, None)
        raise typer.Exit(3)
    r = loaded.recipe
    n_units = sum(len(a.target) for a in r.audits)
    out.print(f"[green]OK[/] {recipe}: {len(r.data)} dataset(s), {len(r.targets)} target(s), "
              f"{len(r.audits)} audit(s) ({n_units} unit(s)); recipe sha256 {r.sha256[:12]}")
    _print_code(loaded, out)


class _RichProgress:
    def __init__(self, progress) -> None:
        self.progress = progress

    def __call__(self, description: str, total: int):
        task = self.progress.add_task(description, total=total)
        progress = self.progress

        class Handle:
            def advance(self, n: int = 1) -> None:
                progress.advance(task, n)

            def close(self) -> None:
                progress.update(task, completed=progress.tasks[task].total, visible=False)

        return Handle()


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Where run folders go "
                                              "(default: the recipe's output_dir, else ./reports)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the latest run of this recipe in the output "
                                "folder, skipping modules already complete."),
    resume_from: Optional[Path] = typer.Option(None, "--resume-from", help="Continue this run folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    executor: Optional[str] = typer.Option(None, "--executor", help="Where independent units run: local | ray "
                                           "(default: the recipe's executor; ray needs `pip install 'fmaudit\\[ray]'`)."),
    allow_code_from: Optional[List[Path]] = typer.Option(None, "--allow-code-from", help=ALLOW_CODE_HELP),
    debug: bool = typer.Option(False, "--debug", help="Print the full traceback of an unexpected error."),
) -> None:
    """Run a recipe: fine-tune targets (cached), run each audit, write reports/<run-id>/report.json.
    SIGINT (Ctrl+C) and SIGTERM stop it the same way: a partial report, exit 130, `--resume` continues."""
    state: dict = {}
    old_term = _sigterm_as_interrupt()
    try:
        _run(recipe, output_dir, resume, resume_from, quiet, executor, state, allow_code_from or [])
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except KeyboardInterrupt:
        runner = state.get("runner")
        _print_interrupted(recipe, getattr(runner, "run_dir", None))
        raise typer.Exit(130)
    except BaseException as exc:  # anything uncaught: exit 3 (never 1, which means a gate failed)
        runner = state.get("runner")
        run_dir = runner.write_failure_report(exc) if runner is not None else None
        _print_crash(exc, debug, run_dir)
        raise typer.Exit(3)
    finally:
        _restore_sigterm(old_term)


def _sigterm_as_interrupt():
    """SIGTERM (a CI timeout, `kill`, a container stop) handled like Ctrl+C for the whole command. Returns
    the previous handler (None when it could not be changed)."""
    import signal
    import threading

    if not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread():
        return None

    def _raise(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    try:
        old = signal.getsignal(signal.SIGTERM)
        if old is signal.SIG_IGN:
            return None
        signal.signal(signal.SIGTERM, _raise)
        return old if old is not None else signal.SIG_DFL
    except (ValueError, OSError):
        return None


def _restore_sigterm(old) -> None:
    import signal

    if old is not None:
        try:
            signal.signal(signal.SIGTERM, old)
        except (ValueError, OSError, TypeError):
            pass


def _print_interrupted(recipe: Path, run_dir: Optional[Path]) -> None:
    if run_dir is not None and (Path(run_dir) / "report.json").is_file():
        err.print(f"[yellow]Interrupted.[/] Partial report (the units that finished): "
                  f"{escape(str(Path(run_dir) / 'report.json'))}; continue with "
                  f"`fmaudit run {escape(str(recipe))} --resume`.", highlight=False, soft_wrap=True)
    elif run_dir is not None:
        err.print(f"[yellow]Interrupted.[/] Partial results are in {escape(str(run_dir))}/events.jsonl; continue with "
                  f"`fmaudit run {escape(str(recipe))} --resume`.", highlight=False, soft_wrap=True)
    else:
        err.print("[yellow]Interrupted[/] before the run folder was created: nothing was written.", highlight=False,
                  soft_wrap=True)


def _print_crash(exc: BaseException, debug: bool, run_dir: Optional[Path]) -> None:
    msg = " ".join((str(exc) or type(exc).__name__).split())[:300]
    where = f"; recorded in {run_dir / 'report.json'}" if run_dir is not None else ""
    err.print(f"[bold red]fmaudit failed:[/] {escape(type(exc).__name__)}: {escape(msg)}{escape(where)}"
              + ("" if debug else " (run with --debug for the traceback)"), highlight=False, soft_wrap=True)
    if debug:
        import traceback

        err.print(escape("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))), highlight=False,
                  soft_wrap=True)


def _run(recipe: Path, output_dir: Optional[Path], resume: bool, resume_from: Optional[Path], quiet: bool,
         executor: Optional[str], state: dict, allow_code_from: Optional[List[Path]] = None) -> None:
    from fmaudit.recipe import RecipeError, load_recipe

    try:
        loaded = load_recipe(recipe, allow_code_from=allow_code_from or ())
    except RecipeError as exc:
        _print_problems(exc)
        raise typer.Exit(2)
    _print_code(loaded, err)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fmaudit.runner import PreparationError, Runner, latest_run

    out_dir = output_dir or (Path(loaded.recipe.output_dir) if loaded.recipe.output_dir else Path("reports"))
    resume_dir = resume_from
    if resume and resume_dir is None:
        resume_dir = latest_run(out_dir, loaded.recipe.sha256)
        if resume_dir is None:
            err.print(f"[yellow]No earlier run of this recipe in {out_dir}; starting a new one.[/]")
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err, disable=quiet, transient=False)
    from fmaudit.executor import EXECUTOR_KINDS, make_executor

    spec = loaded.recipe.executor
    if executor is not None and executor not in EXECUTOR_KINDS:
        err.print(f"[bold red]Unknown executor {executor!r}[/]: use one of {', '.join(EXECUTOR_KINDS)}")
        raise typer.Exit(2)
    try:
        chosen = make_executor(spec if executor in (None, spec.kind) else spec.model_copy(update={"kind": executor}))
    except ValueError as exc:  # ExecutorUnavailable: the optional extra is not installed
        err.print(f"[bold red]Cannot use the {executor or spec.kind} executor:[/] {escape(str(exc))}")
        raise typer.Exit(2)
    runner = Runner(loaded, output_dir=out_dir, resume=resume_dir, progress=_RichProgress(progress),
                    log=lambda m: None, executor=chosen)
    state["runner"] = runner
    # fmaudit's own progress writes to the terminal stream as it is now: while a unit runs, sys.stderr goes to
    # run.log (fmaudit.quiet), and a console that looked sys.stderr up on each write would follow it there.
    err.file = sys.stderr
    try:
        with progress:
            report = runner.run()
    except RecipeError as exc:
        _print_problems(exc)
        raise typer.Exit(2)
    except PreparationError as exc:
        err.print(f"[bold red]Cannot prepare the run:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2)
    finally:
        err.file = None  # back to following sys.stderr
    _print_summary(report)
    if report.error is not None:
        err.print(f"[bold red]The run failed:[/] {escape(report.error.type)}: {escape(report.error.message)} "
                  "(results before the failure are kept; the traceback is in the report)", soft_wrap=True)
    out.print(f"Report: [bold]{runner.run_dir / 'report.json'}[/]")
    raise typer.Exit(report.exit_code or 0)


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}"


# The metric a module's row shows in the terminal summary: the first of these (fnmatch patterns) that the
# result has a value for; modules not listed show their first undotted metric. `fmaudit report RUN --full`
# prints every metric.
HEADLINE_METRICS: dict[str, tuple[str, ...]] = {
    "utility": ("accuracy", "perplexity"),
    "privacy.membership": ("tpr_at_1pct_fpr", "auc"),
    "privacy.dp_finetune": ("epsilon",),
    "privacy.canary_audit": ("epsilon_lb",),
    "robustness.text_attack": ("attack_success_rate",),
    "robustness.image_attack": ("worst_robust_accuracy.*", "robust_accuracy.*", "clean_accuracy"),
    "robustness.certify": ("certified_accuracy@*",),
    "explain.attribution": ("integrated_gradients.deletion_aopc", "*.deletion_aopc"),
}
SUMMARY_WIDTH = 80
SEVERITY_ORDER = ("critical", "high", "medium", "low", "info")


def headline_metric(result) -> tuple[str, object] | None:
    """(name, Metric) of the unit's headline metric, or None when it has no metric with a value."""
    import fnmatch

    valued = [(k, m) for k, m in result.metrics.items() if m.value is not None]
    for pattern in HEADLINE_METRICS.get(result.module, ()):
        for k, m in valued:
            if fnmatch.fnmatchcase(k, pattern):
                return k, m
    undotted = [(k, m) for k, m in valued if "." not in k]
    return (undotted or valued or [None])[0]


def _metric_text(name: str, m) -> str:
    ci = f" [{_fmt(m.ci_low)}, {_fmt(m.ci_high)}]" if m.ci_low is not None and m.ci_high is not None else ""
    return f"{name} {_fmt(m.value)}{ci}"


def _findings_text(result) -> str:
    counts: dict[str, int] = {}
    for f in result.findings:
        counts[f.severity] = counts.get(f.severity, 0) + 1
    colour = {"critical": "bold red", "high": "red", "medium": "yellow", "low": "cyan", "info": "dim"}
    parts = [f"[{colour[s]}]{counts[s]}{s[0].upper()}[/]" for s in SEVERITY_ORDER if counts.get(s)]
    return " ".join(parts) or "—"


def _print_summary(report, full: bool = False) -> None:
    """One row per unit (module, target, its headline metric, findings by severity: C/H/M/L/I), then the
    verdict per area and the gates, within 80 columns. `full`: every metric of every unit after it."""
    from rich import box

    width = min(out.width, SUMMARY_WIDTH)
    rows = []
    for r in report.audits:
        if r.status == "error" and r.error:
            text, style = f"error: {r.error.type}: {' '.join(r.error.message.split())}", "red"
        elif r.status == "skipped" and r.error:
            text, style = " ".join(r.error.message.split()), "yellow"
        else:
            head = headline_metric(r)
            text, style = (_metric_text(*head) if head is not None else "—"), ""
        rows.append((r.module, r.target, text, style, _findings_text(r)))
    # Column widths: a metric name is never cut (the headline column is at least as wide as the longest one);
    # module and target names give way first (ellipsis). One space between columns.
    plain = [len(re.sub(r"\[[^\]]*\]", "", f)) for *_, f in rows]
    find_w = max([8, *plain])
    head_min = max([8, *(len(t.split(" ")[0]) for _, _, t, st, _ in rows if not st)])
    mod_w = min(max([6, *(len(m) for m, *_ in rows)]), 23)
    tgt_w = min(max([6, *(len(t) for _, t, *_ in rows)]), 14)
    spare = width - 3 - find_w - head_min - mod_w - tgt_w
    if spare < 0:  # narrow: targets, then modules, shrink (never below 6)
        cut = min(-spare, tgt_w - 6)
        tgt_w, spare = tgt_w - cut, spare + cut
        mod_w = max(6, mod_w + spare) if spare < 0 else mod_w
    head_w = max(head_min, width - 3 - find_w - mod_w - tgt_w)
    table = Table(title=escape(f"{report.name} — run {report.run_id}"), box=box.SIMPLE_HEAD, padding=(0, 0),
                  show_edge=False, title_justify="left", caption_justify="left",
                  caption="findings: C critical, H high, M medium, L low, I info; `fmaudit report RUN --full` "
                          "prints every metric")
    table.add_column("module", no_wrap=True, overflow="ellipsis", width=mod_w)
    table.add_column("target", no_wrap=True, overflow="ellipsis", width=tgt_w)
    table.add_column("headline", overflow="fold", width=head_w)
    table.add_column("findings", no_wrap=True, width=find_w)
    for module, tgt, text, style, findings in rows:
        if style:
            text = text if len(text) <= 2 * head_w else text[: 2 * head_w - 1] + "…"  # two lines at most
        cell = f"[{style}]{escape(text)}[/]" if style else escape(text)
        table.add_row(escape(module), escape(tgt), cell, findings)
    out.print(table, width=width)
    if full:
        _print_all_metrics(report)
    from fmaudit.verdict import verdict_lines

    out.print("[bold]Verdict per area[/]")
    for line in verdict_lines(report, width=width, markup=True):
        out.print(line, soft_wrap=True, highlight=False)
    failed = [g for r in report.audits for g in r.gates if not g.passed]
    if failed:
        out.print(f"[bold red]{len(failed)} gate(s) failed:[/]")
        for g in failed:
            out.print(f"  - {escape(g.message)}", highlight=False)
    elif any(r.gates for r in report.audits):
        out.print("[green]All gates passed.[/]")


def _print_all_metrics(report) -> None:
    for r in report.audits:
        out.print(f"[bold]{escape(r.unit_id)}[/] ({r.status})", highlight=False)
        for name, m in r.metrics.items():
            unit = f" {m.unit}" if m.unit else ""
            out.print(f"  {escape(_metric_text(name, m))}{escape(unit)}", highlight=False, soft_wrap=True)
        for f in r.findings:
            out.print(f"  [{f.severity}] {escape(f.title)}", highlight=False, soft_wrap=True)


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
        needs = " ".join(filter(None, [", ".join(sorted(cls.requires)), f"({'/'.join(cls.tasks)})" if cls.tasks else ""]))
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
                default = field.default if field.default_factory is None else field.default_factory()
                out.print(f"  {fname} = {escape(repr(default))}: {escape(field.description or '')}", highlight=False)


@app.command()
def schema(which: str = typer.Argument("recipe", help="recipe | report")) -> None:
    """Print the JSON Schema of recipes (for editor completion) or of reports."""
    if which == "recipe":
        from fmaudit.recipe import recipe_json_schema

        print(json.dumps(recipe_json_schema(), indent=2))
    elif which == "report":
        from fmaudit.report import report_json_schema

        print(json.dumps(report_json_schema(), indent=2))
    else:
        err.print(f"[red]unknown schema {which!r}[/]: use `fmaudit schema recipe` or `fmaudit schema report`")
        raise typer.Exit(2)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run folder (or its report.json)."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also write the dashboard's views of this run as one "
                                        "self-contained HTML file (plots, images and scripts inlined)."),
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
            refuse(f"no report.json in {run_dir}: the run was interrupted before it wrote one; its finished units "
                   f"are in events.jsonl, and `fmaudit run RECIPE --resume-from {folder}` completes it")
        refuse(f"no report.json in {run_dir}: not an fmaudit run folder (it has neither report.json nor events.jsonl)")
    except ReportError as exc:
        refuse(str(exc))
    except (OSError, UnicodeError) as exc:  # a folder where report.json should be, no permission...
        refuse(f"cannot read the report in {run_dir}: {exc}")
    _print_summary(rep, full=full)
    if html is not None:
        _dashboard_package()
        from dashboard.export import ExportError, export_html

        try:
            path = export_html(run_dir, html)
        except (ExportError, FileNotFoundError) as exc:
            err.print(f"[red]{exc}[/]")
            raise typer.Exit(2)
        except OSError as exc:
            err.print(f"[red]cannot write {html}: {exc}[/]")
            raise typer.Exit(2)
        out.print(f"HTML report: [bold]{path}[/] ({path.stat().st_size / 2**20:.1f} MiB, self-contained)")


def _dashboard_package() -> Path:
    """The folder of the `dashboard` package (it lives beside `fmaudit/` in the source tree), importable."""
    here = Path(__file__).resolve().parent.parent / "dashboard"
    if (here / "app.py").is_file() and (here / "export.py").is_file():
        if str(here.parent) not in sys.path:
            sys.path.insert(0, str(here.parent))
        return here
    try:
        import dashboard.export  # noqa: F401  (installed as a package)

        return Path(dashboard.export.__file__).resolve().parent
    except ImportError:
        err.print("[red]The dashboard is not installed:[/] it ships in fmaudit's source tree (dashboard/); "
                  "install fmaudit from a checkout with `pip install -e .`.")
        raise typer.Exit(2)


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
    cmd = [sys.executable, "-m", "streamlit", "run", str(app_py), "--server.address", host, "--server.port", str(port),
           "--server.headless", "false" if open_browser else "true", "--browser.gatherUsageStats", "false",
           "--", str(reports_dir.resolve())]
    out.print(f"fmaudit dashboard on http://{host}:{port} for {reports_dir.resolve()} (Ctrl+C stops it)")
    try:
        raise typer.Exit(subprocess.call(cmd, env=env))
    except KeyboardInterrupt:
        raise typer.Exit(0)


def main() -> None:
    """Entry point. Exit codes keep one meaning each: an exception that escapes a command is a one-line
    message and exit 3 (with `run --debug` / `validate --debug`, the traceback too), never Python's exit 1,
    which fmaudit reserves for failed gates. SIGTERM is handled like Ctrl+C from here on."""
    _sigterm_as_interrupt()
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        _print_crash(exc, "--debug" in sys.argv[1:], None)
        sys.exit(3)


if __name__ == "__main__":  # pragma: no cover
    main()
