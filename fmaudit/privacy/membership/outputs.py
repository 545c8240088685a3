"""Model outputs for membership inference: per-example signals of a target on a dataset, the next-token
distribution statistics Min-K%++ needs, and membership-independent features of each example (the base
model's representation) for the quantile-regression attack. torch is imported inside functions."""

from __future__ import annotations

from typing import Any

import numpy as np

from fmaudit.privacy.membership.signals import classifier_signals, sequence_signals


def model_signals(
    target: Any, data: Any, *, is_clf: bool, token_distribution: bool, batch_size: int, min_k: float
) -> dict[str, np.ndarray]:
    """`target`'s per-example signals on `data` (`classifier_signals` or `sequence_signals`); causal LMs run
    at a quarter of `batch_size`, and `token_distribution` adds Min-K%++'s statistics."""
    if is_clf:
        return classifier_signals(target.logits(data, batch_size=batch_size), data.labels)
    lp, mu, sd = lm_token_stats(target, data, batch_size=max(1, batch_size // 4), need_dist=token_distribution)
    return sequence_signals(lp, data.texts, k=min_k, token_mu=mu, token_sigma=sd)


def lm_token_stats(
    target: Any, data: Any, *, batch_size: int, need_dist: bool
) -> tuple[list[Any], list[Any] | None, list[Any] | None]:
    """Next-token log-probs per sequence and, for Min-K%++, the mean and standard deviation of log p
    under the model's own next-token distribution at each position."""
    import torch

    if not need_dist:
        return target.token_logprobs(data, batch_size=batch_size), None, None
    n = len(data)
    lps: list[Any] = [None] * n
    mus: list[Any] = [None] * n
    sds: list[Any] = [None] * n
    model = target.model
    model.eval()
    with torch.no_grad():
        for idx, batch in target.batches(data, batch_size):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logp = torch.log_softmax(model(**inputs).logits[:, :-1, :].float(), dim=-1)
            tgt = batch["labels"][:, 1:]
            mask = tgt != -100
            lp = logp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            prob = logp.exp()
            mu = (prob * logp).sum(-1)
            sd = ((prob * logp * logp).sum(-1) - mu * mu).clamp_min(0).sqrt()
            for row, i in enumerate(idx):
                m = mask[row]
                lps[int(i)] = lp[row][m].double().cpu().numpy()
                mus[int(i)] = mu[row][m].double().cpu().numpy()
                sds[int(i)] = sd[row][m].double().cpu().numpy()
    return lps, mus, sds


def penultimate_features(target: Any, data: Any, *, batch_size: int) -> np.ndarray:
    """A representation of every example by `target`'s model, shape (n, d), float64: for Hugging Face text
    models the last hidden layer averaged over non-padding tokens (what sentence encoders such as MiniLM
    are trained to produce; a BERT pooler may be untrained); otherwise the input of the model's last linear
    layer in module order (the classification head), averaged over positions for sequences."""
    import torch

    model = target.model
    # target.batches may reorder the examples (text targets group similar lengths): every batch's rows go back
    # to the places its indices name, so row i is always example i
    if getattr(target, "tokenizer", None) is not None and hasattr(model, "config"):
        pooled: list[tuple[np.ndarray, np.ndarray]] = []
        model.eval()
        with torch.no_grad():
            for idx, batch in target.batches(data, batch_size):
                out = model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
                feats = _masked_mean(out.hidden_states[-1].float(), batch.get("attention_mask"))
                pooled.append((np.asarray(idx), feats.double().cpu().numpy()))
        return _in_order(pooled, len(data))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError(f"target {target.name!r} has no linear layer to read features from")
    captured: dict[str, Any] = {}
    hook = linears[-1].register_forward_pre_hook(lambda _m, args: captured.__setitem__("x", args[0].detach()))
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    is_lm = "causal_lm" in target.capabilities
    try:
        model.eval()
        with torch.no_grad():
            for idx, batch in target.batches(data, batch_size):
                if is_lm:
                    model(**{k: v for k, v in batch.items() if k != "labels"})
                else:
                    target.forward_logits(model, batch)
                x = captured.pop("x").float()
                if x.dim() == 3:
                    x = _masked_mean(x, batch.get("attention_mask"))
                rows.append((np.asarray(idx), x.reshape(len(x), -1).double().cpu().numpy()))
    finally:
        hook.remove()
    return _in_order(rows, len(data))


def _masked_mean(x: Any, mask: Any) -> Any:
    """(B, T, D) -> (B, D): the mean over the positions `mask` (B, T) marks (None: all of them)."""
    import torch

    w = (mask if mask is not None else torch.ones(x.shape[:2], device=x.device)).to(x.dtype)
    return (x * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)


def _in_order(parts: list[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """Rows of (indices, values) batches placed at their indices: (n, d), every row filled exactly once."""
    if not parts:
        return np.zeros((n, 0))
    out = np.full((n, parts[0][1].shape[1]), np.nan)
    seen = np.zeros(n, dtype=np.int64)
    for idx, values in parts:
        out[idx] = values
        np.add.at(seen, idx, 1)
    if not (seen == 1).all():
        raise RuntimeError(f"features: {int((seen != 1).sum())} of {n} examples were not computed exactly once")
    return out


def base_features(
    base: Any, audit: Any, *, is_clf: bool, num_labels: int | None, batch_size: int
) -> tuple[np.ndarray, str]:
    """Features of every audit example that do not depend on membership, for the quantile-regression attack,
    and a sentence saying what they are: the base model's representation (`penultimate_features`); for
    classifiers also the label (per-class difficulty matters), the base model's logits and its logit-scaled
    confidence in the true label."""
    feats = penultimate_features(base, audit, batch_size=batch_size if is_clf else max(1, batch_size // 4))
    source = (
        "the base model's representation (text: last hidden layer, mean over tokens; else the input of its "
        "last linear layer)"
    )
    if not is_clf:
        return feats, source
    k = int(max(audit.labels.max() + 1, num_labels or 0))
    base_logits = base.logits(audit, batch_size=batch_size)
    base_sig = classifier_signals(base_logits, audit.labels)
    feats = np.concatenate([feats, np.eye(k)[audit.labels], base_logits, base_sig["phi"][:, None]], axis=1)
    return feats, source + ", the label, the base model's logits and logit-scaled confidence"
