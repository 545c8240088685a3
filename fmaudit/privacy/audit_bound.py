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
    top, bottom = order[:k_plus], order[m - k_minus :] if k_minus else np.array([], dtype=int)
    v = int(included[top].sum() + (~included[bottom]).sum())
    return Guesses(r=r, v=v, k_plus=k_plus, k_minus=k_minus)


def audit_curve(
    scores: np.ndarray, included: np.ndarray, *, delta: float, confidence: float, guess_counts: list[int]
) -> dict:
    """epsilon_lb for each number of guesses, and a headline that stays valid over the whole grid:
    each point is tested at confidence 1 - (1 - confidence) / len(grid) (Bonferroni), so picking the best
    r after looking does not overstate the bound."""
    m = len(scores)
    grid = sorted({int(min(max(1, r), m)) for r in guess_counts})
    corrected = 1.0 - (1.0 - confidence) / len(grid)
    rows = []
    for r in grid:
        g = guess(scores, included, r)
        rows.append(
            {
                "r": g.r,
                "v": g.v,
                "k_plus": g.k_plus,
                "k_minus": g.k_minus,
                "epsilon_lb": epsilon_lower_bound(m=m, r=g.r, v=g.v, delta=delta, confidence=confidence),
                "epsilon_lb_corrected": epsilon_lower_bound(m=m, r=g.r, v=g.v, delta=delta, confidence=corrected),
            }
        )
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


def epsilon_lb_ceiling(
    *, m: int, delta: float, confidence: float = 0.95, guess_counts: list[int], num_included: int | None = None
) -> float:
    """The headline epsilon_lb of a perfect attack with m canaries, num_included of them included
    (default m // 2, the balanced draw), the given guess grid, delta and confidence."""
    n_in = m // 2 if num_included is None else int(num_included)
    if not 0 <= n_in <= m:
        raise ValueError(f"num_included must be in [0, m], got {n_in}")
    included = np.zeros(m, dtype=bool)
    included[:n_in] = True
    return ceiling(included, delta=delta, confidence=confidence, guess_counts=guess_counts)["best"][
        "epsilon_lb_corrected"
    ]


# ---------------------------------------------------------------------------------------------------
# Both analyses on the same guesses, and how the number of guesses is chosen


def bounds(*, m: int, r: int, v: int, delta: float, confidence: float) -> dict:
    """Both lower bounds for v correct of r guesses over m canaries at `confidence`:
    epsilon_lb_sjn (Steinke-Nasr-Jagielski, any (eps, delta)-DP mechanism), epsilon_lb_fdp and mu_lb
    (Mahloujifar-Melis-Chaudhuri, Gaussian-DP family; fmaudit.privacy.fdp_bound), and the headline
    epsilon_lb = epsilon_lb_sjn.

    The headline is the assumption-free bound. The f-DP number rejects every mu-GDP mechanism up to mu_lb and
    reports that mu's epsilon: it is a valid lower bound only for mechanisms whose trade-off curve is
    Gaussian. For other mechanisms it can exceed the true epsilon (randomized response at epsilon 2, a
    genuinely (2, 0)-DP mechanism, typically gets an f-DP "bound" of 3.4 at m = 1000), so taking the larger
    of the two as the headline would print a wrong number under a "lower bound" label. DP-SGD is close to,
    but not exactly, Gaussian; epsilon_lb_fdp is reported next to the headline, labelled as such."""
    from fmaudit.privacy import fdp_bound

    sjn = epsilon_lower_bound(m=m, r=r, v=v, delta=delta, confidence=confidence)
    mu = fdp_bound.mu_lower_bound(m=m, r=r, v=v, confidence=confidence)
    fdp = fdp_bound.gdp_epsilon(mu, delta)
    return {"epsilon_lb_sjn": sjn, "epsilon_lb_fdp": fdp, "mu_lb": mu, "epsilon_lb": sjn, "bound": "sjn"}


def guess_count(fraction: float, m: int) -> int:
    """r for a guess fraction of m canaries: round(fraction * m), at least 1 and at most m."""
    return int(min(m, max(1, int(round(fraction * m)))))


def grid_rows(
    scores: np.ndarray, included: np.ndarray, *, fractions: list[float], delta: float, confidence: float
) -> list[dict]:
    """One row per distinct r = round(f m) (f in `fractions`, ascending) on these canaries: the guesses and both
    bounds at `confidence`."""
    m = len(scores)
    rows, seen = [], set()
    for f in sorted(fractions):
        r = guess_count(f, m)
        if r in seen:
            continue
        seen.add(r)
        g = guess(scores, included, r)
        rows.append(
            {
                "fraction": f,
                "m": m,
                "r": g.r,
                "v": g.v,
                "k_plus": g.k_plus,
                "k_minus": g.k_minus,
                **bounds(m=m, r=g.r, v=g.v, delta=delta, confidence=confidence),
            }
        )
    return rows


