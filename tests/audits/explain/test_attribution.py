"""explain.attribution end to end: the audit on trained tiny text, image and causal-LM targets, its pre-flight
checks, the recipe path, and completeness where F(x) = F(baseline)."""

from __future__ import annotations

import numpy as np
import pytest
from explain_fixtures import FAST, ctx, digit_data, hooks, sentence_data, trained_bert_target, trained_cnn_target
from pydantic import ValidationError

from fmaudit.audits.explain.attribution import AttributionAudit
from fmaudit.data import Dataset
from fmaudit.explain.image import ImageSpace
from fmaudit.explain.lm import LMSpace
from fmaudit.explain.space import SpaceOptions
from fmaudit.tasks import CAUSAL_LM, IMAGE_CLASSIFICATION
from fmaudit.testing import NEG_WORDS, POS_WORDS, make_sentences, tiny_text_recipe

# ---------------------------------------------------------------------------------------------------
# the audit on a trained text classifier


def test_text_audit_trained_bert(tiny_bert_dir, tmp_path):
    trained_bert = trained_bert_target(str(tiny_bert_dir))
    sentences = sentence_data()
    sha = trained_bert.weights_sha256()
    module = AttributionAudit(
        {
            "num_examples": 6,
            "methods": ["integrated_gradients", "gradient_x_input", "feature_ablation", "occlusion"],
            **FAST,
        }
    )
    assert module.check(trained_bert, sentences) == []
    out = module.run(trained_bert, ctx(tmp_path, sentences))
    m = {k: v.value for k, v in out.metrics.items()}
    # the trained model relies on the sentiment word: removing IG's top tokens first hurts more than random
    assert m["integrated_gradients.deletion_aopc"] > m["random.deletion_aopc"]
    # perturbation methods: on some 6-example samples single-token ablation of a saturated classifier is
    # nearly flat (one sample of the seed streams gives 0.046 vs random 0.065), so at least one of the two
    assert max(m["feature_ablation.deletion_aopc"], m["occlusion.deletion_aopc"]) > m["random.deletion_aopc"]
    # real integrated gradients on a trained model pass the randomization check
    assert m["integrated_gradients.randomization_spearman"] < 0.5
    assert "integrated_gradients" not in out.tables["randomization"]["failing_methods"]
    # completeness: the measured gap is Captum's delta on every example, and the finding fires exactly when the
    # relative error passes the tolerance (with FAST's n_steps=20 this fixture's model needs ~100 steps on 2 of
    # 6 examples since training draws from seed streams: the finding is then right, so no fixed "< 5%" here;
    # convergence with more steps is tested in test_text_ig_completeness_and_matches_captum)
    assert out.tables["completeness"]["gap_matches_delta"] is True
    flagged = any(f.title == "Integrated gradients are not complete on some examples" for f in out.findings)
    assert flagged == (m["integrated_gradients.completeness_relative_error"] > 0.05)
    assert m["integrated_gradients.completeness_abs_gap"] == pytest.approx(
        max(r["gap"] for r in out.tables["completeness"]["examples"])
    )
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
    assert hooks(trained_bert.model) == 0
    trained_bert.weights_changed()
    assert trained_bert.weights_sha256() == sha and not trained_bert.model.training


def test_text_store_examples_opt_in(tiny_bert_dir, tmp_path):
    trained_bert = trained_bert_target(str(tiny_bert_dir))
    sentences = sentence_data()
    module = AttributionAudit(
        {"num_examples": 2, "methods": ["gradient_x_input"], "quality": ["deletion"], "bootstrap": 0}
    )
    out = module.run(trained_bert, ctx(tmp_path, sentences, store=True))
    ev = out.evidence[0]
    assert ev["text"] in sentences.texts
    assert all(r["token"] for r in ev["attributions"]["gradient_x_input"])
    assert "token" in out.tables["top_tokens"]["towards_explained"][0]


# ---------------------------------------------------------------------------------------------------
# images


def test_image_audit_all_methods_vit(tiny_vit_dir, tmp_path):
    from fmaudit.targets import load_target

    digits = digit_data()
    target = load_target(model=str(tiny_vit_dir), task=IMAGE_CLASSIFICATION, name="vit")
    sha = target.weights_sha256()
    grads = {n: p.requires_grad for n, p in target.model.named_parameters()}
    module = AttributionAudit({"num_examples": 3, "image_baseline": "blur", "blur_sigma": 1.5, **FAST})
    out = module.run(target, ctx(tmp_path, digits))
    assert list(out.tables["methods"]) == ["integrated_gradients", "saliency", "gradient_shap", "occlusion"]
    for m in out.tables["methods"]:
        assert out.metrics[f"{m}.deletion_aopc"].value is not None
        assert out.metrics[f"{m}.infidelity"].value is not None
    assert len(out.artifacts) == 3
    for rel in out.artifacts:
        assert (tmp_path / rel).read_bytes()[:4] == b"\x89PNG"
    ev = out.evidence[0]
    assert ev["heatmap"] == out.artifacts[0] and {"true_label", "predicted_label"} <= set(ev)
    assert hooks(target.model) == 0
    target.weights_changed()
    assert target.weights_sha256() == sha
    assert grads == {n: p.requires_grad for n, p in target.model.named_parameters()}


