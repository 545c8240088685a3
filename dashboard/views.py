"""The views, written once against a `Sink` so the dashboard and the HTML export show the same thing.

Generic renderers show any module's metrics, curves, tables, evidence and findings. Module-specific
renderers (keyed by module name) add the plots an auditor expects for privacy.*, robustness.* and
explain.* results; they render only from results that exist in the report (no placeholder data), and a
view whose modules are absent says so in one line.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from dashboard import figures as F
from dashboard.runs import SEVERITIES, SEVERITY_RANK, RunEntry, gate_verdict, run_rows, safe_child
from dashboard.sinks import Card, Sink
from fmaudit.report import AuditResult, Curve, Metric, RunReport

VIEWS = ("Runs", "Run overview", "Privacy", "Robustness", "Explainability", "Compare")
CATEGORY_OF_VIEW = {"Privacy": "privacy", "Robustness": "robustness", "Explainability": "explain"}

METRIC_HELP = {
    "metric": "Name the module gives this number (usable in a recipe's fail_if).",
    "value": "The measured value, in the unit of the next column.",
    "unit": "Unit of the value.",
    "CI": "Confidence interval reported by the module (level in the next column).",
    "level": "Confidence level of the interval.",
    "better": "Which direction is good for this metric.",
    "description": "What the number means, as the module describes it.",
}
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
# Small helpers


def result_title(r: AuditResult) -> str:
    return f"{r.module} @ {r.target}"


def metric_value(m: Metric | None) -> float | None:
    return None if m is None else m.value


def metric_card(name: str, m: Metric) -> Card:
    help_parts = [m.description or ""]
    if m.ci_low is not None and m.ci_high is not None:
        lvl = f"{m.ci_level:.0%} " if m.ci_level else ""
        help_parts.append(f"{lvl}CI [{F.fmt(m.ci_low)}, {F.fmt(m.ci_high)}]")
    if m.higher_is_better is not None:
        help_parts.append("higher is better" if m.higher_is_better else "lower is better")
    if m.unit:
        help_parts.append(f"unit: {m.unit}")
    label = f"{name} ({m.unit})" if m.unit and m.unit != name else name
    return Card(label, F.fmt(m.value), " · ".join(p for p in help_parts if p) or None)


def metrics_frame(metrics: dict[str, Metric], prefix: dict[str, Any] | None = None) -> pd.DataFrame:
    rows, tips = [], {}
    for i, (name, m) in enumerate(metrics.items()):
        row = dict(prefix or {})
        row.update({
            "metric": name, "value": m.value, "unit": m.unit or "",
            "CI": (f"[{m.ci_low:.4g}, {m.ci_high:.4g}]" if m.ci_low is not None and m.ci_high is not None else ""),
            "level": m.ci_level, "better": {True: "higher", False: "lower", None: "—"}[m.higher_is_better],
            "description": m.description or "",
        })
        rows.append(row)
        if m.description:
            tips[(i, "value")] = f"{m.description}" + (f" ({m.unit})" if m.unit else "")
            tips[(i, "metric")] = m.description
    df = pd.DataFrame(rows)
    df.attrs["tooltips"] = tips
    return df


def _jsonable(v: Any) -> str:
    if isinstance(v, (dict, list)):
        s = json.dumps(v, ensure_ascii=False)
        return s if len(s) <= 300 else s[:299] + "…"
    return str(v)


def table_frame(value: Any) -> pd.DataFrame | None:
    """A module's table as a DataFrame when it has a tabular shape, else None."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        rows = [{k: (v if isinstance(v, (int, float, str, bool)) or v is None else _jsonable(v))
                 for k, v in row.items()} for row in value[:500]]
        return pd.DataFrame(rows)
    if isinstance(value, dict) and value and all(not isinstance(v, (dict, list)) for v in value.values()):
        return pd.DataFrame({"key": list(value), "value": [str(v) for v in value.values()]})
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()) and \
            all(all(not isinstance(x, (dict, list)) for x in v.values()) for v in value.values()):
        rows = [{"name": k, **v} for k, v in value.items()]
        return pd.DataFrame(rows)
    return None


def is_roc(name: str, c: Curve) -> bool:
    label = f"{name} {c.x_label}".lower()
    return "roc" in name.lower() or "false positive" in label or re.search(r"\bfpr\b", label) is not None


def roc_attack_name(name: str) -> str:
    s = re.sub(r"(^|[_\-/.:\s])roc($|[_\-/.:\s])", r"\1\2", name, flags=re.I).strip("_-/.: ")
    return s or name


def find_metric(metrics: dict[str, Metric], *needles: str, attack: str | None = None) -> tuple[str, Metric] | None:
    """First metric whose lowercase name contains every needle (and the attack name, when given)."""
    for n, m in metrics.items():
        low = n.lower()
        if attack and attack.lower() not in low:
            continue
        if all(nd in low for nd in needles):
            return n, m
    return None


def private_targets(report: RunReport | None) -> dict[str, str]:
    """target name -> the DP unit that produced it (targets fine-tuned with differential privacy)."""
    if report is None:
        return {}
    out = {}
    for r in report.audits:
        if r.produces and (r.module.startswith("privacy.dp") or "dp" in r.module.split(".")[-1]):
            out[r.produces] = r.unit_id
    for name, t in report.targets.items():
        if t.produced_by and "dp" in t.produced_by.split("@")[0].split(":")[-1]:
            out.setdefault(name, t.produced_by)
    return out


