"""Guess selection without the Bonferroni loss (issue 14): r chosen on held-out canaries, the bound computed
once on the others; the ceiling computed for the same procedure; the record recomputes both bounds."""

from __future__ import annotations

import numpy as np
import pytest

from fmaudit.privacy.audit_bound import audit, bounds, guess, procedure_ceiling
from fmaudit.privacy.canary import CanaryAuditResult, canary_findings, holdout_split, inclusion_vector
from fmaudit.seeds import Stream, rng

FRACTIONS = (0.05, 0.1, 0.2, 0.5, 1.0)


def test_holdout_split_is_its_own_seeded_stream():
    a = holdout_split(200, 7, 0.3)
    assert a.sum() == 60 and np.array_equal(a, holdout_split(200, 7, 0.3))
    assert not np.array_equal(a, holdout_split(200, 8, 0.3))
    expected = np.zeros(200, bool)
    expected[rng(7, Stream.CANARY_GUESS_SPLIT).choice(200, size=60, replace=False)] = True
    assert np.array_equal(a, expected)
    # not the inclusion draw (another stream), and at least one canary on each side
    assert not np.array_equal(a, inclusion_vector(200, 7))
    assert holdout_split(10, 0, 0.01).sum() == 1 and holdout_split(10, 0, 0.99).sum() == 9
    with pytest.raises(ValueError):
        holdout_split(10, 0, 1.0)


def test_holdout_chooses_r_on_held_out_canaries_only_and_does_not_correct():
    g = np.random.default_rng(3)
    m = 120
    included = g.random(m) < 0.5
    held = holdout_split(m, 0, 0.3)
    # held-out canaries: only the 5% most confident scores carry signal -> a small r wins there
    scores = g.normal(size=m)
    hi = np.flatnonzero(held)
    order = np.argsort(-scores[hi])
    scores[hi[order[:3]]] += 10 * included[hi[order[:3]]] - 5
    res = audit(
        scores, included, delta=1e-5, confidence=0.95, guess_fractions=FRACTIONS, selection="holdout", holdout=held
    )
    assert res["held_out"] == hi.tolist() and res["audited"] == np.flatnonzero(~held).tolist()
    assert all(row["m"] == len(hi) for row in res["rows"])
    best_row = max(res["rows"], key=lambda row: (row["epsilon_lb"], -row["r"]))
    assert res["fraction"] == best_row["fraction"]
    # the audited part: r = round(f m'), v from its own guesses, bound at the stated confidence (no correction)
    aud = np.flatnonzero(~held)
    r = max(1, round(res["fraction"] * len(aud)))
    gg = guess(scores[aud], included[aud], r)
    assert (res["m"], res["r"], res["v"]) == (len(aud), gg.r, gg.v)
    assert res["test_confidence"] == 0.95
    again = bounds(m=res["m"], r=res["r"], v=res["v"], delta=1e-5, confidence=0.95)
    assert {k: res[k] for k in again} == again
    # changing the audited canaries' scores never changes the chosen fraction
    other = scores.copy()
    other[aud] = g.normal(size=len(aud)) * 100
    res2 = audit(
        other, included, delta=1e-5, confidence=0.95, guess_fractions=FRACTIONS, selection="holdout", holdout=held
    )
    assert res2["fraction"] == res["fraction"] and res2["rows"] == res["rows"]


def test_bonferroni_keeps_the_old_correction():
    g = np.random.default_rng(1)
    included = g.random(100) < 0.5
    scores = included * 2.0 + g.normal(size=100)
    res = audit(scores, included, delta=1e-5, confidence=0.95, guess_fractions=FRACTIONS, selection="bonferroni")
    assert res["test_confidence"] == pytest.approx(1 - 0.05 / 5)
    assert res["held_out"] == [] and res["m"] == 100
    assert res["epsilon_lb"] == max(row["epsilon_lb"] for row in res["rows"])
    for row in res["rows"]:
        b = bounds(m=100, r=row["r"], v=row["v"], delta=1e-5, confidence=1 - 0.05 / 5)
        assert row["epsilon_lb_sjn"] == b["epsilon_lb_sjn"] and row["epsilon_lb_fdp"] == b["epsilon_lb_fdp"]