def audit(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    delta: float,
    confidence: float,
    guess_fractions: list[float] | tuple[float, ...],
    selection: str = "holdout",
    holdout: np.ndarray | None = None,
) -> dict:
    """The audit's headline: both bounds (`bounds`) at one number of guesses, chosen by `selection`:

    - "bonferroni": every r = round(f m) of the grid is tried on all m canaries, each at confidence
      1 - (1 - confidence) / len(grid); the best r is reported (valid over the grid).
    - "holdout": `holdout` (a boolean mask) marks the canaries used only to choose the guess fraction: on them,
      each fraction's headline bound is computed at `confidence` and the best fraction f is kept (ties: the
      smaller); the bound is then computed once, on the other canaries only (m' of them, r = round(f m')),
      at `confidence`, with no correction.

    Returns the recorded numbers (m, num_included, r, v, k_plus, k_minus, delta, test_confidence: what the bound
    was computed at) with both bounds, plus `rows` (the grid as tried: on all canaries for bonferroni, on the
    held-out ones for holdout), and for holdout the chosen fraction and the audited canaries' indices."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    fractions = sorted({float(f) for f in guess_fractions})
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ValueError("guess_fractions must be non-empty and lie in (0, 1]")

    def tried(idx: np.ndarray, conf: float) -> list[dict]:
        return grid_rows(scores[idx], included[idx], fractions=fractions, delta=delta, confidence=conf)

    m_all = len(scores)
    if selection == "bonferroni":
        n_grid = len({guess_count(f, m_all) for f in fractions})
        conf = 1.0 - (1.0 - confidence) / n_grid
        rows = tried(np.arange(m_all), conf)
        best = max(rows, key=lambda row: (row["epsilon_lb"], -row["r"]))
        return {
            **best,
            "selection": "bonferroni",
            "delta": delta,
            "confidence": confidence,
            "test_confidence": conf,
            "num_included": int(included.sum()),
            "rows": rows,
            "audited": list(range(m_all)),
            "held_out": [],
        }
    if selection != "holdout":
        raise ValueError(f"selection must be 'holdout' or 'bonferroni', got {selection!r}")
    if holdout is None:
        raise ValueError("selection='holdout' needs the held-out mask")
    holdout = np.asarray(holdout, dtype=bool)
    if holdout.shape != included.shape:
        raise ValueError("holdout mask and canaries differ in length")
    sel, aud = np.flatnonzero(holdout), np.flatnonzero(~holdout)
    if len(sel) < 1 or len(aud) < 1:
        raise ValueError("the holdout split must leave canaries on both sides")
    rows = tried(sel, confidence)
    chosen = max(rows, key=lambda row: (row["epsilon_lb"], -row["r"]))["fraction"]
    r = guess_count(chosen, len(aud))
    g = guess(scores[aud], included[aud], r)
    return {
        "fraction": chosen,
        "m": len(aud),
        "r": g.r,
        "v": g.v,
        "k_plus": g.k_plus,
        "k_minus": g.k_minus,
        **bounds(m=len(aud), r=g.r, v=g.v, delta=delta, confidence=confidence),
        "selection": "holdout",
        "delta": delta,
        "confidence": confidence,
        "test_confidence": confidence,
        "num_included": int(included[aud].sum()),
        "rows": rows,
        "audited": aud.tolist(),
        "held_out": sel.tolist(),
    }


def procedure_ceiling(
    included: np.ndarray,
    *,
    delta: float,
    confidence: float,
    guess_fractions: list[float] | tuple[float, ...],
    selection: str = "holdout",
    holdout: np.ndarray | None = None,
) -> dict:
    """The largest headline this audit could report, for the same inclusion draw, guess fractions, selection
    procedure, holdout split, delta and confidence: a PERFECT attack (every included canary scored above every
    excluded one) gets the most correct guesses possible at every r, and both bounds grow with v.

    bonferroni: `audit` on perfect scores. holdout: the held-out canaries may make any fraction win, so the
    ceiling is the best, over the fractions, of the perfect attack's bound on the audited canaries (this can
    exceed what the perfect attack itself would choose when the two parts' inclusion draws are unbalanced
    differently). Each analysis's own ceiling (epsilon_lb_sjn, epsilon_lb_fdp) is its best over the same rows."""
    included = np.asarray(included, dtype=bool)
    perfect = included.astype(np.float64)
    if selection != "holdout":
        out = audit(
            perfect,
            included,
            delta=delta,
            confidence=confidence,
            guess_fractions=guess_fractions,
            selection=selection,
            holdout=holdout,
        )
        out["epsilon_lb_sjn"] = max(row["epsilon_lb_sjn"] for row in out["rows"])
        out["epsilon_lb_fdp"] = max(row["epsilon_lb_fdp"] for row in out["rows"])
        return out
    if holdout is None:
        raise ValueError("selection='holdout' needs the held-out mask")
    holdout = np.asarray(holdout, dtype=bool)
    aud = ~holdout
    # the audited canaries alone, every fraction tried (at the stated confidence: one r is used in the end)
    rows = grid_rows(
        perfect[aud],
        included[aud],
        fractions=sorted({float(f) for f in guess_fractions}),
        delta=delta,
        confidence=confidence,
    )
    best = max(rows, key=lambda row: (row["epsilon_lb"], -row["r"]))
    return {
        **best,
        "selection": "holdout",
        "delta": delta,
        "confidence": confidence,
        "test_confidence": confidence,
        "num_included": int(included[aud].sum()),
        "rows": rows,
        "audited": np.flatnonzero(aud).tolist(),
        "held_out": np.flatnonzero(holdout).tolist(),
        "epsilon_lb_sjn": max(row["epsilon_lb_sjn"] for row in rows),
        "epsilon_lb_fdp": max(row["epsilon_lb_fdp"] for row in rows),
    }
