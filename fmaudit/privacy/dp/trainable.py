"""What DP-SGD trains: the `trainable` scopes ("all", "last_n_layers", "head", "lora") as a registry.

Each scope sets requires_grad on a target's model before training (LoRA: wraps the model in PEFT adapters)
and says what becomes of the model after training (LoRA: the adapters are merged back)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fmaudit.hints import did_you_mean
from fmaudit.privacy.dp.errors import DPConfigError
from fmaudit.tasks import CAUSAL_LM

# Attention projections adapted by LoRA when the caller names none (q_lin ...: DistilBERT).
_LORA_PROJECTIONS = frozenset(
    {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "query",
        "key",
        "value",
        "c_attn",
        "qkv",
        "q",
        "k",
        "v",
        "out_proj",
        "q_lin",
        "k_lin",
        "v_lin",
        "out_lin",
    }
)


def _by_target(target: Any, mode: str, n_layers: int, _lora: dict[str, Any] | None) -> None:
    target.set_trainable(mode, n_layers)


def _add_lora(target: Any, _mode: str, _n_layers: int, lora: dict[str, Any] | None) -> None:
    target.model = _lora_wrap(target, lora or {})


def _keep(_target: Any, _base_model: Any) -> None:
    """Nothing to undo: the trained parameters are the model's own."""


def _merge_lora(target: Any, base_model: Any) -> None:
    """Merge the adapters into the base weights: the model handed back is plain."""
    merged = target.model.merge_and_unload()
    target.model = merged if merged is not None else base_model


@dataclass(frozen=True)
class TrainableScope:
    """How one `trainable` choice selects the parameters (`select(target, mode, n_layers, lora)`), what it leaves
    after training (`finish(target, model before select)`), and what the loop's TrainConfig records for it."""

    select: Callable[[Any, str, int, dict[str, Any] | None], None]
    finish: Callable[[Any, Any], None] = _keep
    config_mode: str | None = None  # TrainConfig.trainable (a part of the cache key); None: the scope's name


TRAINABLE_SCOPES: dict[str, TrainableScope] = {
    "all": TrainableScope(_by_target),
    "last_n_layers": TrainableScope(_by_target),
    "head": TrainableScope(_by_target),
    "lora": TrainableScope(_add_lora, finish=_merge_lora, config_mode="keep"),
}
TRAINABLE = tuple(TRAINABLE_SCOPES)


def trainable_scope(trainable: str) -> TrainableScope:
    """The scope named `trainable`; DPConfigError for an unknown name."""
    try:
        return TRAINABLE_SCOPES[trainable]
    except KeyError:
        raise DPConfigError(
            [f"trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}" + did_you_mean(trainable, TRAINABLE)]
        ) from None


def apply_trainable(target: Any, trainable: str, n_layers: int, lora: dict[str, Any] | None) -> None:
    """Set requires_grad on target.model (for LoRA: replace target.model with a PEFT model)."""
    trainable_scope(trainable).select(target, trainable, n_layers, lora)


def _lora_wrap(target: Any, lora: dict[str, Any]) -> Any:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - peft is a dependency
        raise DPConfigError(["trainable='lora' needs the peft package: pip install peft"]) from exc
    from torch import nn

    model = target.model
    modules = lora.get("target_modules")
    if not modules:
        modules = _default_lora_modules(model)
    if not modules:
        raise DPConfigError(
            [
                f"trainable='lora': found no linear layers to adapt in {type(model).__name__}; "
                "name them with lora_target_modules"
            ]
        )
    cfg = LoraConfig(
        r=int(lora.get("r", 8)),
        lora_alpha=int(lora.get("alpha", 16)),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=list(modules),
        bias="none",
    )
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = get_peft_model(model, cfg)
    # Classifier heads are new: train them too (full, small).
    if target.task != CAUSAL_LM:
        for m in target.head_modules():
            for p in m.parameters():
                p.requires_grad_(True)
    assert isinstance(peft_model, nn.Module)
    return peft_model


def _default_lora_modules(model: Any) -> list[str]:
    """Attention projections by name (q/k/v/o, query/key/value, c_attn...), else every Linear in blocks."""
    from torch import nn

    def linear(m: Any) -> bool:
        return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"

    names = {
        name.rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if linear(m) and name.rsplit(".", 1)[-1] in _LORA_PROJECTIONS
    }
    if not names:  # unknown naming: every linear layer inside the repeated blocks (the largest ModuleList),
        # by full name (a short leaf name like "0" would also match unrelated modules)
        blocks = max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len, default=None)
        inside = {id(m) for m in blocks.modules()} if blocks is not None else set()
        names = {name for name, m in model.named_modules() if id(m) in inside and linear(m)}
    return sorted(names)