@pytest.mark.parametrize("selection", ["holdout", "bonferroni"])
def test_no_attack_exceeds_the_ceiling_of_the_same_procedure(selection):
    g = np.random.default_rng(0)
    for trial in range(4):
        m = int(g.choice([60, 100]))
        included = g.random(m) < 0.5
        held = holdout_split(m, trial, 0.3) if selection == "holdout" else None
        scores = included * g.uniform(0, 6) + g.normal(size=m)
        got = audit(
            scores, included, delta=1e-5, confidence=0.95, guess_fractions=FRACTIONS, selection=selection, holdout=held
        )
        top = procedure_ceiling(
            included, delta=1e-5, confidence=0.95, guess_fractions=FRACTIONS, selection=selection, holdout=held
        )
        for key in ("epsilon_lb", "epsilon_lb_sjn", "epsilon_lb_fdp"):
            assert got[key] <= top[key] + 1e-12
        assert top["audited"] == got["audited"]


def test_ceiling_of_a_perfect_balanced_holdout_audit():
    """m = 100, 30 held out: a perfect attack on a balanced audited part guesses all 70 right (r = 70)."""
    included = np.zeros(100, bool)
    held = np.zeros(100, bool)
    held[:30] = True
    included[:15] = True  # held out: 15 in, 15 out
    included[30:65] = True  # audited: 35 in, 35 out
    top = procedure_ceiling(included, delta=1e-5, confidence=0.95, guess_fractions=FRACTIONS, holdout=held)
    assert (top["fraction"], top["m"], top["r"], top["v"]) == (1.0, 70, 70, 70)
    assert top["epsilon_lb"] == bounds(m=70, r=70, v=70, delta=1e-5, confidence=0.95)["epsilon_lb"]


def _result(**kw) -> CanaryAuditResult:
    m = 100
    base = dict(
        epsilon_lb=2.5,
        confidence=0.95,
        delta=1e-5,
        num_canaries=m,
        num_included=50,
        guesses=70,
        correct=70,
        rows=[],
        scores=np.zeros(m),
        included=np.zeros(m, bool),
        canary_ids=[],
        kind="flipped_label",
        score="loss_delta",
        accountant_epsilon=1.0,
        epsilon_lb_ceiling=8.0,
        ceiling_guesses=70,
        epsilon_lb_sjn=2.0,
        epsilon_lb_fdp=2.5,
        bound="fdp",
        guess_selection="holdout",
        record={"guess_selection": "holdout", "m": 70, "held_out_ids": [f"c{i}" for i in range(30)]},
    )
    base.update(kw)
    return CanaryAuditResult(**base)


def test_findings_name_the_procedure_and_the_analysis():
    (f,) = canary_findings(_result())
    assert f["severity"] == "critical"
    assert "30 held out to choose r, the bound on the other 70 with r = 70" not in f["detail"]  # critical: no reach
    assert "f-DP analysis, which assumes a Gaussian trade-off curve" in f["detail"]
    assert "Steinke-Nasr-Jagielski bound on the same guesses is 2.000" in f["detail"]
    (g,) = canary_findings(
        _result(epsilon_lb=0.5, epsilon_lb_sjn=0.5, epsilon_lb_fdp=0.1, bound="sjn", accountant_epsilon=9.0)
    )
    assert "30 held out to choose r, the bound on the other 70 with r = 70" in g["detail"]
    assert "assumes a Gaussian trade-off curve" not in g["detail"]


def test_f_dp_alone_above_the_claim_is_high_not_critical():
    """Randomized response at eps = 2 is (2, 0)-DP, but its typical outcome (881 of 1000 right) rejects every mu-GDP
    with epsilon(mu, 1e-5) below 3.4: the f-DP number is about the Gaussian family, the SNJ one about every
    mechanism. A claim between the two gets a 'high' finding that says so, not 'critical'."""
    b = bounds(m=1000, r=1000, v=881, delta=1e-5, confidence=0.95)
    assert b["epsilon_lb_sjn"] < 2.0 < b["epsilon_lb_fdp"]
    res = _result(
        epsilon_lb=b["epsilon_lb"],
        epsilon_lb_sjn=b["epsilon_lb_sjn"],
        epsilon_lb_fdp=b["epsilon_lb_fdp"],
        mu_lb=b["mu_lb"],
        bound=b["bound"],
        accountant_epsilon=2.0,
        epsilon_lb_ceiling=12.0,
    )
    (f,) = canary_findings(res)
    assert f["severity"] == "high" and "if the trade-off curve is Gaussian" in f["title"]
    assert f"{b['epsilon_lb_sjn']:.3f}, within the claim" in f["detail"]
    # both above the claim: critical
    (g,) = canary_findings(_result(accountant_epsilon=1.0))
    assert g["severity"] == "critical"
