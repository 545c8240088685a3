"""Randomized-smoothing certificates (Cohen, Rosenfeld & Kolter, ICML 2019): pure functions on counts.

The smoothed classifier g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c). CERTIFY guesses the top class cA
from n0 noisy copies, counts how often cA wins among n *further* copies, takes the one-sided
Clopper-Pearson lower bound pA_lower at level 1 - alpha, and certifies g(x + delta) = cA for every
||delta||_2 < R = sigma * Phi^-1(pA_lower), or abstains when pA_lower <= 1/2 (Theorem 1 with
pB <= 1 - pA). PREDICT returns the top class of n copies when a two-sided binomial test of nA against
nA + nB (the top two counts) at p = 1/2 rejects at level alpha, else abstains: with probability at most
alpha it returns a class other than g(x) (Proposition 1).

No torch here: the module (`fmaudit.audits.robustness.certify`) draws the noise and counts; these functions
turn counts into bounds, radii and accuracies, and are tested against scipy and closed forms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

ABSTAIN = -1


def pa_lower_bound(count: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower confidence bound on a binomial proportion from `count`
    successes in `n` trials: the alpha quantile of Beta(count, n - count + 1), 0 when count is 0. Equals
    `statsmodels.proportion_confint(count, n, alpha=2 * alpha, method="beta")[0]`, Cohen et al.'s code."""
    from scipy.special import betaincinv

    k, n = int(count), int(n)
    if n <= 0:
        raise ValueError(f"n must be positive (got {n})")
    if not 0 <= k <= n:
        raise ValueError(f"count must be in [0, n] (got {k} of {n})")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1) (got {alpha})")
    if k == 0:
        return 0.0
    return float(betaincinv(k, n - k + 1, alpha))


def certified_radius(pa_lower: float, sigma: float) -> float | None:
    """sigma * Phi^-1(pA_lower), or None (abstain) when pA_lower <= 1/2."""
    from scipy.stats import norm

    if not sigma > 0:
        raise ValueError(f"sigma must be positive (got {sigma})")
    if not pa_lower > 0.5:
        return None
    return float(sigma * norm.ppf(pa_lower))


def certify_from_counts(
    counts0: ArrayLike, counts: ArrayLike, sigma: float, alpha: float
) -> tuple[int, float | None, float]:
    """CERTIFY from the selection counts (n0 copies) and the estimation counts (n further copies, an
    independent sample): (class or ABSTAIN, radius or None, pA_lower). Ties in the selection go to the
    lowest class index (numpy argmax), as in the reference code."""
    c0 = np.asarray(counts0, dtype=np.int64)
    c = np.asarray(counts, dtype=np.int64)
    if c0.shape != c.shape or c.ndim != 1:
        raise ValueError("counts0 and counts must be one count per class, the same length")
    n = int(c.sum())
    c_hat = int(np.argmax(c0))
    pa = pa_lower_bound(int(c[c_hat]), n, alpha)
    radius = certified_radius(pa, sigma)
    if radius is None:
        return ABSTAIN, None, pa
    return c_hat, radius, pa


def predict_from_counts(counts: ArrayLike, alpha: float) -> tuple[int, float]:
    """PREDICT: (top class or ABSTAIN, p-value) from the counts of n noisy copies; abstains unless the
    two-sided binomial test of the top count nA against nA + nB (nB the runner-up) at p = 1/2 has p-value
    <= alpha (Cohen et al. abstain when it is > alpha)."""
    from scipy.stats import binomtest

    c = np.asarray(counts, dtype=np.int64)
    if c.ndim != 1 or len(c) < 2:
        raise ValueError("counts must be one count per class (at least two classes)")
    order = np.argsort(-c, kind="stable")
    na, nb = int(c[order[0]]), int(c[order[1]])
    if na + nb == 0:
        return ABSTAIN, 1.0
    p = float(binomtest(na, na + nb, 0.5).pvalue)
    return (int(order[0]) if p <= alpha else ABSTAIN), p


def certified_accuracy(
    predictions: ArrayLike, radii: Sequence[float | None], labels: ArrayLike, radius: float
) -> np.ndarray:
    """Per example: certified correct at L2 radius `radius` (the certified class is the label and the
    certified radius is at least `radius`; abstentions are never certified). Cohen et al.'s
    `(correct & (radius >= r)).mean()`."""
    pred = np.asarray(predictions, dtype=np.int64)
    lab = np.asarray(labels, dtype=np.int64)
    rad = np.array([-np.inf if r is None else float(r) for r in radii], dtype=np.float64)
    return (pred != ABSTAIN) & (pred == lab) & (rad >= float(radius))


def failure_allowance(n: int, failure_probability: float, quantile: float = 0.999) -> int:
    """How many of n independent statements, each false with probability at most `failure_probability`,
    may be false before it is surprising: the `quantile` quantile of Binomial(n, p), at least 1."""
    from scipy.stats import binom

    if n <= 0:
        return 1
    p = min(1.0, max(0.0, float(failure_probability)))
    return max(1, int(binom.ppf(quantile, int(n), p)))


def linear_exact_radius(margin: float, weight_norm: float) -> float:
    """The L2 distance from a point to the hyperplane w.x + b = 0 of a linear classifier whose signed
    score there is `margin`: |margin| / ||w||. For a linear classifier the smoothed classifier flips at
    exactly this distance, so Cohen et al.'s certificate is tight: R -> this as n -> infinity."""
    if not weight_norm > 0:
        raise ValueError("weight_norm must be positive")
    return abs(float(margin)) / float(weight_norm)


def clean_radius_grid(radii: Sequence[float]) -> list[float]:
    """Sorted, unique, finite, non-negative radii, always starting at 0."""
    out = sorted({float(r) for r in radii if math.isfinite(float(r)) and float(r) >= 0} | {0.0})
    return out
