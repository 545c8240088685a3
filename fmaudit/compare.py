"""Compare two runs metric by metric, knowing what a difference is.

Pure functions over audit results (standard library and `fmaudit.report` only), used by the dashboard's
Compare view and usable from scripts.

**When does a metric count as changed?** Metrics are matched on (module, target, metric name); the first
result of a (module, target) pair that finished is used. With A and B the two values and d = B - A:

- *same* when |d| <= tol, where tol = rtol * max(|A|, |B|) + atol (rtol = 1e-6, atol = 1e-12 by default):
  float noise from a different summation order or a cached model (utility NLL 0.48444377 vs 0.48444404)
  is not a change;
- *within noise* when the metric has a confidence interval in either run and |d| does not exceed the
  interval of the difference, approximated from each run's interval on the side facing the other value:
  sqrt(armA^2 + armB^2) with armA = A's upper (or lower) half-width towards B and armB likewise (a 95%
  interval per run gives roughly a 95% interval for d when the runs are independent). A run with an
  interval and one without: that one arm;
- otherwise *better in B* / *worse in B* by the metric's `higher_is_better`, or *changed* when it has none;
- *only in A* / *only in B* when one run lacks the metric; a value missing (null) in one run only is *changed*.

**Timing and cost metrics are never better or worse.** Wall-clock figures change with the machine, its load
and the cache, not with what was audited. The report schema has no field marking them, so they are
recognised here, by `is_cost_metric`: a `kind` of "cost" (should the schema ever gain one; "measurement"
then overrides the rules below), a time unit (seconds, s, ms, minutes, hours), a name (any dot-separated
component) ending in `_seconds`, `_s` or `_ms`, or containing `seconds`, `wall_time`, `per_example`,
`per_second` or `cost_ratio`, a unit "ratio" on a name mentioning time, cost or speed, or a name in
`COST_METRICS`. They are listed in their own section with *higher in B* / *lower in B* / *same*.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from fmaudit.report import AuditResult, Metric

RTOL = 1e-6
ATOL = 1e-12

TIME_UNITS = {"seconds", "second", "s", "sec", "secs", "ms", "milliseconds", "minutes", "min", "hours", "h"}
COST_METRICS = {
    "reference_cost_ratio",
    "train_seconds",
    "wall_time_per_example_s",
    "duration_s",
    "total_s",
    "images_per_second",
    "build_seconds",
    "attack_seconds",
    "canary_run_seconds",
}
_COST_NAME = re.compile(r"(_seconds|_s|_ms)$|seconds|wall_time|per_example|per_second|cost_ratio")
_TIMEISH = re.compile(r"time|cost|speed|second")

AUDIT_VERDICTS = ("worse in B", "better in B", "changed", "only in A", "only in B", "within noise", "same")
COST_VERDICTS = ("higher in B", "lower in B", "only in A", "only in B", "same")
CHANGED = {"worse in B", "better in B", "changed", "only in A", "only in B"}


def is_cost_metric(name: str, m: Metric | None) -> bool:
    """True for wall-clock and cost figures (see the module docstring for the rule)."""
    kind = getattr(m, "kind", None) if m is not None else None
    if kind in ("cost", "measurement"):
        return kind == "cost"
    if name in COST_METRICS:
        return True
    unit = (m.unit or "").strip().lower() if m is not None else ""
    if unit in TIME_UNITS:
        return True
    parts = [p.lower() for p in re.split(r"[.@]", name) if p]
    if any(p in COST_METRICS or _COST_NAME.search(p) for p in parts):
        return True
    return unit == "ratio" and _TIMEISH.search(name.lower()) is not None


@dataclass(frozen=True)
class MetricDiff:
    module: str
    target: str
    metric: str
    a: Metric | None
    b: Metric | None
    kind: str  # "audit" | "cost"
    verdict: str
    delta: float | None
    relative: float | None
    noise: float | None  # the largest |B - A| that still counts as no change (tolerance or interval)

    @property
    def changed(self) -> bool:
        return self.kind == "audit" and self.verdict in CHANGED


def _value(m: Metric | None) -> float | None:
    if m is None or m.value is None or not math.isfinite(m.value):
        return None
    return m.value


def tolerance(va: float, vb: float, rtol: float = RTOL, atol: float = ATOL) -> float:
    return rtol * max(abs(va), abs(vb)) + atol


def interval_bound(a: Metric, b: Metric) -> float | None:
    """Half-width of the interval of B - A from each run's interval (None when neither has one)."""
    va, vb = a.value, b.value
    assert va is not None and vb is not None
    up = vb >= va  # B above A: A's upper arm and B's lower arm face each other

    def arm(m: Metric, v: float, upper: bool) -> float | None:
        if m.ci_low is None or m.ci_high is None:
            return None
        return max(0.0, (m.ci_high - v) if upper else (v - m.ci_low))

    arms = [x for x in (arm(a, va, up), arm(b, vb, not up)) if x is not None]
    if not arms:
        return None
    return math.sqrt(sum(x * x for x in arms))


