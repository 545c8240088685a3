"""The f-DP one-run bound (Mahloujifar, Melis & Chaudhuri 2025; fmaudit.privacy.fdp_bound): hand-computed
small cases, soundness against exact tail probabilities of a mu-GDP mechanism, and invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.optimize import brentq
from scipy.stats import binom, norm

from fmaudit.privacy import fdp_bound as F
from fmaudit.privacy.audit_bound import bounds
from fmaudit.privacy.audit_bound import epsilon_lower_bound as sjn_lb


def _reference_rejects(m: int, r: int, v: int, mu: float, tau: float) -> bool:
    """The recursion written out with scipy.stats.norm, scalar by scalar, as in the authors' reference code
    (PrivacyGuard's rh_with_cap / audit_rh_with_cap, k = 2): True when mu-GDP is rejected."""
    h = [0.0] * (v + 1)
    rr = [0.0] * (v + 1)
    h[v], rr[v] = tau * (r - v) / m, tau * v / m
    for i in range(v - 1, -1, -1):
        h[i] = max(h[i + 1], norm.cdf(norm.ppf(rr[i + 1]) - mu))
        rr[i] = rr[i + 1] + i / (r - i) * (h[i] - h[i + 1])
    return rr[0] + h[0] > r / m


def test_two_canaries_by_hand():
    """m = r = v = 2, tau = 1/2: h_1 = Phi(-mu) (as Phi^-1(1/2) = 0), r_1 = 1/2 + h_1,
    h_0 = max(h_1, Phi(Phi^-1(r_1) - mu)), and mu is rejected iff r_1 + h_0 > 1."""

    def by_hand(mu: float) -> float:
        h1 = norm.cdf(-mu)
        r1 = 0.5 + h1
        return r1 + max(h1, norm.cdf(norm.ppf(r1) - mu)) - 1.0

    mus = np.linspace(0.0, 4.0, 81)
    got = F.rejects(m=2, r=2, v=2, mu=mus, confidence=0.5)
    assert list(got) == [by_hand(x) > 1e-12 for x in mus]
    assert got[0] and not got[-1]
    mu_star = brentq(by_hand, 0.0, 4.0, xtol=1e-12)  # by_hand decreases: one crossing
    assert F.mu_lower_bound(m=2, r=2, v=2, confidence=0.5) == pytest.approx(mu_star, abs=1e-6)
    # by hand at mu = 0.9235: h_1 = Phi(-0.9235) = 0.1779, r_1 = 0.6779, Phi^-1(0.6779) = 0.4620,
    # Phi(0.4620 - 0.9235) = 0.3222 > h_1, r_1 + 0.3222 = 1.0001: the crossing
    assert mu_star == pytest.approx(0.9235, abs=2e-4)
    # sound for the independent Gaussian mechanism: both guesses right w.p. Phi(mu/2)^2 < 1/2 at mu_star
    assert norm.cdf(mu_star / 2) ** 2 < 0.5


def test_one_guess_never_rejects_at_95():
    # r = v = 1: tau + Phi(Phi^-1(tau) - mu) <= 2 tau < 1 for tau = 0.05, so nothing is rejected.
    assert F.mu_lower_bound(m=1, r=1, v=1) == 0.0
    assert F.epsilon_lower_bound(m=10, r=1, v=1, delta=1e-5) == 0.0


@pytest.mark.parametrize("m,r,v", [(10, 10, 10), (10, 10, 9), (10, 6, 6), (20, 20, 18), (20, 8, 8), (20, 14, 13)])
def test_matches_the_reference_recursion_for_small_m(m, r, v):
    mu = F.mu_lower_bound(m=m, r=r, v=v, confidence=0.95)
    if mu == 0.0:
        assert not _reference_rejects(m, r, v, 1e-9, 0.05)
        return
    assert _reference_rejects(m, r, v, mu, 0.05)
    assert not _reference_rejects(m, r, v, mu + 1e-5, 0.05)
    # and every smaller mu is rejected too (rejection is monotone here)
    assert all(_reference_rejects(m, r, v, x, 0.05) for x in np.linspace(1e-6, mu, 12))


@pytest.mark.parametrize("m", [10, 20])
@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0, 3.0])
def test_sound_against_the_exact_tail_of_a_gdp_mechanism(m, mu):
    """Release y_j ~ N(mu b_j, 1) for each canary bit b_j: mu-GDP in each bit. Guessing every canary by y_j > mu/2
    is right with probability Phi(mu/2), independently, so P[N >= v] = P[Bin(m, Phi(mu/2)) >= v] exactly. The f-DP
    p-value must bound it for every v (and is not absurdly loose near the top)."""
    q = norm.cdf(mu / 2)
    for v in range(1, m + 1):
        exact = binom.sf(v - 1, m, q)
        p = F.p_value(m=m, r=m, v=v, mu=mu)
        assert p >= exact * (1 - 1e-9), (v, p, exact)
    assert F.p_value(m=m, r=m, v=m, mu=mu) < 1.0


