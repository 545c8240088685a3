"""One-run canary audits: the bound matches the paper, memorization is detected, DP is respected,
and canaries never leak."""

from __future__ import annotations

import numpy as np
import pytest

from fmaudit.privacy.audit_bound import audit_curve, epsilon_lower_bound, guess, p_value
from fmaudit.testing import tiny_text_recipe


@pytest.mark.parametrize("r,v,expected", [(100, 100, 3.47), (100, 90, 1.63), (1000, 1000, 5.78), (1000, 700, 0.73)])
def test_bound_matches_steinke_nasr_jagielski(r, v, expected):
    eps = epsilon_lower_bound(m=1000, r=r, v=v, delta=1e-5, confidence=0.95)
    assert eps == pytest.approx(expected, abs=0.01)


def test_chance_level_gives_zero_and_bound_is_monotone():
    assert epsilon_lower_bound(m=1000, r=1000, v=500, delta=1e-5) == 0.0
    assert epsilon_lower_bound(m=1000, r=100, v=50, delta=1e-5) == 0.0
    vals = [epsilon_lower_bound(m=1000, r=100, v=v, delta=1e-5) for v in range(60, 101, 10)]
    assert vals == sorted(vals)
    # the p-value is a probability bound that grows with eps
    ps = [p_value(m=1000, r=100, v=90, eps=e, delta=1e-5) for e in (0.5, 1.0, 2.0, 4.0)]
    assert ps == sorted(ps) and all(0 <= x <= 1 for x in ps)


def test_guessing_counts_and_bonferroni_grid():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([True, True, False, True, False, False])
    g = guess(scores, included, 4)  # top 2 guessed in (both right), bottom 2 guessed out (both right)
    assert (g.r, g.v, g.k_plus, g.k_minus) == (4, 4, 2, 2)
    curve = audit_curve(scores, included, delta=1e-5, confidence=0.95, guess_counts=[2, 4, 6])
    assert curve["per_point_confidence"] == pytest.approx(1 - 0.05 / 3)
    for row in curve["rows"]:
        assert row["epsilon_lb_corrected"] <= row["epsilon_lb"] + 1e-12


def test_dp_mechanism_never_exceeds_its_epsilon():
    """Randomized response is exactly eps-DP: the audited bound stays below eps in every trial."""
    rng = np.random.default_rng(0)
    eps = 2.0
    q = np.exp(eps) / (1 + np.exp(eps))
    for _ in range(20):
        included = rng.random(1000) < 0.5
        reported = np.where(rng.random(1000) < q, included, ~included)
        scores = reported.astype(float) + rng.random(1000) * 1e-3
        curve = audit_curve(scores, included, delta=0.0, confidence=0.95, guess_counts=[100, 500, 1000])
        assert curve["best"]["epsilon_lb_corrected"] <= eps


def _recipe(tiny_bert_dir, sentiment_csv, tmp_path, audits, **ft):
    recipe = tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path)
    recipe["data"]["sents"]["limit"] = 100  # 50 members: the canary run stays cheap
    recipe["targets"]["bert"]["finetune"].update({"epochs": 6, "lr": 3e-3, "batch_size": 8, **ft})
    recipe["audits"] = audits
    return recipe


