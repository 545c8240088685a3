"""robustness.text_attack controls: a degenerate (constant) target must raise the degenerate-target finding,
and a keyword classifier (a positive control the attacks must break) must be flipped by DeepWordBug and by the
word-swap attack in >= 90% of cases, with every success re-verified.

The keyword classifier is a real fmaudit `TextClassifier` (MiniLM's tokenizer, a torch module with an input
embedding layer), so TextAttack drives it through the same `TargetModelWrapper` as any Hugging Face model.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from fmaudit.audits.base import AuditContext
from fmaudit.audits.robustness.text_attack import TextAttackAudit

FILLER = ["the", "movie", "was", "really", "today", "so", "this", "my", "weekend", "food", "show", "it"]
# keyword -> (class scores): "good" decides positive, "bad" negative; "dull" / "fine" are weak opposite cues,
# so that removing the keyword flips the prediction in both classes.
KEYWORDS = {"good": (0.0, 10.0), "bad": (10.0, 0.0), "dull": (1.0, 0.0), "fine": (0.0, 1.0)}


class KeywordClassifier(nn.Module):
    """Logits = sum over tokens of the class scores of the keywords present. A token counts as a keyword when its
    input embedding has cosine >= 0.95 with the keyword's embedding (differentiable: relu(cos - 0.95) / 0.05, 1
    at the keyword itself). Embeddings are random 32-d vectors, except that "bad" is planted at cosine 0.85 to
    "good": its nearest neighbour in the input-embedding space, as antonyms are in real models."""

    def __init__(self, tokenizer, dim: int = 32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        vocab = len(tokenizer)
        w = torch.randn(vocab, dim, generator=g)
        good, bad = tokenizer.convert_tokens_to_ids(["good", "bad"])
        r = torch.randn(dim, generator=g)
        u = w[good] / w[good].norm()
        r = r - (r @ u) * u
        w[bad] = w[good].norm() * (0.85 * u + np.sqrt(1 - 0.85**2) * r / r.norm())
        self.embeddings = nn.Embedding(vocab, dim)
        with torch.no_grad():
            self.embeddings.weight.copy_(w)
        ids = tokenizer.convert_tokens_to_ids(list(KEYWORDS))
        self.register_buffer("keys", nn.functional.normalize(w[ids].clone(), dim=-1))
        self.register_buffer("scores", torch.tensor(list(KEYWORDS.values())))

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings

    def forward(self, input_ids, attention_mask=None):
        e = self.embeddings(input_ids)
        cos = nn.functional.normalize(e, dim=-1) @ self.keys.T  # (B, L, K)
        hits = torch.relu(cos - 0.95) / 0.05
        if attention_mask is not None:
            hits = hits * attention_mask[..., None]
        return hits.sum(1) @ self.scores


def keyword_sentences(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        y = i % 2
        words = list(rng.choice(FILLER, size=int(rng.integers(4, 8))))
        for w in (["good", "dull"] if y else ["bad", "fine"]):
            words.insert(int(rng.integers(0, len(words) + 1)), w)
        texts.append(" ".join(words))
        labels.append(y)
    return texts, labels


@pytest.fixture(scope="module")
def keyword_target(minilm_tokenizer_dir):
    from transformers import AutoTokenizer

    from fmaudit.data import Dataset
    from fmaudit.targets.text import TextClassifier

    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_dir)
    target = TextClassifier(name="keyword", model=KeywordClassifier(tok), tokenizer=tok, source="test:keyword",
                            max_length=32, label_names=["negative", "positive"])
    texts, labels = keyword_sentences(20)
    data = Dataset("kw", "test", "text", [f"k{i}" for i in range(20)], np.array(labels), texts=texts,
                   label_names=["negative", "positive"])
    assert (target.predict(data) == data.labels).all(), "the keyword classifier must classify its data perfectly"
    # removing the keyword flips the prediction, in both classes
    stripped = [" ".join(w for w in t.split() if w not in ("good", "bad")) for t in texts]
    assert (target.logits_texts(stripped).argmax(1) != data.labels).all()
    return target, data


def _ctx(tmp_path, data, *, store=True, seed=7):
    return AuditContext(unit_id="0:robustness.text_attack@t", seed=seed, device="cpu", run_dir=tmp_path,
                        cache_dir=tmp_path / "cache", store_examples=store, data=data)


def _unmark(text: str) -> str:
    return re.sub(r"\[\[(.*?)\]\]", r"\1", text)


def _assert_all_successes_reverified(out, target, data):
    m = {k: v.value for k, v in out.metrics.items()}
    assert m["num_unverified"] == 0 and m["num_verified"] == m["num_successes"]
    assert out.tables["verification"]["claimed_successes"] == m["num_verified"]
    successes = [e for e in out.evidence if e["verified"]]
    assert len(successes) == m["num_successes"]
    adv = [_unmark(e["adversarial_text"]) for e in successes]
    preds = target.logits_texts(adv).argmax(1)  # an independent forward pass
    for e, pred, text in zip(successes, preds, adv):
        assert pred != e["label"] and pred == e["adversarial_prediction"]
        assert _unmark(e["original_text"]) == data.texts[data.ids.index(e["id"])] != text
    return m, successes


# -- item 8: positive control -------------------------------------------------------------------------


def test_positive_control_deepwordbug_flips_keyword_classifier(keyword_target, tmp_path):
    target, data = keyword_target
    out = TextAttackAudit({"attack": "deepwordbug", "num_examples": 20, "max_evidence": 20}).run(
        target, _ctx(tmp_path, data))
    m, successes = _assert_all_successes_reverified(out, target, data)
    assert m["num_attacked"] == 20 and m["clean_accuracy"] == 1.0
    assert m["attack_success_rate"] >= 0.9, m
    assert not out.tables["predictions"]["degenerate"]
    assert not any("Degenerate" in f.title for f in out.findings)
    # the keyword itself is what DeepWordBug edits
    for e in successes:
        changed = re.findall(r"\[\[(.*?)\]\]", e["original_text"])
        assert set(changed) & {"good", "bad"}, e


def test_positive_control_word_swap_flips_keyword_classifier(keyword_target, tmp_path):
    target, data = keyword_target
    out = TextAttackAudit({"attack": "embedding-swap", "num_examples": 20, "max_evidence": 20}).run(
        target, _ctx(tmp_path, data))
    m, successes = _assert_all_successes_reverified(out, target, data)
    assert m["num_attacked"] == 20
    assert m["attack_success_rate"] >= 0.9, m
    for e in successes:
        assert 1 <= e["words_changed"] <= max(1, int(np.ceil(0.3 * e["num_words"])))


# -- item 7: degenerate targets -----------------------------------------------------------------------


def test_constant_classifier_raises_degenerate_finding(tiny_bert_dir, keyword_target, tmp_path):
    """A tiny BERT whose head bias makes class 0 always win: 0% success must not read as robust."""
    from fmaudit.targets import load_target

    _, data = keyword_target
    target = load_target(model=str(tiny_bert_dir), task="text-classification", num_labels=2, max_length=32,
                         name="constant", label_names=["negative", "positive"])
    with torch.no_grad():
        target.model.classifier.bias.copy_(torch.tensor([50.0, -50.0]))
    assert (target.predict(data) == 0).all()
    out = TextAttackAudit({"attack": "deepwordbug", "num_examples": 8, "query_budget": 300}).run(
        target, _ctx(tmp_path, data))
    m = {k: v.value for k, v in out.metrics.items()}
    table = out.tables["predictions"]
    sample = data.select_ids([row["id"] for row in out.tables["per_example"]])
    true_counts = np.bincount(sample.labels, minlength=2)
    assert table["predicted_class_counts"] == {"negative": 8, "positive": 0}
    assert table["true_class_counts"] == {"negative": int(true_counts[0]), "positive": int(true_counts[1])}
    assert m["majority_baseline"] == pytest.approx(true_counts.max() / 8)
    assert m["top_predicted_class_share"] == 1.0
    assert m["clean_accuracy"] == pytest.approx(true_counts[0] / 8)
    assert m["attack_success_rate"] == 0.0  # nothing flips a constant classifier ...
    deg = [f for f in out.findings if f.title.startswith("Degenerate target")]
    assert len(deg) == 1 and deg[0].severity == "high"  # ... and the report says that means nothing
    assert "'negative' for 100%" in deg[0].detail
    rate = [f for f in out.findings if f.metric == "attack_success_rate"]
    assert rate and "not evidence of robustness" in rate[0].title


def test_degeneracy_rules():
    from fmaudit.audits.robustness.text_attack import degeneracy

    def rows(preds):
        return [{"orig_pred": p} for p in preds]

    # healthy: balanced predictions, accuracy well above the majority baseline
    d = degeneracy(rows([0, 1] * 10), [0, 1] * 10, 2, None)
    assert d["reasons"] == [] and d["majority_baseline"] == 0.5 and d["top_predicted_class_share"] == 0.5
    # accuracy within 5 points of the majority baseline (70% class 0), predictions not constant
    labels = [0] * 14 + [1] * 6
    preds = [0] * 12 + [1] * 2 + [0] * 3 + [1] * 3  # 15/20 = 0.75 correct, majority 0.70
    d = degeneracy(rows(preds), labels, 2, ["neg", "pos"])
    assert len(d["reasons"]) == 1 and "majority baseline 0.700" in d["reasons"][0]
    assert d["top_predicted_class_share"] == pytest.approx(0.75)
    # 90% of the predictions in one class fires even when accuracy is above the baseline
    d = degeneracy(rows([0] * 18 + [1] * 2), [0] * 17 + [1] * 3, 2, None)
    assert any("for 90%" in r for r in d["reasons"])
    # a three-class target with one unused class still lists it
    d = degeneracy(rows([0, 1, 0, 1]), [0, 1, 0, 1], 3, None)
    assert d["table"]["predicted_class_counts"] == {"0": 2, "1": 2, "2": 0} and d["reasons"] == []
