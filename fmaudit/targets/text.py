"""Hugging Face text targets: sequence classifiers and causal LMs, with dynamic padding."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fmaudit.data import Dataset
from fmaudit.targets.base import ClassifierTarget, Target, TargetError
from fmaudit.tasks import CAUSAL_LM, TEXT_CLASSIFICATION


def position_offset(model: nn.Module) -> int:
    """First position id of a sequence as the model numbers positions itself: RoBERTa-style embeddings
    (RoBERTa, XLM-R, CamemBERT, ...) start after the padding index (`padding_idx + 1`), others at 0."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None) or model
    emb = getattr(base, "embeddings", None)
    pad = getattr(emb, "padding_idx", None)
    if isinstance(pad, int) and isinstance(getattr(emb, "position_embeddings", None), nn.Embedding):
        return pad + 1
    return 0


def uses_token_types(model: nn.Module) -> bool:
    """Whether the model has its own token type (segment) embeddings, whose default input is all zeros.
    GPT-2 also takes `token_type_ids` but embeds them with its word embeddings: zeros there are not its default."""
    return any(name.endswith("token_type_embeddings") for name, _ in model.named_modules())


class _TokenizedDataset(torch.utils.data.Dataset):
    def __init__(self, input_ids: list[list[int]], labels: np.ndarray | None):
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"input_ids": self.input_ids[i]}
        if self.labels is not None:
            item["label"] = int(self.labels[i])
        return item


class _TextMixin:
    """Tokenization, dynamic padding and length-sorted inference batches."""

    tokenizer: Any
    max_length: int
    model: nn.Module

    def _init_text(self) -> None:
        fwd = inspect.signature(self.model.forward).parameters
        # Explicit position_ids: Opacus' per-sample gradients of position embeddings need them
        # (built with arange().repeat(), not expand(), which breaks ghost clipping).
        self._pass_position_ids = "position_ids" in fwd
        self._position_offset = position_offset(self.model)
        self._pass_token_type_ids = "token_type_ids" in fwd and uses_token_types(self.model)
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token_id is None:
                raise TargetError("the tokenizer has neither a pad token nor an eos token to pad with")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        cfg = getattr(self.model, "config", None)
        if cfg is not None and getattr(cfg, "pad_token_id", 0) is None:
            # Sequence classifiers that pool the last token (GPT-2, Llama, ...) find it by the config's pad id;
            # without one they refuse every batch of more than one text
            cfg.pad_token_id = self.tokenizer.pad_token_id
        self._cache: dict[str, list[list[int]]] = {}

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, add_special_tokens=True)
        return [list(x) for x in enc["input_ids"]]

    def _ids_for(self, data: Dataset) -> list[list[int]]:
        if data.texts is None:
            raise TargetError(f"dataset {data.name!r} has no texts; a text target needs text data")
        key = data.fingerprint
        if key not in self._cache:
            self._cache = {key: self.tokenize(data.texts)}  # keep one: memory stays bounded
        return self._cache[key]

    def torch_dataset(self, data: Dataset) -> torch.utils.data.Dataset:
        return _TokenizedDataset(self._ids_for(data), data.labels)

    def pad(self, seqs: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        n = len(seqs)
        length = max((len(s) for s in seqs), default=1) or 1
        ids = torch.full((n, length), int(self.tokenizer.pad_token_id), dtype=torch.long)
        mask = torch.zeros((n, length), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if self._pass_position_ids:
            off = self._position_offset
            batch["position_ids"] = torch.arange(off, off + length, dtype=torch.long).repeat(n, 1)
        if self._pass_token_type_ids:
            batch["token_type_ids"] = torch.zeros((n, length), dtype=torch.long)
        return batch

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.pad([it["input_ids"] for it in items])
        if items and "label" in items[0]:
            batch["labels"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
        return batch

    def encode_texts(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Model inputs for raw strings (dynamic padding), on the target's device."""
        return self.to_device(self.pad(self.tokenize(texts)))  # type: ignore[attr-defined]

    def batches(self, data: Dataset, batch_size: int) -> Iterable[tuple[np.ndarray, dict[str, torch.Tensor]]]:
        ids = self._ids_for(data)
        order = np.argsort([len(s) for s in ids], kind="stable")  # similar lengths together: less padding
        ds = self.torch_dataset(data)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield idx, self.to_device(self.collate([ds[int(i)] for i in idx]))  # type: ignore[attr-defined]


class TextClassifier(_TextMixin, ClassifierTarget):
    """A Hugging Face sequence classifier (BERT, DistilBERT, RoBERTa, ... any local checkpoint)."""

    task = TEXT_CLASSIFICATION
    kind = TEXT_CLASSIFICATION

    def __init__(
        self,
        *,
        name: str,
        model: nn.Module,
        tokenizer: Any,
        source: str,
        device: str = "cpu",
        max_length: int = 128,
        label_names: list[str] | None = None,
    ):
        super().__init__(name=name, model=model, source=source, device=device, label_names=label_names)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._init_text()

    def forward_logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = model(**inputs)
        return out.logits if hasattr(out, "logits") else out

    def logits_texts(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Logits for raw strings (used by attacks and explanations)."""
        data = Dataset("adhoc", "adhoc", "text", [str(i) for i in range(len(texts))], texts=list(texts))
        return self.logits(data, batch_size)

    def embedding_layer(self) -> nn.Module:
        layer: nn.Module = self.model.get_input_embeddings()  # type: ignore[operator]  # an HF PreTrainedModel
        return layer


class CausalLM(_TextMixin, Target):
    """A Hugging Face causal LM (any local checkpoint; GGUF files through transformers' gguf_file)."""

    task = CAUSAL_LM
    kind = CAUSAL_LM

    def __init__(
        self, *, name: str, model: nn.Module, tokenizer: Any, source: str, device: str = "cpu", max_length: int = 128
    ):
        super().__init__(name=name, model=model, source=source, device=device)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._init_text()
        self._pass_token_type_ids = False

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.pad([it["input_ids"] for it in items])
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
        return batch

    def _token_nll(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits[:, :-1, :].float()
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        nll = nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.clamp_min(0).reshape(-1), reduction="none"
        ).view_as(targets)
        return nll * mask, mask

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
        nll, mask = self._token_nll(model, batch)
        per_seq = nll.sum(1) / mask.sum(1).clamp_min(1)
        if reduction == "none":
            return per_seq
        if reduction == "sum":
            return per_seq.sum()
        return nll.sum() / mask.sum().clamp_min(1)  # token-weighted mean, the usual LM loss

    @torch.no_grad()
    def token_logprobs(self, data: Dataset, batch_size: int = 8) -> list[np.ndarray]:
        """Log-probability of each next token, per sequence (first token excluded)."""
        self.model.eval()
        out: list[np.ndarray | None] = [None] * len(data)
        for idx, batch in self.batches(data, batch_size):
            nll, mask = self._token_nll(self.model, batch)
            for row, i in enumerate(idx):
                m = mask[row].bool()
                out[int(i)] = (-nll[row][m]).double().cpu().numpy()
        return [o if o is not None else np.zeros(0) for o in out]

    @torch.no_grad()
    def token_counts(self, data: Dataset) -> np.ndarray:
        return np.array([max(len(s) - 1, 0) for s in self._ids_for(data)], dtype=np.int64)