def test_memorizing_model_gives_positive_bound_and_canaries_do_not_leak(tiny_bert_dir, sentiment_csv, tmp_path):
    from fmaudit.runner import run_recipe

    audits = [
        {"use": "utility", "target": "bert"},
        {
            "use": "privacy.canary_audit",
            "target": "bert",
            "params": {"num_canaries": 40, "kind": "random_tokens", "score": "loss"},
        },
        {"use": "utility", "target": "bert"},
    ]
    report = run_recipe(_recipe(tiny_bert_dir, sentiment_csv, tmp_path, audits))
    before, canary, after = report.audits
    assert canary.status == "ok", canary.error
    assert canary.metrics["epsilon_lb"].value > 0.0
    assert canary.metrics["canary_auc"].value > 0.7
    # both analyses, the tighter one as headline, recomputable from the recorded numbers (issue 14)
    rec = canary.tables["bound"]
    from fmaudit.privacy.audit_bound import bounds

    again = bounds(m=rec["m"], r=rec["r"], v=rec["v"], delta=rec["delta"], confidence=rec["confidence"])
    assert again["epsilon_lb_sjn"] == canary.metrics["epsilon_lb_sjn"].value
    assert again["epsilon_lb_fdp"] == canary.metrics["epsilon_lb_fdp"].value
    assert canary.metrics["epsilon_lb"].value == again["epsilon_lb"]
    assert rec["guess_selection"] == "holdout" and rec["m"] + len(rec["held_out_ids"]) == 40
    assert {e["id"] for e in canary.evidence if e["held_out"]} == set(rec["held_out_ids"])
    assert canary.metrics["guesses"].value == rec["r"] and canary.metrics["correct_guesses"].value == rec["v"]
    # Canaries never leak: the audited target, its cached fine-tune and later modules' data are untouched.
    assert {k: m.value for k, m in before.metrics.items()} == {k: m.value for k, m in after.metrics.items()}
    assert before.tables["evaluated_on"] == after.tables["evaluated_on"]
    assert all(e["id"].startswith("canary:") for e in canary.evidence)
    again = run_recipe(_recipe(tiny_bert_dir, sentiment_csv, tmp_path, audits[:1]))
    assert again.targets["bert"].weights_sha256 == report.targets["bert"].weights_sha256
    assert again.targets["bert"].cache_hit
    assert not any(i.startswith("canary:") for i in report.targets["bert"].split.member_ids)


def test_dp_target_bound_stays_below_accountant(tiny_bert_dir, sentiment_csv, tmp_path):
    from fmaudit.runner import run_recipe

    audits = [
        {
            "use": "privacy.dp_finetune",
            "target": "bert",
            "produces": "bert-dp",
            "params": {
                "target_epsilon": 1.0,
                "epochs": 2,
                "batch_size": 8,
                "lr": 1e-3,
                "weight_decay": 0.01,
                "trainable": "last_n_layers",
                "n_layers": 1,
            },
        },
        {"use": "privacy.canary_audit", "target": "bert-dp", "params": {"num_canaries": 40, "kind": "random_tokens"}},
    ]
    report = run_recipe(_recipe(tiny_bert_dir, sentiment_csv, tmp_path, audits, epochs=1))
    dp, canary = report.audits
    assert dp.status == "ok", dp.error
    assert canary.status == "ok", canary.error
    acc = canary.metrics["accountant_epsilon"].value
    assert acc is not None and acc <= 1.0 + 1e-6
    assert canary.metrics["epsilon_lb"].value <= acc
    assert not any(f.severity == "critical" for f in canary.findings)
    # The canary run re-ran exactly the recorded DP procedure (issue 13, item 5), and says so.
    recorded, rerun = dp.tables["dp_parameters"], canary.tables["rerun"]
    assert rerun["defaulted"] == []
    for key in (
        "epochs",
        "batch_size",
        "noise_multiplier",
        "delta",
        "max_grad_norm",
        "accountant",
        "clipping",
        "trainable",
        "n_layers",
        "lr",
        "weight_decay",
        "max_physical_batch_size",
    ):
        assert rerun["settings"][key] == recorded[key], key
    assert (rerun["settings"]["n_layers"], rerun["settings"]["weight_decay"]) == (1, 0.01)
    # The ceiling sits next to the bound, and the finding is phrased from it (issue 13, item 4).
    top = canary.metrics["epsilon_lb_ceiling"].value
    assert canary.metrics["epsilon_lb"].value <= top
    (finding,) = canary.findings
    if acc > top:
        assert "cannot confirm or refute" in finding.detail and "consistent" not in finding.title.lower()
    else:
        assert finding.title == "Audit consistent with the DP guarantee"


def _secret_recipe(tiny_llama_dir, sentiment_csv, tmp_path, lr):
    return {
        "version": 1,
        "name": "lm",
        "output_dir": str(tmp_path / "r"),
        "data": {"s": {"source": str(sentiment_csv), "limit": 40, "label_column": None}},
        "targets": {
            "lm": {
                "model": str(tiny_llama_dir),
                "task": "causal-lm",
                "max_length": 24,
                "finetune": {"data": "s", "epochs": 10, "lr": lr, "batch_size": 8},
            }
        },
        "audits": [
            {
                "use": "privacy.canary_audit",
                "target": "lm",
                "params": {"num_canaries": 20, "secret_digits": 4, "exposure_candidates": 100},
            }
        ],
    }


