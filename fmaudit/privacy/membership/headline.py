"""Calibrated headline of a membership audit: choose the strongest attack on one half of the audit set,
measure it on the other, next to a permutation null (numpy / scipy only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fmaudit.privacy.membership.stats import FPR_LEVELS, AttackMetrics, attack_metrics, check_scores, roc, tpr_at_fpr

HEADLINE_METRICS: tuple[str, ...] = (
    "auc",
    "tpr_at_1pct_fpr",
    "tpr_at_0.1pct_fpr",
    "tpr_at_0pct_fpr",
    "balanced_accuracy",
    "advantage",
    "ppv_at_1pct_fpr",
)
NULL_METRICS: tuple[str, ...] = (
    "auc",
    "advantage",
    "balanced_accuracy",
    "tpr_at_1pct_fpr",
    "tpr_at_0.1pct_fpr",
    "tpr_at_0pct_fpr",
)


def metric_values(m: AttackMetrics) -> dict[str, float]:
    """The headline metrics of one attack as a flat dict."""
    out = {
        "auc": m.auc,
        "balanced_accuracy": m.balanced_accuracy,
        "advantage": m.advantage,
        "ppv_at_1pct_fpr": m.ppv_at_1pct_fpr,
    }
    out.update({f"tpr_at_{suffix}_fpr": v for suffix, v in m.tpr.items()})
    return out


def selection_half(is_member: np.ndarray, seed: int) -> np.ndarray:
    """A stratified random half of the audit set (True = used to choose the attack): half of the members
    and half of the non-members, from its own random stream."""
    from fmaudit.seeds import Stream, rng

    y = np.asarray(is_member).astype(bool)
    sel = np.zeros(len(y), dtype=bool)
    g = rng(seed, Stream.SELECTION_SPLIT)
    for group in (np.nonzero(y)[0], np.nonzero(~y)[0]):
        sel[g.choice(group, len(group) // 2, replace=False)] = True
    return sel


def permutation_null(scores: np.ndarray, is_member: np.ndarray, *, rounds: int, seed: int) -> dict[str, np.ndarray]:
    """What each metric looks like when membership carries no information: the same scores with the
    member / non-member labels randomly permuted (set sizes kept), `rounds` times."""
    from fmaudit.seeds import Stream, rng

    s, y = check_scores(scores, is_member)
    g = rng(seed, Stream.NULL_PERMUTATION)
    vals: dict[str, list[float]] = {k: [] for k in NULL_METRICS}
    for _ in range(rounds):
        yp = g.permutation(y)
        fpr, tpr, _thr = roc(s, yp)
        adv = float(np.max(tpr - fpr))
        vals["auc"].append(float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)))
        vals["advantage"].append(adv)
        vals["balanced_accuracy"].append((1.0 + adv) / 2.0)
        for suffix, lvl in FPR_LEVELS:
            vals[f"tpr_at_{suffix}_fpr"].append(tpr_at_fpr(fpr, tpr, lvl)[0])
    return {k: np.asarray(v) for k, v in vals.items()}


@dataclass
class Headline:
    metric: str
    attack: str
    value: float
    ci: tuple[float, float] | None
    null_quantile: float | None  # the null's `level` quantile: a value at or below it is chance
    p_value: float | None  # permutation p-value of the value (one-sided, higher = more leakage)
    selected_on: str  # "selection half" | "only attack"
    num_members: int  # members / non-members the value is measured on
    num_nonmembers: int


def calibrated_headlines(
    scores: dict[str, np.ndarray], is_member: np.ndarray, *, bootstrap: int, level: float, null_rounds: int, seed: int
) -> tuple[dict[str, Headline], np.ndarray | None]:
    """One honest headline per metric.

    Taking the maximum over attacks of each metric on the same examples it is reported on is biased
    upward (on pure noise, the best of several AUCs is above 0.5 more often than not, and max(TPR - FPR)
    over thresholds is above 0 by construction). With more than one attack, the attack is chosen on a
    stratified random half of the audit set (`selection_half`) and its metrics are measured on the other
    half only; with one attack, on the whole set. Each headline comes with a permutation null (labels
    shuffled, `null_rounds` times) on the same examples: its `level` quantile is the largest value chance
    alone reaches, and the p-value says how unusual the measured one is.

    Returns (headlines by metric, the selection mask or None)."""
    y = np.asarray(is_member).astype(bool)
    attacks = list(scores)
    if len(attacks) > 1 and min(y.sum(), (~y).sum()) >= 4:
        sel = selection_half(y, seed)
        ev = ~sel
        chosen_on = "selection half"
        on_sel = {a: metric_values(attack_metrics(scores[a][sel], y[sel], bootstrap=0)) for a in attacks}
    elif len(attacks) > 1:  # too few examples to split: choose and measure on the same ones (optimistic)
        sel, ev, chosen_on = None, np.ones(len(y), bool), "same examples"
        on_sel = {a: metric_values(attack_metrics(scores[a], y, bootstrap=0)) for a in attacks}
    else:
        sel, ev, chosen_on, on_sel = None, np.ones(len(y), bool), "only attack", None
    cache: dict[str, tuple[AttackMetrics, dict[str, np.ndarray] | None]] = {}

    def evaluate(a: str):
        if a not in cache:
            m = attack_metrics(scores[a][ev], y[ev], bootstrap=bootstrap, level=level, seed=seed)
            null = permutation_null(scores[a][ev], y[ev], rounds=null_rounds, seed=seed) if null_rounds else None
            cache[a] = (m, null)
        return cache[a]

    out: dict[str, Headline] = {}
    for name in HEADLINE_METRICS:
        if on_sel is not None:

            def key(a: str, name: str = name) -> float:
                v = on_sel[a][name]
                return -np.inf if v is None or not np.isfinite(v) else v

            best = max(attacks, key=key)  # first attack wins ties (the order given)
        else:
            best = attacks[0]
        m, null = evaluate(best)
        value = metric_values(m)[name]
        ci = m.ci.get(name)
        if name == "balanced_accuracy" and "advantage" in m.ci:
            lo, hi = m.ci["advantage"]
            ci = ((1.0 + lo) / 2.0, (1.0 + hi) / 2.0)
        nq = pv = None
        if null is not None and name in null:
            nq = float(np.quantile(null[name], level))
            pv = float((1 + np.sum(null[name] >= value - 1e-12)) / (len(null[name]) + 1))
        out[name] = Headline(
            metric=name,
            attack=best,
            value=float(value),
            ci=ci,
            null_quantile=nq,
            p_value=pv,
            selected_on=chosen_on,
            num_members=int(y[ev].sum()),
            num_nonmembers=int((~y[ev]).sum()),
        )
    return out, sel