def diff_metric(
    module: str, target: str, name: str, a: Metric | None, b: Metric | None, *, rtol: float = RTOL, atol: float = ATOL
) -> MetricDiff:
    m = a or b
    kind = "cost" if is_cost_metric(name, m) else "audit"
    va, vb = _value(a), _value(b)
    delta = vb - va if va is not None and vb is not None else None
    relative = delta / abs(va) if delta is not None and va not in (None, 0.0) else None
    noise = None
    if a is None or b is None or m is None:
        verdict = "only in A" if b is None else "only in B"
    elif va is None or vb is None or delta is None:
        verdict = "same" if va is None and vb is None else "changed"
    else:
        tol = tolerance(va, vb, rtol, atol)
        noise = tol
        if abs(delta) <= tol:
            verdict = "same"
        elif kind == "cost":
            verdict = "higher in B" if delta > 0 else "lower in B"
        else:
            ci = interval_bound(a, b)
            if ci is not None:
                noise = max(tol, ci)
            if ci is not None and abs(delta) <= ci:
                verdict = "within noise"
            elif m.higher_is_better is None:
                verdict = "changed"
            else:
                verdict = "better in B" if (delta > 0) == m.higher_is_better else "worse in B"
    return MetricDiff(module, target, name, a, b, kind, verdict, delta, relative, noise)


def index_metrics(results: Iterable[AuditResult]) -> dict[tuple[str, str, str], Metric]:
    """(module, target, metric) -> Metric, from the first finished result of each (module, target)."""
    out: dict[tuple[str, str, str], Metric] = {}
    for r in results:
        if r.status != "ok":
            continue
        for n, m in r.metrics.items():
            out.setdefault((r.module, r.target, n), m)
    return out


def compare_results(
    a: Iterable[AuditResult], b: Iterable[AuditResult], *, rtol: float = RTOL, atol: float = ATOL
) -> list[MetricDiff]:
    """Every metric of both runs, matched on (module, target, metric), sorted by that key."""
    ia, ib = index_metrics(a), index_metrics(b)
    return [diff_metric(*k, ia.get(k), ib.get(k), rtol=rtol, atol=atol) for k in sorted(set(ia) | set(ib))]


def summary(diffs: list[MetricDiff]) -> dict[str, int]:
    """Counts: 'compared'; 'changes' (audit metrics beyond their noise, or in one run only); each audit verdict
    ('changed' is the verdict of a metric without a good direction); 'cost' and 'cost changed'."""
    audit = [d for d in diffs if d.kind == "audit"]
    out = {"compared": len(diffs), "changes": sum(d.changed for d in diffs), "cost": len(diffs) - len(audit)}
    for v in AUDIT_VERDICTS:
        out[v] = sum(d.verdict == v for d in audit)
    out["cost changed"] = sum(d.kind == "cost" and d.verdict != "same" for d in diffs)
    return out
