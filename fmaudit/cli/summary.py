"""The terminal summary of a run: one row per unit (module, target, headline metric, findings by severity)
within 80 columns, then the verdict per area and the gates; `full` adds every metric of every unit."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from typing import Any

from rich import box
from rich.markup import escape
from rich.table import Table

from fmaudit.cli.console import out

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


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}"


def headline_metric(result: Any) -> tuple[str, Any] | None:
    """(name, Metric) of the unit's headline metric, or None when it has no metric with a value."""
    valued = [(k, m) for k, m in result.metrics.items() if m.value is not None]
    for pattern in HEADLINE_METRICS.get(result.module, ()):
        for k, m in valued:
            if fnmatch.fnmatchcase(k, pattern):
                return k, m
    undotted = [(k, m) for k, m in valued if "." not in k]
    return (undotted or valued)[0] if (undotted or valued) else None


def metric_text(name: str, m: Any) -> str:
    """'name value [ci_low, ci_high]' (the interval when the metric has one)."""
    ci = f" [{_fmt(m.ci_low)}, {_fmt(m.ci_high)}]" if m.ci_low is not None and m.ci_high is not None else ""
    return f"{name} {_fmt(m.value)}{ci}"


def _findings_text(result: Any) -> str:
    counts: dict[str, int] = {}
    for f in result.findings:
        counts[f.severity] = counts.get(f.severity, 0) + 1
    colour = {"critical": "bold red", "high": "red", "medium": "yellow", "low": "cyan", "info": "dim"}
    parts = [f"[{colour[s]}]{counts[s]}{s[0].upper()}[/]" for s in SEVERITY_ORDER if counts.get(s)]
    return " ".join(parts) or "—"


# unit status -> its headline cell (text, style) from the unit's error, for a unit that has one
STATUS_CELLS: dict[str, Callable[[Any], tuple[str, str]]] = {
    "error": lambda e: (f"error: {e.type}: {' '.join(e.message.split())}", "red"),
    "skipped": lambda e: (" ".join(e.message.split()), "yellow"),
}


def _headline_cell(result: Any) -> tuple[str, str]:
    """(text, style) of a unit's headline cell: why it errored or was skipped, else its headline metric."""
    cell = STATUS_CELLS.get(result.status)
    if cell is not None and result.error:
        return cell(result.error)
    head = headline_metric(result)
    return (metric_text(*head) if head is not None else "—"), ""


def print_summary(report: Any, full: bool = False) -> None:
    """One row per unit (module, target, its headline metric, findings by severity: C/H/M/L/I), then the
    verdict per area and the gates, within 80 columns. `full`: every metric of every unit after it."""
    width = min(out.width, SUMMARY_WIDTH)
    rows = []
    for r in report.audits:
        rows.append((r.module, r.target, *_headline_cell(r), _findings_text(r)))
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
    table = Table(
        title=escape(f"{report.name} — run {report.run_id}"),
        box=box.SIMPLE_HEAD,
        padding=(0, 0),
        show_edge=False,
        title_justify="left",
        caption_justify="left",
        caption="findings: C critical, H high, M medium, L low, I info; `fmaudit report RUN --full` "
        "prints every metric",
    )
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


def _print_all_metrics(report: Any) -> None:
    """Every metric (with its unit) and finding of every unit."""
    for r in report.audits:
        out.print(f"[bold]{escape(r.unit_id)}[/] ({r.status})", highlight=False)
        for name, m in r.metrics.items():
            unit = f" {m.unit}" if m.unit else ""
            out.print(f"  {escape(metric_text(name, m))}{escape(unit)}", highlight=False, soft_wrap=True)
        for f in r.findings:
            out.print(f"  [{f.severity}] {escape(f.title)}", highlight=False, soft_wrap=True)
