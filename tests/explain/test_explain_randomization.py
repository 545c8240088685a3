"""The cascading model-parameter randomization check (Adebayo et al. 2018): layer groups, re-initialization,
untying, SSIM, and the audit's curves and findings for real and for weight-independent "methods"."""

from __future__ import annotations

import numpy as np
import pytest
from explain_fixtures import ctx, digit_data, hooks, trained_cnn_target

from fmaudit.audits.explain.attribution import AttributionAudit
from fmaudit.data import Dataset
from fmaudit.explain.image import IMAGE_METHODS
from fmaudit.explain.space import AttributionMethod
from fmaudit.tasks import CAUSAL_LM
from fmaudit.testing import make_sentences

# ---------------------------------------------------------------------------------------------------
# layer groups, re-initialization, similarity


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
            x, y = a[i : i + 7, j : j + 7].ravel(), b[i : i + 7, j : j + 7].ravel()
            mx, my = x.mean(), y.mean()
            vx, vy, cxy = x.var(ddof=1), y.var(ddof=1), np.cov(x, y, ddof=1)[0, 1]
            vals.append((2 * mx * my + 1e-4) * (2 * cxy + 9e-4) / ((mx**2 + my**2 + 1e-4) * (vx + vy + 9e-4)))
    assert ssim(a, b) == pytest.approx(np.mean(vals), rel=1e-9)
    assert ssim(a, b) < 0.9 and ssim(a, 1 - a) < 0
    try:  # scikit-image's structural_similarity with its defaults, when installed
        from skimage.metrics import structural_similarity
    except ImportError:
        return
    assert ssim(a, b) == pytest.approx(structural_similarity(a, b, data_range=1.0), rel=1e-9)
    small_a, small_b = a[:5, :6], b[:5, :6]  # window shrunk to 5 to fit
    assert ssim(small_a, small_b) == pytest.approx(
        structural_similarity(small_a, small_b, data_range=1.0, win_size=5), rel=1e-9
    )
    assert map_ssim(-3 * a, a) == pytest.approx(1.0)  # absolute values, each scaled by its own maximum


# ---------------------------------------------------------------------------------------------------
# the cascade in the audit


def test_cascade_digits_cnn_curve_per_layer(tmp_path):
    trained_cnn = trained_cnn_target()
    digits = digit_data()
    sha = trained_cnn.weights_sha256()
    module = AttributionAudit(
        {
            "num_examples": 3,
            "methods": ["integrated_gradients", "saliency"],
            "quality": ["randomization"],
            "n_steps": 16,
            "bootstrap": 50,
        }
    )
    out = module.run(trained_cnn, ctx(tmp_path, digits))
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
            out.curves[f"{m}.randomization_cascade"].y[-1]
        )
        assert out.metrics[f"{m}.randomization_ssim"].value == pytest.approx(rnd["similarity"][m][-1]["ssim"])
    ig = out.curves["integrated_gradients.randomization_cascade"].y
    ig_ssim = out.curves["integrated_gradients.randomization_cascade_ssim"].y
    sal = out.curves["saliency.randomization_cascade"].y
    # a real method: similarity to the trained model's maps falls (1.0 before any re-initialization)
    assert max(ig) < 0.5 and ig_ssim[-1] < ig_ssim[0] and ig_ssim[-1] < 0.5
    assert sal[-1] < sal[0] and sal[-1] < 0.3
    assert rnd["failing_methods"] == []
    trained_cnn.weights_changed()
    assert trained_cnn.weights_sha256() == sha and hooks(trained_cnn.model) == 0