def test_vit_patch_features(tiny_vit_dir, tmp_path):
    import torch
    from captum.attr import Occlusion

    from fmaudit.targets import load_target

    digits = digit_data()
    target = load_target(model=str(tiny_vit_dir), task=IMAGE_CLASSIFICATION, name="vit")
    module = AttributionAudit(
        {
            "num_examples": 2,
            "methods": ["integrated_gradients", "occlusion"],
            "n_steps": 16,
            "quality": ["deletion", "insertion", "infidelity"],
            "bootstrap": 0,
            "random_orderings": 1,
            "curve_steps": 4,
            "heatmaps": False,
        }
    )
    out = module.run(target, ctx(tmp_path, digits))
    assert out.tables["features"] == {
        "unit": "patch",
        "patch_size": [4, 4],
        "grid": [2, 2],
        "num_features": 4,
        "source": "the model config's patch_size",
    }
    assert "patch" in out.tables["methods"]["occlusion"]
    ev = out.evidence[0]
    assert "top_pixels" not in ev and len(ev["top_patches"]["occlusion"]) == 4
    assert all(0 <= r["row"] < 2 and 0 <= r["col"] < 2 for r in ev["top_patches"]["integrated_gradients"])

    space = ImageSpace(target, SpaceOptions.from_params(module.params), "cpu")
    ex = space.example(0, "x", digits.images[0])
    assert ex.n_features == 4
    with torch.no_grad():
        ex.explained = int(target.model(ex.x).argmax())
    # occlusion: one patch at a time, the same numbers as Captum's Occlusion with window = stride = patch
    occ = space.attribute("occlusion", target.model, ex)
    direct = (
        Occlusion(target.model)
        .attribute(
            ex.x, sliding_window_shapes=(1, 4, 4), strides=(1, 4, 4), baselines=ex.baseline, target=ex.explained
        )[0]
        .numpy()
    )
    np.testing.assert_allclose(occ.full, direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(occ.features, direct[0, ::4, ::4].ravel() * 16, rtol=1e-5, atol=1e-6)
    # IG: a patch's score is the sum of its pixels' attributions
    ig = space.attribute("integrated_gradients", target.model, ex)
    np.testing.assert_allclose(ig.features, ig.full[0].reshape(2, 4, 2, 4).sum((1, 3)).ravel(), rtol=1e-9)
    # deletion / insertion remove whole patches
    composed = space.compose(ex, np.array([[False, True, True, True]]))
    assert torch.equal(composed[0, :, :4, :4], ex.baseline[0, :, :4, :4])
    assert torch.equal(composed[0, :, 4:, :], ex.x[0, :, 4:, :])
    assert torch.equal(composed[0, :, :4, 4:], ex.x[0, :, :4, 4:])
    # pixels on request; patches refused for a model without them
    assert AttributionAudit({"image_features": "pixels"}).check(target, digits) == []
    assert (
        ImageSpace(target, SpaceOptions(image_features="pixels"), "cpu").example(0, "x", digits.images[0]).n_features
        == 64
    )
    cnn = load_target(model="bundled:digits-cnn", name="cnn")
    problems = AttributionAudit({"image_features": "patches"}).check(cnn, digits)
    assert problems and "patch_size" in problems[0]


def test_road_on_digits_cnn(tmp_path):
    trained_cnn = trained_cnn_target()
    digits = digit_data()
    module = AttributionAudit(
        {
            "num_examples": 4,
            "methods": ["integrated_gradients", "saliency"],
            "quality": ["road"],
            "n_steps": 16,
            "bootstrap": 50,
            "curve_steps": 5,
            "random_orderings": 2,
            "heatmaps": False,
        }
    )
    out = module.run(trained_cnn, ctx(tmp_path, digits))
    m = {k: v.value for k, v in out.metrics.items()}
    for meth in ("integrated_gradients", "saliency"):
        assert len(out.curves[f"{meth}.road_morf"].y) == 5 and out.curves[f"{meth}.road_morf"].x[-1] == 0.8
        # nothing removed at the first point: the model's own probability, the same for both orders
        assert out.curves[f"{meth}.road_morf"].y[0] == pytest.approx(out.curves[f"{meth}.road_lerf"].y[0])
    # integrated gradients rank the pixels the model uses: removing them first (and imputing them from their
    # neighbours) hurts more than a random order and than removing the least-attributed first. (LeRF is not
    # above random here: IG with a black baseline gives the background exactly 0, so "least attributed" runs
    # through the negative pixels and then the zero background in arbitrary order.)
    assert m["integrated_gradients.road_morf"] < m["random.road"]
    assert m["integrated_gradients.road_morf"] < m["integrated_gradients.road_lerf"]
    assert out.metrics["integrated_gradients.road_morf"].ci_low is not None
    assert not any("ROAD imputation" in f.title and f.title.startswith("integrated_gradients") for f in out.findings)


# ---------------------------------------------------------------------------------------------------
# causal LMs


def test_llm_attribution_tiny_llama(tiny_llama_dir, tmp_path):
    import torch

    from fmaudit.targets import load_target

    target = load_target(model=str(tiny_llama_dir), task=CAUSAL_LM, name="llama", max_length=32)
    texts, _ = make_sentences(6, seed=3)
    data = Dataset("lm", "test", "text", [f"t{i}" for i in range(6)], texts=texts)
    sha = target.weights_sha256()
    module = AttributionAudit(
        {
            "num_examples": 2,
            "continuation_tokens": 2,
            **FAST,
            "quality": ["deletion", "infidelity", "randomization", "completeness"],
        }
    )
    assert module.check(target, data) == []
    out = module.run(target, ctx(tmp_path, data))
    assert set(out.tables["methods"]) == {"feature_ablation", "integrated_gradients"}
    ev = out.evidence[0]
    assert len(ev["continuation_token_ids"]) == 2 and "prompt" not in ev
    # LLMGradientAttribution(LayerIntegratedGradients): attributions add up to the change in continuation log-prob
    comp = out.tables["completeness"]
    assert comp["gap_matches_delta"] is None  # no delta from Captum's LLM wrapper
    for row in comp["examples"]:
        assert row["gap"] <= 0.05 * abs(row["f_x"] - row["f_baseline"]) + 1e-4, row
    # Captum's LLMAttribution(FeatureAblation) equals the drop in our own continuation log-prob per token
    space = LMSpace(target, SpaceOptions.from_params(module.params), "cpu")
    ex = space.example(0, "x", data.texts[int(np.random.default_rng(0).permutation(6)[0])])
    fa = space.attribute("feature_ablation", target.model, ex)
    n = ex.n_features
    keep = ~np.eye(n, dtype=bool)
    full = space.explained_output(target.model, ex, np.ones((1, n), dtype=bool))
    drops = (full - space.explained_output(target.model, ex, keep)).numpy()
    np.testing.assert_allclose(fa.features, drops, rtol=1e-3, atol=1e-5)
    assert isinstance(ex.extra["continuation"], torch.Tensor)
    assert hooks(target.model) == 0
    target.weights_changed()
    assert target.weights_sha256() == sha


# ---------------------------------------------------------------------------------------------------
# checks and the recipe path


def test_check_reports_unusable_methods(tiny_bert_dir):
    trained_bert = trained_bert_target(str(tiny_bert_dir))
    sentences = sentence_data()
    problems = AttributionAudit({"methods": ["saliency"]}).check(trained_bert, sentences)
    assert problems and "saliency" in problems[0]
    assert any("road" in p for p in AttributionAudit({"quality": ["road"]}).check(trained_bert, sentences))
    with pytest.raises(ValidationError, match="each method at most once"):
        AttributionAudit({"methods": ["integrated_gradients", "integrated_gradients"]})
    with pytest.raises(ValidationError, match="n_step"):
        AttributionAudit({"n_step": 3})


def test_recipe_end_to_end(tiny_bert_dir, sentiment_csv, tmp_path):
    from fmaudit.report import load_report
    from fmaudit.runner import run_recipe

    recipe = tiny_text_recipe(
        tiny_bert_dir,
        sentiment_csv,
        tmp_path,
        audits=[
            {
                "use": "explain.attribution",
                "target": "bert",
                "params": {"num_examples": 3, "methods": ["integrated_gradients", "feature_ablation"], **FAST},
                "fail_if": {"methods_failing_randomization": {"gt": 5}},
            }
        ],
    )
    report = run_recipe(recipe)
    res = report.result("explain.attribution", "bert")
    assert res.status == "ok", res.error
    assert res.metrics["num_examples"].value == 3
    assert res.gates and all(g.passed for g in res.gates)
    assert "integrated_gradients.deletion" in res.curves
    again = load_report(tmp_path / "reports" / report.run_id)
    assert again.result("explain.attribution").metrics.keys() == res.metrics.keys()


# ---------------------------------------------------------------------------------------------------
# completeness where F(x) = F(baseline)


def _symmetric_target(power: int = 2):
    """logit 0 = sum((x - 0.5)^2): every binary image scores exactly like the black baseline."""
    import torch
    from torch import nn

    from fmaudit.targets.vision import ImageClassifier, PixelClassifier

    class Sym(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))  # (a 0-dim parameter trips state_dict_sha256)

        def forward(self, x):
            s = ((x - 0.5) ** 2).flatten(1).sum(1) * self.scale
            return torch.stack([s, torch.zeros_like(s) - 100.0, 0.1 * x.flatten(1).pow(power).sum(1) - 100.0], 1)

    return ImageClassifier(name="sym", model=PixelClassifier(Sym()), source="test", num_classes=3)