def target_label(entry: RunEntry, target: str) -> str:
    priv = private_targets(entry.report)
    if target in priv:
        eps = None
        for r in entry.results:
            if r.unit_id == priv[target]:
                hit = find_metric(r.metrics, "epsilon")
                eps = hit[1].value if hit else None
        return f"{target} (private, DP" + (f" ε={eps:.3g}" if eps is not None else "") + ")"
    return f"{target} (non-private)" if priv else target


# ---------------------------------------------------------------------------------------------------
# Generic rendering of one result


def render_status(sink: Sink, r: AuditResult) -> bool:
    """Notice for an errored / skipped unit. Returns True when there is nothing else to show."""
    if r.status == "error":
        e = r.error
        msg = f"{result_title(r)} errored" + (f": {e.type}: {e.message}" if e else "")
        if e and e.hint:
            msg += f" — hint: {e.hint}"
        sink.notice("error", msg)
        if e and e.traceback:
            sink.section("Traceback", expanded=False).code(e.traceback)
        return True
    if r.status == "skipped":
        e = r.error
        msg = f"{result_title(r)} was skipped" + (f": {e.message}" if e and e.message else ".")
        if e and e.hint:
            msg += f" — hint: {e.hint}"
        sink.notice("info", msg)
        return True
    return False


def render_findings(sink: Sink, findings: list[tuple[AuditResult, Any]], *, empty: str | None = None) -> None:
    if not findings:
        if empty:
            sink.caption(empty)
        return
    ordered = sorted(findings, key=lambda rf: (0 if rf[1].gate is not None and not rf[1].gate.passed else 1,
                                               SEVERITY_RANK.get(rf[1].severity, 9)))
    rows = [{"severity": f.severity, "failed gate": "yes" if f.gate is not None and not f.gate.passed else "",
             "module": r.module, "target": r.target, "title": f.title, "detail": f.detail, "metric": f.metric or ""}
            for r, f in ordered]
    sink.table(pd.DataFrame(rows), help={"severity": "critical > high > medium > low > info",
                                         "failed gate": "This finding is a recipe fail_if gate that failed.",
                                         "detail": "What was seen and why it matters."})


def render_curve_block(sink: Sink, name: str, c: Curve, key: str) -> None:
    roc = is_roc(name, c)
    fig = F.roc_figure([(roc_attack_name(name), c, {})], title=name) if roc else \
        F.curves_figure([(name, c)], title=name)
    sink.figure(fig, key=key)
    if c.description:
        sink.caption(c.description)


def render_table_block(sink: Sink, name: str, value: Any, key: str) -> None:
    if isinstance(value, dict) and "matrix" in value and isinstance(value.get("matrix"), list):
        labels = value.get("labels") or list(range(len(value["matrix"])))
        try:
            fig = F.matrix_figure(value["matrix"], labels, labels, name, str(value.get("columns", "predicted")),
                                  str(value.get("rows", "true")))
            sink.figure(fig, key=key)
            return
        except Exception:
            pass
    df = table_frame(value)
    if df is not None:
        sink.caption(name)
        sink.table(df, key=key)
    else:
        sink.caption(name)
        sink.code(json.dumps(value, indent=2, ensure_ascii=False)[:20000])


def render_generic(sink: Sink, r: AuditResult, entry: RunEntry, *, key: str, show_status: bool = True,
                   skip_curves: frozenset[str] | set[str] = frozenset(), images: bool = True) -> None:
    """Everything one result holds, for any module (curves a specific view already drew are skipped)."""
    if show_status and render_status(sink, r):
        return
    if r.metrics:
        sink.table(metrics_frame(r.metrics), help=METRIC_HELP, key=f"{key}-metrics")
    for i, (name, c) in enumerate(r.curves.items()):
        if name not in skip_curves:
            render_curve_block(sink, name, c, key=f"{key}-curve-{i}")
    for i, (name, value) in enumerate(r.tables.items()):
        render_table_block(sink, name, value, key=f"{key}-table-{i}")
    if r.evidence:
        sink.caption(f"evidence ({len(r.evidence)} item(s))")
        df = table_frame(r.evidence)
        if df is not None:
            sink.table(df, key=f"{key}-evidence")
    if images:
        render_images(sink, entry, r.artifacts)
    if r.findings:
        render_findings(sink, [(r, f) for f in r.findings])
    if r.params:
        sink.section("Parameters", expanded=False).code(json.dumps(r.params, indent=2, ensure_ascii=False))


def render_images(sink: Sink, entry: RunEntry, images: list[Any], limit: int = 24, per_row: int = 3) -> int:
    """PNG files of a result (relative paths, or (path, caption) pairs), read only from inside the run folder,
    which lies inside the reports folder."""
    pairs = [(i, Path(i).name) if isinstance(i, str) else (str(i[0]), str(i[1])) for i in images]
    pairs = [(p, c) for p, c in pairs if p.lower().endswith(".png")]
    shown = 0
    for start in range(0, min(len(pairs), limit), per_row):
        cols = sink.columns(per_row)
        for col, (rel, caption) in zip(cols, pairs[start: start + per_row]):
            p = safe_child(entry.path, rel)
            if p is None:
                col.caption(f"{rel}: not found inside the run folder")
                continue
            col.image(p.read_bytes(), caption=caption)
            shown += 1
    if len(pairs) > limit:
        sink.caption(f"{len(pairs) - limit} more image(s) in the run folder")
    return shown


