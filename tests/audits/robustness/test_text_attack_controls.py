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

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True, scope="module")
def _textattack_imported_offline():
    """Several tests import TextAttack's classes directly: TextAttack must first be imported the fmaudit way
    (offline, NLTK's stopwords from fmaudit's cache), or a test that runs first in a worker process fails."""
    from fmaudit.audits.robustness.textattack_env import import_textattack

    import_textattack()


FILLER = ["the", "movie", "was", "really", "today", "so", "this", "my", "weekend", "food", "show", "it"]
# keyword -> (class scores): "good" decides positive, "bad" negative; "dull" / "fine" are weak opposite cues,
# so that removing the keyword flips the prediction in both classes.
KEYWORDS = {"good": (0.0, 10.0), "bad": (10.0, 0.0), "dull": (1.0, 0.0), "fine": (0.0, 1.0)}


class KeywordClassifier(nn.Module):
    """Logits = sum over tokens of the class scores of the keywords present. A token counts as a keyword when the
    projection of its input embedding onto the keyword's embedding is >= 0.95 of the keyword's own (linear, so
    the input-embedding gradient is nonzero: relu(proj - 0.95) / 0.05, 1 at the keyword itself; a random token
    would need a 5-sigma projection). Embeddings are random 32-d vectors, except that "bad" is planted at cosine 0.85 to
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
        keys = w[ids].clone()
        self.register_buffer("keys", keys / keys.norm(dim=-1, keepdim=True) ** 2)  # e . key = 1 at the keyword
        self.register_buffer("scores", torch.tensor(list(KEYWORDS.values())))

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings

    def forward(self, input_ids, attention_mask=None):
        e = self.embeddings(input_ids)
        proj = e @ self.keys.T  # (B, L, K): the projection onto each keyword's embedding, 1 at the keyword
        hits = torch.relu(proj - 0.95) / 0.05
        if attention_mask is not None:
            hits = hits * attention_mask[..., None]
        return hits.sum(1) @ self.scores


def keyword_sentences(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        y = i % 2
        words = list(rng.choice(FILLER, size=int(rng.integers(4, 8))))
        for w in ["good", "dull"] if y else ["bad", "fine"]:
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
    target = TextClassifier(
        name="keyword",
        model=KeywordClassifier(tok),
        tokenizer=tok,
        source="test:keyword",
        max_length=32,
        label_names=["negative", "positive"],
    )
    texts, labels = keyword_sentences(20)
    data = Dataset(
        "kw",
        "test",
        "text",
        [f"k{i}" for i in range(20)],
        np.array(labels),
        texts=texts,
        label_names=["negative", "positive"],
    )
    assert (target.predict(data) == data.labels).all(), "the keyword classifier must classify its data perfectly"
    # removing the keyword flips the prediction, in both classes
    stripped = [" ".join(w for w in t.split() if w not in ("good", "bad")) for t in texts]
    assert (target.logits_texts(stripped).argmax(1) != data.labels).all()
    return target, data


def _ctx(tmp_path, data, *, store=True, seed=7):
    return AuditContext(
        unit_id="0:robustness.text_attack@t",
        seed=seed,
        device="cpu",
        run_dir=tmp_path,
        cache_dir=tmp_path / "cache",
        store_examples=store,
        data=data,
    )


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
        target, _ctx(tmp_path, data)
    )
    m, successes = _assert_all_successes_reverified(out, target, data)
    assert m["num_attacked"] == 20 and m["clean_accuracy"] == 1.0
    assert m["attack_success_rate"] >= 0.9, m
    assert not out.tables["predictions"]["degenerate"]
    assert not any("Degenerate" in f.title for f in out.findings)
    # the keyword itself is what DeepWordBug edits
    for e in successes:
        changed = re.findall(r"\[\[(.*?)\]\]", e["original_text"])
        assert set(changed) & {"good", "bad"}, e


@pytest.mark.parametrize("search", ["delete", "gradient"])
def test_positive_control_word_swap_flips_keyword_classifier(keyword_target, tmp_path, search):
    """The word swap (with its antonym / polarity filter on) flips the keyword classifier, with the black-box
    (delete) and the gradient word-importance ranking. The sentence-similarity constraint is off here: the
    control's sentences are random filler words, so their MiniLM similarity says nothing (it is tested below)."""
    target, data = keyword_target
    out = TextAttackAudit(
        {"attack": "embedding-swap", "num_examples": 20, "max_evidence": 20, "search": search, "min_sentence_sim": None}
    ).run(target, _ctx(tmp_path, data))
    m, successes = _assert_all_successes_reverified(out, target, data)
    assert m["num_attacked"] == 20
    assert m["attack_success_rate"] >= 0.9, m
    for e in successes:
        assert 1 <= e["words_changed"] <= max(1, int(np.floor(0.3 * e["num_words"])))
        # the keyword is what was swapped, and never for its planted antonym (refused by the filter)
        orig = re.findall(r"\[\[(.*?)\]\]", e["original_text"])
        adv = re.findall(r"\[\[(.*?)\]\]", e["adversarial_text"])
        assert set(orig) & {"good", "bad"} and not set(adv) & {"good", "bad"}, e
    table = out.tables["attack"]
    assert table["search_wir_method"] == search and table["search_method"] == "GreedyWordSwapWIR"
    assert table["swaps_refused_by_polarity_filter"].get("antonym", 0) > 0
    names = [c["constraint"] for c in out.tables["constraints"]]
    assert "SentimentPolarityFilter" in names and "MiniLMSentenceSimilarity" not in names
    if search == "gradient":  # one gradient per attacked example, none for the black-box ranking
        assert table["model_gradients"] == m["num_attacked"]
    else:
        assert table["model_gradients"] == 0


