"""Generic rendering of any module's result: metrics, curves, tables, evidence, images and findings.

These are the fallback for a module with no renderer of its own (`dashboard.renderers`), and the small helpers
the module renderers share (metric cards, target labels, finding metrics by name). Everything renders only
from what the report holds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from dashboard import figures as F
from dashboard.runs import SEVERITY_RANK, RunEntry, safe_child
from dashboard.sinks import Card, Sink
from fmaudit.report import AuditResult, Curve, Metric, RunReport

METRIC_HELP = {
    "metric": "Name the module gives this number (usable in a recipe's fail_if).",
    "value": "The measured value, in the unit of the next column.",
    "unit": "Unit of the value.",
    "CI": "Confidence interval reported by the module (level in the next column).",
    "level": "Confidence level of the interval.",
    "better": "Which direction is good for this metric.",
    "description": "What the number means, as the module describes it.",
}


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
        row.update(
            {
                "metric": name,
                "value": m.value,
                "unit": m.unit or "",
                "CI": (f"[{m.ci_low:.4g}, {m.ci_high:.4g}]" if m.ci_low is not None and m.ci_high is not None else ""),
                "level": m.ci_level,
                "better": {True: "higher", False: "lower", None: "—"}[m.higher_is_better],
                "description": m.description or "",
            }
        )
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
        rows = [
            {k: (v if isinstance(v, (int, float, str, bool)) or v is None else _jsonable(v)) for k, v in row.items()}
            for row in value[:500]
        ]
        return pd.DataFrame(rows)
    if isinstance(value, dict) and value and all(not isinstance(v, (dict, list)) for v in value.values()):
        return pd.DataFrame({"key": list(value), "value": [str(v) for v in value.values()]})
    if (
        isinstance(value, dict)
        and value
        and all(isinstance(v, dict) for v in value.values())
        and all(all(not isinstance(x, (dict, list)) for x in v.values()) for v in value.values())
    ):
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


# Rendering of one result


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
    ordered = sorted(
        findings,
        key=lambda rf: (
            0 if rf[1].gate is not None and not rf[1].gate.passed else 1,
            SEVERITY_RANK.get(rf[1].severity, 9),
        ),
    )
    rows = [
        {
            "severity": f.severity,
            "failed gate": "yes" if f.gate is not None and not f.gate.passed else "",
            "module": r.module,
            "target": r.target,
            "title": f.title,
            "detail": f.detail,
            "metric": f.metric or "",
        }
        for r, f in ordered
    ]
    sink.table(
        pd.DataFrame(rows),
        help={
            "severity": "critical > high > medium > low > info",
            "failed gate": "This finding is a recipe fail_if gate that failed.",
            "detail": "What was seen and why it matters.",
        },
    )


def render_curve_block(sink: Sink, name: str, c: Curve, key: str) -> None:
    roc = is_roc(name, c)
    fig = (
        F.roc_figure([(roc_attack_name(name), c, {})], title=name) if roc else F.curves_figure([(name, c)], title=name)
    )
    sink.figure(fig, key=key)
    if c.description:
        sink.caption(c.description)


def render_table_block(sink: Sink, name: str, value: Any, key: str) -> None:
    if isinstance(value, dict) and "matrix" in value and isinstance(value.get("matrix"), list):
        labels = value.get("labels") or list(range(len(value["matrix"])))
        try:
            fig = F.matrix_figure(
                value["matrix"],
                labels,
                labels,
                name,
                str(value.get("columns", "predicted")),
                str(value.get("rows", "true")),
            )
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


def render_generic(
    sink: Sink,
    r: AuditResult,
    entry: RunEntry,
    *,
    key: str,
    show_status: bool = True,
    skip_curves: frozenset[str] | set[str] = frozenset(),
    images: bool = True,
) -> None:
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
        for col, (rel, caption) in zip(cols, pairs[start : start + per_row]):
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
