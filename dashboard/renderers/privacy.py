"""Privacy renderers: the DP fine-tune's privacy ledger and utility, membership-inference ROC curves side by side
per target, and the canary audit's epsilon lower bound against the accountant's."""

from __future__ import annotations

from typing import Any

from dashboard import figures as F
from dashboard.generic import find_metric, is_roc, metric_card, private_targets, roc_attack_name, target_label
from dashboard.runs import RunEntry
from dashboard.sinks import Sink
from fmaudit.report import AuditResult, Metric


def render_dp(sink: Sink, entry: RunEntry, results: list[AuditResult]) -> None:
    sink.header("Differentially private fine-tuning", level=2)
    ledger = []
    for r in results:
        for name, c in r.curves.items():
            if "epsilon" in f"{name} {c.y_label}".lower():
                ledger.append((f"{r.produces or r.target} ({name})", c))
    if ledger:
        sink.figure(
            F.curves_figure(ledger, title="Privacy ledger: epsilon spent vs training step", mode="lines"),
            key="dp-ledger",
        )
        sink.caption(
            "The accountant's epsilon (an upper bound on privacy loss at the recorded delta) as training progresses."
        )
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
            rows.append(
                {
                    "x": k,
                    "y": base.value,
                    "group": f"{r.target} (non-private)",
                    "unit": base.unit,
                    "help": base.description or f"{k} of the non-private model",
                }
            )
            rows.append(
                {
                    "x": k,
                    "y": dp.value,
                    "group": f"{r.produces or r.target} (private, DP)",
                    "unit": dp.unit,
                    "help": dp.description or f"{k} of the DP model",
                }
            )
    if not rows:
        util = {r.target: r for r in entry.results if r.module == "utility" and r.status == "ok"}
        for r in results:
            for tname, kind in ((r.target, "non-private"), (r.produces, "private, DP")):
                u = util.get(tname) if tname else None
                for k in ("accuracy", "macro_f1", "perplexity"):
                    m = u.metrics.get(k) if u is not None else None
                    if m is not None and m.value is not None:
                        rows.append(
                            {"x": k, "y": m.value, "group": f"{tname} ({kind})", "unit": m.unit, "help": m.description}
                        )
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
                    auc_rows.append(
                        {
                            "label": f"{t} · {attack}",
                            "value": stats["auc"],
                            "lo": stats.get("auc_lo"),
                            "hi": stats.get("auc_hi"),
                            "unit": "fraction",
                            "help": stats.get("auc_help"),
                        }
                    )
        if series:
            col.figure(F.roc_figure(series, title=f"ROC — {label}"), key=f"mia-roc-{t}")
        else:
            col.caption(f"{label}: no ROC curve in this result")
        for r in by_target[t]:
            cards = [
                metric_card(n, r.metrics[n])
                for n in (
                    "auc",
                    "auc_null",
                    "tpr_at_1pct_fpr",
                    "tpr_at_0.1pct_fpr",
                    "advantage",
                    "advantage_null",
                    "fpr_resolution",
                    "blind_baseline_auc",
                )
                if n in r.metrics
            ]
            col.cards(cards, per_row=3 if len(targets) > 1 else 5)
    if auc_rows:
        sink.figure(
            F.interval_figure(
                auc_rows, "Attack AUC with confidence intervals", "AUC", reference=0.5, reference_label="chance 0.5"
            ),
            key="mia-auc",
        )
        sink.caption(
            "AUC 0.5 = the attacker cannot tell members from non-members; error bars are the module's "
            "bootstrap intervals (simultaneous over a result's attacks). The headline `auc` is the attack "
            "chosen on half of the examples, measured on the other half; `auc_null` is what chance alone "
            "reaches on those examples (95% of label permutations stay below it)."
        )


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
        lb = (
            find_metric(r.metrics, "epsilon_lb")
            or find_metric(r.metrics, "epsilon", "lower")
            or find_metric(r.metrics, "eps_lb")
        )
        acc = find_metric(r.metrics, "accountant") or (
            ("accountant epsilon", dp_eps[r.target]) if r.target in dp_eps else None
        )
        label = target_label(entry, r.target)
        top = r.metrics.get("epsilon_lb_ceiling")
        if lb:
            rows.append(
                {
                    "x": label,
                    "y": lb[1].value,
                    "group": "audit lower bound (ε ≥)",
                    "unit": lb[1].unit,
                    "help": lb[1].description,
                }
            )
        if top is not None and top.value is not None:
            rows.append(
                {
                    "x": label,
                    "y": top.value,
                    "group": "audit ceiling (perfect attack)",
                    "unit": top.unit,
                    "help": top.description,
                }
            )
        if acc and acc[1].value is not None:
            rows.append(
                {
                    "x": label,
                    "y": acc[1].value,
                    "group": "accountant upper bound (ε ≤)",
                    "unit": acc[1].unit,
                    "help": acc[1].description,
                }
            )
        parts = []
        if acc and acc[1].value is not None:
            parts.append(f"accountant says ε ≤ {F.fmt(acc[1].value)}")
        if lb:
            parts.append(f"audit shows ε ≥ {F.fmt(lb[1].value)}")
        if top is not None and top.value is not None:
            parts.append(
                f"the audit's ceiling is {F.fmt(top.value)} (no attack could show more"
                + (
                    ", so it cannot confirm or refute the accountant's ε)"
                    if acc and acc[1].value is not None and acc[1].value > top.value
                    else ")"
                )
            )
        if parts:
            kind = (
                "error"
                if (lb and acc and acc[1].value is not None and lb[1].value is not None and lb[1].value > acc[1].value)
                else "info"
            )
            sink.notice(kind, f"{label}: " + "; ".join(parts))
    if rows:
        sink.figure(F.bar_figure(rows, "Epsilon: audit lower bound vs accountant", "epsilon"), key="canary-eps")
    _render_exposure(sink, entry, results)


def _render_exposure(sink: Sink, entry: RunEntry, results: list[AuditResult]) -> None:
    """Secret canaries (causal LMs): each secret's exposure, trained-on vs left-out, and the rank test."""
    series = []
    for r in results:
        rows = [e for e in r.evidence if isinstance(e.get("exposure_bits"), (int, float))]
        if not rows:
            continue
        label = target_label(entry, r.target)
        series.append(
            (
                label,
                [float(e["exposure_bits"]) for e in rows if e.get("included")],
                [float(e["exposure_bits"]) for e in rows if not e.get("included")],
            )
        )
        pv, auc = r.metrics.get("exposure_p_value"), r.metrics.get("exposure_auc")
        if pv is not None and pv.value is not None and auc is not None and auc.value is not None:
            exposed = any(f.metric == "exposure_p_value" for f in r.findings)
            sink.notice(
                "warning" if exposed else "info",
                f"{label}: secrets trained on "
                + ("rank higher than" if exposed else "are not told apart from")
                + f" the ones left out (exposure AUC {F.fmt(auc.value)}, one-sided Mann-Whitney p = {F.fmt(pv.value)})",
            )
    if series:
        sink.figure(F.exposure_figure(series, "Secret exposure: trained on vs left out"), key="canary-exposure")