def notice_for_entry(sink: Sink, entry: RunEntry) -> bool:
    """The run-level notice. Returns True when there is no report and no partial result to show."""
    if entry.state == "ok":
        if entry.report is not None and entry.report.status == "interrupted":
            sink.notice("warning", "This run was interrupted: the report holds the units that finished.")
        return False
    kind = "warning" if entry.state == "partial" else "error"
    sink.notice(kind, f"{entry.label}: {entry.notice}")
    return not entry.partial_results


# ---------------------------------------------------------------------------------------------------
# Runs


def view_runs(sink: Sink, entries: list[RunEntry]) -> pd.DataFrame:
    df = pd.DataFrame(run_rows(entries))
    if df.empty:
        sink.notice("info", "No runs in this folder: `fmaudit run RECIPE -o FOLDER` writes one run folder per run.")
        return df
    help_ = {**RUN_HELP, "state": "complete / interrupted; otherwise why the run cannot be shown: 'partial' (no "
                                  "report yet, units recovered from events.jsonl), 'corrupt', 'old schema', "
                                  "'newer schema', 'too large' or 'empty' (see the notice column)."}
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
        sink.caption(f"recipe {rep.name} · started {rep.created_at} · fmaudit {rep.fmaudit_version} · seed "
                     f"{rep.seed} · {rep.host.device} on {rep.host.hostname} · recipe sha256 {rep.recipe_sha256[:12]}")
    # The verdict per area first: what a reviewer should conclude, with the numbers behind it.
    from fmaudit.verdict import verdicts, verdicts_from_results

    sink.header("Verdict per area", level=2)
    sink.html(F.verdict_block_html(verdicts(rep) if rep is not None else verdicts_from_results(results)))
    sink.caption("One line per area from the findings, gates and metrics (rules: fmaudit/verdict.py); colour = "
                 "the worst part: red high / critical, orange medium, yellow low, green nothing found, purple "
                 "errored, grey not run." + ("" if rep is not None else " From the units that finished."))
    if rep is not None:
        verdict = gate_verdict(entry)
        sink.cards([
            Card("gates", verdict, "Overall verdict of the recipe's fail_if gates."),
            Card("exit code", str(rep.exit_code), "0 all gates pass, 1 a gate failed, 3 a module errored, "
                                                   "130 interrupted."),
            Card("units", f"{sum(r.status == 'ok' for r in results)} ok / {len(results)}",
                 "Audit units (module x target) that finished."),
            Card("total time", F.fmt(rep.timings.get("total_s"), "s"), "Wall time of the whole run, seconds."),
        ])
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
        row = {"target": t.name, "kind": t.kind, "architecture": t.architecture,
               "parameters": t.num_parameters, "trainable": t.num_trainable_parameters,
               "source": t.source, "private (DP)": "yes" if t.name in priv else "no",
               "fine-tuned on": (t.finetune or {}).get("data", "—") if t.finetune else "—"}
        u = util.get(t.name)
        for k in UTILITY_KEYS:
            if u is not None and k in u.metrics:
                row[k] = u.metrics[k].value
        rows.append(row)
    if rows:
        help = {"parameters": "Number of parameters of the model.",
                "private (DP)": "Produced by differentially private fine-tuning in this run."}
        if util:
            any_u = next(iter(util.values()))
            for k in UTILITY_KEYS:
                if k in any_u.metrics:
                    m = any_u.metrics[k]
                    help[k] = f"{m.description or k} ({m.unit or 'no unit'}; from the utility module)"
        sink.table(pd.DataFrame(rows), help=help, key="targets-table")
        if not util:
            sink.caption("No utility module in this run: add `- use: utility` to the recipe to see each target's "
                         "clean performance here.")
    elif not targets:
        sink.caption("Targets are listed in report.json, which this run does not have.")
    # Module statuses.
    sink.header("Audit units", level=2)
    srows = [{"unit": r.unit_id, "module": r.module, "category": r.category, "target": r.target,
              "status": r.status, "duration (s)": r.duration_s, "findings": len(r.findings),
              "gates": ("FAIL" if any(not g.passed for g in r.gates) else "pass") if r.gates else "—",
              "error": f"{r.error.type}: {r.error.message}" if r.error else ""} for r in results]
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
    for module, renderer in SPECIFIC.get(category, []):
        mine = [r for r in ok if r.module == module]
        if mine:
            renderer(sink, entry, mine)
            done.add(module)
    for i, r in enumerate(ok):
        expanded = r.module not in done
        drawn = SPECIFIC_CURVES.get(r.module, ())
        skip = {n for n in r.curves if any(n == d or (d.endswith(".") and n.startswith(d))
                                           or (d.startswith(".") and n.endswith(d)) for d in drawn)}
        title = f"{result_title(r)} — " + ("all metrics, curves and tables" if expanded else "more details")
        render_generic(sink.section(title, expanded=expanded), r, entry, key=f"{category}-{i}", show_status=False,
                       skip_curves=skip, images=expanded)


# -- privacy ------------------------------------------------------------------------------------------


