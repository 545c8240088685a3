"""The generic views, written once against a `Sink` so the dashboard and the HTML export show the same thing:
the run list, a run's overview, and the category views (Privacy, Robustness, Explainability).

A category view draws each module's plots with its registered renderer (`dashboard.renderers`), then every
result generically (`dashboard.generic`); it renders only from results that exist in the report (no
placeholder data), and a view whose modules are absent says so in one line. Compare is `dashboard.compare_view`.
"""

from __future__ import annotations

import pandas as pd

from dashboard import figures as F
from dashboard.fragments import verdict_block_html
from dashboard.generic import (
    notice_for_entry,
    private_targets,
    render_findings,
    render_generic,
    render_status,
    result_title,
)
from dashboard.renderers import RENDERERS, renderers_for
from dashboard.runs import SEVERITIES, RunEntry, gate_verdict, run_rows
from dashboard.sinks import Card, Sink
from fmaudit.report import AuditResult

VIEWS = ("Runs", "Run overview", "Privacy", "Robustness", "Explainability", "Compare")
CATEGORY_OF_VIEW = {"Privacy": "privacy", "Robustness": "robustness", "Explainability": "explain"}

RUN_HELP = {
    "run": "Run folder inside the reports folder.",
    "date": "When the run started (UTC).",
    "recipe": "Recipe name.",
    "targets": "Models audited in this run (including ones a module produced, e.g. a DP fine-tune).",
    "gates": "Overall verdict of the recipe's fail_if gates: FAIL if any gate failed.",
    "state": "complete / interrupted; 'old schema', 'corrupt' or 'partial' when the report could not be fully read.",
    "modules ok": "Audit units that finished.",
    "modules errored": "Audit units that raised an error (their message is in the run overview).",
    "critical/high findings": "Findings of severity critical or high.",
    "module statuses": "Every unit as module@target: status.",
    "notice": "Why a run could not be read fully.",
}


# ---------------------------------------------------------------------------------------------------
# Runs


def view_runs(sink: Sink, entries: list[RunEntry]) -> pd.DataFrame:
    df = pd.DataFrame(run_rows(entries))
    if df.empty:
        sink.notice("info", "No runs in this folder: `fmaudit run RECIPE -o FOLDER` writes one run folder per run.")
        return df
    help_ = {
        **RUN_HELP,
        "state": "complete / interrupted; otherwise why the run cannot be shown: 'partial' (no "
        "report yet, units recovered from events.jsonl), 'corrupt', 'old schema', "
        "'newer schema', 'too large' or 'empty' (see the notice column).",
    }
    sink.table(df, help=help_, key="runs-table")
    return df


# ---------------------------------------------------------------------------------------------------
# Run overview


UTILITY_KEYS = ("accuracy", "macro_f1", "perplexity", "ece", "nll")