def test_without_polarity_filter_the_swap_picks_the_antonym(keyword_target, tmp_path):
    """The failure the filter prevents: good -> bad is the nearest neighbour and the strongest flip, so without
    the filter the attack "succeeds" by changing the true label."""
    target, data = keyword_target
    out = TextAttackAudit(
        {
            "attack": "embedding-swap",
            "num_examples": 6,
            "max_evidence": 6,
            "polarity_filter": False,
            "min_sentence_sim": None,
        }
    ).run(target, _ctx(tmp_path, data))
    m, successes = _assert_all_successes_reverified(out, target, data)
    antonym_swaps = 0
    for e in successes:
        orig = re.findall(r"\[\[(.*?)\]\]", e["original_text"])
        adv = re.findall(r"\[\[(.*?)\]\]", e["adversarial_text"])
        antonym_swaps += "good" in orig and "bad" in adv
    assert antonym_swaps >= 1
    assert out.tables["attack"]["swaps_refused_by_polarity_filter"] is None


# -- item 7: degenerate targets -----------------------------------------------------------------------


def test_constant_classifier_raises_degenerate_finding(tiny_bert_dir, keyword_target, tmp_path):
    """A tiny BERT whose head bias makes class 0 always win: 0% success must not read as robust."""
    from fmaudit.targets import load_target

    _, data = keyword_target
    target = load_target(
        model=str(tiny_bert_dir),
        task="text-classification",
        num_labels=2,
        max_length=32,
        name="constant",
        label_names=["negative", "positive"],
    )
    with torch.no_grad():
        target.model.classifier.bias.copy_(torch.tensor([50.0, -50.0]))
    assert (target.predict(data) == 0).all()
    out = TextAttackAudit({"attack": "deepwordbug", "num_examples": 8, "query_budget": 300}).run(
        target, _ctx(tmp_path, data)
    )
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
    from fmaudit.audits.robustness.text_attack_results import degeneracy

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


# -- item 9: antonym / polarity filter, sentence similarity, gradients ------------------------------------


def test_swap_conflict_refuses_antonyms_opposite_polarity_and_negation(tmp_path):
    from fmaudit.robustness.text_polarity import polarity_lexicon, read_vader_lexicon, swap_conflict

    assert swap_conflict("good", "bad") == "antonym" and swap_conflict("Bad", "GOOD") == "antonym"
    assert swap_conflict("love", "hate") == "antonym"
    assert swap_conflict("amazing", "boring") == "opposite polarity"  # not a listed pair, opposite lexicon entries
    assert swap_conflict("awesome", "disappointing") == "opposite polarity"
    assert swap_conflict("is", "not") == "negation" and swap_conflict("never", "often") == "negation"
    for a, b in [
        ("good", "excellent"),
        ("good", "great"),
        ("bad", "terrible"),
        ("movie", "film"),
        ("phone", "device"),
        ("good", "good"),
    ]:
        assert swap_conflict(a, b) is None, (a, b)
    lex, source = polarity_lexicon()
    assert lex["good"] == 1 and lex["bad"] == -1 and "curated" in source
    # VADER's lexicon format (used when the vaderSentiment package is installed)
    f = tmp_path / "vader_lexicon.txt"
    f.write_text(
        "splendiferous\t2.5\t0.5\t[2, 3]\nmeh\t-0.3\t0.4\t[0, -1]\nyucky\t-1.8\t0.6\t[-2]\n:)\t2.0\t0\t[2]\n"
        "broken line\n"
    )
    assert read_vader_lexicon(f) == {"splendiferous": 1, "yucky": -1}