def render_dp(sink: Sink, entry: RunEntry, results: list[AuditResult]) -> None:
    sink.header("Differentially private fine-tuning", level=2)
    ledger = []
    for r in results:
        for name, c in r.curves.items():
            if "epsilon" in f"{name} {c.y_label}".lower():
                ledger.append((f"{r.produces or r.target} ({name})", c))
    if ledger:
        sink.figure(F.curves_figure(ledger, title="Privacy ledger: epsilon spent vs training step", mode="lines"),
                    key="dp-ledger")
        sink.caption("The accountant's epsilon (an upper bound on privacy loss at the recorded delta) as training "
                     "progresses.")
    for r in results:
        sink.header(f"{r.target} → {r.produces or '(no produced target)'}", level=3)
        sink.cards([metric_card(n, m) for n, m in r.metrics.items()][:12])
    # Utility of the DP model beside the non-private baseline: the module's own evaluation
    # ('<metric>' vs 'baseline_<metric>'), else utility audits on both targets.
    rows = []
    for r in results:
        for k in ("accuracy", "perplexity", "loss"):
            dp, base = r.metrics.get(k), r.metrics.get(f"baseline_{k}")
            if dp is None or base is None or dp.value is None or base.value is None:
                continue
            rows.append({"x": k, "y": base.value, "group": f"{r.target} (non-private)", "unit": base.unit,
                         "help": base.description or f"{k} of the non-private model"})
            rows.append({"x": k, "y": dp.value, "group": f"{r.produces or r.target} (private, DP)", "unit": dp.unit,
                         "help": dp.description or f"{k} of the DP model"})
    if not rows:
        util = {r.target: r for r in entry.results if r.module == "utility" and r.status == "ok"}
        for r in results:
            for tname, kind in ((r.target, "non-private"), (r.produces, "private, DP")):
                u = util.get(tname) if tname else None
                for k in ("accuracy", "macro_f1", "perplexity"):
                    m = u.metrics.get(k) if u is not None else None
                    if m is not None and m.value is not None:
                        rows.append({"x": k, "y": m.value, "group": f"{tname} ({kind})", "unit": m.unit,
                                     "help": m.description})
    if rows:
        sink.figure(F.bar_figure(rows, "Utility: private vs non-private", "value"), key="dp-utility")
    elif results:
        sink.caption("No utility of the DP model beside its baseline in this report.")


def render_membership(sink: Sink, entry: RunEntry, results: list[AuditResult]) -> None:
    sink.header("Membership inference", level=2)
    by_target: dict[str, list[AuditResult]] = {}
    for r in results:
        by_target.setdefault(r.target, []).append(r)
    # ROC side by side: one column per target (non-private first, private next to it).
    priv = private_targets(entry.report)
    targets = sorted(by_target, key=lambda t: (t in priv, t))
    cols = sink.columns(len(targets)) if len(targets) > 1 else [sink]
    auc_rows = []
    for col, t in zip(cols, targets):
        label = target_label(entry, t)
        series = []
        for r in by_target[t]:
            rocs = [(n, c) for n, c in r.curves.items() if is_roc(n, c)]
            for n, c in rocs:
                attack = roc_attack_name(n)
                stats = membership_stats(r.metrics, attack, single=len(rocs) == 1)
                series.append((attack, c, stats))
                if stats.get("auc") is not None:
                    auc_rows.append({"label": f"{t} · {attack}", "value": stats["auc"], "lo": stats.get("auc_lo"),
                                     "hi": stats.get("auc_hi"), "unit": "fraction", "help": stats.get("auc_help")})
        if series:
            col.figure(F.roc_figure(series, title=f"ROC — {label}"), key=f"mia-roc-{t}")
        else:
            col.caption(f"{label}: no ROC curve in this result")
        for r in by_target[t]:
            cards = [metric_card(n, r.metrics[n]) for n in ("auc", "auc_null", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr",
                                                             "advantage", "advantage_null", "fpr_resolution",
                                                             "blind_baseline_auc") if n in r.metrics]
            col.cards(cards)
    if auc_rows:
        sink.figure(F.interval_figure(auc_rows, "Attack AUC with confidence intervals", "AUC", reference=0.5,
                                      reference_label="chance 0.5"), key="mia-auc")
        sink.caption("AUC 0.5 = the attacker cannot tell members from non-members; error bars are the module's "
                     "bootstrap intervals (simultaneous over a result's attacks). The headline `auc` is the attack "
                     "chosen on half of the examples, measured on the other half; `auc_null` is what chance alone "
                     "reaches on those examples (95% of label permutations stay below it).")


def membership_stats(metrics: dict[str, Metric], attack: str | None, single: bool = True) -> dict[str, Any]:
    """AUC (with CI) and TPR at 1% / 0.1% FPR of one attack, from the metrics named '<attack>.auc',
    '<attack>.tpr_at_1pct_fpr', '<attack>.tpr_at_0.1pct_fpr' (privacy.membership), or the unprefixed names
    when the result has a single attack."""
    def get(name: str) -> Metric | None:
        if attack and f"{attack}.{name}" in metrics:
            return metrics[f"{attack}.{name}"]
        if single and name in metrics:
            return metrics[name]
        return None

    out: dict[str, Any] = {}
    auc = get("auc")
    if auc is None and single:
        hit = find_metric(metrics, "auc")
        auc = hit[1] if hit else None
    if auc is not None and auc.value is not None:
        out.update(auc=auc.value, auc_lo=auc.ci_low, auc_hi=auc.ci_high, auc_help=auc.description)
    for key, name in (("tpr@1%", "tpr_at_1pct_fpr"), ("tpr@0.1%", "tpr_at_0.1pct_fpr")):
        m = get(name)
        if m is not None and m.value is not None:
            out[key] = m.value
    return out