def view_overview(sink: Sink, entry: RunEntry) -> None:
    sink.header(f"Run {entry.label}", level=1)
    if notice_for_entry(sink, entry):
        return
    rep = entry.report
    results = entry.results
    if rep is not None:
        sink.caption(
            f"recipe {rep.name} · started {rep.created_at} · fmaudit {rep.fmaudit_version} · seed "
            f"{rep.seed} · {rep.host.device} on {rep.host.hostname} · recipe sha256 {rep.recipe_sha256[:12]}"
        )
    # The verdict per area first: what a reviewer should conclude, with the numbers behind it.
    from fmaudit.verdict import verdicts, verdicts_from_results

    sink.header("Verdict per area", level=2)
    sink.html(verdict_block_html(verdicts(rep) if rep is not None else verdicts_from_results(results)))
    sink.caption(
        "One line per area from the findings, gates and metrics (rules: fmaudit.verdict); colour = "
        "the worst part: red high / critical, orange medium, yellow low, green nothing found, purple "
        "errored, grey not run." + ("" if rep is not None else " From the units that finished.")
    )
    if rep is not None:
        verdict = gate_verdict(entry)
        sink.cards(
            [
                Card("gates", verdict, "Overall verdict of the recipe's fail_if gates."),
                Card(
                    "exit code",
                    str(rep.exit_code),
                    "0 all gates pass, 1 a gate failed, 3 a module errored, 130 interrupted.",
                ),
                Card(
                    "units",
                    f"{sum(r.status == 'ok' for r in results)} ok / {len(results)}",
                    "Audit units (module x target) that finished.",
                ),
                Card("total time", F.fmt(rep.timings.get("total_s"), "s"), "Wall time of the whole run, seconds."),
            ]
        )
    # Failed gates first.
    gates = [(r, g) for r in results for g in r.gates]
    failed = [(r, g) for r, g in gates if not g.passed]
    if failed:
        sink.header("Failed gates", level=2)
        for r, g in failed:
            sink.notice("error", f"{result_title(r)}: {g.message}")
    # Scorecard by severity.
    sink.header("Findings scorecard", level=2)
    counts = {s: 0 for s in SEVERITIES}
    findings = [(r, f) for r in results for f in r.findings]
    for _, f in findings:
        counts[f.severity] += 1
    sink.cards([Card(s, str(counts[s]), f"Findings of severity {s} across all modules.") for s in SEVERITIES])
    render_findings(sink, findings, empty="No findings.")
    # Targets with utility.
    sink.header("Targets", level=2)
    rows = []
    util = {r.target: r for r in results if r.module == "utility" and r.status == "ok"}
    priv = private_targets(rep)
    targets = list(rep.targets.values()) if rep is not None else []
    for t in targets:
        row = {
            "target": t.name,
            "kind": t.kind,
            "architecture": t.architecture,
            "parameters": t.num_parameters,
            "trainable": t.num_trainable_parameters,
            "source": t.source,
            "private (DP)": "yes" if t.name in priv else "no",
            "fine-tuned on": (t.finetune or {}).get("data", "—") if t.finetune else "—",
        }
        u = util.get(t.name)
        for k in UTILITY_KEYS:
            if u is not None and k in u.metrics:
                row[k] = u.metrics[k].value
        rows.append(row)
    if rows:
        help = {
            "parameters": "Number of parameters of the model.",
            "private (DP)": "Produced by differentially private fine-tuning in this run.",
        }
        if util:
            any_u = next(iter(util.values()))
            for k in UTILITY_KEYS:
                if k in any_u.metrics:
                    m = any_u.metrics[k]
                    help[k] = f"{m.description or k} ({m.unit or 'no unit'}; from the utility module)"
        sink.table(pd.DataFrame(rows), help=help, key="targets-table")
        if not util:
            sink.caption(
                "No utility module in this run: add `- use: utility` to the recipe to see each target's "
                "clean performance here."
            )
    elif not targets:
        sink.caption("Targets are listed in report.json, which this run does not have.")
    # Module statuses.
    sink.header("Audit units", level=2)
    srows = [
        {
            "unit": r.unit_id,
            "module": r.module,
            "category": r.category,
            "target": r.target,
            "status": r.status,
            "duration (s)": r.duration_s,
            "findings": len(r.findings),
            "gates": ("FAIL" if any(not g.passed for g in r.gates) else "pass") if r.gates else "—",
            "error": f"{r.error.type}: {r.error.message}" if r.error else "",
        }
        for r in results
    ]
    if srows:
        sink.table(pd.DataFrame(srows), help={"duration (s)": "Wall time of the unit, seconds."}, key="units-table")
    for r in results:
        if r.status == "error":
            render_status(sink, r)
    # Utility details, and modules no category view covers.
    for i, r in enumerate(results):
        covered = r.category in CATEGORY_OF_VIEW.values() or r.module.split(".")[0] in CATEGORY_OF_VIEW.values()
        if r.status == "ok" and not covered:
            render_generic(sink.section(f"{result_title(r)} — details", expanded=True), r, entry, key=f"ov-{i}")


# ---------------------------------------------------------------------------------------------------
# Category views


def _category_results(entry: RunEntry, category: str) -> list[AuditResult]:
    return [r for r in entry.results if r.category == category or r.module.split(".")[0] == category]


def view_category(sink: Sink, entry: RunEntry, view: str) -> None:
    category = CATEGORY_OF_VIEW[view]
    sink.header(f"{view} — {entry.label}", level=1)
    if notice_for_entry(sink, entry):
        return
    results = _category_results(entry, category)
    if not results:
        sink.notice("info", f"This run has no {view.lower()} results (no {category}.* module in its recipe).")
        return
    for r in results:
        if r.status != "ok":
            render_status(sink, r)
    ok = [r for r in results if r.status == "ok"]
    done: set[str] = set()
    for module, renderer in renderers_for(category).items():
        mine = [r for r in ok if r.module == module]
        if mine:
            renderer.render(sink, entry, mine)
            done.add(module)
    for i, r in enumerate(ok):  # every result generically; a module without a renderer expanded
        expanded = r.module not in done
        specific = RENDERERS.get(r.module)
        skip = {n for n in r.curves if specific is not None and specific.draws(n)}
        title = f"{result_title(r)} — " + ("all metrics, curves and tables" if expanded else "more details")
        render_generic(
            sink.section(title, expanded=expanded),
            r,
            entry,
            key=f"{category}-{i}",
            show_status=False,
            skip_curves=skip,
            images=expanded,
        )