def test_modification_rate_rounds_down():
    from textattack.constraints.pre_transformation import MaxModificationRate
    from textattack.shared import AttackedText

    from fmaudit.audits.robustness import text_attack_engine as engine

    text = AttackedText(" ".join(f"w{i}" for i in range(17)))
    for k, (ours_open, ta_open) in {3: (False, True), 2: (True, True)}.items():
        t = text.replace_words_at_indices(list(range(k)), [f"x{i}" for i in range(k)])
        t.attack_attrs["modified_indices"] = set(range(k))
        # 0.2 x 17 = 3.4: ours allows 3 words (17.6%), TextAttack's ceil allows 4 (23.5%)
        assert bool(engine.MaxModificationRateFloor(0.2)._get_modifiable_indices(t)) is ours_open
        assert bool(MaxModificationRate(0.2)._get_modifiable_indices(t)) is ta_open
    short = AttackedText("too short")  # min_threshold: one word may always change
    short.attack_attrs["modified_indices"] = set()
    assert engine.MaxModificationRateFloor(0.2)._get_modifiable_indices(short) == {0, 1}


def test_polarity_filter_constraint_on_attacked_texts():
    from textattack.shared import AttackedText
    from textattack.transformations import WordDeletion, WordSwapEmbedding

    from fmaudit.audits.robustness import text_attack_engine as engine

    c = engine.SentimentPolarityFilter()
    orig = AttackedText("the movie was good and the cast was fine")
    ok = orig.replace_word_at_index(3, "excellent")
    assert c._check_constraint(ok, orig)
    assert not c._check_constraint(orig.replace_word_at_index(3, "bad"), orig)
    # compared with the original, so a chain good -> great -> terrible is refused at the second step
    chained = ok.replace_word_at_index(3, "terrible")
    assert not c._check_constraint(chained, orig)
    assert c.refused == {"antonym": 1, "opposite polarity": 1}
    assert c.check_compatibility(WordSwapEmbedding(embedding=_tiny_embedding()))
    assert not c.check_compatibility(WordDeletion())  # only word swaps are checked


def _tiny_embedding():
    from textattack.shared import WordEmbedding

    emb = np.eye(3, dtype=np.float32)
    return WordEmbedding(emb, {"a": 0, "b": 1, "c": 2}, {0: "a", 1: "b", 2: "c"}, np.array([[0, 1, 2]] * 3))


def test_minilm_sentence_similarity_constraint_matches_sentence_transformers():
    from textattack.shared import AttackedText
    from textattack.transformations import WordSwapEmbedding

    from fmaudit.audits.robustness import text_attack_engine as engine
    from fmaudit.robustness.text_similarity import MiniLMSentenceEncoder

    c = engine.MiniLMSentenceSimilarity(threshold=0.8)
    orig = AttackedText("@united my flight was delayed three hours and nobody helped!! #fail")
    cands = [
        orig.replace_word_at_index(4, "late"),
        orig.replace_word_at_index(8, "banana"),
        orig.replace_words_at_indices([3, 4, 9], ["sandwich", "purple", "danced"]),
    ]
    assert orig.words[4] == "delayed"
    t = WordSwapEmbedding(embedding=_tiny_embedding())
    for x in cands:
        x.attack_attrs["last_transformation"] = t
        x.attack_attrs["newly_modified_indices"] = set(orig.all_words_diff(x))
    kept = c._check_constraint_many(cands, orig)
    sims = MiniLMSentenceEncoder().similarity([orig.text] * 3, [x.text for x in cands])
    np.testing.assert_allclose([x.attack_attrs["similarity_score"] for x in cands], sims, atol=1e-5)
    assert [x.text for x in kept] == [x.text for x, s in zip(cands, sims) if s >= 0.8]
    assert sims[0] >= 0.8 > sims[2]  # a near-synonym keeps the sentence, three nonsense swaps do not
    # the whole text is compared (TextAttack's no-window mode drops the leading "@" and trailing "!!", "#")
    single = cands[0]
    assert float(c._sim_score(orig, single)) == pytest.approx(float(sims[0]), abs=1e-5)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:  # pragma: no cover
        return
    from fmaudit.targets import minilm_path

    ref = SentenceTransformer(str(minilm_path()), device="cpu").encode(
        [orig.text] + [x.text for x in cands], normalize_embeddings=True
    )
    np.testing.assert_allclose(ref[1:] @ ref[0], sims, atol=1e-5)