def render_canary(sink: Sink, entry: RunEntry, results: list[AuditResult]) -> None:
    sink.header("Canary audit: empirical epsilon lower bound vs the accountant's epsilon", level=2)
    rows = []
    dp_eps = {}
    for r in entry.results:
        if r.status == "ok" and r.produces and r.module.startswith("privacy.dp"):
            hit = find_metric(r.metrics, "epsilon")
            if hit:
                dp_eps[r.produces] = hit[1]
    for r in results:
        lb = find_metric(r.metrics, "epsilon_lb") or find_metric(r.metrics, "epsilon", "lower") or \
            find_metric(r.metrics, "eps_lb")
        acc = find_metric(r.metrics, "accountant") or (("accountant epsilon", dp_eps[r.target])
                                                        if r.target in dp_eps else None)
        label = target_label(entry, r.target)
        top = r.metrics.get("epsilon_lb_ceiling")
        if lb:
            rows.append({"x": label, "y": lb[1].value, "group": "audit lower bound (ε ≥)", "unit": lb[1].unit,
                         "help": lb[1].description})
        if top is not None and top.value is not None:
            rows.append({"x": label, "y": top.value, "group": "audit ceiling (perfect attack)", "unit": top.unit,
                         "help": top.description})
        if acc and acc[1].value is not None:
            rows.append({"x": label, "y": acc[1].value, "group": "accountant upper bound (ε ≤)", "unit": acc[1].unit,
                         "help": acc[1].description})
        parts = []
        if acc and acc[1].value is not None:
            parts.append(f"accountant says ε ≤ {F.fmt(acc[1].value)}")
        if lb:
            parts.append(f"audit shows ε ≥ {F.fmt(lb[1].value)}")
        if top is not None and top.value is not None:
            parts.append(f"the audit's ceiling is {F.fmt(top.value)} (no attack could show more"
                         + (", so it cannot confirm or refute the accountant's ε)" if acc and acc[1].value is not None
                            and acc[1].value > top.value else ")"))
        if parts:
            kind = "error" if (lb and acc and acc[1].value is not None and lb[1].value is not None
                               and lb[1].value > acc[1].value) else "info"
            sink.notice(kind, f"{label}: " + "; ".join(parts))
    if rows:
        sink.figure(F.bar_figure(rows, "Epsilon: audit lower bound vs accountant", "epsilon"), key="canary-eps")


# -- robustness --------------------------------------------------------------------------------------


def render_image_attack(sink: Sink, entry: RunEntry, results: list[AuditResult]) -> None:
    sink.header("Adversarial images", level=2)
    for r in results:
        label = target_label(entry, r.target)
        sink.header(label, level=3)
        sink.cards([metric_card(n, r.metrics[n]) for n in ("clean_accuracy", "num_invalid_adversarials",
                                                           "zero_gradient_fraction", "num_examples")
                    if n in r.metrics])
        # One plot per norm (Linf and L2 budgets are not on the same scale).
        groups: dict[str, list[tuple[str, Curve]]] = {}
        for n, c in r.curves.items():
            if "epsilon" in f"{n} {c.x_label}".lower():
                name = n.split(".", 1)[1] if n.startswith("robust_accuracy.") else n
                groups.setdefault(c.x_label, []).append((name, c))
        for i, (x_label, series) in enumerate(groups.items()):
            sink.figure(F.curves_figure(series, title=f"Accuracy vs {x_label} per attack — {r.target}",
                                        mode="lines+markers"), key=f"img-acc-{r.unit_id}-{i}")
        items = []
        for ev in r.evidence:
            if isinstance(ev.get("image"), str):
                panels = " | ".join(map(str, ev.get("image_panels") or []))
                eps = ev.get("epsilon")
                items.append((ev["image"], f"{ev.get('attack', '')} ε={eps:g} · true {ev.get('true_label')} → "
                                           f"{ev.get('adversarial_prediction')}" if isinstance(eps, (int, float)) else
                              str(ev.get("id", "")), panels))
        if items:
            panels = items[0][2]
            sink.caption(f"Example images ({panels})" if panels else "Example images")
            render_images(sink, entry, [(p, c) for p, c, _ in items], per_row=3)
        elif r.evidence:
            sink.caption("The evidence holds example ids only (set store_examples: true in the recipe to keep "
                         "images).")


def render_certify(sink: Sink, entry: RunEntry, results: list[AuditResult]) -> None:
    """robustness.certify: certified accuracy (a lower bound on robustness) and the smoothed classifier's
    accuracy under attack (an upper bound) on one plot, one per target."""
    sink.header("Certified robustness (randomized smoothing)", level=2)
    for r in results:
        sink.header(target_label(entry, r.target), level=3)
        sink.cards([metric_card(n, r.metrics[n]) for n in ("smoothed_clean_accuracy", "abstention_rate",
                                                           "median_certified_radius", "num_invariant_violations")
                    if n in r.metrics])
        series = [(name, c) for name, c in r.curves.items() if "radius" in (c.x_label or "").lower()]
        if series:
            sink.figure(F.curves_figure(series, title=f"Certified vs attacked accuracy — {r.target}",
                                        mode="lines+markers",
                                        caption="The true robust accuracy lies between the two curves: "
                                                "certification proves the lower one, attacks show the upper one."),
                        key=f"certify-{r.unit_id}")


