"""Known answer "DP consistency" (issue 13's suite): on a DP run the canary audit's epsilon_lb never exceeds
the accountant's epsilon, and the critical finding fires when the accounting is wrong.

The scenario: a tiny BERT memorizes 200 random-token canaries (each with a random label; about half are
included) over 12 epochs of DP-SGD. Honest run: noise multiplier 4 (RDP epsilon ~1.0): the bound must stay
below the accountant's epsilon, and that epsilon is below the audit's ceiling, so the audit could have
caught a violation. Mis-accounted run: the same procedure with the noise effectively off (multiplier 1e-6),
claiming the honest run's epsilon (what an implementation that forgets to add noise but still accounts for
it would report): the bound must exceed the claim and the critical finding must fire."""

from __future__ import annotations

import numpy as np
import pytest

from fmaudit.data import Dataset
from fmaudit.privacy.audit_bound import bounds
from fmaudit.privacy.canary import canary_audit, canary_findings, holdout_split
from fmaudit.testing import make_sentences

SCENARIO = {
    "epochs": 12,
    "batch_size": 8,
    "delta": 1e-5,
    "max_grad_norm": 1.0,
    "lr": 5e-3,
    "weight_decay": 0.0,
    "accountant": "rdp",
    "trainable": "all",
    "n_layers": 2,
    "clipping": "ghost",
}


@pytest.fixture(scope="module")
def runs(tiny_bert_dir, tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-wide model gains nothing from threads; on a busy machine they cost ~5x
    try:
        yield _scenario(tiny_bert_dir, tmp_path_factory)
    finally:
        torch.set_num_threads(threads)


def _scenario(tiny_bert_dir, tmp_path_factory):
    from fmaudit.targets import load_target

    base = load_target(model=str(tiny_bert_dir), task="text-classification", max_length=16)
    texts, labels = make_sentences(20)
    members = Dataset("sents", "sents", "text", [f"s{i}" for i in range(20)], labels, texts=texts)
    cache = tmp_path_factory.mktemp("canary-known-answer")
    common = dict(
        base=base,
        members=members,
        train={},
        num_canaries=200,
        kind="random_tokens",
        score="loss",
        seed=0,
        cache_dir=cache,
    )
    honest = canary_audit(dp={**SCENARIO, "noise_multiplier": 4.0}, **common)
    broken = canary_audit(
        dp={**SCENARIO, "noise_multiplier": 1e-6}, claimed_epsilon=honest.accountant_epsilon, **common
    )
    return honest, broken


def test_honest_dp_run_stays_below_its_accountant(runs):
    honest, _ = runs
    assert 0.5 < honest.accountant_epsilon < honest.epsilon_lb_ceiling  # the audit could have caught a violation
    assert honest.epsilon_lb <= honest.accountant_epsilon
    assert not any(f["severity"] == "critical" for f in canary_findings(honest))
    assert canary_findings(honest)[0]["title"] == "Audit consistent with the DP guarantee"


def test_mis_accounted_run_triggers_the_critical_finding(runs):
    honest, broken = runs
    # same canaries, inclusion, data and steps: only the noise differs
    assert np.array_equal(honest.included, broken.included) and honest.canary_ids == broken.canary_ids
    assert broken.rerun["steps"] == honest.rerun["steps"] and broken.rerun["sample_rate"] == honest.rerun["sample_rate"]
    assert broken.canary_auc > 0.85
    assert broken.epsilon_lb > broken.claimed_epsilon == honest.accountant_epsilon
    findings = canary_findings(broken)
    assert [f["severity"] for f in findings] == ["critical"]
    assert "exceeds the claimed epsilon" in findings[0]["title"]
    # the run's own (honest) accounting for multiplier 1e-6 is astronomically large and not contradicted
    assert broken.accountant_epsilon > 1e6 and broken.epsilon_lb <= broken.accountant_epsilon


def test_both_bounds_recompute_from_the_record(runs):
    """Issue 14: the report records (m, num_included, r, v, delta, confidence, guess_selection, held-out ids);
    both bounds follow from it, and the headline is the tighter one."""
    honest, broken = runs
    for res in (honest, broken):
        rec = res.record
        assert rec["guess_selection"] == res.guess_selection == "holdout"  # the default
        held = holdout_split(200, 0, 0.3)
        assert rec["held_out_ids"] == [res.canary_ids[i] for i in np.flatnonzero(held)]
        assert rec["m"] == 200 - held.sum() == 140 and rec["confidence"] == 0.95
        assert rec["num_included"] == int(res.included[~held].sum())
        assert (rec["r"], rec["v"]) == (res.guesses, res.correct)
        again = bounds(m=rec["m"], r=rec["r"], v=rec["v"], delta=rec["delta"], confidence=rec["confidence"])
        assert again["epsilon_lb_sjn"] == res.epsilon_lb_sjn == rec["epsilon_lb_sjn"]
        assert again["epsilon_lb_fdp"] == res.epsilon_lb_fdp == rec["epsilon_lb_fdp"]
        assert res.epsilon_lb == res.epsilon_lb_sjn <= res.epsilon_lb_fdp  # headline: the assumption-free bound
        assert res.epsilon_lb <= res.epsilon_lb_ceiling
    print(
        f"honest: lb {honest.epsilon_lb:.3f} (sjn {honest.epsilon_lb_sjn:.3f}, fdp {honest.epsilon_lb_fdp:.3f}), "
        f"acct {honest.accountant_epsilon:.3f}, ceiling {honest.epsilon_lb_ceiling:.3f}, auc {honest.canary_auc:.2f}; "
        f"broken: lb {broken.epsilon_lb:.3f} (sjn {broken.epsilon_lb_sjn:.3f}, fdp {broken.epsilon_lb_fdp:.3f}) "
        f"r {broken.guesses} v {broken.correct} auc {broken.canary_auc:.2f}"
    )