def test_get_grad_is_the_input_embedding_gradient(keyword_target, tiny_bert_dir):
    from fmaudit.audits.robustness import text_attack_engine as engine
    from fmaudit.targets import load_target

    target, _ = keyword_target
    w = engine.TargetModelWrapper(target)
    text = "the movie was good " + "dull " * 9  # logits (9, 10): a loss well away from 0
    out = w.get_grad(text)
    tokens = w.tokenize([text], strip_prefix=True)[0]
    g = out["gradient"]
    assert g.shape == (len(tokens), 32) and out["ids"].shape == (1, len(tokens)) and w.num_gradients == 1
    norms = np.abs(g).sum(1)
    assert tokens[int(norms.argmax())] in ("good", "dull")  # only keyword tokens get a gradient
    assert norms[tokens.index("the")] == 0 and norms[tokens.index("good")] > 0
    # finite differences through the embedding table: d loss / d e(good) . v
    emb = target.embedding_layer().weight
    gid = target.tokenizer.convert_tokens_to_ids("good")
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))

    def loss_at(eps: float) -> float:
        with torch.no_grad():
            saved = emb[gid].clone()
            emb[gid] += eps * v
            lg = torch.as_tensor(target.logits_texts([text]))
            emb[gid] = saved
        return float(torch.nn.functional.cross_entropy(lg, lg.argmax(1)))

    assert loss_at(0.0) > 0.1
    fd = (loss_at(1e-2) - loss_at(-1e-2)) / 2e-2
    assert fd == pytest.approx(float(g[tokens.index("good")] @ v.numpy()), rel=2e-2)
    assert all(p.grad is None for p in target.model.parameters())  # no parameter gradients left behind
    # a Hugging Face BERT: one row per word piece incl. [CLS] / [SEP], deterministic (eval mode, no dropout)
    bert = load_target(model=str(tiny_bert_dir), task="text-classification", num_labels=2, max_length=32)
    wb = engine.TargetModelWrapper(bert)
    a, b = wb.get_grad("an unbelievably good day"), wb.get_grad("an unbelievably good day")
    assert a["gradient"].shape == (len(bert.tokenize(["an unbelievably good day"])[0]), 32)
    np.testing.assert_array_equal(a["gradient"], b["gradient"])
    assert np.abs(a["gradient"]).sum() > 0 and bert.model.training is False


def test_search_choices_build_textattack_search_methods(keyword_target):
    from textattack.search_methods import BeamSearch, GreedySearch, GreedyWordSwapWIR

    from fmaudit.audits.robustness import text_attack_engine as engine

    target, _ = keyword_target
    w = engine.TargetModelWrapper(target)
    build = lambda search: engine.build_embedding_swap(  # noqa: E731
        w,
        _tiny_embedding(),
        max_candidates=2,
        min_cos_sim=0.5,
        max_modification_rate=0.2,
        sentence_similarity=None,
        search=search,
    )
    assert type(build("greedy").search_method) is GreedySearch
    beam = build("beam").search_method
    assert type(beam) is BeamSearch and beam.beam_width == engine.BEAM_WIDTH
    grad = build("gradient")
    assert isinstance(grad.search_method, GreedyWordSwapWIR) and grad.search_method.wir_method == "gradient"
    assert grad.is_black_box is False and build("delete").is_black_box is True
    with pytest.raises(ValueError, match="unknown search"):
        build("random-walk")
