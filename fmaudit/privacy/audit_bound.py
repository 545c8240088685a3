"""Empirical epsilon lower bounds from one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

Setting: m canaries, each included in training independently with probability 1/2. The auditor scores
every canary, then guesses "included" for the k+ highest scores and "excluded" for the k- lowest
(r = k+ + k- guesses, abstaining on the rest); v of the guesses are right.

For an (eps, delta)-DP training algorithm, the number of correct guesses W satisfies

    P[W >= v] <= beta + 2 m delta alpha,
    beta  = P[Binomial(r, q) >= v],           q = e^eps / (1 + e^eps)
    alpha = max_{1 <= i <= v} P[v - i <= Binomial(r, q) < v] / i

(their Theorem for approximate DP). The lower bound at confidence c is the largest eps whose p-value
stays below 1 - c: an algorithm that is eps-DP for any smaller eps would have produced guesses this good
with probability under 1 - c.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def p_value(*, m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Upper bound on P[W >= v] for an (eps, delta)-DP algorithm with m canaries and r guesses."""
    from scipy.stats import binom

    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if eps < 0 or not (0 <= delta <= 1):
        raise ValueError("need eps >= 0 and 0 <= delta <= 1")
    if v == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-eps))
    beta = float(binom.sf(v - 1, r, q))
    # Cumulative P[v - i <= B < v] for i = 1..v, divided by i; alpha is its maximum.
    pmf = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v-1], P[B = v-2], ..., P[B = 0]
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(1.0, beta + 2.0 * m * delta * alpha)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """Largest eps rejected at `confidence` given v correct of r guesses over m canaries (0 if none)."""
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    alpha = 1.0 - confidence
    if p_value(m=m, r=r, v=v, eps=0.0, delta=delta) >= alpha:
        return 0.0
    hi = 1.0
    while p_value(m=m, r=r, v=v, eps=hi, delta=delta) < alpha:
        hi *= 2.0
        if hi > 1e3:
            return float("inf")
    lo = 0.0
    for _ in range(60):  # p_value is increasing in eps: bisect to ~1e-15 relative precision
        mid = 0.5 * (lo + hi)
        if p_value(m=m, r=r, v=v, eps=mid, delta=delta) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class Guesses:
    r: int
    v: int
    k_plus: int
    k_minus: int


def guess(scores: np.ndarray, included: np.ndarray, r: int) -> Guesses:
    """Guess 'included' on the ceil(r/2) highest scores and 'excluded' on the floor(r/2) lowest; count hits.
    Higher score = more likely included. Ties are broken by a stable order (canary index)."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    r = int(min(max(r, 0), m))
    k_plus = (r + 1) // 2
    k_minus = r - k_plus
    order = np.argsort(-scores, kind="stable")
    top, bottom = order[:k_plus], order[m - k_minus:] if k_minus else np.array([], dtype=int)
    v = int(included[top].sum() + (~included[bottom]).sum())
    return Guesses(r=r, v=v, k_plus=k_plus, k_minus=k_minus)


def audit_curve(scores: np.ndarray, included: np.ndarray, *, delta: float, confidence: float,
                guess_counts: list[int]) -> dict:
    """epsilon_lb for each number of guesses, and a headline that stays valid over the whole grid:
    each point is tested at confidence 1 - (1 - confidence) / len(grid) (Bonferroni), so picking the best
    r after looking does not overstate the bound."""
    m = len(scores)
    grid = sorted({int(min(max(1, r), m)) for r in guess_counts})
    corrected = 1.0 - (1.0 - confidence) / len(grid)
    rows = []
    for r in grid:
        g = guess(scores, included, r)
        rows.append({"r": g.r, "v": g.v, "k_plus": g.k_plus, "k_minus": g.k_minus,
                     "epsilon_lb": epsilon_lower_bound(m=m, r=g.r, v=g.v, delta=delta, confidence=confidence),
                     "epsilon_lb_corrected": epsilon_lower_bound(m=m, r=g.r, v=g.v, delta=delta,
                                                                 confidence=corrected)})
    best = max(rows, key=lambda row: (row["epsilon_lb_corrected"], -row["r"]))
    return {"rows": rows, "best": best, "confidence": confidence, "per_point_confidence": corrected}


def ceiling(included: np.ndarray, *, delta: float, confidence: float, guess_counts: list[int]) -> dict:
    """What a PERFECT attack would reach in this audit: the same guessing and Bonferroni-corrected bound
    (`audit_curve`) on scores that rank every included canary above every excluded one.

    The inclusion vector matters: the guesser puts ceil(r/2) guesses on "included" and floor(r/2) on
    "excluded", so with n_in != m/2 included canaries even a perfect attack gets only
    min(ceil(r/2), n_in) + min(floor(r/2), m - n_in) of r right. The result is the largest epsilon_lb this
    audit (m, guess grid, delta, confidence, this inclusion draw) could ever report: an accountant epsilon
    above it can be neither confirmed nor refuted by the audit."""
    included = np.asarray(included, dtype=bool)
    perfect = included.astype(np.float64)
    return audit_curve(perfect, included, delta=delta, confidence=confidence, guess_counts=guess_counts)


def epsilon_lb_ceiling(*, m: int, delta: float, confidence: float = 0.95, guess_counts: list[int],
                       num_included: int | None = None) -> float:
    """The headline epsilon_lb of a perfect attack with m canaries, num_included of them included
    (default m // 2, the balanced draw), the given guess grid, delta and confidence."""
    n_in = m // 2 if num_included is None else int(num_included)
    if not 0 <= n_in <= m:
        raise ValueError(f"num_included must be in [0, m], got {n_in}")
    included = np.zeros(m, dtype=bool)
    included[:n_in] = True
    return ceiling(included, delta=delta, confidence=confidence, guess_counts=guess_counts)["best"][
        "epsilon_lb_corrected"]
