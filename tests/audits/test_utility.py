"""The utility module's numbers against scikit-learn and hand computations."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from fmaudit.stats import expected_calibration_error, wilson_interval


def test_ece_known_values():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8], [0.4, 0.6]])
    labels = np.array([0, 1, 1, 1])
    ece, confs, accs, counts = expected_calibration_error(probs, labels, bins=10)
    # bins: 0.9 -> acc 0.5 (2 ex), 0.8 -> acc 1 (1 ex), 0.6 -> acc 1 (1 ex)
    expected = 0.5 * abs(0.5 - 0.9) + 0.25 * abs(1 - 0.8) + 0.25 * abs(1 - 0.6)
    assert ece == pytest.approx(expected)
    assert sum(counts) == 4


def test_wilson_interval_contains_estimate():
    lo, hi = wilson_interval(45, 50)
    assert lo < 0.9 < hi and 0 <= lo and hi <= 1
    assert wilson_interval(0, 10)[0] == 0.0


def test_utility_matches_sklearn(tiny_bert_dir, sentiment_csv, tmp_path):
    from fmaudit.runner import run_recipe
    from fmaudit.testing import tiny_text_recipe

    recipe = tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path)
    recipe["audits"] = [
        {"use": "utility", "target": "bert", "params": {"bootstrap": 50}},
        {"use": "utility", "target": "bert", "params": {"split": "members", "bootstrap": 0}},
    ]
    report = run_recipe(recipe)
    held, mem = report.audits
    assert held.tables["evaluated_on"]["subset"] == "nonmembers"
    assert mem.tables["evaluated_on"]["subset"] == "members"
    # Recompute from the confusion matrix the module reported.
    cm = np.array(held.tables["confusion_matrix"]["matrix"])
    assert cm.sum() == 100
    acc = np.trace(cm) / cm.sum()
    assert held.metrics["accuracy"].value == pytest.approx(acc)
    y_true = np.repeat([0, 0, 1, 1], [cm[0, 0], cm[0, 1], cm[1, 0], cm[1, 1]])
    y_pred = np.repeat([0, 1, 0, 1], [cm[0, 0], cm[0, 1], cm[1, 0], cm[1, 1]])
    assert held.metrics["macro_f1"].value == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    m = held.metrics["macro_f1"]
    assert m.ci_low <= m.value <= m.ci_high
    assert 0 <= held.metrics["ece"].value <= 1
    assert mem.metrics["macro_f1"].ci_low is None


def test_perplexity_is_exp_of_token_weighted_nll(tiny_llama_dir, sentiment_csv, tmp_path):
    from fmaudit.runner import run_recipe

    recipe = {
        "version": 1,
        "name": "lm",
        "output_dir": str(tmp_path / "r"),
        "data": {"s": {"source": str(sentiment_csv), "limit": 20}},
        "targets": {"lm": {"model": str(tiny_llama_dir), "task": "causal-lm"}},
        "audits": [{"use": "utility", "target": "lm", "data": "s", "params": {"bootstrap": 20}}],
    }
    report = run_recipe(recipe)
    res = report.audits[0]
    assert res.status == "ok", res.error
    assert res.metrics["perplexity"].value == pytest.approx(np.exp(res.metrics["nll"].value))
    # An untrained model over a ~30k vocabulary is near-uniform: perplexity on the order of the vocab.
    assert 5_000 < res.metrics["perplexity"].value < 100_000
