"""Statistics of membership-inference attacks (numpy / scipy only; no torch).

Convention everywhere: the positive class is *member* (label 1), and a higher score means "more likely a
member". The ROC here is the same as scikit-learn's `roc_curve(..., drop_intermediate=False)` with the
(0, 0) point first; the tests check it against scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# FPR levels reported for every attack: (metric suffix, fpr)
FPR_LEVELS: tuple[tuple[str, float], ...] = (("1pct", 0.01), ("0.1pct", 0.001), ("0pct", 0.0))


def _check(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(is_member).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{len(s)} scores for {len(y)} membership labels")
    if not np.isfinite(s).all():
        raise ValueError("membership scores must be finite (got NaN or inf)")
    if y.all() or not y.any():
        raise ValueError("membership metrics need at least one member and one non-member")
    return s, y


def roc(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds decreasing, starting at (0, 0) with threshold +inf.

    A point i means: predict member when score >= thresholds[i]."""
    s, y = _check(scores, is_member)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], len(s_sorted) - 1]  # last index of each distinct score
    tps = np.cumsum(y_sorted)[last].astype(np.float64)
    fps = (last + 1) - tps
    tpr = np.r_[0.0, tps / y.sum()]
    fpr = np.r_[0.0, fps / (~y).sum()]
    thr = np.r_[np.inf, s_sorted[last]]
    return fpr, tpr, thr


def auc_score(scores: np.ndarray, is_member: np.ndarray) -> float:
    """ROC AUC = P(score of a random member > score of a random non-member) + 0.5 P(tie)."""
    from scipy.stats import rankdata

    s, y = _check(scores, is_member)
    ranks = rankdata(s)  # average ranks for ties
    p, n = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - p * (p + 1) / 2) / (p * n))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, level: float) -> tuple[float, int]:
    """Highest TPR of any threshold whose FPR is at most `level`, and that point's index."""
    ok = np.nonzero(fpr <= level + 1e-12)[0]
    i = int(ok[np.argmax(tpr[ok])])
    return float(tpr[i]), i


@dataclass
class AttackMetrics:
    auc: float
    tpr: dict[str, float]  # suffix ("1pct", "0.1pct", "0pct") -> TPR
    ppv_at_1pct_fpr: float
    advantage: float  # max over thresholds of TPR - FPR
    balanced_accuracy: float  # at the threshold that maximizes it (= (1 + advantage) / 2)
    best_threshold: float
    ci: dict[str, tuple[float, float]]  # metric -> bootstrap interval
    fpr: np.ndarray
    tpr_curve: np.ndarray


def attack_metrics(scores: np.ndarray, is_member: np.ndarray, *, bootstrap: int = 1000, level: float = 0.95,
                   seed: int = 0) -> AttackMetrics:
    s, y = _check(scores, is_member)
    fpr, tpr, thr = roc(s, y)
    p, n = int(y.sum()), int((~y).sum())
    tprs = {}
    ppv = float("nan")
    for suffix, lvl in FPR_LEVELS:
        tprs[suffix], i = tpr_at_fpr(fpr, tpr, lvl)
        if suffix == "1pct":
            tp, fp = tpr[i] * p, fpr[i] * n
            ppv = float(tp / (tp + fp)) if tp + fp > 0 else float("nan")
    gap = tpr - fpr
    j = int(np.argmax(gap))
    adv = float(gap[j])
    ci = bootstrap_attack_ci(s, y, rounds=bootstrap, level=level, seed=seed) if bootstrap else {}
    return AttackMetrics(auc=auc_score(s, y), tpr=tprs, ppv_at_1pct_fpr=ppv, advantage=adv,
                         balanced_accuracy=(1.0 + adv) / 2.0, best_threshold=float(thr[j]), ci=ci, fpr=fpr,
                         tpr_curve=tpr)


