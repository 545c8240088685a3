"""explain.attribution: Captum attributions and explanation-quality metrics on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import NEG_WORDS, POS_WORDS, make_sentences, tiny_text_recipe

from fmaudit.audits.base import AuditContext
from fmaudit.audits.explain import attribution as attr_mod
from fmaudit.audits.explain.attribution import AttributionAudit, explain_texts, keep_masks, spearman
from fmaudit.data import Dataset, load_digits

FAST = dict(n_steps=20, perturbations=4, sensitivity_examples=1, random_orderings=2, bootstrap=100,
            internal_batch_size=32)


def _ctx(tmp_path, data, *, store=False, seed=0) -> AuditContext:
    return AuditContext(unit_id="0:explain.attribution@t", seed=seed, device="cpu", run_dir=tmp_path,
                        cache_dir=tmp_path, store_examples=store, data=data)


def _hooks(model) -> int:
    return attr_mod._hook_count(model)


@pytest.fixture(scope="module")
def sentences() -> Dataset:
    texts, labels = make_sentences(160, seed=1)
    return Dataset("sents", "test", "text", [f"s{i}" for i in range(len(texts))], np.array(labels), texts=texts,
                   label_names=["neg", "pos"])


@pytest.fixture(scope="module")
def trained_bert(tiny_bert_dir, sentences):
    from fmaudit.targets import load_target
    from fmaudit.training import TrainConfig, train

    target = load_target(model=str(tiny_bert_dir), task="text-classification", name="bert", max_length=32)
    train(target, sentences, TrainConfig(epochs=3, batch_size=16, lr=3e-3, seed=0))
    return target


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits().subset(np.arange(600))


@pytest.fixture(scope="module")
def trained_cnn(digits):
    from fmaudit.targets import load_target
    from fmaudit.training import TrainConfig, train

    target = load_target(model="bundled:digits-cnn", name="cnn")
    train(target, digits, TrainConfig(epochs=4, batch_size=32, lr=3e-3, seed=0))
    return target


# ---------------------------------------------------------------------------------------------------
# helpers


def test_spearman_and_keep_masks():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=20), rng.normal(size=20)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)
    assert spearman(np.ones(5), np.ones(5)) == 1.0  # identical (constant) attributions do not "pass"
    assert spearman(np.ones(5), np.arange(5.0)) == 0.0
    order = np.array([2, 0, 1, 3])
    d = keep_masks(order, 4, 4, insertion=False)
    i = keep_masks(order, 4, 4, insertion=True)
    assert d.shape == (5, 4) and d[0].all() and not d[-1].any() and not d[1, 2] and d[1, [0, 1, 3]].all()
    assert (i == ~d).all()


# ---------------------------------------------------------------------------------------------------
# integrated gradients: completeness, and the same numbers as Captum called directly


def test_text_ig_completeness_and_matches_captum(trained_bert):
    import torch
    from captum.attr import LayerIntegratedGradients

    texts = ["the movie was great today", "so bad and boring this weekend", "my food"]
    model = trained_bert.model
    pairs = explain_texts(trained_bert, texts, n_steps=50)
    rel = []
    for ex, a in pairs:
        with torch.no_grad():
            fx = trained_bert.forward_logits(model, {"input_ids": ex.x, **ex.extra})[0, ex.explained].item()
            fb = trained_bert.forward_logits(model, {"input_ids": ex.baseline, **ex.extra})[0, ex.explained].item()
        gap = abs(a.full.sum() - (fx - fb))
        assert gap == pytest.approx(abs(a.delta), abs=1e-5)  # the delta Captum reports is the gap we measure
        assert gap <= 0.1 * abs(fx - fb) + 1e-6  # and it is small
        rel.append(gap / abs(fx - fb))
        assert ex.x[0, 0].item() == trained_bert.tokenizer.cls_token_id == ex.baseline[0, 0].item()
        assert (ex.baseline[0, 1:-1] == trained_bert.tokenizer.pad_token_id).all()

        def fwd(ids, *extra):
            return trained_bert.forward_logits(model, {"input_ids": ids, **dict(zip(ex.extra, extra))})

        direct = LayerIntegratedGradients(fwd, model.get_input_embeddings()).attribute(
            ex.x, baselines=ex.baseline, target=ex.explained, additional_forward_args=tuple(ex.extra.values()),
            n_steps=50).sum(-1)[0].numpy()
        np.testing.assert_allclose(a.full, direct, rtol=1e-4, atol=1e-7)
    # more steps: the gap shrinks (the Riemann sum converges to the integral)
    worst = int(np.argmax(rel))
    (ex, a), = explain_texts(trained_bert, [texts[worst]], n_steps=200)
    assert abs(a.delta) <= 0.25 * abs(pairs[worst][1].delta) + 1e-6
    assert _hooks(model) == 0


# ---------------------------------------------------------------------------------------------------
# the audit on a trained text classifier


def test_text_audit_trained_bert(trained_bert, sentences, tmp_path):
    sha = trained_bert.weights_sha256()
    module = AttributionAudit({"num_examples": 6, "methods": ["integrated_gradients", "gradient_x_input",
                                                              "feature_ablation", "occlusion"], **FAST})
    assert module.check(trained_bert, sentences) == []
    out = module.run(trained_bert, _ctx(tmp_path, sentences))
    m = {k: v.value for k, v in out.metrics.items()}
    # the trained model relies on the sentiment word: removing IG's top tokens first hurts more than random
    assert m["integrated_gradients.deletion_aopc"] > m["random.deletion_aopc"]
    # perturbation methods: on some 6-example samples single-token ablation of a saturated classifier is
    # nearly flat (one sample of the seed streams gives 0.046 vs random 0.065), so at least one of the two
    assert max(m["feature_ablation.deletion_aopc"], m["occlusion.deletion_aopc"]) > m["random.deletion_aopc"]
    # real integrated gradients on a trained model pass the randomization check
    assert m["integrated_gradients.randomization_spearman"] < 0.5
    assert "integrated_gradients" not in out.tables["randomization"]["failing_methods"]
    assert m["integrated_gradients.completeness_relative_error"] < 0.05
    assert out.tables["completeness"]["gap_matches_delta"] is True
    for k in ("integrated_gradients.infidelity", "feature_ablation.sensitivity_max", "occlusion.insertion_auc"):
        assert m[k] is not None and np.isfinite(m[k])
    assert out.metrics["integrated_gradients.deletion_aopc"].ci_low is not None
    # the most influential tokens are sentiment words
    vocab = trained_bert.tokenizer.convert_tokens_to_ids(POS_WORDS + NEG_WORDS)
    top = [r["token_id"] for r in out.tables["top_tokens"]["towards_explained"][:5]]
    assert set(top) & set(vocab)
    # no raw text without opt-in: ids, positions and scores only
    ev = out.evidence[0]
    assert "text" not in ev and all("token" not in r for r in ev["attributions"]["integrated_gradients"])
    assert {"position", "token_id", "score"} <= set(ev["attributions"]["integrated_gradients"][0])
    assert "token" not in out.tables["top_tokens"]["towards_explained"][0]
    # the target is untouched: no hook left, same weights, still in eval mode
    assert _hooks(trained_bert.model) == 0
    trained_bert.weights_changed()
    assert trained_bert.weights_sha256() == sha and not trained_bert.model.training


def test_text_store_examples_opt_in(trained_bert, sentences, tmp_path):
    module = AttributionAudit({"num_examples": 2, "methods": ["gradient_x_input"], "quality": ["deletion"],
                               "bootstrap": 0})
    out = module.run(trained_bert, _ctx(tmp_path, sentences, store=True))
    ev = out.evidence[0]
    assert ev["text"] in sentences.texts
    assert all(r["token"] for r in ev["attributions"]["gradient_x_input"])
    assert "token" in out.tables["top_tokens"]["towards_explained"][0]


def test_sensitivity_embedding_twin_matches_layer_method(trained_bert):
    """The embedding-space IG used for sensitivity gives the same attributions as LayerIntegratedGradients."""
    import torch
    from captum.attr import IntegratedGradients

    (ex, a), = explain_texts(trained_bert, ["the show was awful today"], n_steps=30)
    task = attr_mod._TextTask(trained_bert, AttributionAudit.Params(n_steps=30), "cpu")
    emb = trained_bert.model.get_input_embeddings()
    with torch.no_grad():
        e, eb = emb(ex.x), emb(ex.baseline)
    twin = IntegratedGradients(task._fwd(trained_bert.model, ex, embeds=True)).attribute(
        e, baselines=eb, target=ex.explained, additional_forward_args=tuple(ex.extra.values()), n_steps=30)
    np.testing.assert_allclose(twin.sum(-1)[0].numpy(), a.full, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# images: randomization sanity check, completeness, heatmaps


def test_image_randomization_flags_weight_independent_method(trained_cnn, digits, tmp_path, monkeypatch):
    """A method whose maps do not depend on the weights (an edge detector on the input, as in Adebayo et al.)
    is flagged; real integrated gradients on the same trained model pass."""
    import torch

    real = attr_mod._ImageTask._raw

    def fake_raw(self, method, model, x, baseline, target, seed=0):
        if method != "saliency":
            return real(self, method, model, x, baseline, target, seed)
        gx = torch.zeros_like(x)
        gx[..., 1:, :] = x[..., 1:, :] - x[..., :-1, :]
        return gx.abs() + 0.1 * x, None  # input-only "explanation"

    monkeypatch.setattr(attr_mod._ImageTask, "_raw", fake_raw)
    sha = trained_cnn.weights_sha256()
    module = AttributionAudit({"num_examples": 6, "methods": ["integrated_gradients", "saliency"],
                               "quality": ["randomization", "completeness", "deletion"], "n_steps": 64,
                               "bootstrap": 100})
    out = module.run(trained_cnn, _ctx(tmp_path, digits))
    rnd = out.tables["randomization"]
    assert rnd["failing_methods"] == ["saliency"]
    assert out.metrics["methods_failing_randomization"].value == 1
    assert out.metrics["saliency.randomization_spearman"].value == pytest.approx(1.0)
    assert out.metrics["integrated_gradients.randomization_spearman"].value < 0.5
    assert any("saliency fails" in f.title and f.severity == "high" for f in out.findings)
    assert not any(f.title.startswith("integrated_gradients fails") for f in out.findings)
    # IG completeness on images
    assert out.tables["completeness"]["gap_matches_delta"] is True
    assert out.metrics["integrated_gradients.completeness_relative_error"].value < 0.05
    assert out.metrics["integrated_gradients.deletion_aopc"].value > out.metrics["random.deletion_aopc"].value
    # the randomized model was a copy
    trained_cnn.weights_changed()
    assert trained_cnn.weights_sha256() == sha
    assert _hooks(trained_cnn.model) == 0


def test_image_audit_all_methods_vit(tiny_vit_dir, digits, tmp_path):
    from fmaudit.targets import load_target

    target = load_target(model=str(tiny_vit_dir), task="image-classification", name="vit")
    sha = target.weights_sha256()
    grads = {n: p.requires_grad for n, p in target.model.named_parameters()}
    module = AttributionAudit({"num_examples": 3, "image_baseline": "blur", "blur_sigma": 1.5, **FAST})
    out = module.run(target, _ctx(tmp_path, digits))
    assert list(out.tables["methods"]) == ["integrated_gradients", "saliency", "gradient_shap", "occlusion"]
    for m in out.tables["methods"]:
        assert out.metrics[f"{m}.deletion_aopc"].value is not None
        assert out.metrics[f"{m}.infidelity"].value is not None
    assert len(out.artifacts) == 3
    for rel in out.artifacts:
        assert (tmp_path / rel).read_bytes()[:4] == b"\x89PNG"
    ev = out.evidence[0]
    assert ev["heatmap"] == out.artifacts[0] and {"true_label", "predicted_label"} <= set(ev)
    assert _hooks(target.model) == 0
    target.weights_changed()
    assert target.weights_sha256() == sha
    assert grads == {n: p.requires_grad for n, p in target.model.named_parameters()}


# ---------------------------------------------------------------------------------------------------
# causal LMs


def test_llm_attribution_tiny_llama(tiny_llama_dir, tmp_path):
    import torch

    from fmaudit.targets import load_target

    target = load_target(model=str(tiny_llama_dir), task="causal-lm", name="llama", max_length=32)
    texts, _ = make_sentences(6, seed=3)
    data = Dataset("lm", "test", "text", [f"t{i}" for i in range(6)], texts=texts)
    sha = target.weights_sha256()
    module = AttributionAudit({"num_examples": 2, "continuation_tokens": 2, **FAST,
                               "quality": ["deletion", "infidelity", "randomization", "completeness"]})
    assert module.check(target, data) == []
    out = module.run(target, _ctx(tmp_path, data))
    assert set(out.tables["methods"]) == {"feature_ablation", "integrated_gradients"}
    ev = out.evidence[0]
    assert len(ev["continuation_token_ids"]) == 2 and "prompt" not in ev
    # LLMGradientAttribution(LayerIntegratedGradients): attributions add up to the change in continuation log-prob
    comp = out.tables["completeness"]
    assert comp["gap_matches_delta"] is None  # no delta from Captum's LLM wrapper
    for row in comp["examples"]:
        assert row["gap"] <= 0.05 * abs(row["f_x"] - row["f_baseline"]) + 1e-4, row
    # Captum's LLMAttribution(FeatureAblation) equals the drop in our own continuation log-prob per token
    task = attr_mod._LMTask(target, module.params, "cpu")
    ex = task.example(0, "x", data.texts[int(np.random.default_rng(0).permutation(6)[0])])
    fa = task.attribute("feature_ablation", target.model, ex)
    n = ex.n_features
    keep = ~np.eye(n, dtype=bool)
    full = task.explained_output(target.model, ex, np.ones((1, n), dtype=bool))
    drops = (full - task.explained_output(target.model, ex, keep)).numpy()
    np.testing.assert_allclose(fa.features, drops, rtol=1e-3, atol=1e-5)
    assert isinstance(ex.extra["continuation"], torch.Tensor)
    assert _hooks(target.model) == 0
    target.weights_changed()
    assert target.weights_sha256() == sha


# ---------------------------------------------------------------------------------------------------
# checks and the recipe path


def test_check_reports_unusable_methods(trained_bert, sentences):
    problems = AttributionAudit({"methods": ["saliency"]}).check(trained_bert, sentences)
    assert problems and "saliency" in problems[0]
    with pytest.raises(Exception):
        AttributionAudit({"methods": ["integrated_gradients", "integrated_gradients"]})
    with pytest.raises(Exception):
        AttributionAudit({"n_step": 3})


def test_recipe_end_to_end(tiny_bert_dir, sentiment_csv, tmp_path):
    from fmaudit.report import load_report
    from fmaudit.runner import run_recipe

    recipe = tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path, audits=[{
        "use": "explain.attribution", "target": "bert",
        "params": {"num_examples": 3, "methods": ["integrated_gradients", "feature_ablation"], **FAST},
        "fail_if": {"methods_failing_randomization": {"gt": 5}}}])
    report = run_recipe(recipe)
    res = report.result("explain.attribution", "bert")
    assert res.status == "ok", res.error
    assert res.metrics["num_examples"].value == 3
    assert res.gates and all(g.passed for g in res.gates)
    assert "integrated_gradients.deletion" in res.curves
    again = load_report(tmp_path / "reports" / report.run_id)
    assert again.result("explain.attribution").metrics.keys() == res.metrics.keys()
