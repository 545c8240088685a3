"""ROC statistics of membership-inference attacks (numpy / scipy only; no torch): AUC, TPR at low FPR,
advantage, bootstrap intervals.

Convention everywhere: the positive class is *member* (label 1), and a higher score means "more likely a
member". The ROC here is the same as scikit-learn's `roc_curve(..., drop_intermediate=False)` with the
(0, 0) point first; the tests check it against scikit-learn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# FPR levels reported for every attack: (metric suffix, fpr)
FPR_LEVELS: tuple[tuple[str, float], ...] = (("1pct", 0.01), ("0.1pct", 0.001), ("0pct", 0.0))


def check_scores(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores and membership labels as flat arrays, checked: same length, finite, both classes present."""
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
    s, y = check_scores(scores, is_member)
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

    s, y = check_scores(scores, is_member)
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


def attack_metrics(
    scores: np.ndarray, is_member: np.ndarray, *, bootstrap: int = 1000, level: float = 0.95, seed: int = 0
) -> AttackMetrics:
    s, y = check_scores(scores, is_member)
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
    return AttackMetrics(
        auc=auc_score(s, y),
        tpr=tprs,
        ppv_at_1pct_fpr=ppv,
        advantage=adv,
        balanced_accuracy=(1.0 + adv) / 2.0,
        best_threshold=float(thr[j]),
        ci=ci,
        fpr=fpr,
        tpr_curve=tpr,
    )


def bootstrap_attack_ci(
    scores: np.ndarray, is_member: np.ndarray, *, rounds: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap, resampling members and non-members separately (the set sizes stay fixed).

    Intervals for auc, advantage and the TPR at each FPR level."""
    from fmaudit.seeds import Stream
    from fmaudit.seeds import rng as stream_rng

    s, y = check_scores(scores, is_member)
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
    keep = (
        np.r_[True, np.logical_or(np.diff(fpr, 2) != 0, np.diff(tpr, 2) != 0), True]
        if len(fpr) > 2
        else np.ones(len(fpr), bool)
    )
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


def summarize_levels(levels: Sequence[tuple[str, float]], n_nonmembers: int) -> list[tuple[str, float, int]]:
    """FPR levels that cannot be resolved with this many non-members: (suffix, level, needed)."""
    return [
        (s, lvl, min_nonmembers_for(lvl)) for s, lvl in levels if lvl > 0 and n_nonmembers < min_nonmembers_for(lvl)
    ]
