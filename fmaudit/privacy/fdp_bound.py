"""Empirical privacy from one run under f-DP (Mahloujifar, Melis & Chaudhuri, "Auditing f-Differential
Privacy in One Run", ICML 2025, arXiv 2410.22235), for the Gaussian-DP family.

Same game as the Steinke-Nasr-Jagielski bound (fmaudit.privacy.audit_bound): m canaries, each included
independently with probability 1/2; the auditor makes exactly r guesses ("in"/"out") from the trained
model and v of them are right. Question: which mu-GDP mechanisms are inconsistent with v correct guesses?

The recursion (the paper's analysis for k = 2, the membership game). Let N be the number of correct
guesses and, for i = 0..r, let
    r_i = E[N 1{N >= i}] / m            (correct-guess mass on the event N >= i, per canary)
    h_i = E[(r - N) 1{N >= i}] / m      (incorrect-guess mass on the same event)
Flipping canary j's inclusion turns a correct guess on j with N >= i+1 into a wrong guess on j with
N >= i, and that event is an event on the output once the other canaries' bits are fixed. f-DP (for
mu-GDP: P1[E] >= Phi(Phi^-1(P0[E]) - mu) for neighbours) and Jensen (the curve is convex) give
    h_i >= max(h_{i+1}, Phi(Phi^-1(r_{i+1}) - mu)),
and on the event N = i the masses grow in the ratio i : (r - i), so r_i = r_{i+1} + i/(r-i) (h_i - h_{i+1}).
If P[N >= v] = tau, start at r_v = tau v / m, h_v = tau (r - v) / m and run the recursion down to i = 0
with the smallest masses it allows. Every run makes exactly r guesses, so r_0 + h_0 = r / m; if the forced
masses exceed r / m, no mu-GDP mechanism has P[N >= v] >= tau, and mu is rejected at confidence 1 - tau.

    mu_lb = sup{mu rejected}     (a valid lower bound whether or not rejection is monotone in mu: the
                                  rejection events are nested in v, so the union is one of them)
    epsilon_lb = eps(mu_lb, delta) of mu-GDP: the epsilon at which delta(eps) = Phi(-eps/mu + mu/2) -
                 e^eps Phi(-eps/mu - mu/2) equals delta (Dong, Roth & Su 2022).

This follows the authors' reference implementation (Meta's PrivacyGuard, FDPAnalysisNode: `rh_with_cap`
and `audit_rh_with_cap`, k = 2), with two differences: mu is searched continuously (a grid, refined by
bisection) instead of their fixed grid of noise values 0.001 + 0.01 i, and epsilon at delta is solved to
1e-12 instead of 1e-3 (they report the grid cell's upper end).

Caveat: epsilon_lb here is a statement about the GDP family: "the mechanism is not mu-GDP for any
mu <= mu_lb", reported as the epsilon that mu_lb-GDP has at delta. It is a lower bound on the mechanism's
(epsilon, delta) only if its trade-off curve is Gaussian (the paper's model for DP-SGD); a mechanism with
another curve shape (randomized response, say) can be (eps, delta)-DP with eps below it.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtr, ndtri

__all__ = ["gdp_delta", "gdp_epsilon", "forced_mass", "rejects", "p_value", "mu_lower_bound", "epsilon_lower_bound"]


def _check(m: int, r: int, v: int) -> None:
    if not (0 <= v <= r <= m) or m < 1:
        raise ValueError(f"need 0 <= v <= r <= m and m >= 1, got v={v}, r={r}, m={m}")


def forced_mass(*, m: int, r: int, v: int, tau: float | np.ndarray, mu: float | np.ndarray) -> np.ndarray:
    """r_0 + h_0: the least total guess mass per canary that mu-GDP forces when P[N >= v] = tau.
    Broadcasts over tau and mu (arrays of the same shape, or scalars)."""
    _check(m, r, v)
    tau, mu = np.broadcast_arrays(np.asarray(tau, dtype=np.float64), np.asarray(mu, dtype=np.float64))
    rr = tau * (v / m)  # r_v
    hh = tau * ((r - v) / m)  # h_v
    for i in range(v - 1, -1, -1):
        h_new = np.maximum(hh, ndtr(ndtri(np.clip(rr, 0.0, 1.0)) - mu))
        rr = rr + (i / (r - i)) * (h_new - hh)
        hh = h_new
    return rr + hh


def rejects(*, m: int, r: int, v: int, mu: float | np.ndarray, confidence: float = 0.95) -> np.ndarray:
    """True where mu-GDP is inconsistent with v correct of r guesses at `confidence`
    (no mu-GDP mechanism reaches P[N >= v] >= 1 - confidence)."""
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    if v == 0:
        return np.zeros(np.shape(mu), dtype=bool)
    return forced_mass(m=m, r=r, v=v, tau=1.0 - confidence, mu=mu) > r / m * (1 + 1e-12)


def p_value(*, m: int, r: int, v: int, mu: float) -> float:
    """A tau at which the recursion rejects mu-GDP for v correct of r guesses, as small as bisection finds
    (1.0 if none): an upper bound on P[N >= v] for every mu-GDP mechanism. Only rejected values of tau are
    returned, so it stays an upper bound even where the forced mass were not monotone in tau (it is, on every
    case tests/test_fdp_bound.py scans)."""
    _check(m, r, v)
    if v == 0 or not forced_mass(m=m, r=r, v=v, tau=1.0, mu=mu) > r / m * (1 + 1e-12):
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if forced_mass(m=m, r=r, v=v, tau=mid, mu=mu) > r / m * (1 + 1e-12):
            hi = mid
        else:
            lo = mid
    return hi


def mu_lower_bound(*, m: int, r: int, v: int, confidence: float = 0.95, mu_max: float = 50.0) -> float:
    """sup{mu : mu-GDP rejected}: a grid on [0, mu_max] (step 0.02), then the cell after the largest rejected
    grid point refined by three rounds of 200-point grids. Only rejected values are ever returned (0.0 if
    none), so the result is a valid lower bound even where rejection were not monotone in mu."""
    _check(m, r, v)
    if v == 0:
        return 0.0
    grid = np.linspace(0.0, mu_max, int(round(mu_max / 0.02)) + 1)
    rej = rejects(m=m, r=r, v=v, mu=grid, confidence=confidence)
    if not rej.any():
        return 0.0
    k = int(np.flatnonzero(rej)[-1])
    if k == len(grid) - 1:
        return float(grid[-1])  # rejected up to mu_max: report mu_max (a lower bound)
    lo, step = float(grid[k]), float(grid[1] - grid[0])
    for _ in range(3):
        fine = lo + np.linspace(0.0, step, 201)
        rej = rejects(m=m, r=r, v=v, mu=fine, confidence=confidence)
        lo = float(fine[int(np.flatnonzero(rej)[-1])]) if rej.any() else lo
        step /= 200.0
    return lo


def gdp_delta(mu: float, eps: float) -> float:
    """delta(eps) of mu-GDP (Dong, Roth & Su 2022, Corollary 2.13)."""
    if mu <= 0:
        return 0.0
    return float(ndtr(-eps / mu + mu / 2) - math.exp(eps) * ndtr(-eps / mu - mu / 2))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The epsilon of mu-GDP at `delta` (0 when delta(0) <= delta), by bisection to 1e-12 (from below)."""
    if not 0 < delta < 1:
        raise ValueError("delta must be in (0, 1)")
    if mu <= 0 or gdp_delta(mu, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gdp_delta(mu, hi) > delta:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        if gdp_delta(mu, mid) > delta:
            lo = mid
        else:
            hi = mid
    return lo  # delta(lo) > delta: lo is below the exact epsilon, so never overstated


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The f-DP (Gaussian family) empirical epsilon: eps at `delta` of the largest mu-GDP rejected by v correct
    of r guesses over m canaries at `confidence`."""
    return gdp_epsilon(mu_lower_bound(m=m, r=r, v=v, confidence=confidence), delta)
