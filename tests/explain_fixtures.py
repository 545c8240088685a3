"""The trained tiny targets and the helpers the explain tests share (tests/audits/explain, tests/explain): built
once per test process (cached), so every file explains the same models. tests/explain/test_explain_targets.py
checks that they learned, which the other files' assertions about "what the model uses" rely on."""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

from fmaudit.audits.base import AuditContext
from fmaudit.data import Dataset, load_digits
from fmaudit.targets.base import hook_count
from fmaudit.tasks import TEXT_CLASSIFICATION
from fmaudit.testing import audit_context, make_sentences

# Small but real settings for audit runs in tests.
FAST: dict[str, Any] = dict(
    n_steps=20, perturbations=4, sensitivity_examples=1, random_orderings=2, bootstrap=100, internal_batch_size=32
)


def ctx(tmp_path, data, *, store: bool = False, seed: int = 0) -> AuditContext:
    """The context of one explain.attribution unit writing under tmp_path."""
    return audit_context(tmp_path, data=data, store_examples=store, seed=seed, unit_id="0:explain.attribution@t")


def hooks(model) -> int:
    return hook_count(model)


@cache
def sentence_data() -> Dataset:
    texts, labels = make_sentences(160, seed=1)
    return Dataset(
        "sents",
        "test",
        "text",
        [f"s{i}" for i in range(len(texts))],
        np.array(labels),
        texts=texts,
        label_names=["neg", "pos"],
    )


@cache
def trained_bert_target(model_dir: str) -> Any:
    """The tiny BERT of `model_dir` (conftest's tiny_bert_dir) fine-tuned on `sentence_data()`."""
    from fmaudit.targets import load_target
    from fmaudit.training import TrainConfig, train

    target = load_target(model=model_dir, task=TEXT_CLASSIFICATION, name="bert", max_length=32)
    train(target, sentence_data(), TrainConfig(epochs=3, batch_size=16, lr=3e-3, seed=0))
    return target


@cache
def digit_data() -> Dataset:
    return load_digits().subset(np.arange(600))


@cache
def trained_cnn_target() -> Any:
    """The bundled digits CNN trained on `digit_data()`."""
    from fmaudit.targets import load_target
    from fmaudit.training import TrainConfig, train

    target = load_target(model="bundled:digits-cnn", name="cnn")
    train(target, digit_data(), TrainConfig(epochs=4, batch_size=32, lr=3e-3, seed=0))
    return target
