"""Any nn.Module (plain, Hugging Face, PEFT) behind the Target interface the DP loop trains, on map-style torch
data (`TorchData`): batches keep the user's form (tuples or dicts), the default loss is per example."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fmaudit.tasks import CAUSAL_LM

LossFunction = Callable[[Any, Any], Any]
_LABEL_KEYS = ("labels", "label")
_TUPLE_PREFIX = "__item"  # internal dict keys of a tuple batch: __item0, __item1, ... (the loop moves dicts)


class TorchData:
    """A map-style torch Dataset seen the way the DP loop sees data (len, name, subset)."""

    labels = None
    label_names = None

    def __init__(self, dataset: Any, name: str):
        self.dataset = dataset
        self.name = name

    def __len__(self) -> int:
        return len(self.dataset)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TorchData:
        import torch

        return TorchData(torch.utils.data.Subset(self.dataset, [int(i) for i in indices]), self.name)


def _pad_value(key: str, pad_id: int) -> int:
    return {"input_ids": pad_id, "labels": -100, "label": -100}.get(key, 0)


def collate_items(items: Sequence[Any], pad_id: int) -> Any:
    """torch's default_collate, with 1-D sequences of different lengths in dict items (tokenized text) padded
    on the right (input_ids with the pad id, labels with -100, the rest with 0) and an attention mask added."""
    import torch

    first = items[0]
    if not isinstance(first, dict):
        return torch.utils.data.default_collate(list(items))
    out: dict[str, Any] = {}
    for key in first:
        vals = [it[key] for it in items]
        if isinstance(vals[0], str):
            continue
        ts = [torch.as_tensor(v) for v in vals]
        if all(t.shape == ts[0].shape for t in ts):
            out[key] = torch.stack(ts)
            continue
        if not all(t.dim() == 1 for t in ts):
            raise ValueError(f"column {key!r} has items of different shapes {[tuple(t.shape) for t in ts[:3]]}")
        length = max(len(t) for t in ts)
        batch = torch.full((len(ts), length), _pad_value(key, pad_id), dtype=ts[0].dtype)
        for i, t in enumerate(ts):
            batch[i, : len(t)] = t
        out[key] = batch
        if key == "input_ids" and "attention_mask" not in first:
            mask = torch.zeros((len(ts), length), dtype=torch.long)
            for i, t in enumerate(ts):
                mask[i, : len(t)] = 1
            out["attention_mask"] = mask
    return out


def _to_internal(batch: Any) -> dict[str, Any]:
    """A collated batch as the loop moves it: a dict of tensors (tuples under __item0, __item1, ...)."""
    import torch

    if isinstance(batch, (tuple, list)):
        return {f"{_TUPLE_PREFIX}{i}": torch.as_tensor(v) for i, v in enumerate(batch)}
    if hasattr(batch, "items"):  # dict, transformers' BatchEncoding
        out = {k: v for k, v in batch.items() if torch.is_tensor(v)}
        if "label" in out and "labels" not in out:
            out["labels"] = out.pop("label")
        return out
    return {f"{_TUPLE_PREFIX}0": torch.as_tensor(batch)}


def _to_user(batch: dict[str, Any]) -> Any:
    """The batch in the user's form: a tuple for tuple items, else the dict."""
    keys = list(batch)
    if keys and all(k.startswith(_TUPLE_PREFIX) for k in keys):
        return tuple(batch[f"{_TUPLE_PREFIX}{i}"] for i in range(len(keys)))
    return batch


