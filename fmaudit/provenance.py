"""Where a fine-tuned target came from: a frozen record every module reads the same way.

The runner fills `target.provenance` after the recipe's fine-tune; privacy.dp_finetune fills it for the DP
target it produces. Membership inference trains its reference models with `provenance.train`, the canary
audit re-runs `provenance.train` or `provenance.dp`, and `base_target` checks `base_weights_sha256`.
A target the recipe did not fine-tune has `provenance = None`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from fmaudit.training import TrainConfig


@dataclass(frozen=True)
class DPRecord:
    """Everything a DP fine-tune ran with and spent: enough to re-run exactly that procedure (the canary
    audit does) and to recompute its accounting. The noise seed is deliberately not recorded."""

    epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    epochs: int
    batch_size: int
    accountant: str
    clipping: str
    trainable: str
    lr: float
    weight_decay: float = 0.0
    n_layers: int = 2
    lora: Mapping[str, Any] | None = None
    max_physical_batch_size: int | None = None
    steps_per_epoch: int = 0
    target_epsilon: float | None = None
    epsilon_accountant: str = ""
    epsilon_gdp: float | None = None
    epsilon_by_accountant: Mapping[str, float] = field(default_factory=dict)
    epsilon_per_epoch: tuple[float, ...] = ()
    num_trainable_parameters: int = 0
    num_train_examples: int = 0
    empty_batches: int = 0

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> DPRecord:
        """From `DPResult.params()` (or a report's `finetune.dp`); unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in params.items() if k in known}
        if kw.get("lora") is not None:
            kw["lora"] = dict(kw["lora"])
        kw["epsilon_by_accountant"] = dict(kw.get("epsilon_by_accountant") or {})
        kw["epsilon_per_epoch"] = tuple(kw.get("epsilon_per_epoch") or ())
        return cls(**kw)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, the shape `DPResult.params()` has (reports, canary re-runs)."""
        out = asdict(self)
        out["lora"] = dict(self.lora) if self.lora is not None else None
        out["epsilon_by_accountant"] = dict(self.epsilon_by_accountant)
        out["epsilon_per_epoch"] = list(self.epsilon_per_epoch)
        return out


@dataclass(frozen=True)
class Provenance:
    """How a target was trained in this run. `train` is the non-private fine-tune's settings (None for a DP
    target: its procedure is `dp`); `start` says which weights training began from."""

    data: str | None = None
    train: TrainConfig | None = None
    dp: DPRecord | None = None
    base_weights_sha256: str | None = None
    cache_key: str | None = None
    seed: int | None = None
    steps: int | None = None
    epoch_losses: tuple[float, ...] = ()
    train_seconds: float | None = None
    start: str | None = None

    def to_report(self) -> dict[str, Any]:
        """The report's `targets[].finetune`."""
        out: dict[str, Any] = {
            "data": self.data,
            "seed": self.seed,
            "base_weights_sha256": self.base_weights_sha256,
            "cache_key": self.cache_key,
            "steps": self.steps,
            "epoch_losses": list(self.epoch_losses),
            "train_seconds": self.train_seconds,
        }
        if self.train is not None:
            out["config"] = {k: v for k, v in asdict(self.train).items() if k != "seed"}
        if self.dp is not None:
            out["dp"] = self.dp.as_dict()
        if self.start is not None:
            out["start"] = self.start
        return out
