"""Blind baseline: can members be told apart without the model at all? (numpy / scipy only)"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fmaudit.privacy.membership.stats import auc_score, bootstrap_attack_ci


@dataclass
class ShiftCheck:
    feature: str
    auc: float  # AUC of the feature alone as a membership score (0.5 = no shift)
    ci: tuple[float, float]
    detail: str
    flagged: bool


def blind_baseline(
    is_member: np.ndarray,
    *,
    lengths: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    bootstrap: int = 500,
    level: float = 0.95,
    seed: int = 0,
    min_effect: float = 0.05,
    alpha: float = 0.01,
) -> list[ShiftCheck]:
    """Model-free attacks on the member / non-member sets: length, and label balance.

    A feature whose AUC differs from 0.5 by at least `min_effect`, with its confidence interval excluding
    0.5 (labels: chi-square p < `alpha`), flags a distribution shift that inflates every attack's AUC
    without any leak."""
    y = np.asarray(is_member).astype(bool)
    out: list[ShiftCheck] = []
    if lengths is not None:
        lengths = np.asarray(lengths, dtype=np.float64)
        a = auc_score(lengths, y)
        ci = (
            bootstrap_attack_ci(lengths, y, rounds=bootstrap, level=level, seed=seed)["auc"]
            if bootstrap
            else (float("nan"), float("nan"))
        )
        sig = not (ci[0] <= 0.5 <= ci[1]) if bootstrap else True
        flagged = bool(sig and abs(a - 0.5) >= min_effect)
        out.append(
            ShiftCheck(
                "length",
                a,
                ci,
                f"mean length {lengths[y].mean():.1f} (members) vs {lengths[~y].mean():.1f} (non-members)",
                flagged,
            )
        )
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
        ci = (
            bootstrap_attack_ci(rate[labels], y, rounds=bootstrap, level=level, seed=seed)["auc"]
            if bootstrap
            else (float("nan"), float("nan"))
        )
        flagged = bool(p_value < alpha and tv >= min_effect)
        out.append(
            ShiftCheck(
                "label",
                a,
                ci,
                f"label distributions differ by total variation {tv:.3f} (chi-square p = {p_value:.3g})",
                flagged,
            )
        )
    return out