def output_logits(out: Any) -> Any:
    """The logits of a model's output: `.logits`, the first element of a tuple, or the output itself."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def module_target(
    model: Any,
    *,
    task: str,
    loss_fn: LossFunction | None = None,
    collate: Any = None,
    name: str | None = None,
    pad_id: int = 0,
) -> Any:
    """Any nn.Module (plain, Hugging Face, PEFT) behind the Target interface the DP loop trains.

    Batches keep the user's form: `(x, y)` tuples call `model(x)` (all but the last element) with labels the
    last element; dicts call `model(**inputs)` with the keys the forward accepts (labels / label excluded).
    The default loss is per-example cross-entropy on the logits (classifiers) or the per-sequence mean
    next-token loss (causal LMs); `loss_fn(model, batch) -> tensor[B]` replaces it, and gets the batch in the
    user's form (a tuple of tensors, or the dict). `collate` replaces the default batching (torch's
    default_collate, with tokenized sequences padded on the right)."""
    return _module_target_class()(
        model, task=task, loss_fn=loss_fn, collate=collate, name=name or type(model).__name__, pad_id=pad_id
    )


@functools.lru_cache(maxsize=1)
def _module_target_class() -> type:
    """The Target subclass behind `module_target` (built on first use: torch is imported late)."""
    import inspect

    import torch
    from torch import nn

    from fmaudit.targets.base import Target

    class ModuleTarget(Target):
        kind = "torch-module"

        def __init__(
            self, model: nn.Module, *, task: str, loss_fn: LossFunction | None, collate: Any, name: str, pad_id: int
        ):
            params = list(model.parameters())
            device = str(params[0].device) if params else "cpu"
            was_training = model.training
            super().__init__(name=name, model=model, source="python", device=device)
            model.train(was_training)  # Target.__init__ sets eval(); the caller's module is left as it was
            self.task = task
            self.user_loss = loss_fn
            self.user_collate = collate
            self.pad_id = pad_id
            fwd = inspect.signature(model.forward).parameters
            self._var_kw = any(p.kind is p.VAR_KEYWORD for p in fwd.values())
            self._accepts = set(fwd)
            # Explicit position / token type ids, built with repeat (per-example rows for per-sample gradients)
            from fmaudit.targets.text import position_offset, uses_token_types

            self._pass_position_ids = "position_ids" in fwd
            self._position_offset = position_offset(model)  # RoBERTa-style: positions start at padding_idx + 1
            self._pass_token_type_ids = "token_type_ids" in fwd and uses_token_types(model)
            # accuracy needs the default forward and labels; `_dry_run` says whether they work with a custom loss
            self.accuracy_from_forward = task != CAUSAL_LM and loss_fn is None

        @property
        def capabilities(self) -> frozenset[str]:
            kind = "causal_lm" if self.task == CAUSAL_LM else "classifier"
            return frozenset({kind, "per_example_loss", "trainable"})

        @property
        def is_peft(self) -> bool:
            return hasattr(self.model, "peft_config") and hasattr(self.model, "get_base_model")

        # -- data -------------------------------------------------------------------------------------
        def torch_dataset(self, data: TorchData) -> Any:  # type: ignore[override]  # torch data, not a Dataset
            return data.dataset

        def collate(self, items: Sequence[Any]) -> dict[str, Any]:
            batch = _to_internal(
                self.user_collate(list(items)) if self.user_collate is not None else collate_items(items, self.pad_id)
            )
            ids = batch.get("input_ids")
            if ids is not None and ids.dim() == 2:
                n, length = ids.shape
                if self._pass_position_ids and "position_ids" not in batch:
                    off = self._position_offset
                    batch["position_ids"] = torch.arange(off, off + length, dtype=torch.long).repeat(n, 1)
                if self._pass_token_type_ids and "token_type_ids" not in batch:
                    batch["token_type_ids"] = torch.zeros((n, length), dtype=torch.long)
            return batch

        def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
            return {k: v.to(self.device) for k, v in batch.items()}

        # -- model ------------------------------------------------------------------------------------
        def forward(self, model: nn.Module, batch: dict[str, Any]) -> Any:
            user = _to_user(batch)
            if isinstance(user, tuple):
                if len(user) < 2:
                    raise ValueError("tuple items need inputs and a label, (x, y); or give loss_fn")
                return model(*user[:-1])
            inputs = {k: v for k, v in batch.items() if k not in _LABEL_KEYS and (self._var_kw or k in self._accepts)}
            return model(**inputs)

        def labels(self, batch: dict[str, Any]) -> Any:
            user = _to_user(batch)
            if isinstance(user, tuple):
                return user[-1] if len(user) >= 2 else None
            return batch.get("labels")

        def token_nll(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Any, Any]:
            logits = output_logits(self.forward(model, batch))[:, :-1, :].float()
            labels = batch.get("labels")
            if labels is None:
                labels = batch["input_ids"].clone()
                if "attention_mask" in batch:
                    labels[batch["attention_mask"] == 0] = -100
            targets = labels[:, 1:]
            mask = targets != -100
            nll = nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), targets.clamp_min(0).reshape(-1), reduction="none"
            ).view_as(targets)
            return nll * mask, mask

        def loss(self, model: nn.Module, batch: dict[str, Any], reduction: str = "mean") -> Any:
            if self.user_loss is not None:
                per = self.user_loss(model, _to_user(batch))
            elif self.task == CAUSAL_LM:
                nll, mask = self.token_nll(model, batch)
                per = nll.sum(1) / mask.sum(1).clamp_min(1)  # the privacy unit is one sequence
            else:
                labels = self.labels(batch)
                if labels is None:
                    raise ValueError(
                        "the batch has no labels (give (x, y) tuples, a 'labels' / 'label' column, or loss_fn)"
                    )
                logits = output_logits(self.forward(model, batch))
                per = nn.functional.cross_entropy(logits.float(), labels.long(), reduction="none")
            if reduction == "none":
                return per
            return per.sum() if reduction == "sum" else per.mean()

        def set_trainable(self, mode: str = "all", n_layers: int = 2) -> None:
            if mode == "all" and self.is_peft:
                return  # a PEFT model given as is: its adapters (and modules_to_save) are what trains
            super().set_trainable(mode, n_layers)

        # -- evaluation -------------------------------------------------------------------------------
        @torch.no_grad()
        def evaluate(
            self, data: TorchData | None, max_examples: int = 1000, seed: int = 0, batch_size: int = 64
        ) -> dict[str, float]:
            """Mean per-example loss (the training loss); accuracy (classifiers whose output is (B, C) logits
            and whose batch has labels); perplexity (causal LMs, token-weighted)."""
            if data is None or len(data) == 0:
                return {}
            idx = np.arange(len(data))
            if len(data) > max_examples:
                from fmaudit.seeds import Stream, rng

                idx = np.sort(rng(seed, Stream.EXAMPLE_SAMPLE).choice(len(data), max_examples, replace=False))
            ds = data.dataset
            self.model.eval()
            total, correct, counted, tok_nll, toks = 0.0, 0, 0, 0.0, 0
            for start in range(0, len(idx), batch_size):
                batch = self.to_device(self.collate([ds[int(i)] for i in idx[start : start + batch_size]]))
                total += float(self.loss(self.model, batch, reduction="sum"))
                if self.task == CAUSAL_LM:
                    nll, mask = self.token_nll(self.model, batch)
                    tok_nll += float(nll.sum())
                    toks += int(mask.sum())
                    continue
                if not self.accuracy_from_forward:
                    continue
                labels = self.labels(batch)
                logits = output_logits(self.forward(self.model, batch))
                if logits.dim() == 2 and labels.dim() == 1 and logits.shape[0] == len(labels):
                    correct += int((logits.argmax(1) == labels).sum())
                    counted += len(labels)
            out = {"num_examples": float(len(idx)), "loss": total / len(idx)}
            if counted == len(idx):
                out["accuracy"] = correct / counted
            if toks:
                out["perplexity"] = float(math.exp(min(tok_nll / toks, 700)))
            return out

    return ModuleTarget
