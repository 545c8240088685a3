"""The Target protocol: a wrapped model that states its capabilities and gives each library what it
expects (one logits tensor for Opacus / torchattacks / Captum; batched, dynamically padded inputs)."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fmaudit.data import Dataset, Split
from fmaudit.tasks import CAPABILITIES

if TYPE_CHECKING:  # pragma: no cover
    from fmaudit.provenance import Provenance


class TargetError(ValueError):
    """A model that cannot be loaded or used as asked."""


def hook_count(model: nn.Module) -> int:
    """Forward / backward hooks on the model's modules (Captum and Opacus calls must leave none behind)."""
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(getattr(m, "_backward_pre_hooks", {}))
        for m in model.modules()
    )


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over parameter/buffer names, dtypes, shapes and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(name.encode() + b"\x00" + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        # reshape(-1) first: a 0-dimensional tensor (a scalar parameter, e.g. a temperature) cannot be viewed
        # as bytes directly when its element is wider than one byte
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class Target:
    """Base class. Subclasses: TextClassifier, CausalLM, ImageClassifier (fmaudit.targets)."""

    task: str
    kind: str

    def __init__(
        self, *, name: str, model: nn.Module, source: str, device: str = "cpu", label_names: list[str] | None = None
    ):
        self.name = name
        self.model = model
        self.source = source
        self.device = torch.device(device)
        self.label_names = label_names
        self.split: Split | None = None
        self.provenance: Provenance | None = None  # how the run trained it (None: used as given)
        self.cache_hit: bool | None = None
        self.produced_by: str | None = None
        self._sha: str | None = None
        self.model.to(self.device)
        self.model.eval()

    # -- identity ------------------------------------------------------------------------------------
    @property
    def capabilities(self) -> frozenset[str]:
        return CAPABILITIES[self.task]

    @property
    def num_labels(self) -> int | None:
        return None

    @property
    def architecture(self) -> str:
        return type(self.model).__name__

    def weights_sha256(self) -> str:
        if self._sha is None:
            self._sha = state_dict_sha256(self.model)
        return self._sha

    def weights_changed(self) -> None:
        """Call after changing weights in place (training) so the hash is recomputed."""
        self._sha = None

    def describe(self):  # -> TargetInfo
        from fmaudit.report import TargetInfo

        params = list(self.model.parameters())
        return TargetInfo(
            name=self.name,
            kind=self.kind,
            source=self.source,
            architecture=self.architecture,
            num_parameters=sum(p.numel() for p in params),
            num_trainable_parameters=sum(p.numel() for p in params if p.requires_grad),
            weights_sha256=self.weights_sha256(),
            capabilities=sorted(self.capabilities),
            num_labels=self.num_labels,
            finetune=self.provenance.to_report() if self.provenance is not None else None,
            split=self.split.info() if self.split is not None else None,
            produced_by=self.produced_by,
            cache_hit=self.cache_hit,
        )

    def copy(self, name: str | None = None) -> Target:
        """A deep copy (weights included) that can be trained without touching this target."""
        new = copy.copy(self)
        new.model = copy.deepcopy(self.model)
        new.name = name or self.name
        new._sha = None
        return new

    # -- data -> tensors -----------------------------------------------------------------------------
    def torch_dataset(self, data: Dataset) -> torch.utils.data.Dataset:
        """Per-example items that `collate` batches (used by the training loop and Opacus' loaders)."""
        raise NotImplementedError

    def collate(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()}

    def batches(self, data: Dataset, batch_size: int) -> Iterable[tuple[np.ndarray, dict[str, torch.Tensor]]]:
        """Inference batches in data order (indices, tensors on the target's device)."""
        ds = self.torch_dataset(data)
        for start in range(0, len(data), batch_size):
            idx = np.arange(start, min(start + batch_size, len(data)))
            yield idx, self.to_device(self.collate([ds[int(i)] for i in idx]))

    # -- training ------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
        """Training loss of `model` (this target's model or a wrapped copy) on one collated batch."""
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks (transformer layers / conv stages), first to last."""
        best: nn.ModuleList | None = None
        for mod in self.model.modules():
            if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (best is None or len(mod) > len(best)):
                best = mod
        if best is not None:
            return list(best)
        return [m for m in self.model.children() if any(True for _ in m.parameters())]

    def head_modules(self) -> list[nn.Module]:
        """Modules outside the backbone (classification head, pooler)."""
        prefix = getattr(self.model, "base_model_prefix", None)
        if prefix and hasattr(self.model, prefix):
            base = getattr(self.model, prefix)
            out: list[nn.Module] = [m for n, m in self.model.named_children() if m is not base]
            pooler = getattr(base, "pooler", None)
            if pooler is not None:
                out.append(pooler)
            return out
        linears: list[nn.Module] = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        return linears[-1:]

    def set_trainable(self, mode: str = "all", n_layers: int = 2) -> None:
        """Freeze / unfreeze parameters: all, last_n_layers (+ head), or head only."""
        if mode == "all":
            for p in self.model.parameters():
                p.requires_grad_(True)
            return
        for p in self.model.parameters():
            p.requires_grad_(False)
        chosen = list(self.head_modules())
        if mode == "last_n_layers":
            chosen += self.blocks()[-n_layers:]
        elif mode != "head":
            raise TargetError(f"unknown trainable mode {mode!r} (all | last_n_layers | head)")
        for m in chosen:
            for p in m.parameters():
                p.requires_grad_(True)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise TargetError(f"trainable={mode!r} left no trainable parameter in {self.architecture}")

    # -- inference -----------------------------------------------------------------------------------
    @torch.no_grad()
    def per_example_loss(self, data: Dataset, batch_size: int = 32) -> np.ndarray:
        self.model.eval()
        out = np.zeros(len(data), dtype=np.float64)
        for idx, batch in self.batches(data, batch_size):
            out[idx] = self.loss(self.model, batch, reduction="none").double().cpu().numpy()
        return out


class ClassifierTarget(Target):
    """A target with logits over a fixed set of labels."""

    @property
    def num_labels(self) -> int | None:
        cfg = getattr(self.model, "config", None)
        if cfg is not None and getattr(cfg, "num_labels", None):
            return int(cfg.num_labels)
        return len(self.label_names) if self.label_names else None

    def forward_logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
        logits = self.forward_logits(model, batch)
        return nn.functional.cross_entropy(logits, batch["labels"], reduction=reduction)

    @torch.no_grad()
    def logits(self, data: Dataset, batch_size: int = 32) -> np.ndarray:
        self.model.eval()
        out: np.ndarray | None = None
        for idx, batch in self.batches(data, batch_size):
            lg = self.forward_logits(self.model, batch).double().cpu().numpy()
            if out is None:
                out = np.zeros((len(data), lg.shape[1]), dtype=np.float64)
            out[idx] = lg
        return out if out is not None else np.zeros((0, self.num_labels or 0))

    def predict(self, data: Dataset, batch_size: int = 32) -> np.ndarray:
        return self.logits(data, batch_size).argmax(axis=1)


def call_with_supported_kwargs(fn: Callable[..., Any], **kwargs: Any) -> Any:
    import inspect

    sig = inspect.signature(fn)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in sig.parameters})
