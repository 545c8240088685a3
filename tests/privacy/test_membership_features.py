"""The quantile attack's base-model features: row i describes example i, whatever order the target batches
examples in (text targets group similar lengths, so batch order is not example order). A misaligned feature
matrix once gave every member the features of a short text and every non-member those of a long one: on a DP
model the attack then "found" members at AUC 0.35 (far from chance in the wrong direction) and at 3.3% TPR
at 1% FPR, and on the non-private model it hid the leak the loss attack saw."""

from __future__ import annotations

import numpy as np
import pytest

from fmaudit.data import Dataset
from fmaudit.privacy.membership.outputs import base_features, penultimate_features
from fmaudit.targets import load_target


def _texts(n: int) -> Dataset:
    g = np.random.default_rng(0)
    words = "good bad movie day show really awful great fine plot actor scene music ending".split()
    texts = [" ".join(g.choice(words, int(k))) + f" {i}" for i, k in enumerate(g.integers(1, 14, n))]
    return Dataset("t", "test", "text", [f"t{i}" for i in range(n)], np.arange(n) % 2, texts=texts)


def _one_by_one(target, data: Dataset) -> np.ndarray:
    return np.concatenate(
        [penultimate_features(target, data.subset(np.array([i])), batch_size=1) for i in range(len(data))]
    )


@pytest.mark.parametrize("kind", ["classifier", "causal_lm"])
def test_text_features_follow_example_order(kind, tiny_bert_dir, tiny_llama_dir):
    data = _texts(23)  # lengths 1-13 words in random order: length-sorted batching reorders them
    if kind == "classifier":
        target = load_target(model=str(tiny_bert_dir), task="text-classification", num_labels=2, max_length=32)
    else:
        target = load_target(model=str(tiny_llama_dir), task="causal-lm", max_length=32)
    batched = penultimate_features(target, data, batch_size=5)
    assert batched.shape[0] == len(data) and np.isfinite(batched).all()
    np.testing.assert_allclose(batched, _one_by_one(target, data), rtol=1e-4, atol=1e-5)
    # and a permutation of the data permutes the rows the same way
    perm = np.random.default_rng(1).permutation(len(data))
    np.testing.assert_allclose(penultimate_features(target, data.subset(perm), batch_size=5), batched[perm], atol=1e-5)


def test_image_features_follow_example_order():
    from fmaudit.data import load_digits

    digits = load_digits().subset(np.arange(17))
    target = load_target(model="bundled:digits-cnn", name="cnn")
    batched = penultimate_features(target, digits, batch_size=4)
    np.testing.assert_allclose(batched, _one_by_one(target, digits), rtol=1e-4, atol=1e-5)


def test_base_features_do_not_separate_a_random_split(tiny_bert_dir):
    """A null: a random split of one population cannot be told apart from the base model's features (they do
    not depend on membership); a cross-validated classifier on them stays near chance."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    data = _texts(400)
    member = np.zeros(len(data), bool)
    member[np.random.default_rng(2).permutation(len(data))[:200]] = True
    order = np.r_[np.nonzero(member)[0], np.nonzero(~member)[0]]  # the module's audit order: members first
    audit, y = data.subset(order), member[order]
    target = load_target(model=str(tiny_bert_dir), task="text-classification", num_labels=2, max_length=32)
    feats, _ = base_features(target, audit, is_clf=True, num_labels=2, batch_size=16)
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    p = cross_val_predict(LogisticRegression(max_iter=2000, C=0.1), feats, y, cv=cv, method="predict_proba")[:, 1]
    assert abs(roc_auc_score(y, p) - 0.5) < 0.1
