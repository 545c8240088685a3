"""robustness.text_attack: attacks on a tiny BERT trained briefly on the synthetic sentiment CSV.

Every success must hold when re-run through the target; metrics must agree with TextAttack's own metric
classes and with each other; bad input fails at validation.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from fmaudit.audits.base import AuditContext
from fmaudit.audits.robustness.text_attack import TextAttackAudit


@pytest.fixture(scope="module")
def trained_bert(tiny_bert_dir, sentiment_csv):
    """The tiny BERT fine-tuned for a few epochs on the synthetic CSV (accuracy well above chance)."""
    from fmaudit.data import load_table
    from fmaudit.targets import load_target
    from fmaudit.training import TrainConfig, train

    data = load_table(sentiment_csv, text_column="text", label_column="label", id_column="id", name="sents")
    target = load_target(model=str(tiny_bert_dir), task="text-classification", num_labels=2, max_length=32, name="bert")
    train(target, data.subset(np.arange(0, 160)), TrainConfig(epochs=4, batch_size=16, lr=2e-3, seed=0))
    held_out = data.subset(np.arange(160, 200), name="sents-heldout")
    acc = float((target.predict(held_out) == held_out.labels).mean())
    assert acc >= 0.75, f"fixture model did not learn the synthetic task (accuracy {acc})"
    return target, held_out


def _ctx(tmp_path, data, *, store=True, seed=123):
    return AuditContext(
        unit_id="0:robustness.text_attack@bert",
        seed=seed,
        device="cpu",
        run_dir=tmp_path,
        cache_dir=tmp_path / "cache",
        store_examples=store,
        data=data,
    )


def _unmark(text: str) -> str:
    return re.sub(r"\[\[(.*?)\]\]", r"\1", text)


def _check_consistent(out, target, data):
    m = {k: v.value for k, v in out.metrics.items()}
    n = m["num_examples"]
    assert m["num_attacked"] + m["num_skipped"] == n
    assert m["num_successes"] + m["num_failed"] == m["num_attacked"]
    assert m["num_verified"] == m["num_successes"]
    if m["num_attacked"]:
        assert m["attack_success_rate"] == pytest.approx(m["num_successes"] / m["num_attacked"])
    assert m["clean_accuracy"] == pytest.approx(m["num_attacked"] / n)
    # clean accuracy from an independent forward pass on the same sample
    ids = [row["id"] for row in out.tables["per_example"]]
    sample = data.select_ids(ids)
    assert m["clean_accuracy"] == pytest.approx(float((target.predict(sample) == sample.labels).mean()))
    return m


def test_deepwordbug_successes_flip_the_target(trained_bert, tmp_path):
    target, data = trained_bert
    audit = TextAttackAudit({"attack": "deepwordbug", "num_examples": 8, "max_evidence": 8})
    assert audit.check(target, data) == []
    out = audit.run(target, _ctx(tmp_path, data))
    m = _check_consistent(out, target, data)
    assert m["accuracy_under_attack"] == pytest.approx((m["num_attacked"] - m["num_successes"]) / m["num_examples"])
    assert m["num_successes"] > 0, "DeepWordBug should flip some predictions of a tiny model"
    assert out.tables["verification"]["verified"] == m["num_verified"]
    successes = [e for e in out.evidence if e["verified"]]
    assert len(successes) == m["num_successes"]
    adv = [_unmark(e["adversarial_text"]) for e in successes]
    preds = target.logits_texts(adv).argmax(1)
    for e, pred, text in zip(successes, preds, adv):
        assert pred != e["label"] and pred == e["adversarial_prediction"]
        assert "[[" in e["adversarial_text"] and "[[" in e["original_text"]  # changed words are marked
        assert _unmark(e["original_text"]) == data.texts[data.ids.index(e["id"])]
        assert text != _unmark(e["original_text"])
    thresholds = {c["constraint"]: c for c in out.tables["constraints"]}
    assert thresholds["LevenshteinEditDistance"]["max_edit_distance"] == 30
    # a healthy target: predictions in both classes, accuracy above the majority baseline, no degenerate finding
    pred = out.tables["predictions"]
    assert pred["degenerate"] is False and sum(pred["predicted_class_counts"].values()) == m["num_examples"]
    assert min(pred["predicted_class_counts"].values()) > 0
    assert m["top_predicted_class_share"] < 0.9 and m["clean_accuracy"] > m["majority_baseline"] + 0.05
    assert not any(f.title.startswith("Degenerate target") for f in out.findings)
    assert 0 < m["avg_queries"] <= 2000


def test_same_seed_same_result(trained_bert, tmp_path):
    target, data = trained_bert
    small = data.subset(np.arange(3))
    a = TextAttackAudit({"attack": "deepwordbug", "num_examples": 3}).run(target, _ctx(tmp_path, small))
    b = TextAttackAudit({"attack": "deepwordbug", "num_examples": 3}).run(target, _ctx(tmp_path, small))
    assert [e.get("adversarial_text") for e in a.evidence] == [e.get("adversarial_text") for e in b.evidence]
    assert a.metrics["avg_queries"].value == b.metrics["avg_queries"].value


def test_metrics_match_textattack_reference(trained_bert, tmp_path):
    """Our aggregation of TextAttack results equals TextAttack's own metric classes."""
    from fmaudit.audits.robustness.textattack_env import import_textattack

    import_textattack(tmp_path / "cache")
    from textattack.metrics import AttackQueries, AttackSuccessRate, WordsPerturbed

    from fmaudit.audits.robustness import text_attack_engine as engine
    from fmaudit.audits.robustness.text_attack_results import summarize
    from fmaudit.stats import softmax

    target, data = trained_bert
    params = TextAttackAudit.Params(attack="pruthi", query_budget=500)
    attack, _ = engine.build_attack(
        "pruthi", engine.TargetModelWrapper(target), params=params, target=target, cache_dir=tmp_path / "cache"
    )
    sub = data.subset(np.arange(8))
    results = []
    for i, (t, y) in enumerate(zip(sub.texts, sub.labels)):
        engine.seed_all(i)
        results.append(attack.attack(t, int(y)))
    s = summarize(results, [int(y) for y in sub.labels], target, "pruthi", 500, softmax)
    assert s["num_unverified"] == 0
    ref = AttackSuccessRate().calculate(results)
    assert s["num_successes"] == ref["successful_attacks"]
    assert s["num_failed"] == ref["failed_attacks"]
    assert s["num_skipped"] == ref["skipped_attacks"]
    if s["num_attacked"]:
        assert 100 * s["num_successes"] / s["num_attacked"] == pytest.approx(ref["attack_success_rate"], abs=0.01)
        assert s["avg_queries"] == pytest.approx(AttackQueries().calculate(results)["avg_num_queries"], abs=0.01)
    if s["num_successes"]:
        assert s["avg_perturbed_word_pct"] == pytest.approx(
            WordsPerturbed().calculate(results)["avg_word_perturbed_perc"], abs=0.01
        )


