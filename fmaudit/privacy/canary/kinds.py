"""Canaries per kind: the examples a canary audit inserts into training, built from held-out examples (a
changed label, a stamped image) or from scratch (random words, random secrets), all drawn from the
CANARY_MAKE stream. Each kind states the model task it fits. Ids start with 'canary:'."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np

from fmaudit.data import Dataset
from fmaudit.hints import did_you_mean
from fmaudit.seeds import Stream
from fmaudit.seeds import rng as stream_rng
from fmaudit.tasks import CAUSAL_LM, IMAGE_CLASSIFICATION, TEXT_CLASSIFICATION

CanaryKind = Literal["flipped_label", "random_tokens", "secret", "mislabel", "pattern"]
SECRET_PREFIX = "my secret code is"
MIN_RANDOM_TOKEN_WORDS = 100


def random_token_words(tokenizer: Any) -> list[str]:
    """Lowercase words (3+ letters) that are single tokens of a tokenizer's vocabulary, for random_tokens canaries.
    Byte-level BPE (GPT-2, RoBERTa: 'Ġword') and SentencePiece ('▁word') mark a word's start: there only marked
    tokens count (unmarked ones are word middles), the marker dropped. WordPiece words are unmarked."""
    marked: set[str] = set()
    plain: set[str] = set()
    for w in tokenizer.get_vocab():
        hit = re.fullmatch(r"([\u0120\u2581]?)([a-z]{3,})", w)
        if hit:
            (marked if hit.group(1) else plain).add(hit.group(2))
    return sorted(marked if marked else plain)


def _flip(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return (labels + rng.integers(1, k, size=len(labels))) % k


def _relabelled(
    kind: str,
    *,
    m: int,
    rng: np.random.Generator,
    pool: Dataset | None,
    num_labels: int | None,
    stamp: bool = False,
    **_: Any,
) -> Dataset:
    """m held-out examples with a wrong label (flipped_label, mislabel); `stamp`: also a 2x2 white square in
    the image's top-left corner (pattern)."""
    if pool is None or len(pool) < m:
        have = 0 if pool is None else len(pool)
        raise ValueError(
            f"{kind} canaries are built from held-out examples: need {m}, have {have}; "
            "lower num_canaries or use more data"
        )
    if pool.labels is None or not num_labels:
        raise ValueError(f"{kind} canaries need labelled data")
    # one generator for the choice and the new labels (a Dataset.sample would start the stream afresh)
    chosen = pool.subset(np.sort(rng.choice(len(pool), size=m, replace=False)))
    assert chosen.labels is not None  # checked above
    labels = _flip(chosen.labels, num_labels, rng)
    images = chosen.images
    if stamp:  # image canaries (pattern)
        assert images is not None
        images = images.copy()
        images[:, :, :2, :2] = 1.0
    return Dataset(
        "canaries",
        f"canary:{kind}",
        chosen.modality,
        [f"canary:{i}" for i in chosen.ids],
        labels,
        texts=chosen.texts,
        images=images,
        label_names=chosen.label_names,
    )


def _random_tokens(*, m: int, rng: np.random.Generator, target: Any, num_labels: int | None, **_: Any) -> Dataset:
    """m texts of 8 random whole-word tokens of the target's vocabulary, with random labels."""
    vocab = random_token_words(target.tokenizer)
    if len(vocab) < MIN_RANDOM_TOKEN_WORDS or not num_labels:
        raise ValueError("random_tokens canaries need a word-piece vocabulary and labels")
    words = np.asarray(vocab)  # once, not per canary (choice on a list converts it every call)
    texts = [" ".join(rng.choice(words, size=8)) for _ in range(m)]
    labels = rng.integers(0, num_labels, size=m)
    return Dataset("canaries", "canary:random_tokens", "text", [f"canary:rt{i}" for i in range(m)], labels, texts=texts)


def _secret(*, m: int, rng: np.random.Generator, secret_digits: int, **_: Any) -> Dataset:
    """m distinct secrets 'my secret code is d d d ...' (secret sharer, Carlini et al. 2019), in random order."""
    if 10**secret_digits < 4 * m:
        raise ValueError(f"secret_digits={secret_digits} gives too few distinct secrets for {m} canaries")
    secrets: set[str] = set()
    while len(secrets) < m:
        secrets.add(" ".join(str(d) for d in rng.integers(0, 10, size=secret_digits)))
    texts = [f"{SECRET_PREFIX} {s}" for s in sorted(secrets)]
    order = rng.permutation(m)
    texts = [texts[i] for i in order]
    return Dataset("canaries", "canary:secret", "text", [f"canary:s{i}" for i in range(m)], None, texts=texts)


@dataclass(frozen=True)
class Kind:
    task: str  # the model task it fits (fmaudit.tasks)
    build: Callable[..., Dataset]  # (m=, rng=, pool=, target=, num_labels=, secret_digits=) -> canaries


KINDS: dict[str, Kind] = {
    "flipped_label": Kind(TEXT_CLASSIFICATION, partial(_relabelled, "flipped_label")),
    "random_tokens": Kind(TEXT_CLASSIFICATION, _random_tokens),
    "secret": Kind(CAUSAL_LM, _secret),
    "mislabel": Kind(IMAGE_CLASSIFICATION, partial(_relabelled, "mislabel")),
    "pattern": Kind(IMAGE_CLASSIFICATION, partial(_relabelled, "pattern", stamp=True)),
}
# What `kind: auto` means for each model task.
DEFAULT_KIND: dict[str, str] = {
    TEXT_CLASSIFICATION: "flipped_label",
    CAUSAL_LM: "secret",
    IMAGE_CLASSIFICATION: "mislabel",
}


def default_kind(task: str) -> str:
    """The canary kind `kind: auto` stands for on a target of this model task."""
    return DEFAULT_KIND[task]


def kinds_for(task: str) -> set[str]:
    """The canary kinds that fit a model task."""
    return {name for name, k in KINDS.items() if k.task == task}


def make_canaries(
    kind: str, *, m: int, seed: int, pool: Dataset | None, target: Any, num_labels: int | None, secret_digits: int = 6
) -> Dataset:
    """m canaries of `kind`, drawn from the CANARY_MAKE stream of `seed`. `pool` (examples the target never
    trained on) feeds the kinds built from real examples. Ids start with 'canary:'."""
    if kind not in KINDS:
        raise ValueError(f"unknown canary kind {kind!r}{did_you_mean(kind, KINDS)}")
    return KINDS[kind].build(
        m=m,
        rng=stream_rng(seed, Stream.CANARY_MAKE),
        pool=pool,
        target=target,
        num_labels=num_labels,
        secret_digits=secret_digits,
    )
