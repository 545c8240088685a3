"""How useful a model is on data: the summary DP fine-tuning reports beside epsilon (and that audits compare
with the non-private model)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def utility_summary(target: Any, data: Any, *, max_examples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Accuracy + mean loss for classifiers; mean loss + perplexity for causal LMs, on at most `max_examples`
    examples of the fmaudit Dataset `data` (a seeded sample, Stream.EXAMPLE_SAMPLE); {} for no data."""
    if data is None or len(data) == 0:
        return {}
    from fmaudit.seeds import Stream

    data = data.sample(max_examples, seed, Stream.EXAMPLE_SAMPLE)
    out: dict[str, float] = {"num_examples": float(len(data))}
    if "classifier" in target.capabilities and data.labels is not None:
        from fmaudit.stats import softmax

        probs = softmax(target.logits(data))
        out["accuracy"] = float((probs.argmax(1) == data.labels).mean())
        out["loss"] = float(-np.log(np.clip(probs[np.arange(len(data)), data.labels], 1e-12, 1)).mean())
    elif "token_logprobs" in target.capabilities:
        lps = target.token_logprobs(data)
        tok = sum(len(x) for x in lps)
        nll = -sum(float(x.sum()) for x in lps) / max(tok, 1)
        out["loss"] = nll
        out["perplexity"] = float(math.exp(min(nll, 700)))
    return out