def render_text_attack(sink: Sink, entry: RunEntry, results: list[AuditResult]) -> None:
    sink.header("Adversarial text", level=2)
    rate, cost = [], []
    for r in results:
        attack = str(r.params.get("attack") or "attack")
        label = f"{r.target} · {attack}"
        sink.header(label, level=3)
        sink.cards([metric_card(n, r.metrics[n]) for n in (
            "clean_accuracy", "accuracy_under_attack", "attack_success_rate", "avg_perturbed_word_pct", "avg_queries",
            "wall_time_per_example_s", "num_verified", "num_unverified") if n in r.metrics])
        for n in ("clean_accuracy", "accuracy_under_attack", "attack_success_rate"):
            m = r.metrics.get(n)
            if m is not None and m.value is not None:
                rate.append({"x": n, "y": m.value, "group": label, "unit": m.unit, "help": m.description})
        for n in ("avg_queries",):
            m = r.metrics.get(n)
            if m is not None and m.value is not None:
                cost.append({"x": label, "y": m.value, "group": n, "unit": m.unit, "help": m.description})
    if rate or cost:
        cols = sink.columns(2)
        if rate:
            cols[0].figure(F.bar_figure(rate, "Accuracy and attack success rate", "fraction"), key="txt-rate")
        if cost:
            cols[1].figure(F.bar_figure(cost, "Query cost per attacked example", "queries"), key="txt-cost")
    import html as _h

    for r in results:
        texts = [ev for ev in r.evidence if _text_pair(ev) is not None]
        if texts:
            sink.header(f"Adversarial examples — {r.target} · {r.params.get('attack', '')}", level=3)
        for ev in texts[:20]:
            orig, adv = _text_pair(ev)
            a, b, changed = F.marked_or_diff_html(orig, adv)
            meta = ", ".join(f"{k}: {ev[k]}" for k in ("id", "status", "verified", "label", "original_prediction",
                                                         "adversarial_prediction", "queries") if k in ev)
            sink.html(f'<div class="advpair" style="border-left:3px solid #fbd38d; padding:4px 8px; margin:6px 0">'
                      f"<div><b>original</b>: {a}</div><div><b>adversarial</b>: {b}</div>"
                      f'<div style="color:#666; font-size:0.85em">{changed} word(s) changed · {_h.escape(meta)}'
                      "</div></div>")
        if r.evidence and not texts:
            sink.caption(f"{r.target}: the evidence holds example ids only (set store_examples: true in the recipe "
                         "to keep the texts).")


def _text_pair(ev: dict[str, Any]) -> tuple[str, str] | None:
    for a, b in (("original_text", "adversarial_text"), ("original_text", "perturbed_text"),
                 ("original", "adversarial")):
        if isinstance(ev.get(a), str) and isinstance(ev.get(b), str):
            return ev[a], ev[b]
    return None


# -- explain -----------------------------------------------------------------------------------------


def render_attribution(sink: Sink, entry: RunEntry, results: list[AuditResult]) -> None:
    sink.header("Attributions", level=2)
    for r in results:
        sink.header(f"{target_label(entry, r.target)}", level=3)
        methods = list((r.tables.get("methods") or {}).keys()) if isinstance(r.tables.get("methods"), dict) else []
        # Quality metrics: one row per method ('<method>.<metric>'), random ordering as the reference.
        quality = _quality_frame(r.metrics, methods + ["random"])
        if quality is not None:
            sink.caption("Explanation quality per method (hover a column for its meaning; compare deletion / "
                         "insertion with the random ordering).")
            sink.table(quality, help={k: v for k, v in _QUALITY_HELP.items()}, key=f"expl-q-{r.unit_id}")
        # Deletion / insertion curves.
        for kind in ("deletion", "insertion"):
            series = [(n.rsplit(".", 1)[0], c) for n, c in r.curves.items() if n.endswith(f".{kind}")]
            if series:
                sink.figure(F.curves_figure(series, title=f"{kind.title()} curves", mode="lines+markers"),
                            key=f"expl-{kind}-{r.unit_id}")
        # Randomization sanity check.
        rand = r.tables.get("randomization")
        rows = []
        for m in methods:
            met = r.metrics.get(f"{m}.randomization_spearman")
            if met is not None and met.value is not None:
                rows.append({"label": m, "value": met.value, "lo": met.ci_low, "hi": met.ci_high,
                             "unit": met.unit, "help": met.description})
        if rows:
            thr = rand.get("threshold") if isinstance(rand, dict) else None
            sink.figure(F.interval_figure(rows, "Model-parameter randomization check (Adebayo et al. 2018)",
                                          "Spearman vs randomized model", reference=thr,
                                          reference_label=f"fail above {thr}" if thr is not None else ""),
                        key=f"expl-rand-{r.unit_id}")
            failing = (rand or {}).get("failing_methods") if isinstance(rand, dict) else None
            if failing:
                sink.notice("error", f"Fails the randomization check: {', '.join(map(str, failing))} — these "
                                     "attributions barely depend on the trained weights.")
            elif isinstance(rand, dict):
                sink.notice("success", "Every method passes the randomization check (attributions change when the "
                                       "top layers are re-initialized).")
        # Token heatmaps.
        shown = 0
        for ev in r.evidence:
            if shown >= 12:
                break
            attrs = ev.get("attributions")
            if isinstance(attrs, dict):
                title = " · ".join(f"{k}: {ev[k]}" for k in ("id", "true_label", "predicted_label", "explained_label")
                                   if ev.get(k) is not None)
                if isinstance(ev.get("text"), str):
                    sink.caption(ev["text"])
                for m, toks in list(attrs.items())[:3]:
                    if isinstance(toks, list) and toks and all(isinstance(t, dict) for t in toks):
                        words = [t.get("token") if t.get("token") is not None else f"#{t.get('token_id')}"
                                 for t in toks]
                        sink.html(F.token_heatmap_html(words, [t.get("score", 0.0) for t in toks], f"{title} · {m}"))
                shown += 1
        if shown and not any("token" in t for ev in r.evidence for toks in (ev.get("attributions") or {}).values()
                             if isinstance(toks, list) for t in toks if isinstance(t, dict)):
            sink.caption("Tokens are shown as ids: set store_examples: true in the recipe to keep the text.")
        top = r.tables.get("top_tokens")
        if isinstance(top, dict):
            cols = sink.columns(2)
            for col, key in zip(cols, ("towards_explained", "against_explained")):
                df = table_frame(top.get(key))
                if df is not None:
                    col.caption(f"Most influential tokens — {key.replace('_', ' ')} ({top.get('method', '')})")
                    col.table(df, key=f"expl-top-{key}-{r.unit_id}")
        # Image overlays: heatmap PNGs written by the module into the run folder.
        heatmaps = [(ev["heatmap"], " · ".join(f"{k}: {ev[k]}" for k in ("id", "true_label", "predicted_label")
                                               if ev.get(k) is not None))
                    for ev in r.evidence if isinstance(ev.get("heatmap"), str)]
        if heatmaps:
            sink.caption("Attribution overlays (input, then one panel per method; red = towards the explained class)")
        render_images(sink, entry, heatmaps, per_row=3)