def test_completeness_undefined_where_output_equals_baseline(tmp_path):
    rng = np.random.default_rng(0)
    binary = (rng.random((3, 1, 4, 4)) < 0.5).astype(np.float32)  # F(x) = F(black) exactly
    graded = np.full((2, 1, 4, 4), 0.5, dtype=np.float32)  # F(x) = 0 vs F(black) = 4
    images = np.concatenate([binary, graded])
    data = Dataset("sym", "test", "image", [f"b{i}" for i in range(3)] + ["g0", "g1"], np.zeros(5), images=images)
    target = _symmetric_target()
    module = AttributionAudit(
        {
            "num_examples": 5,
            "methods": ["integrated_gradients"],
            "quality": ["completeness"],
            "n_steps": 20,
            "bootstrap": 0,
            "heatmaps": False,
        }
    )
    out = module.run(target, ctx(tmp_path, data))
    comp = out.tables["completeness"]
    rows = {r["id"]: r for r in comp["examples"]}
    assert sorted(comp["relative_error_undefined"]) == ["b0", "b1", "b2"]
    for i in ("b0", "b1", "b2"):
        assert rows[i]["f_x"] == pytest.approx(rows[i]["f_baseline"], abs=1e-5) and rows[i]["relative_error"] is None
    # relative error only over the examples where it is defined; the absolute gap over all of them
    assert out.metrics["integrated_gradients.completeness_relative_error"].value == pytest.approx(
        max(rows[i]["gap"] / abs(rows[i]["f_x"] - rows[i]["f_baseline"]) for i in ("g0", "g1"))
    )
    assert out.metrics["integrated_gradients.completeness_abs_gap"].value == pytest.approx(
        max(r["gap"] for r in rows.values())
    )
    assert out.metrics["integrated_gradients.completeness_abs_gap"].unit == "logit"
    assert not any("raise n_steps" in f.detail for f in out.findings)
    flat = [f for f in out.findings if "F(x) = F(baseline)" in f.title]
    assert len(flat) == 1 and flat[0].severity == "low" and "3 of 5" in flat[0].title

    # only flat examples: the relative error is null, still no "raise n_steps"
    only = data.subset(np.arange(3))
    out = module.run(target, ctx(tmp_path, only))
    assert out.metrics["integrated_gradients.completeness_relative_error"].value is None
    assert out.metrics["integrated_gradients.completeness_abs_gap"].value is not None
    assert not any("raise n_steps" in f.detail for f in out.findings)


def test_completeness_still_flags_coarse_ig(tmp_path):
    """The finding that remains: a strongly curved output with 2 IG steps misses F(x) - F(b) by far."""
    images = np.full((2, 1, 4, 4), 0.9, dtype=np.float32)
    data = Dataset("sym", "test", "image", ["a", "b"], np.full(2, 2), images=images)
    target = _symmetric_target(power=8)  # class 2: 0.1 * sum(x^8) - 100, beyond 2-point Gauss-Legendre
    module = AttributionAudit(
        {
            "num_examples": 2,
            "methods": ["integrated_gradients"],
            "quality": ["completeness"],
            "n_steps": 2,
            "bootstrap": 0,
            "heatmaps": False,
            "explain_label": "true",
        }
    )
    out = module.run(target, ctx(tmp_path, data))
    rel = out.metrics["integrated_gradients.completeness_relative_error"].value
    assert rel is not None and rel > 0.05
    assert out.tables["completeness"]["relative_error_undefined"] == []
    assert any("raise n_steps" in f.detail for f in out.findings)