def test_secret_exposure_on_causal_lm(tiny_llama_dir, sentiment_csv, tmp_path):
    """Planted: an LM trained hard on its data (with the secrets) ranks the secrets it saw above the ones left
    out: the finding, the metrics and the verdict say so."""
    from fmaudit.runner import run_recipe
    from fmaudit.verdict import verdicts

    report = run_recipe(_secret_recipe(tiny_llama_dir, sentiment_csv, tmp_path, 5e-3))
    res = report.audits[0]
    assert res.status == "ok", res.error
    ex = res.tables["exposure"]
    assert ex["space_bits"] == pytest.approx(4 * np.log2(10))
    assert ex["mean_included"] > ex["mean_excluded"]
    assert 0 <= res.metrics["exposure_max_included"].value <= ex["space_bits"]
    assert res.metrics["exposure_mean_excluded"].value == pytest.approx(ex["mean_excluded"])
    assert res.metrics["exposure_auc"].value > 0.7 and res.metrics["exposure_p_value"].value < 0.05
    assert any(f.title == "Planted secrets are exposed" for f in res.findings)
    privacy = next(v for v in verdicts(report) if v.area == "privacy")
    assert privacy.level in ("medium", "high", "critical") and "planted secrets exposed" in privacy.text


def test_secret_exposure_null_when_training_barely_moves(tiny_llama_dir, sentiment_csv, tmp_path):
    """Null: a learning rate of 1e-9 leaves the LM as it was, so inclusion cannot show in the exposures."""
    from fmaudit.runner import run_recipe
    from fmaudit.verdict import verdicts

    report = run_recipe(_secret_recipe(tiny_llama_dir, sentiment_csv, tmp_path, 1e-9))
    res = report.audits[0]
    assert res.status == "ok", res.error
    assert 0.2 < res.metrics["exposure_auc"].value < 0.8
    assert res.metrics["exposure_p_value"].value >= 0.05
    assert not any(f.title == "Planted secrets are exposed" for f in res.findings)
    privacy = next(v for v in verdicts(report) if v.area == "privacy")
    assert "planted secrets not exposed beyond chance" in privacy.text


def test_bad_params_and_kinds(tiny_bert_dir, sentiment_csv, tmp_path):
    from fmaudit.recipe import RecipeError, load_recipe
    from fmaudit.runner import run_recipe

    recipe = _recipe(
        tiny_bert_dir,
        sentiment_csv,
        tmp_path,
        [{"use": "privacy.canary_audit", "target": "bert", "params": {"num_canaries": 5}}],
    )
    with pytest.raises(RecipeError, match="num_canaries"):
        load_recipe(recipe)
    recipe["audits"][0]["params"] = {"kind": "secret"}
    with pytest.raises(RecipeError, match="does not fit"):
        run_recipe(recipe)


def test_default_canary_count_is_1000_capped_so_canaries_stay_a_minority(tiny_bert_dir, sentiment_csv, tmp_path):
    from fmaudit.audits.privacy.canary import DEFAULT_CANARIES, default_canaries
    from fmaudit.runner import run_recipe

    assert DEFAULT_CANARIES == 1000
    assert default_canaries(2000, 2000) == 1000  # privacy_deep's size: the full default
    assert default_canaries(350, 1050) == 350  # at most the members: about m / 2 join them
    assert default_canaries(5000, 300) == 300  # flipped-label canaries come from the non-members
    assert default_canaries(4, 4) == 10  # never below what the params allow
    audits = [{"use": "privacy.canary_audit", "target": "bert", "params": {"kind": "random_tokens"}}]
    (canary,) = run_recipe(_recipe(tiny_bert_dir, sentiment_csv, tmp_path, audits)).audits
    assert canary.status == "ok", canary.error
    assert canary.metrics["num_canaries"].value == 50  # 50 members in the canary run
    assert "default" in canary.metrics["num_canaries"].description