_QUALITY_HELP = {
    "deletion_aopc": "Drop of the output as top features are removed (higher = more faithful).",
    "insertion_auc": "Output as top features are inserted (higher = more faithful).",
    "infidelity": "Captum infidelity (lower is better).",
    "sensitivity_max": "Captum sensitivity_max: change under small noise (lower is better).",
    "randomization_spearman": "Rank correlation with a randomized model (low = depends on the weights).",
    "randomization_spearman_abs": "Same, on absolute values.",
    "seconds_per_example": "Attribution time per example, seconds.",
    "convergence_delta": "Integrated gradients convergence delta.",
}


def _quality_frame(metrics: dict[str, Metric], methods: list[str]) -> pd.DataFrame | None:
    rows = []
    for m in methods:
        row: dict[str, Any] = {"method": m}
        for n, met in metrics.items():
            if n.startswith(f"{m}.") and met.value is not None:
                row[n[len(m) + 1:]] = met.value
        if len(row) > 1:
            rows.append(row)
    return pd.DataFrame(rows) if rows else None


# Curves the specific views draw (exact names, or prefixes ending in '.'): not drawn again in "more details".
SPECIFIC_CURVES: dict[str, tuple[str, ...]] = {
    "privacy.dp_finetune": ("epsilon_ledger",),
    "privacy.membership": ("roc.",),
    "explain.attribution": (".deletion", ".insertion"),
    "robustness.image_attack": ("robust_accuracy.",),
}

SPECIFIC: dict[str, list[tuple[str, Callable[[Sink, RunEntry, list[AuditResult]], None]]]] = {
    "privacy": [("privacy.dp_finetune", render_dp), ("privacy.membership", render_membership),
                ("privacy.canary_audit", render_canary)],
    "robustness": [("robustness.image_attack", render_image_attack), ("robustness.text_attack", render_text_attack),
                   ("robustness.certify", render_certify)],
    "explain": [("explain.attribution", render_attribution)],
}


# ---------------------------------------------------------------------------------------------------
# Compare


def compare_frame(a: RunEntry, b: RunEntry) -> pd.DataFrame:
    """Every metric of both runs, matched on (module, target, metric), with a verdict that knows noise from
    change (the rule is `fmaudit.compare`'s): 'kind' is 'audit' or 'cost' (wall-clock and cost figures, never
    better or worse)."""
    from fmaudit.compare import compare_results

    rows = []
    for d in compare_results(a.results, b.results):
        m = d.a or d.b
        rows.append({"module": d.module, "target": d.target, "metric": d.metric, "A": metric_value(d.a),
                     "B": metric_value(d.b), "B − A": d.delta, "relative": d.relative, "noise bound": d.noise,
                     "verdict": d.verdict, "kind": d.kind, "unit": m.unit or "", "description": m.description or ""})
    return pd.DataFrame(rows, columns=["module", "target", "metric", "A", "B", "B − A", "relative", "noise bound",
                                       "verdict", "kind", "unit", "description"])


COMPARE_HELP = {
    "B − A": "Difference B minus A, in the metric's unit.", "relative": "(B − A) / |A|.",
    "noise bound": "The largest |B − A| that counts as no change: the interval of the difference (from both runs' "
                   "confidence intervals) when the metric has one, else the relative tolerance 1e-6.",
    "verdict": "same: equal within float tolerance; within noise: differs by less than the interval of the "
               "difference; better / worse by the metric's good direction ('changed' when it has none). Timing and "
               "cost metrics are only higher / lower.",
    "kind": "audit: a measured result; cost: wall-clock time or a cost ratio (depends on the machine, its load and "
            "the cache, not on the model).",
}