def bootstrap_attack_ci(scores: np.ndarray, is_member: np.ndarray, *, rounds: int = 1000, level: float = 0.95,
                        seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap, resampling members and non-members separately (the set sizes stay fixed).

    Intervals for auc, advantage and the TPR at each FPR level."""
    from fmaudit.seeds import Stream
    from fmaudit.seeds import rng as stream_rng

    s, y = _check(scores, is_member)
    rng = stream_rng(seed, Stream.BOOTSTRAP)
    mem, non = np.nonzero(y)[0], np.nonzero(~y)[0]
    lab = np.r_[np.ones(len(mem), bool), np.zeros(len(non), bool)]
    vals: dict[str, list[float]] = {"auc": [], "advantage": []}
    vals.update({f"tpr_at_{suffix}_fpr": [] for suffix, _ in FPR_LEVELS})
    for _ in range(rounds):
        idx = np.r_[rng.choice(mem, len(mem)), rng.choice(non, len(non))]
        fpr, tpr, _thr = roc(s[idx], lab)
        # trapezoid area over the full ROC = Mann-Whitney AUC with ties counted half
        vals["auc"].append(float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)))
        vals["advantage"].append(float(np.max(tpr - fpr)))
        for suffix, lvl in FPR_LEVELS:
            vals[f"tpr_at_{suffix}_fpr"].append(tpr_at_fpr(fpr, tpr, lvl)[0])
    alpha = (1 - level) / 2
    return {k: (float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))) for k, v in vals.items()}


def curve_points(fpr: np.ndarray, tpr: np.ndarray, max_points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """The ROC's corner points, thinned to at most ~max_points with the low-FPR end kept dense
    (for log-log plots)."""
    # corners: drop points that lie on a straight horizontal / vertical run
    keep = np.r_[True, np.logical_or(np.diff(fpr, 2) != 0, np.diff(tpr, 2) != 0), True] if len(fpr) > 2 \
        else np.ones(len(fpr), bool)
    f, t = fpr[keep], tpr[keep]
    if len(f) <= max_points:
        return f, t
    pos_min = f[f > 0].min() if (f > 0).any() else 1.0
    grid = np.unique(np.r_[0.0, np.geomspace(pos_min, 1.0, max_points // 2), np.linspace(0, 1, max_points // 2)])
    idx = np.unique(np.r_[0, np.searchsorted(f, grid, side="right") - 1, len(f) - 1])
    return f[idx], t[idx]


def min_nonmembers_for(level: float) -> int:
    """Non-members needed before an FPR of `level` is measurable at all (one false positive allowed)."""
    return int(np.ceil(1.0 / level)) if level > 0 else 1


# ---------------------------------------------------------------------------------------------------
# Blind baseline: can members be told apart without the model at all?


@dataclass
class ShiftCheck:
    feature: str
    auc: float  # AUC of the feature alone as a membership score (0.5 = no shift)
    ci: tuple[float, float]
    detail: str
    flagged: bool


def blind_baseline(is_member: np.ndarray, *, lengths: np.ndarray | None = None,
                   labels: np.ndarray | None = None, bootstrap: int = 500, level: float = 0.95, seed: int = 0,
                   min_effect: float = 0.05, alpha: float = 0.01) -> list[ShiftCheck]:
    """Model-free attacks on the member / non-member sets: length, and label balance.

    A feature whose AUC differs from 0.5 by at least `min_effect`, with its confidence interval excluding
    0.5 (labels: chi-square p < `alpha`), flags a distribution shift that inflates every attack's AUC
    without any leak."""
    y = np.asarray(is_member).astype(bool)
    out: list[ShiftCheck] = []
    if lengths is not None:
        lengths = np.asarray(lengths, dtype=np.float64)
        a = auc_score(lengths, y)
        ci = bootstrap_attack_ci(lengths, y, rounds=bootstrap, level=level, seed=seed)["auc"] if bootstrap \
            else (float("nan"), float("nan"))
        sig = not (ci[0] <= 0.5 <= ci[1]) if bootstrap else True
        flagged = bool(sig and abs(a - 0.5) >= min_effect)
        out.append(ShiftCheck("length", a, ci, f"mean length {lengths[y].mean():.1f} (members) vs "
                                               f"{lengths[~y].mean():.1f} (non-members)", flagged))
    if labels is not None:
        from scipy.stats import chi2_contingency

        labels = np.asarray(labels, dtype=np.int64)
        k = int(labels.max()) + 1
        cm = np.bincount(labels[y], minlength=k).astype(float)
        cn = np.bincount(labels[~y], minlength=k).astype(float)
        used = (cm + cn) > 0
        tv = 0.5 * float(np.abs(cm / cm.sum() - cn / cn.sum()).sum())
        p_value = 1.0
        if used.sum() > 1:
            p_value = float(chi2_contingency(np.stack([cm[used], cn[used]]))[1])
        # blind attack: score = member rate of the example's label (in-sample; slightly optimistic)
        rate = np.divide(cm, cm + cn, out=np.zeros(k), where=(cm + cn) > 0)
        a = auc_score(rate[labels], y)
        ci = bootstrap_attack_ci(rate[labels], y, rounds=bootstrap, level=level, seed=seed)["auc"] if bootstrap \
            else (float("nan"), float("nan"))
        flagged = bool(p_value < alpha and tv >= min_effect)
        out.append(ShiftCheck("label", a, ci, f"label distributions differ by total variation {tv:.3f} "
                                              f"(chi-square p = {p_value:.3g})", flagged))
    return out


def summarize_levels(levels: Sequence[tuple[str, float]], n_nonmembers: int) -> list[tuple[str, float, int]]:
    """FPR levels that cannot be resolved with this many non-members: (suffix, level, needed)."""
    return [(s, lvl, min_nonmembers_for(lvl)) for s, lvl in levels if lvl > 0 and n_nonmembers < min_nonmembers_for(lvl)]


# ---------------------------------------------------------------------------------------------------
# Calibrated headline: choose the strongest attack on one half, measure it on the other, next to a null


HEADLINE_METRICS: tuple[str, ...] = ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "tpr_at_0pct_fpr",
                                     "balanced_accuracy", "advantage", "ppv_at_1pct_fpr")
NULL_METRICS: tuple[str, ...] = ("auc", "advantage", "balanced_accuracy", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr",
                                 "tpr_at_0pct_fpr")


def metric_values(m: AttackMetrics) -> dict[str, float]:
    """The headline metrics of one attack as a flat dict."""
    out = {"auc": m.auc, "balanced_accuracy": m.balanced_accuracy, "advantage": m.advantage,
           "ppv_at_1pct_fpr": m.ppv_at_1pct_fpr}
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


def permutation_null(scores: np.ndarray, is_member: np.ndarray, *, rounds: int, seed: int
                     ) -> dict[str, np.ndarray]:
    """What each metric looks like when membership carries no information: the same scores with the
    member / non-member labels randomly permuted (set sizes kept), `rounds` times."""
    from fmaudit.seeds import Stream, rng

    s, y = _check(scores, is_member)
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
    null_quantile: float | None     # the null's `level` quantile: a value at or below it is chance
    p_value: float | None           # permutation p-value of the value (one-sided, higher = more leakage)
    selected_on: str                # "selection half" | "only attack"
    num_members: int                # members / non-members the value is measured on
    num_nonmembers: int


def calibrated_headlines(scores: dict[str, np.ndarray], is_member: np.ndarray, *, bootstrap: int, level: float,
                         null_rounds: int, seed: int) -> tuple[dict[str, Headline], np.ndarray | None]:
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
            def key(a: str) -> float:
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
        out[name] = Headline(metric=name, attack=best, value=float(value), ci=ci, null_quantile=nq, p_value=pv,
                             selected_on=chosen_on, num_members=int(y[ev].sum()), num_nonmembers=int((~y[ev]).sum()))
    return out, sel