def test_embedding_swap_uses_cached_model_neighbours(trained_bert, tmp_path):
    target, data = trained_bert
    params = {"attack": "embedding-swap", "num_examples": 5, "min_cos_sim": 0.3, "max_candidates": 20}
    out = TextAttackAudit(params).run(target, _ctx(tmp_path, data, store=False))
    m = _check_consistent(out, target, data)
    info = out.tables["attack"]["embedding"]
    assert info["cache_hit"] is False and info["vocabulary_words"] > 1000
    for e in out.evidence:  # no raw text without store_examples: ids only
        assert "original_text" not in e and "adversarial_text" not in e and e["id"] in data.ids
    thresholds = {c["constraint"]: c for c in out.tables["constraints"]}
    assert thresholds["WordEmbeddingDistance"]["min_cos_sim"] == 0.3
    assert thresholds["MaxModificationRateFloor"]["max_rate"] == 0.3
    # on by default: the antonym / polarity filter and the MiniLM sentence-similarity constraint (cosine >= 0.8)
    assert thresholds["MiniLMSentenceSimilarity"]["threshold"] == 0.8
    assert thresholds["MiniLMSentenceSimilarity"]["window_size"] is None  # whole text, JSON-safe
    assert thresholds["SentimentPolarityFilter"]["lexicon_size"] > 300

    # The cached neighbour matrix is the exact cosine top-k of the target's whole-word input embeddings.
    from fmaudit.audits.robustness import text_attack_engine as engine

    emb, info2 = engine.embedding_for_target(target, cache_dir=tmp_path / "cache", neighbours=50)
    assert info2["cache_hit"] is True and info2["cache_key"] == info["cache_key"]
    words, ids = engine.whole_word_vocab(target.tokenizer)
    assert all(w.isalpha() and not w.startswith("##") for w in words)
    w = target.embedding_layer().weight.detach().numpy()[ids]
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    for row in (0, 17, len(words) // 2):
        sims = w @ w[row]
        sims[row] = np.inf
        expected = np.argsort(-sims, kind="stable")[:6]
        got = emb.nn_matrix[row][:6]
        assert got[0] == row
        np.testing.assert_allclose(np.sort(sims[got[1:]]), np.sort(sims[expected[1:]]), rtol=1e-5)
    if m["num_successes"]:
        # a verified success changes at most 30% of the words (rounded down), at least one
        for e in out.evidence:
            if e["verified"]:
                assert 1 <= e["words_changed"] <= max(1, int(np.floor(0.3 * e["num_words"])))


def test_input_reduction_keeps_prediction(trained_bert, tmp_path):
    target, data = trained_bert
    out = TextAttackAudit({"attack": "input-reduction", "num_examples": 4}).run(target, _ctx(tmp_path, data))
    assert "accuracy_under_attack" not in out.metrics
    for e in out.evidence:
        if e["verified"]:
            reduced = _unmark(e["adversarial_text"])
            assert target.logits_texts([reduced]).argmax(1)[0] == e["label"]
            assert e["words_changed"] >= 1


# -- bad input ----------------------------------------------------------------------------------------


def test_unknown_attack_suggests():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="did you mean 'deepwordbug'"):
        TextAttackAudit.Params(attack="deepwordbg")
    with pytest.raises(ValidationError, match="greater than 0"):
        TextAttackAudit.Params(query_budget=0)
    with pytest.raises(ValidationError, match="masked_lm is used only by"):
        TextAttackAudit.Params(attack="pruthi", masked_lm="/nowhere")
    assert TextAttackAudit.Params(attack="Input_Reduction").attack == "input-reduction"