def view_compare(sink: Sink, a: RunEntry, b: RunEntry) -> pd.DataFrame:
    from fmaudit.compare import CHANGED

    sink.header(f"Compare: A = {a.label}  ·  B = {b.label}", level=1)
    for e in (a, b):
        if e.state != "ok":
            sink.notice("warning" if e.state == "partial" else "error", f"{e.label}: {e.notice}")
    df = compare_frame(a, b)
    if df.empty:
        sink.notice("info", "Neither run has metrics to compare.")
        return df
    audit, cost = df[df["kind"] == "audit"], df[df["kind"] == "cost"]
    changed = audit[audit["verdict"].isin(sorted(CHANGED))]
    count = lambda v: str(int((audit["verdict"] == v).sum()))  # noqa: E731
    sink.cards([
        Card("metrics compared", str(len(df)), "Metrics matched by module, target and name."),
        Card("changed", str(len(changed)), "Audit metrics that moved beyond their noise bound, or are in one run only."),
        Card("better in B", count("better in B"), "Moved beyond its noise in the metric's good direction."),
        Card("worse in B", count("worse in B"), "Moved beyond its noise in the metric's bad direction."),
        Card("within noise", count("within noise"), "Differ, but by less than the interval of the difference."),
        Card("only in one run", str(int(audit["verdict"].str.startswith("only").sum())),
             "Metric present in one run only."),
        Card("timing / cost", str(len(cost)), "Wall-clock and cost figures: shown apart, never better or worse."),
    ])
    cols = sink.columns(2)
    for col, e, tag in ((cols[0], a, "A"), (cols[1], b, "B")):
        col.header(f"{tag}: {e.label}", level=3)
        rep = e.report
        col.caption(f"recipe {e.recipe_name or '—'} · {e.created_at or '—'} · gates {gate_verdict(e)}"
                    + (f" · recipe sha256 {rep.recipe_sha256[:12]}" if rep else ""))
    if a.report is not None and b.report is not None:
        from fmaudit.verdict import verdicts

        va, vb = verdicts(a.report), verdicts(b.report)
        sink.html(F.verdict_compare_html(
            [(x.area, (x.level, x.text), (y.level, y.text)) for x, y in zip(va, vb)]))
    sink.header("Differences", level=2)
    if changed.empty:
        sink.notice("success", "No audit metric changed beyond its noise (confidence interval, or a relative "
                               "tolerance of 1e-6 when it has none)"
                    + (f"; {int((audit['verdict'] == 'within noise').sum())} differ within their intervals."
                       if (audit["verdict"] == "within noise").any() else "."))
    else:
        order = {"worse in B": 0, "better in B": 1, "changed": 2, "only in A": 3, "only in B": 4}
        changed = changed.assign(_o=changed["verdict"].map(order)).sort_values(["_o", "module", "target", "metric"],
                                                                               kind="stable").drop(columns="_o")
        both = changed[changed["relative"].notna()]
        if not both.empty:
            sink.figure(F.diff_figure(both.to_dict("records")), key="compare-diff")
        sink.html(_diff_html(changed))
    noise = audit[audit["verdict"] == "within noise"]
    if not noise.empty:
        sink.section(f"Within noise ({len(noise)})", expanded=False).html(_diff_html(noise))
    sink.header("Timing and cost (not audit results)", level=2)
    if cost.empty:
        sink.caption("No timing or cost metric in these runs.")
    else:
        sink.caption("Wall-clock times and cost ratios depend on the machine, its load and the cache (a cached "
                     "fine-tune takes no time), not on the model: they are never counted as better or worse.")
        sink.html(_diff_html(cost))
    sink.header("All metrics", level=2)
    sink.table(df, help=COMPARE_HELP, key="compare-table")
    return df


def _diff_html(df: pd.DataFrame) -> str:
    import html as _h

    colour = {"better in B": "#e6f4ea", "worse in B": "#fde7e9", "changed": "#fff4d6", "only in A": "#eef",
              "only in B": "#eef", "within noise": "#f6f7f9", "higher in B": "#f6f7f9", "lower in B": "#f6f7f9"}
    rows = []
    for _, r in df.iterrows():
        def f(v: Any) -> str:
            return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"
        noise = r.get("noise bound")
        rows.append(f'<tr style="background:{colour.get(r["verdict"], "#fff")}" title="{_h.escape(r["description"])}">'
                    f"<td>{_h.escape(r['module'])}</td><td>{_h.escape(r['target'])}</td>"
                    f"<td>{_h.escape(r['metric'])}</td><td>{f(r['A'])}</td><td>{f(r['B'])}</td>"
                    f"<td>{f(r['B − A'])}</td><td>{'±' + f(noise) if noise is not None and noise == noise else '—'}"
                    f"</td><td>{_h.escape(r['unit'])}</td><td><b>{_h.escape(r['verdict'])}</b></td></tr>")
    return ('<table class="diff" style="border-collapse:collapse; width:100%"><thead><tr><th>module</th><th>target'
            "</th><th>metric</th><th>A</th><th>B</th><th>B − A</th><th>noise bound</th><th>unit</th><th>verdict</th>"
            "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
