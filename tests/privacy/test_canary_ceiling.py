"""The canary audit's ceiling (issue 13, item 4): the epsilon_lb a perfect attack would reach at this m,
guess grid, delta and confidence, and findings phrased from it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fmaudit.privacy.audit_bound import audit_curve, ceiling, epsilon_lb_ceiling
from fmaudit.privacy.canary import CanaryAuditResult, canary_findings

FRACTIONS = (0.05, 0.1, 0.2, 0.5, 1.0)  # the module's default guess grid


def _grid(m: int) -> list[int]:
    return sorted({max(1, int(round(f * m))) for f in FRACTIONS})


def _independent_lb(*, m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """Steinke-Nasr-Jagielski's bound solved directly from scipy's binomial tail with a root finder
    (no code shared with fmaudit.privacy.audit_bound)."""
    from scipy.optimize import brentq
    from scipy.stats import binom

    def pval(eps: float) -> float:
        q = math.exp(eps) / (1 + math.exp(eps))
        tail = binom.sf(v - 1, r, q)  # P[Bin(r, q) >= v]
        alpha = max((binom.cdf(v - 1, r, q) - binom.cdf(v - 1 - i, r, q)) / i for i in range(1, v + 1))
        return tail + 2 * m * delta * alpha - (1 - confidence)

    if pval(0.0) >= 0:
        return 0.0
    return brentq(pval, 0.0, 50.0, xtol=1e-10)


def _independent_ceiling(*, m: int, n_in: int, delta: float, confidence: float) -> float:
    grid = _grid(m)
    per_point = 1 - (1 - confidence) / len(grid)
    best = 0.0
    for r in grid:
        k_plus, k_minus = (r + 1) // 2, r // 2
        v = min(k_plus, n_in) + min(k_minus, m - n_in)  # a perfect attack on this inclusion draw
        best = max(best, _independent_lb(m=m, r=r, v=v, delta=delta, confidence=per_point))
    return best


@pytest.mark.parametrize("m,expected", [(100, 3.05), (200, 3.75)])
def test_ceiling_matches_issue_numbers_and_independent_binomial_tail(m, expected):
    got = epsilon_lb_ceiling(m=m, delta=1e-5, confidence=0.95, guess_counts=_grid(m))
    indep = _independent_ceiling(m=m, n_in=m // 2, delta=1e-5, confidence=0.95)
    assert got == pytest.approx(indep, abs=1e-6)
    assert got == pytest.approx(expected, abs=0.01)
    assert got < 8.0  # the quickstart's epsilon: out of reach of this audit


def test_ceiling_respects_the_inclusion_draw_and_the_grid():
    # 40 of 100 included: r = 100 puts 50 "included" guesses on 40 included canaries, so even a perfect
    # attack gets 90 of 100 right; the ceiling is lower than the balanced one and still matches scipy.
    included = np.zeros(100, dtype=bool)
    included[np.random.default_rng(1).choice(100, 40, replace=False)] = True
    top = ceiling(included, delta=1e-5, confidence=0.95, guess_counts=_grid(100))
    row = {r["r"]: r for r in top["rows"]}
    assert row[100]["v"] == 90 and row[50]["v"] == 50
    indep = _independent_ceiling(m=100, n_in=40, delta=1e-5, confidence=0.95)
    assert top["best"]["epsilon_lb_corrected"] == pytest.approx(indep, abs=1e-6)
    assert indep < _independent_ceiling(m=100, n_in=50, delta=1e-5, confidence=0.95)
    # a coarser grid (one point, no Bonferroni split) gives a different ceiling: the grid is part of it
    one = epsilon_lb_ceiling(m=100, delta=1e-5, confidence=0.95, guess_counts=[100])
    assert one == pytest.approx(_independent_lb(m=100, r=100, v=100, delta=1e-5, confidence=0.95), abs=1e-6)
    assert one > epsilon_lb_ceiling(m=100, delta=1e-5, confidence=0.95, guess_counts=_grid(100))


def test_no_attack_exceeds_the_ceiling():
    rng = np.random.default_rng(0)
    for _ in range(8):
        m = int(rng.choice([50, 100, 200]))
        included = rng.random(m) < 0.5
        strength = rng.uniform(0, 6)
        scores = included * strength + rng.normal(size=m)
        grid = _grid(m)
        lb = audit_curve(scores, included, delta=1e-5, confidence=0.95, guess_counts=grid)["best"]
        top = ceiling(included, delta=1e-5, confidence=0.95, guess_counts=grid)["best"]
        assert lb["epsilon_lb_corrected"] <= top["epsilon_lb_corrected"] + 1e-12


def _result(
    *, lb: float, ceiling_: float, accountant: float | None, claimed: float | None = None, m: int = 100
) -> CanaryAuditResult:
    return CanaryAuditResult(
        epsilon_lb=lb,
        confidence=0.95,
        delta=1e-5,
        num_canaries=m,
        num_included=m // 2,
        guesses=m,
        correct=m,
        rows=[],
        scores=np.zeros(m),
        included=np.zeros(m, bool),
        canary_ids=[],
        kind="flipped_label",
        score="loss_delta",
        accountant_epsilon=accountant,
        epsilon_lb_ceiling=ceiling_,
        ceiling_guesses=m,
        claimed_epsilon=claimed,
        guess_grid=_grid(m),
    )


def test_finding_when_the_claim_is_above_the_ceiling():
    (f,) = canary_findings(_result(lb=1.2, ceiling_=3.049, accountant=8.0))
    assert f["severity"] != "critical"
    assert "consistent" not in (f["title"] + f["detail"]).lower()
    assert "cannot confirm or refute epsilon = 8.000" in f["detail"]
    assert "ceiling at m=100" in f["detail"] and "3.049" in f["detail"]


def test_finding_when_the_audit_could_have_contradicted_the_claim():
    (f,) = canary_findings(_result(lb=0.4, ceiling_=3.049, accountant=2.0))
    assert f["severity"] == "info" and f["title"] == "Audit consistent with the DP guarantee"
    assert "3.049 >= 2.000" in f["detail"]


@pytest.mark.parametrize("accountant", [1.0, 8.0])
def test_critical_when_the_bound_exceeds_the_epsilon_whatever_the_ceiling(accountant):
    (f,) = canary_findings(_result(lb=2.5, ceiling_=3.049, accountant=min(accountant, 2.0)))
    assert f["severity"] == "critical" and "exceeds the accountant's epsilon" in f["title"]
    (g,) = canary_findings(_result(lb=2.5, ceiling_=3.049, accountant=accountant, claimed=1.0))
    assert g["severity"] == "critical" and "exceeds the claimed epsilon" in g["title"]
    assert f"accountant says epsilon <= {accountant:.3f}" in g["detail"]


def test_non_private_findings_report_the_ceiling():
    (f,) = canary_findings(_result(lb=3.049, ceiling_=3.049, accountant=None))
    assert f["severity"] == "medium" and "ceiling 3.049" in f["detail"] and "at the audit's ceiling" in f["detail"]
    (g,) = canary_findings(_result(lb=0.0, ceiling_=3.049, accountant=None))
    assert g["severity"] == "info" and "ceiling 3.049" in g["detail"] and "NOT a privacy guarantee" in g["detail"]


def test_without_a_ceiling_the_finding_does_not_claim_reach():
    (f,) = canary_findings(_result(lb=0.4, ceiling_=float("nan"), accountant=2.0))
    assert f["severity"] == "info" and "consistent" not in f["title"].lower() and "unknown" in f["detail"]
