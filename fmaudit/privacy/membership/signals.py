"""Per-example membership signals from model outputs (numpy only; no torch).

- Classifiers: loss, log p(true label), logit-scaled confidence (LiRA's phi), max confidence and prediction
  entropy (Yeom et al. 2018; Salem et al. 2019).
- Causal LMs: sequence loss, zlib ratio (Carlini et al. 2021), Min-K% Prob (Shi et al. 2023) and Min-K%++
  (Zhang et al. 2024).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np


def logsumexp(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """log(sum(exp(z))) along `axis`, stable for large values and all -inf rows."""
    m = np.max(z, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return (m + np.log(np.sum(np.exp(z - m), axis=axis, keepdims=True))).squeeze(axis)


def classifier_signals(logits: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-example signals of a classifier: loss, log p(true label), logit-scaled confidence, max
    confidence and entropy."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    n = len(y)
    lse = logsumexp(z)
    logp = z - lse[:, None]
    logp_true = logp[np.arange(n), y]
    others = z.copy()
    others[np.arange(n), y] = -np.inf
    # log(p / (1 - p)) computed from logits: stable even when p rounds to 1.0
    phi = z[np.arange(n), y] - logsumexp(others)
    p = np.exp(logp)
    return {
        "loss": -logp_true,
        "logp_true": logp_true,
        "phi": phi,
        "confidence": p.max(axis=1),
        "entropy": -(p * logp).sum(axis=1),
    }


def logit_scale(logp: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) from log p (p <= 1)."""
    logp = np.minimum(np.asarray(logp, dtype=np.float64), -1e-12)
    return logp - np.log(-np.expm1(logp))


def sequence_signals(
    token_logprobs: Sequence[np.ndarray],
    texts: Sequence[str] | None,
    *,
    k: float = 0.2,
    token_mu: Sequence[np.ndarray] | None = None,
    token_sigma: Sequence[np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Per-sequence scores of a causal LM from next-token log-probs (first token excluded).

    loss = mean token NLL; zlib = loss / zlib-compressed length in bytes; min_k = mean of the lowest k
    fraction of token log-probs; min_k_pp = the same over (log p - mu) / sigma, where mu and sigma are the
    mean and standard deviation of log p(z) under the model's own next-token distribution."""
    n = len(token_logprobs)
    loss = np.zeros(n)
    min_k = np.zeros(n)
    min_k_pp = np.full(n, np.nan)
    for i, lp in enumerate(token_logprobs):
        lp = np.asarray(lp, dtype=np.float64)
        if len(lp) == 0:
            raise ValueError("a sequence shorter than 2 tokens has no next-token log-probs to score")
        loss[i] = -lp.mean()
        m = max(1, int(np.ceil(k * len(lp))))
        min_k[i] = np.sort(lp)[:m].mean()
        if token_mu is not None and token_sigma is not None:
            zs = (lp - token_mu[i]) / np.maximum(token_sigma[i], 1e-8)
            min_k_pp[i] = np.sort(zs)[:m].mean()
    out = {"loss": loss, "logp_true": -loss, "phi": logit_scale(-loss), "min_k": min_k}
    if token_mu is not None:
        out["min_k_pp"] = min_k_pp
    if texts is not None:
        zl = np.array([max(len(zlib.compress(t.encode("utf-8"))), 1) for t in texts], dtype=np.float64)
        out["zlib"] = loss / zl
    return out