def test_image_randomization_flags_weight_independent_method(tmp_path, monkeypatch):
    """A method whose maps do not depend on the weights (an edge detector on the input, as in Adebayo et al.)
    is flagged; real integrated gradients on the same trained model pass."""
    import torch

    trained_cnn = trained_cnn_target()
    digits = digit_data()

    def fake_saliency(space, model, x, baseline, target, seed):
        gx = torch.zeros_like(x)
        gx[..., 1:, :] = x[..., 1:, :] - x[..., :-1, :]
        return gx.abs() + 0.1 * x, None  # input-only "explanation"

    monkeypatch.setitem(IMAGE_METHODS, "saliency", AttributionMethod("Saliency", fake_saliency))
    sha = trained_cnn.weights_sha256()
    module = AttributionAudit(
        {
            "num_examples": 6,
            "methods": ["integrated_gradients", "saliency"],
            "quality": ["randomization", "completeness", "deletion"],
            "n_steps": 64,
            "bootstrap": 100,
        }
    )
    out = module.run(trained_cnn, ctx(tmp_path, digits))
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
    assert hooks(trained_cnn.model) == 0


def test_cascade_flags_method_that_only_tracks_the_first_layer(tmp_path, monkeypatch):
    """A 'saliency' that only reads the first conv layer keeps rank correlation 1 until the cascade reaches
    that layer: it passes the gate (the last step is low) but gets the low finding the curve shape calls for."""
    import torch

    trained_cnn = trained_cnn_target()
    digits = digit_data()

    def first_layer_only(space, model, x, baseline, target, seed):
        conv = model.inner[0]
        with torch.no_grad():
            return torch.nn.functional.conv2d(x, conv.weight[:1], conv.bias[:1], padding=1), None

    monkeypatch.setitem(IMAGE_METHODS, "saliency", AttributionMethod("Saliency", first_layer_only))
    module = AttributionAudit(
        {"num_examples": 3, "methods": ["saliency"], "quality": ["randomization"], "bootstrap": 0}
    )
    out = module.run(trained_cnn, ctx(tmp_path, digits))
    curve = out.curves["saliency.randomization_cascade"].y
    assert curve[:4] == pytest.approx([1.0] * 4) and curve[4] < 0.5
    assert out.tables["randomization"]["failing_methods"] == []
    assert [f.severity for f in out.findings if "only once the lower layers" in f.title] == ["low"]


@pytest.fixture(scope="module")
def tied_gpt2_dir(tmp_path_factory, minilm_tokenizer_dir):
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tied-gpt2")
    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_dir)
    cfg = GPT2Config(
        vocab_size=tok.vocab_size,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
    )
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
        seen.setdefault("steps", []).append(
            (group.name, torch.equal(m.transformer.wte.weight, emb0), torch.equal(m.lm_head.weight, emb0))
        )

    monkeypatch.setattr(cascade, "untie_parameters", spy_untie)
    monkeypatch.setattr(cascade, "reinitialize", spy_reinit)
    texts, _ = make_sentences(4, seed=5)
    data = Dataset("lm", "test", "text", [f"t{i}" for i in range(4)], texts=texts)
    module = AttributionAudit(
        {
            "num_examples": 2,
            "continuation_tokens": 2,
            "methods": ["feature_ablation"],
            "quality": ["randomization"],
            "bootstrap": 0,
        }
    )
    out = module.run(target, ctx(tmp_path, data))
    rnd = out.tables["randomization"]
    assert rnd["untied"] == [{"kept": "transformer.wte.weight", "untied": "lm_head.weight"}]
    assert [s["group"] for s in rnd["cascade"]] == [
        "lm_head",
        "transformer.ln_f",
        "transformer.h.1",
        "transformer.h.0",
        "transformer.wpe",
        "transformer.wte",
    ]
    # step 1 re-initialized the head only: input embeddings unchanged, head changed
    assert seen["steps"][0] == ("lm_head", True, False)
    assert all(s[1] for s in seen["steps"][:-1]) and seen["steps"][-1] == ("transformer.wte", False, False)
    assert len(out.curves["feature_ablation.randomization_cascade"].y) == 6
    # the target itself: still tied, same weights
    assert tm.lm_head.weight is tm.transformer.wte.weight and torch.equal(tm.transformer.wte.weight, emb0)
    target.weights_changed()
    assert target.weights_sha256() == sha and hooks(tm) == 0
    assert getattr(tm.config, "tie_word_embeddings", True) is True
