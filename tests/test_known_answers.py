"""The known-answer suite (fmaudit.known_answers): planted scenarios whose right answer is known, on
small models. Each returns its numbers and a verdict; these tests hold the audits to them."""

from __future__ import annotations

from fmaudit import known_answers as ka


def test_null_two_unseen_sets_read_as_nothing(tmp_path):
    r = ka.membership_null(seed=0, work=tmp_path)
    assert r.passed, r.line()
    assert r.numbers["auc"] <= 0.6 and r.numbers["max_attack_auc_deviation"] < 0.1


def test_planted_leak_is_found_and_its_dp_twin_is_not(tmp_path):
    r = ka.membership_planted_leak(seed=0, work=tmp_path)
    assert r.passed, r.line()
    assert r.numbers["auc"] >= 0.8 and r.numbers["tpr@1%"] >= 0.05
    assert r.numbers["dp_epsilon"] <= 1.0 + 1e-6


def test_reference_halves_are_independent_of_the_split():
    r = ka.seed_independence(seeds=30)
    assert r.passed, r.line()


def test_same_seed_gives_identical_numbers(tmp_path):
    r = ka.same_seed_same_numbers(seed=0, work=tmp_path)
    assert r.passed, r.line()
    assert r.numbers["metrics"] > 20


def test_a_scenario_can_fail():
    """The suite is not vacuous: a scenario whose expectation is wrong reports FAIL with the reason."""
    c = ka._Checks()
    c.expect(False, "planted failure")
    res = ka.ScenarioResult("x", not c.failures, {"auc": 0.9}, "nothing", c.failures)
    assert not res.passed and "FAIL: planted failure" in res.line()


def test_dp_canary_bound_never_exceeds_epsilon_and_a_broken_run_is_caught(tmp_path):
    r = ka.dp_canary_consistency(seed=0, work=tmp_path)
    assert r.passed, r.line()
    assert r.numbers["honest_eps_lb"] <= r.numbers["honest_eps"] < r.numbers["ceiling"]
    assert r.numbers["broken_eps_lb"] > r.numbers["honest_eps"]
