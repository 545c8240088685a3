"""What the verdict rules read from a report: metric values, formatted numbers, findings by severity, and how
a target is named (a DP twin next to its source). Standard library and `fmaudit.report` only."""

from __future__ import annotations

import math
from collections.abc import Iterable

from fmaudit.report import AuditResult, Finding, Metric, RunReport
from fmaudit.verdict.levels import AREA_OF_CATEGORY, LEVEL_RANK


def metric_value(r: AuditResult, name: str) -> float | None:
    m = r.metrics.get(name)
    return None if m is None or m.value is None or not math.isfinite(m.value) else m.value


def fmt_pct(v: float | None) -> str:
    if v is None:
        return "?"
    p = 100 * v
    return f"{p:.0f}%" if abs(p) >= 10 or p == 0 else f"{p:.1f}%"


def fmt_pct_ci(m: Metric | None) -> str:
    """' [8, 16]' in percent, or ''."""
    if m is None or m.ci_low is None or m.ci_high is None:
        return ""
    lo, hi = 100 * m.ci_low, 100 * m.ci_high
    f = (lambda v: f"{v:.0f}") if max(abs(lo), abs(hi)) >= 10 else (lambda v: f"{v:.1f}")
    return f" [{f(lo)}, {f(hi)}]"


def fmt_num(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "?"
    return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"


def area_of(r: AuditResult) -> str | None:
    cat = r.category or r.module.split(".")[0]
    return AREA_OF_CATEGORY.get(cat) or AREA_OF_CATEGORY.get(r.module.split(".")[0])


def worst_finding(findings: Iterable[Finding], *, metric: str | None = None) -> Finding | None:
    fs = [f for f in findings if metric is None or f.metric == metric]
    return min(fs, key=lambda f: LEVEL_RANK[f.severity] if f.severity in LEVEL_RANK else 99, default=None)


def level_of(f: Finding | None) -> str:
    """A finding's severity as a level (info = ok)."""
    return "ok" if f is None or f.severity == "info" else f.severity


def dp_twins(report: RunReport) -> dict[str, str]:
    """Targets produced by differentially private fine-tuning in this run -> the target they were tuned from."""
    out: dict[str, str] = {}
    for r in report.audits:
        if r.produces and r.module.split(".")[0] == "privacy" and "dp" in r.module.split(".")[-1]:
            out[r.produces] = r.target
    return out


def dp_epsilon(report: RunReport, target: str) -> float | None:
    for r in report.audits:
        if r.produces == target and r.status == "ok" and "dp" in r.module.split(".")[-1]:
            return metric_value(r, "epsilon")
    return None


def target_name(report: RunReport, target: str) -> str:
    """'bert', or 'DP twin bert-dp (ε=8)' for a target DP fine-tuning produced; '' when the run audits a single
    target (naming it on every line says nothing)."""
    twins = dp_twins(report)
    if target in twins:
        eps = dp_epsilon(report, target)
        return f"DP twin {target}" + (f" (ε={fmt_num(eps, 2)})" if eps is not None else "")
    audited = {r.target for r in report.audits}
    return "" if len(audited) <= 1 else target


def who_prefix(who: str) -> str:
    return f"{who}: " if who else ""
