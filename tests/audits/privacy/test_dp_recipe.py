"""privacy.dp_finetune as a recipe step: produces a target that later audits use; cached like fine-tunes."""

import pytest

from fmaudit.registry import registry
from fmaudit.runner import run_recipe
from fmaudit.testing import tiny_text_recipe


def _recipe(tiny_bert_dir, sentiment_csv, tmp_path, **params):
    audits = [
        {
            "use": "privacy.dp_finetune",
            "target": "bert",
            "produces": "bert-dp",
            "params": {"accountant": "rdp", "trainable": "head", "lr": 1e-2, **params},
        },
        {"use": "utility", "target": ["bert", "bert-dp"]},
    ]
    return tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path, audits=audits)


def test_recipe_produces_private_target_used_by_utility(tiny_bert_dir, sentiment_csv, tmp_path):
    recipe = _recipe(
        tiny_bert_dir,
        sentiment_csv,
        tmp_path,
        target_epsilon=None,
        noise_multiplier=0.8,
        epsilon_budget=1.0,
        min_accuracy=0.99,
    )
    report = run_recipe(recipe)
    dp = report.result("privacy.dp_finetune", "bert")
    assert dp.status == "ok", dp.error
    assert dp.produces == "bert-dp"
    eps = dp.metrics["epsilon"].value
    assert eps > 1.0  # noise 0.8 over these steps spends more than the budget ...
    titles = [f.title for f in dp.findings]
    assert "Epsilon exceeds the recipe's privacy budget" in titles  # ... which is a finding
    assert "DP model accuracy is below the threshold" in titles
    ledger = dp.curves["epsilon_ledger"]
    assert ledger.x[-1] == dp.metrics["steps"].value and ledger.y[-1] == pytest.approx(eps)
    params = dp.tables["dp_parameters"]
    for key in ("noise_multiplier", "max_grad_norm", "sample_rate", "delta", "accountant", "clipping", "steps"):
        assert key in params
    assert params["start"].startswith("the pre-trained weights")  # not the non-private fine-tune
    assert {"dp", "non_private"} <= set(dp.tables["utility"])
    assert "baseline_accuracy" in dp.metrics
    # the produced target keeps the source's member / non-member split and is audited later
    src, prod = report.targets["bert"], report.targets["bert-dp"]
    assert prod.split.member_ids == src.split.member_ids and prod.split.nonmember_ids == src.split.nonmember_ids
    assert prod.produced_by == dp.unit_id and prod.cache_hit is False
    assert prod.weights_sha256 != src.weights_sha256
    util = report.result("utility", "bert-dp")
    assert util.status == "ok", util.error
    assert util.tables["evaluated_on"]["subset"] == "nonmembers"

    # Warm run: the DP fine-tune comes from the cache, bit-identical.
    again = run_recipe(recipe)
    assert again.targets["bert-dp"].cache_hit is True
    assert again.targets["bert-dp"].weights_sha256 == prod.weights_sha256
    dp2 = again.result("privacy.dp_finetune", "bert")
    assert dp2.metrics["epsilon"].value == eps and dp2.curves["epsilon_ledger"] == ledger


def test_recipe_preflight_rejects_bad_settings(tiny_bert_dir, sentiment_csv, tmp_path):
    from fmaudit.recipe import RecipeError

    with pytest.raises(RecipeError) as err:  # batch larger than the 100 members: caught before anything runs
        run_recipe(_recipe(tiny_bert_dir, sentiment_csv, tmp_path, batch_size=150))
    assert "fewer than batch_size 150" in str(err.value)
    cls = registry.get("privacy.dp_finetune")
    with pytest.raises(ValueError):
        cls.Params(target_epsilon=0)
    with pytest.raises(ValueError):
        cls.Params(delta=1.0)
    with pytest.raises(ValueError):
        cls.Params(target_epsilon=None)  # neither budget nor noise


DP_RERUN_KEYS = (
    "lr",
    "weight_decay",
    "n_layers",
    "lora",
    "clipping",
    "max_physical_batch_size",
    "trainable",
    "accountant",
    "delta",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "epochs",
    "batch_size",
    "max_grad_norm",
)


def test_recipe_gdp_fallback_seed_statement_and_recorded_settings(tiny_bert_dir, sentiment_csv, tmp_path, monkeypatch):
    """The module reports what dp_finetune found: GDP paired with another accountant (the larger epsilon
    claimed, GDP's beside it), a failed PRV accountant (simulated: NaN, as in Opacus issues) as a medium finding
    with RDP used, the run seed's secrecy beside epsilon, and every setting the canary re-run needs."""
    import math

    from opacus.accountants import PRVAccountant

    from fmaudit.privacy.dp import epsilon_for

    monkeypatch.setattr(PRVAccountant, "get_epsilon", lambda self, **kw: float("nan"))
    recipe = _recipe(
        tiny_bert_dir,
        sentiment_csv,
        tmp_path,
        accountant="gdp",
        target_epsilon=None,
        noise_multiplier=0.9,
        weight_decay=0.01,
    )
    report = run_recipe(recipe)
    dp = report.result("privacy.dp_finetune", "bert")
    assert dp.status == "ok", dp.error
    eps, gdp = dp.metrics["epsilon"].value, dp.metrics["epsilon_gdp"].value
    params = dp.tables["dp_parameters"]
    rdp = epsilon_for(
        noise_multiplier=0.9,
        sample_rate=params["sample_rate"],
        steps=params["steps"],
        delta=params["delta"],
        accountant="rdp",
    )
    assert eps == max(gdp, rdp) == rdp and gdp < eps and math.isfinite(eps)
    assert params["epsilon_accountant"] == "rdp" and params["epsilon_by_accountant"] == {"gdp": gdp, "rdp": rdp}
    assert dp.curves["epsilon_ledger"].y[-1] == pytest.approx(eps)
    by_title = {f.title: f for f in dp.findings}
    assert by_title["The PRV accountant failed; RDP was used"].severity == "medium"
    assert by_title["GDP is an approximation; the larger epsilon is reported"].severity == "low"
    seed = by_title["The DP guarantee needs the run seed to stay secret"]
    assert seed.severity == "info" and "reproduce the noise" in seed.detail
    assert "secret" in params["guarantee_requires_secret_seed"] and params["run_seed"] == dp.seed  # the unit's seed
    assert "not stored" in params["noise_seed"]
    # the produced target records every setting needed to re-run exactly this procedure
    recorded = report.targets["bert-dp"].finetune["dp"]  # the produced target's provenance.dp
    for key in DP_RERUN_KEYS:
        assert key in recorded, key
    assert recorded["lr"] == 1e-2 and recorded["weight_decay"] == 0.01 and recorded["trainable"] == "head"
    assert (
        recorded["lora"] is None
        and recorded["accountant"] == "gdp"
        and recorded["clipping"] in ("bookkeeping", "ghost", "hooks")
    )
    assert recorded["epsilon"] == eps and recorded["epsilon_gdp"] == gdp  # what the canary audit compares against
    assert not any("seed" in k for k in recorded)  # the noise seed is not published