def test_sound_with_abstention_monte_carlo():
    """Same mechanism, m = 12, the auditor guesses only the r = 6 canaries with the largest |y - mu/2|."""
    rng = np.random.default_rng(0)
    m, r, mu, n = 12, 6, 1.5, 200_000
    b = rng.random((n, m)) < 0.5
    y = mu * b + rng.normal(size=(n, m))
    top = np.argsort(-np.abs(y - mu / 2), axis=1)[:, :r]
    correct = ((np.take_along_axis(y, top, 1) > mu / 2) == np.take_along_axis(b, top, 1)).sum(1)
    for v in range(4, r + 1):
        freq = (correct >= v).mean()
        se = math.sqrt(freq * (1 - freq) / n)
        assert F.p_value(m=m, r=r, v=v, mu=mu) >= freq - 4 * se, v


def test_gdp_delta_and_epsilon_match_numerical_integration():
    for mu in (0.5, 1.0, 2.0):
        for eps in (0.0, 0.5, 2.0, 5.0):
            # delta(eps) = integral of max(0, p1 - e^eps p0) for p1 = N(mu, 1), p0 = N(0, 1)
            x0 = eps / mu + mu / 2  # where p1 = e^eps p0
            num = quad(lambda x, mu=mu, eps=eps: norm.pdf(x - mu) - math.exp(eps) * norm.pdf(x), x0, np.inf)[0]
            assert F.gdp_delta(mu, eps) == pytest.approx(num, abs=1e-10)
        eps_at = F.gdp_epsilon(mu, 1e-5)
        assert F.gdp_delta(mu, eps_at) == pytest.approx(1e-5, rel=1e-6)
    assert F.gdp_epsilon(1.0, 1e-5) == pytest.approx(4.3772, abs=1e-3)
    assert F.gdp_epsilon(0.0, 1e-5) == 0.0


def test_invariants_monotone_nonnegative_and_below_perfect():
    m, r = 60, 40
    vals = [F.epsilon_lower_bound(m=m, r=r, v=v, delta=1e-5) for v in range(0, r + 1, 4)]
    assert all(x >= 0 for x in vals)
    assert vals == sorted(vals)
    assert vals[0] == 0.0 and F.epsilon_lower_bound(m=m, r=r, v=r // 2, delta=1e-5) == 0.0
    assert max(vals) == vals[-1] == F.epsilon_lower_bound(m=m, r=r, v=r, delta=1e-5)
    # higher confidence, smaller bound
    assert F.mu_lower_bound(m=m, r=r, v=r, confidence=0.99) < F.mu_lower_bound(m=m, r=r, v=r, confidence=0.95)
    # the forced mass grows with tau (the analysis starts from P[N >= v] = tau exactly: a larger probability
    # must force at least as much), checked on a grid
    for v in (24, 32, 40):
        for mu in (0.3, 1.0, 2.5):
            fm = F.forced_mass(m=m, r=r, v=v, tau=np.linspace(0.0, 1.0, 401), mu=mu)
            assert np.all(np.diff(fm) >= -1e-12), (v, mu)
    # rejection is monotone in mu on a fine grid (the property the bound's search relies on for tightness)
    rej = F.rejects(m=m, r=r, v=36, mu=np.linspace(0, 5, 501))
    k = int(np.flatnonzero(~rej)[0])
    assert rej[:k].all() and not rej[k:].any()


@pytest.mark.parametrize("m", [100, 200, 1000])
def test_perfect_attack_f_dp_at_least_snj(m):
    """The paper's main claim for a perfect attack (all m guesses right)."""
    both = bounds(m=m, r=m, v=m, delta=1e-5, confidence=0.95)
    assert both["epsilon_lb_sjn"] == pytest.approx(sjn_lb(m=m, r=m, v=m, delta=1e-5), abs=1e-12)
    assert both["epsilon_lb_fdp"] >= both["epsilon_lb_sjn"]
    # the headline stays the assumption-free bound: the f-DP number holds only for Gaussian trade-off curves
    assert both["epsilon_lb"] == both["epsilon_lb_sjn"] and both["bound"] == "sjn"
    assert both["epsilon_lb_fdp"] == pytest.approx(F.gdp_epsilon(both["mu_lb"], 1e-5), abs=1e-12)


def test_weak_evidence_gives_no_f_dp_bound_and_snj_headline_when_tighter():
    both = bounds(m=100, r=100, v=50, delta=1e-5, confidence=0.95)
    assert both["epsilon_lb_fdp"] == both["epsilon_lb_sjn"] == both["epsilon_lb"] == 0.0
