"""explain.attribution: Captum attributions and explanation-quality metrics on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
from fmaudit.testing import NEG_WORDS, POS_WORDS, make_sentences, tiny_text_recipe

from fmaudit.audits.base import AuditContext
from fmaudit.audits.explain.attribution import AttributionAudit, hook_count
from fmaudit.data import Dataset, load_digits
from fmaudit.explain.curves import keep_masks
from fmaudit.explain.faithfulness import infidelity, sensitivity
from fmaudit.explain.image import IMAGE_METHODS, ImageSpace
from fmaudit.explain.lm import LMSpace
from fmaudit.explain.similarity import spearman
from fmaudit.explain.space import AttributionMethod, SpaceOptions
from fmaudit.explain.text import TextSpace, explain_texts
from fmaudit.tasks import CAUSAL_LM, IMAGE_CLASSIFICATION, TEXT_CLASSIFICATION

FAST = dict(n_steps=20, perturbations=4, sensitivity_examples=1, random_orderings=2, bootstrap=100,
            internal_batch_size=32)


def _ctx(tmp_path, data, *, store=False, seed=0) -> AuditContext:
    return AuditContext(unit_id="0:explain.attribution@t", seed=seed, device="cpu", run_dir=tmp_path,
                        cache_dir=tmp_path, store_examples=store, data=data)


def _hooks(model) -> int:
    return hook_count(model)


@pytest.fixture(scope="module")
def sentences() -> Dataset:
    texts, labels = make_sentences(160, seed=1)
    return Dataset("sents", "test", "text", [f"s{i}" for i in range(len(texts))], np.array(labels), texts=texts,
                   label_names=["neg", "pos"])


@pytest.fixture(scope="module")
def trained_bert(tiny_bert_dir, sentences):
    from fmaudit.targets import load_target
    from fmaudit.training import TrainConfig, train

    target = load_target(model=str(tiny_bert_dir), task=TEXT_CLASSIFICATION, name="bert", max_length=32)
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
    # completeness: the measured gap is Captum's delta on every example, and the finding fires exactly when the
    # relative error passes the tolerance (with FAST's n_steps=20 this fixture's model needs ~100 steps on 2 of
    # 6 examples since training draws from seed streams: the finding is then right, so no fixed "< 5%" here;
    # convergence with more steps is tested in test_text_ig_completeness_and_matches_captum)
    assert out.tables["completeness"]["gap_matches_delta"] is True
    flagged = any(f.title == "Integrated gradients are not complete on some examples" for f in out.findings)
    assert flagged == (m["integrated_gradients.completeness_relative_error"] > 0.05)
    assert m["integrated_gradients.completeness_abs_gap"] == pytest.approx(
        max(r["gap"] for r in out.tables["completeness"]["examples"]))
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
    space = TextSpace(trained_bert, SpaceOptions(n_steps=30), "cpu")
    emb = trained_bert.model.get_input_embeddings()
    with torch.no_grad():
        e, eb = emb(ex.x), emb(ex.baseline)
    twin = IntegratedGradients(space.forward(trained_bert.model, ex, embeds=True)).attribute(
        e, baselines=eb, target=ex.explained, additional_forward_args=tuple(ex.extra.values()), n_steps=30)
    np.testing.assert_allclose(twin.sum(-1)[0].numpy(), a.full, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# images: randomization sanity check, completeness, heatmaps


def test_image_randomization_flags_weight_independent_method(trained_cnn, digits, tmp_path, monkeypatch):
    """A method whose maps do not depend on the weights (an edge detector on the input, as in Adebayo et al.)
    is flagged; real integrated gradients on the same trained model pass."""
    import torch

    def fake_saliency(space, model, x, baseline, target, seed):
        gx = torch.zeros_like(x)
        gx[..., 1:, :] = x[..., 1:, :] - x[..., :-1, :]
        return gx.abs() + 0.1 * x, None  # input-only "explanation"

    monkeypatch.setitem(IMAGE_METHODS, "saliency", AttributionMethod("Saliency", fake_saliency))
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

    target = load_target(model=str(tiny_vit_dir), task=IMAGE_CLASSIFICATION, name="vit")
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

    target = load_target(model=str(tiny_llama_dir), task=CAUSAL_LM, name="llama", max_length=32)
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
    space = LMSpace(target, SpaceOptions.from_params(module.params), "cpu")
    ex = space.example(0, "x", data.texts[int(np.random.default_rng(0).permutation(6)[0])])
    fa = space.attribute("feature_ablation", target.model, ex)
    n = ex.n_features
    keep = ~np.eye(n, dtype=bool)
    full = space.explained_output(target.model, ex, np.ones((1, n), dtype=bool))
    drops = (full - space.explained_output(target.model, ex, keep)).numpy()
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
    assert any("road" in p for p in AttributionAudit({"quality": ["road"]}).check(trained_bert, sentences))
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


# ---------------------------------------------------------------------------------------------------
# cascading randomization (Adebayo et al. 2018)


def test_layer_groups_cascade_is_cumulative_per_named_layer():
    """Without blocks (the digits CNN) every conv / linear layer is one group; the cascade re-initializes them
    from the logits down, one at a time, leaving the layers below untouched (not the whole network at once)."""
    import copy

    import torch

    from fmaudit.explain import cascade
    from fmaudit.targets.vision import PixelClassifier, digits_cnn

    torch.manual_seed(0)
    model = PixelClassifier(digits_cnn())
    orig = copy.deepcopy(model.state_dict())
    groups, unused = cascade.forward_order(model, cascade.layer_groups(model), lambda: model(torch.zeros(1, 1, 8, 8)))
    assert [g.name for g in groups] == ["inner.0", "inner.2", "inner.5", "inner.9", "inner.11"] and unused == []
    assert [g.kind for g in groups] == ["Conv2d"] * 3 + ["Linear"] * 2
    top_down = list(reversed(groups))
    for k, g in enumerate(top_down):
        torch.manual_seed(k)
        cascade.reinitialize(g, None)
        changed = {n.rsplit(".", 1)[0] for n, v in model.state_dict().items() if not torch.equal(v, orig[n])}
        assert changed == {x.name for x in top_down[: k + 1]}, (k, changed)
        assert g.init == [f"{g.kind}: reset_parameters"]


def test_ssim_matches_windowed_definition():
    from fmaudit.explain.similarity import map_ssim, ssim

    rng = np.random.default_rng(0)
    a = rng.random((9, 10))
    b = np.clip(a + 0.3 * rng.normal(size=a.shape), 0, 1)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, b) == pytest.approx(ssim(b, a))
    # direct definition: every 7x7 window fully inside, sample (n - 1) statistics, K1 = .01, K2 = .03
    vals = []
    for i in range(9 - 6):
        for j in range(10 - 6):
            x, y = a[i: i + 7, j: j + 7].ravel(), b[i: i + 7, j: j + 7].ravel()
            mx, my = x.mean(), y.mean()
            vx, vy, cxy = x.var(ddof=1), y.var(ddof=1), np.cov(x, y, ddof=1)[0, 1]
            vals.append((2 * mx * my + 1e-4) * (2 * cxy + 9e-4) / ((mx ** 2 + my ** 2 + 1e-4) * (vx + vy + 9e-4)))
    assert ssim(a, b) == pytest.approx(np.mean(vals), rel=1e-9)
    assert ssim(a, b) < 0.9 and ssim(a, 1 - a) < 0
    try:  # scikit-image's structural_similarity with its defaults, when installed
        from skimage.metrics import structural_similarity
    except ImportError:
        return
    assert ssim(a, b) == pytest.approx(structural_similarity(a, b, data_range=1.0), rel=1e-9)
    small_a, small_b = a[:5, :6], b[:5, :6]  # window shrunk to 5 to fit
    assert ssim(small_a, small_b) == pytest.approx(structural_similarity(small_a, small_b, data_range=1.0,
                                                                         win_size=5), rel=1e-9)
    assert map_ssim(-3 * a, a) == pytest.approx(1.0)  # absolute values, each scaled by its own maximum


def test_cascade_digits_cnn_curve_per_layer(trained_cnn, digits, tmp_path):
    sha = trained_cnn.weights_sha256()
    module = AttributionAudit({"num_examples": 3, "methods": ["integrated_gradients", "saliency"],
                               "quality": ["randomization"], "n_steps": 16, "bootstrap": 50})
    out = module.run(trained_cnn, _ctx(tmp_path, digits))
    rnd = out.tables["randomization"]
    groups = [s["group"] for s in rnd["cascade"]]
    assert groups == ["inner.11", "inner.9", "inner.5", "inner.2", "inner.0"]  # top (logits) down, per layer
    assert rnd["complete"] is True and rnd["not_in_forward"] == [] and rnd["untied"] == []
    for m in ("integrated_gradients", "saliency"):
        for kind in ("", "_abs", "_ssim"):
            c = out.curves[f"{m}.randomization_cascade{kind}"]
            assert c.x == [1.0, 2.0, 3.0, 4.0, 5.0] and len(c.y) == 5
        # the gated metric is the deepest step of the curve
        assert out.metrics[f"{m}.randomization_spearman"].value == pytest.approx(
            out.curves[f"{m}.randomization_cascade"].y[-1])
        assert out.metrics[f"{m}.randomization_ssim"].value == pytest.approx(rnd["similarity"][m][-1]["ssim"])
    ig = out.curves["integrated_gradients.randomization_cascade"].y
    ig_ssim = out.curves["integrated_gradients.randomization_cascade_ssim"].y
    sal = out.curves["saliency.randomization_cascade"].y
    # a real method: similarity to the trained model's maps falls (1.0 before any re-initialization)
    assert max(ig) < 0.5 and ig_ssim[-1] < ig_ssim[0] and ig_ssim[-1] < 0.5
    assert sal[-1] < sal[0] and sal[-1] < 0.3
    assert rnd["failing_methods"] == []
    trained_cnn.weights_changed()
    assert trained_cnn.weights_sha256() == sha and _hooks(trained_cnn.model) == 0


@pytest.fixture(scope="module")
def tied_gpt2_dir(tmp_path_factory, minilm_tokenizer_dir):
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tied-gpt2")
    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_dir)
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                     tie_word_embeddings=True, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_cascade_unties_lm_head_from_input_embeddings(tied_gpt2_dir, tmp_path, monkeypatch):
    import copy

    import torch

    from fmaudit.explain import cascade
    from fmaudit.targets import load_target

    target = load_target(model=str(tied_gpt2_dir), task=CAUSAL_LM, name="gpt2", max_length=32)
    tm = target.model
    assert tm.lm_head.weight is tm.transformer.wte.weight  # tied in the target
    emb0 = tm.transformer.wte.weight.detach().clone()
    sha = target.weights_sha256()

    # control: without untying, re-initializing the head group re-initializes the input embeddings too
    plain = copy.deepcopy(tm)
    head = [g for g in cascade.layer_groups(plain) if g.name == "lm_head"][0]
    cascade.reinitialize(head, cascade.hf_model(plain))
    assert not torch.equal(plain.transformer.wte.weight, emb0)

    seen: dict = {}
    real_untie, real_reinit = cascade.untie_parameters, cascade.reinitialize

    def spy_untie(model):
        seen["model"] = model
        return real_untie(model)

    def spy_reinit(group, hf):
        real_reinit(group, hf)
        m = seen["model"]
        seen.setdefault("steps", []).append((group.name, torch.equal(m.transformer.wte.weight, emb0),
                                             torch.equal(m.lm_head.weight, emb0)))

    monkeypatch.setattr(cascade, "untie_parameters", spy_untie)
    monkeypatch.setattr(cascade, "reinitialize", spy_reinit)
    texts, _ = make_sentences(4, seed=5)
    data = Dataset("lm", "test", "text", [f"t{i}" for i in range(4)], texts=texts)
    module = AttributionAudit({"num_examples": 2, "continuation_tokens": 2, "methods": ["feature_ablation"],
                               "quality": ["randomization"], "bootstrap": 0})
    out = module.run(target, _ctx(tmp_path, data))
    rnd = out.tables["randomization"]
    assert rnd["untied"] == [{"kept": "transformer.wte.weight", "untied": "lm_head.weight"}]
    assert [s["group"] for s in rnd["cascade"]] == ["lm_head", "transformer.ln_f", "transformer.h.1",
                                                    "transformer.h.0", "transformer.wpe", "transformer.wte"]
    # step 1 re-initialized the head only: input embeddings unchanged, head changed
    assert seen["steps"][0] == ("lm_head", True, False)
    assert all(s[1] for s in seen["steps"][:-1]) and seen["steps"][-1] == ("transformer.wte", False, False)
    assert len(out.curves["feature_ablation.randomization_cascade"].y) == 6
    # the target itself: still tied, same weights
    assert tm.lm_head.weight is tm.transformer.wte.weight and torch.equal(tm.transformer.wte.weight, emb0)
    target.weights_changed()
    assert target.weights_sha256() == sha and _hooks(tm) == 0
    assert getattr(tm.config, "tie_word_embeddings", True) is True


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
    module = AttributionAudit({"num_examples": 5, "methods": ["integrated_gradients"], "quality": ["completeness"],
                               "n_steps": 20, "bootstrap": 0, "heatmaps": False})
    out = module.run(target, _ctx(tmp_path, data))
    comp = out.tables["completeness"]
    rows = {r["id"]: r for r in comp["examples"]}
    assert sorted(comp["relative_error_undefined"]) == ["b0", "b1", "b2"]
    for i in ("b0", "b1", "b2"):
        assert rows[i]["f_x"] == pytest.approx(rows[i]["f_baseline"], abs=1e-5) and rows[i]["relative_error"] is None
    # relative error only over the examples where it is defined; the absolute gap over all of them
    assert out.metrics["integrated_gradients.completeness_relative_error"].value == pytest.approx(
        max(rows[i]["gap"] / abs(rows[i]["f_x"] - rows[i]["f_baseline"]) for i in ("g0", "g1")))
    assert out.metrics["integrated_gradients.completeness_abs_gap"].value == pytest.approx(
        max(r["gap"] for r in rows.values()))
    assert out.metrics["integrated_gradients.completeness_abs_gap"].unit == "logit"
    assert not any("raise n_steps" in f.detail for f in out.findings)
    flat = [f for f in out.findings if "F(x) = F(baseline)" in f.title]
    assert len(flat) == 1 and flat[0].severity == "low" and "3 of 5" in flat[0].title

    # only flat examples: the relative error is null, still no "raise n_steps"
    only = data.subset(np.arange(3))
    out = module.run(target, _ctx(tmp_path, only))
    assert out.metrics["integrated_gradients.completeness_relative_error"].value is None
    assert out.metrics["integrated_gradients.completeness_abs_gap"].value is not None
    assert not any("raise n_steps" in f.detail for f in out.findings)


def test_completeness_still_flags_coarse_ig(tmp_path):
    """The finding that remains: a strongly curved output with 2 IG steps misses F(x) - F(b) by far."""
    images = np.full((2, 1, 4, 4), 0.9, dtype=np.float32)
    data = Dataset("sym", "test", "image", ["a", "b"], np.full(2, 2), images=images)
    target = _symmetric_target(power=8)  # class 2: 0.1 * sum(x^8) - 100, beyond 2-point Gauss-Legendre
    module = AttributionAudit({"num_examples": 2, "methods": ["integrated_gradients"], "quality": ["completeness"],
                               "n_steps": 2, "bootstrap": 0, "heatmaps": False, "explain_label": "true"})
    out = module.run(target, _ctx(tmp_path, data))
    rel = out.metrics["integrated_gradients.completeness_relative_error"].value
    assert rel is not None and rel > 0.05
    assert out.tables["completeness"]["relative_error_undefined"] == []
    assert any("raise n_steps" in f.detail for f in out.findings)


# ---------------------------------------------------------------------------------------------------
# ViT: features are patches


def test_patch_feature_map_follows_model_resize():
    from fmaudit.explain.image import patch_feature_map

    # 16x16 input resized to the model's 8x8, patch 4: each 8x8 block of the input is one of 2x2 patches
    m = patch_feature_map(16, 16, (4, 4, 2, 2), (8, 8))
    expected = np.kron(np.arange(4).reshape(2, 2), np.ones((8, 8), dtype=int))
    np.testing.assert_array_equal(m, expected)
    m = patch_feature_map(8, 8, (2, 2, 4, 4), (8, 8))
    assert m.max() == 15 and (m[:2, :2] == 0).all() and m[7, 7] == 15


def test_vit_patch_features(tiny_vit_dir, digits, tmp_path):
    import torch
    from captum.attr import Occlusion

    from fmaudit.targets import load_target

    target = load_target(model=str(tiny_vit_dir), task=IMAGE_CLASSIFICATION, name="vit")
    module = AttributionAudit({"num_examples": 2, "methods": ["integrated_gradients", "occlusion"], "n_steps": 16,
                               "quality": ["deletion", "insertion", "infidelity"], "bootstrap": 0,
                               "random_orderings": 1, "curve_steps": 4, "heatmaps": False})
    out = module.run(target, _ctx(tmp_path, digits))
    assert out.tables["features"] == {"unit": "patch", "patch_size": [4, 4], "grid": [2, 2], "num_features": 4,
                                      "source": "the model config's patch_size"}
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
    direct = Occlusion(target.model).attribute(ex.x, sliding_window_shapes=(1, 4, 4), strides=(1, 4, 4),
                                               baselines=ex.baseline, target=ex.explained)[0].numpy()
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
    assert ImageSpace(target, SpaceOptions(image_features="pixels"), "cpu").example(
        0, "x", digits.images[0]).n_features == 64
    cnn = load_target(model="bundled:digits-cnn", name="cnn")
    problems = AttributionAudit({"image_features": "patches"}).check(cnn, digits)
    assert problems and "patch_size" in problems[0]


# ---------------------------------------------------------------------------------------------------
# infidelity and max-sensitivity against Quantus (same definitions, same perturbations)


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients"])
def test_infidelity_and_sensitivity_match_quantus(trained_cnn, digits, method):
    """Quantus (an independent implementation) on the same attributions and the same perturbations.
    Infidelity: our presence-space version is Yeh et al.'s with inputs = feature presence (all ones),
    perturbation = the dropped features, and Captum's normalization (attributions scaled by the least-squares
    beta); Quantus' Infidelity computes the unnormalized terms, from which beta is applied here.
    Max-sensitivity: Quantus' MaxSensitivity with Frobenius norms = Captum's sensitivity_max."""
    quantus = pytest.importorskip("quantus")
    import warnings

    import torch

    from fmaudit.seeds import Stream, derive

    model = trained_cnn.model
    params = AttributionAudit.Params(perturbations=6, n_steps=16, sensitivity_radius=0.05)
    space = ImageSpace(trained_cnn, SpaceOptions.from_params(params), "cpu")
    ex = space.example(0, "x", digits.images[3])
    with torch.no_grad():
        ex.explained = int(model(ex.x).argmax())
    a = space.attribute(method, model, ex)
    seed = 7

    # infidelity
    ours = infidelity(space, model, ex, a, perturbations=params.perturbations, drop=params.infidelity_drop,
                      batch_size=params.internal_batch_size or 64, seed=seed)
    gen = torch.Generator().manual_seed(derive(seed, Stream.ATTRIBUTION_PERTURB, 3))
    drops = iter((torch.rand((params.perturbations, ex.n_features), generator=gen, dtype=torch.float64)
                  < params.infidelity_drop).numpy())

    def drop(arr, indices, **_):
        return arr * (1 - next(drops).reshape(arr.shape))

    class Presence(torch.nn.Module):
        def forward(self, z):
            return space.logits(model, ex, space.compose(ex, z.reshape(z.shape[0], -1) > 0.5)).double()

    terms = []

    def loss(a, b, **_):  # a: f(x) - f(perturbed), b: attributions . perturbation
        terms.append((np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()))
        return ((a - b) ** 2).mean(-1)

    q = quantus.Infidelity(loss_func=loss, perturb_patch_sizes=[8], n_perturb_samples=params.perturbations,
                           perturb_func=drop, disable_warnings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = q(model=Presence().eval(), x_batch=np.ones((1, 1, 8, 8)), y_batch=np.array([ex.explained]),
                a_batch=a.features.reshape(1, 1, 8, 8), device="cpu", softmax=False, channel_first=True)
    df, asum = (np.concatenate(t) for t in zip(*terms))
    assert len(df) == params.perturbations  # one whole-image "patch" per sample: our random subsets
    assert raw[0] == pytest.approx(np.mean((asum - df) ** 2), rel=1e-9)
    beta = (df * asum).sum() / (asum ** 2).sum()
    assert ours == pytest.approx(np.mean((beta * asum - df) ** 2), rel=1e-4)

    # max-sensitivity
    n = 5
    s_ours = sensitivity(space, method, model, ex, samples=n, radius=params.sensitivity_radius, seed=seed)
    gen = torch.Generator().manual_seed(derive(seed, Stream.ATTRIBUTION_PERTURB, 2))
    noise = iter([((torch.rand((1, 1, 8, 8), generator=gen) * 2 - 1) * params.sensitivity_radius).numpy()
                  for _ in range(n)])

    def perturb(arr, indices, **_):
        return arr + next(noise).reshape(arr.shape)

    def explain(model, inputs, targets, **_):
        x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32)
        out, _ = space.raw(method, model, x, ex.baseline.expand(x.shape[0], -1, -1, -1), int(targets[0]), seed=seed)
        return out.sum(1, keepdim=True).detach().numpy()

    ms = quantus.MaxSensitivity(nr_samples=n, perturb_func=perturb, disable_warnings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s_q = ms(model=model, x_batch=ex.x.numpy(), y_batch=np.array([ex.explained]),
                 a_batch=explain(model, ex.x.numpy(), [ex.explained]), explain_func=explain, device="cpu",
                 softmax=False, channel_first=True)[0]
    assert s_ours == pytest.approx(s_q, rel=1e-4)
    assert 0 < s_ours < 1.5  # (Captum 0.9 with a bare-tensor explanation gave per-row norms: 2.3 for saliency)


def test_cascade_flags_method_that_only_tracks_the_first_layer(trained_cnn, digits, tmp_path, monkeypatch):
    """A 'saliency' that only reads the first conv layer keeps rank correlation 1 until the cascade reaches
    that layer: it passes the gate (the last step is low) but gets the low finding the curve shape calls for."""
    import torch

    def first_layer_only(space, model, x, baseline, target, seed):
        conv = model.inner[0]
        with torch.no_grad():
            return torch.nn.functional.conv2d(x, conv.weight[:1], conv.bias[:1], padding=1), None

    monkeypatch.setitem(IMAGE_METHODS, "saliency", AttributionMethod("Saliency", first_layer_only))
    module = AttributionAudit({"num_examples": 3, "methods": ["saliency"], "quality": ["randomization"],
                               "bootstrap": 0})
    out = module.run(trained_cnn, _ctx(tmp_path, digits))
    curve = out.curves["saliency.randomization_cascade"].y
    assert curve[:4] == pytest.approx([1.0] * 4) and curve[4] < 0.5
    assert out.tables["randomization"]["failing_methods"] == []
    assert [f.severity for f in out.findings if "only once the lower layers" in f.title] == ["low"]


# ---------------------------------------------------------------------------------------------------
# ROAD (Rong et al. 2022): removal with noisy linear imputation instead of the baseline


def test_road_imputation_reproduces_linear_images():
    from fmaudit.explain.road import noisy_linear_impute

    h, w = 7, 9
    rr, cc = np.mgrid[0:h, 0:w]
    img = np.stack([0.1 * rr + 0.05 * cc, 0.5 - 0.03 * rr]).astype(np.float64)  # two channels, linear ramps
    removed = np.zeros((h, w), dtype=bool)
    removed[2:5, 3:7] = True  # interior block: every neighbour stencil is symmetric
    out = noisy_linear_impute(img, removed, noise=0.0)
    np.testing.assert_allclose(out, img, atol=1e-12)  # linear functions are harmonic under the stencil
    # a bump is smoothed away, kept pixels never change, noise only on the imputed pixels
    bump = img.copy()
    bump[:, 3, 4] += 1.0
    one = np.zeros((h, w), dtype=bool)
    one[3, 4] = True
    np.testing.assert_allclose(noisy_linear_impute(bump, one, noise=0.0), img, atol=1e-12)
    noisy = noisy_linear_impute(img, removed, noise=0.05, rng=np.random.default_rng(0))
    assert (noisy[:, ~removed] == img[:, ~removed]).all()
    assert 0.02 < np.std(noisy[:, removed] - img[:, removed]) < 0.08
    # a border pixel uses only its in-image neighbours: weights 1/6, 1/6 (direct) and 1/12 (diagonal)
    corner = np.zeros((1, 3, 3))
    corner[0, 0, 1], corner[0, 1, 0], corner[0, 1, 1] = 6.0, 6.0, 12.0
    mask = np.zeros((3, 3), dtype=bool)
    mask[0, 0] = True
    assert noisy_linear_impute(corner, mask, noise=0.0)[0, 0, 0] == pytest.approx((1 + 1 + 1) / (5 / 12))
    with pytest.raises(ValueError):
        noisy_linear_impute(img, np.ones((h, w), dtype=bool))


def test_road_on_digits_cnn(trained_cnn, digits, tmp_path):
    module = AttributionAudit({"num_examples": 4, "methods": ["integrated_gradients", "saliency"],
                               "quality": ["road"], "n_steps": 16, "bootstrap": 50, "curve_steps": 5,
                               "random_orderings": 2, "heatmaps": False})
    out = module.run(trained_cnn, _ctx(tmp_path, digits))
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