def test_cli_validate_exits_2(write_recipe, tiny_bert_dir, sentiment_csv, tmp_path):
    from typer.testing import CliRunner

    from fmaudit.cli import app
    from fmaudit.testing import tiny_text_recipe

    recipe = tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path)
    recipe["audits"] = [
        {"use": "robustness.text_attack", "target": "bert", "params": {"attack": "textfoolr", "query_budget": 0}}
    ]
    res = CliRunner().invoke(app, ["validate", str(write_recipe(recipe))])
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "did you mean 'textfooler'" in text and "query_budget" in text


def test_check_rejects_wrong_target_empty_data_and_missing_resources(trained_bert, tiny_llama_dir):
    from fmaudit.data import Dataset
    from fmaudit.targets import load_target

    target, data = trained_bert
    lm = load_target(model=str(tiny_llama_dir), task="causal-lm", max_length=32)
    problems = TextAttackAudit().check(lm, data)
    assert problems and "attacks text classifiers" in problems[0] and "causal-lm" in problems[0]
    empty = Dataset("empty", "test", "text", [], np.zeros(0, dtype=np.int64), texts=[])
    assert any("empty" in p for p in TextAttackAudit().check(target, empty))
    unlabeled = Dataset("u", "test", "text", ["a"], None, texts=["good day"])
    assert any("no labels" in p for p in TextAttackAudit().check(target, unlabeled))
    tf = TextAttackAudit({"attack": "textfooler"}).check(target, data)
    assert any("counter-fitted GloVe" in p and "to provide it" in p for p in tf)
    bae = TextAttackAudit({"attack": "bae", "masked_lm": "/does/not/exist"}).check(target, data)
    assert any("masked language model" in p and "params.masked_lm" in p for p in bae)
    assert any("not supported" in p for p in TextAttackAudit({"attack": "seq2sick"}).check(target, data))


def test_recipe_with_causal_lm_target_is_invalid(write_recipe, tiny_llama_dir, sentiment_csv, tmp_path):
    from fmaudit.recipe import RecipeError, load_recipe

    recipe = {
        "version": 1,
        "name": "t",
        "data": {"s": {"source": str(sentiment_csv), "id_column": "id"}},
        "targets": {"lm": {"model": str(tiny_llama_dir), "task": "causal-lm"}},
        "audits": [{"use": "robustness.text_attack", "target": "lm", "data": "s"}],
    }
    with pytest.raises(RecipeError, match="classifier"):
        load_recipe(write_recipe(recipe))


def test_end_to_end_recipe_with_gate(tiny_bert_dir, sentiment_csv, tmp_path):
    from fmaudit.runner import run_recipe
    from fmaudit.testing import tiny_text_recipe

    recipe = tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path)
    recipe["audits"] = [
        {
            "use": "robustness.text_attack",
            "target": "bert",
            "params": {"attack": "deepwordbug", "num_examples": 3},
            "fail_if": {"attack_success_rate": {"gt": 1.0}},
        }
    ]
    report = run_recipe(recipe)
    res = report.result("robustness.text_attack", "bert")
    assert res.status == "ok", res.error
    assert res.gates and res.gates[0].passed
    assert res.metrics["num_examples"].value == 3
    assert all("original_text" not in e for e in res.evidence)  # store_examples defaults to off
