"""The settings of a DP run: DP-specific training defaults, validation of what the caller asked for, and the
resolved plan (`DPSettings`) that the training loop, the accountant and the cache key all read."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fmaudit.privacy.dp.accounting import ACCOUNTANTS, noise_for
from fmaudit.privacy.dp.clipping import CLIPPING
from fmaudit.privacy.dp.trainable import TRAINABLE

# Li et al. (ICLR 2022), "Large Language Models Can Be Strong Differentially Private Learners": DP-Adam, large
# logical batches, a learning rate well above non-private fine-tuning's, few epochs.
DP_DEFAULT_EPOCHS = 3
DP_DEFAULT_LR = {"all": 5e-4, "other": 1e-3}  # full fine-tuning; few trainable parameters (head, last layers, LoRA)
DP_MAX_DEFAULT_BATCH = 1024


@dataclass(frozen=True)
class DPSettings:
    """Everything that determines a DP run (and its cache key): built once, after validation, by `plan`."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    steps_per_epoch: int
    epochs: int
    batch_size: int
    max_physical_batch_size: int
    delta: float
    accountant: str
    clipping: str
    trainable: str
    n_layers: int
    lora: dict[str, Any] | None
    lr: float
    weight_decay: float
    seed: int
    target_epsilon: float | None

    @classmethod
    def plan(
        cls,
        *,
        n: int,
        epochs: int,
        batch_size: int,
        lr: float,
        weight_decay: float,
        target_epsilon: float | None,
        noise_multiplier: float | None,
        delta: float,
        max_grad_norm: float,
        accountant: str,
        clipping: str,
        trainable: str,
        n_layers: int,
        lora: dict[str, Any] | None,
        max_physical_batch_size: int | None,
        seed: int,
    ) -> DPSettings:
        """The run for validated settings on `n` examples: ceil(N / batch_size) Poisson steps per epoch at
        sample rate 1 / steps_per_epoch, and the noise the accountant picks for `target_epsilon` (unless a
        noise multiplier is given). `clipping` is the resolved mode ("ghost", "hooks" or "bookkeeping", see
        `preflight` and `clipping.CLIPPING_MODES`)."""
        steps_per_epoch = math.ceil(n / batch_size)
        sample_rate = 1.0 / steps_per_epoch
        steps = epochs * steps_per_epoch
        if noise_multiplier is None:
            assert target_epsilon is not None  # validated: exactly one of the two is given
            noise_multiplier = noise_for(
                target_epsilon=float(target_epsilon),
                sample_rate=sample_rate,
                steps=steps,
                delta=delta,
                accountant=accountant,
            )
        return cls(
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(max_grad_norm),
            sample_rate=sample_rate,
            steps=steps,
            steps_per_epoch=steps_per_epoch,
            epochs=epochs,
            batch_size=batch_size,
            max_physical_batch_size=int(max_physical_batch_size or default_physical_batch(batch_size)),
            delta=float(delta),
            accountant=accountant,
            clipping=clipping,
            trainable=trainable,
            n_layers=n_layers,
            lora=lora,
            lr=float(lr),
            weight_decay=float(weight_decay),
            seed=seed,
            target_epsilon=None if target_epsilon is None else float(target_epsilon),
        )


def default_delta(n: int) -> float:
    """min(1e-5, 1/(10 N)): always well below 1/N."""
    return min(1e-5, 1.0 / (10.0 * n))


def default_physical_batch(batch_size: int) -> int:
    """Expected batch + 3 standard deviations of the Poisson batch size: logical batches are rarely split
    (each split costs a forward/backward), and memory stays bounded."""
    return int(batch_size + math.ceil(3 * math.sqrt(batch_size)))


def lora_config(
    trainable: str, *, r: int, alpha: int, dropout: float, target_modules: Sequence[str] | None
) -> dict[str, Any] | None:
    """The LoRA settings as the run records them (None unless trainable is "lora")."""
    if trainable != "lora":
        return None
    return {
        "r": r,
        "alpha": alpha,
        "dropout": dropout,
        "target_modules": list(target_modules) if target_modules else None,
    }


def dp_defaults(
    n: int, *, epochs: int | None, batch_size: int | None, lr: float | None, trainable: str
) -> tuple[int | None, int | None, float | None, dict[str, Any]]:
    """Fill the training settings the caller left out with DP-specific defaults (Li et al., ICLR 2022: large
    logical batches, a higher learning rate, few epochs; the loop's optimizer is Adam(W), i.e. DP-Adam).
    Returns (epochs, batch_size, lr, picked): `picked` names each default taken and why."""
    picked: dict[str, Any] = {}
    if batch_size is None and n > 0:
        # about N/10 (a sample rate near 0.1), capped at 1024 and at N/4 (at least four steps per epoch)
        batch_size = int(max(1, min(DP_MAX_DEFAULT_BATCH, max(n // 10, min(16, n // 4)))))
        picked["batch_size"] = batch_size
    if lr is None:
        lr = DP_DEFAULT_LR["all" if trainable == "all" else "other"]
        picked["lr"] = lr
    if epochs is None:
        epochs = DP_DEFAULT_EPOCHS
        picked["epochs"] = epochs
    return epochs, batch_size, lr, picked


def defaults_note(picked: dict[str, Any], n: int) -> str:
    """The note that says which defaults `dp_defaults` picked, and why."""
    why = {
        "batch_size": f"about N/10 of N = {n} (capped at {DP_MAX_DEFAULT_BATCH}): large logical batches shrink "
        "the noise on the averaged gradient",
        "lr": "DP-Adam with a learning rate above non-private fine-tuning's",
        "epochs": "few epochs: each one spends privacy",
    }
    parts = [f"{k}={v:g} ({why[k]})" for k, v in picked.items()]
    return (
        "DP training defaults picked because none were given (Li et al., ICLR 2022): "
        + "; ".join(parts)
        + ". Tuning them on the private data spends privacy the ledger does not count."
    )


def validate_settings(
    *,
    n: int | None,
    target_epsilon: Any,
    noise_multiplier: Any,
    delta: Any,
    max_grad_norm: Any,
    epochs: Any,
    batch_size: Any,
    lr: Any,
    accountant: str,
    trainable: str,
    clipping: str,
    max_physical_batch_size: Any,
    n_layers: Any,
) -> list[str]:
    """Every problem with the settings a caller asked for, for `n` training examples (None: not known yet)."""
    p: list[str] = []
    if target_epsilon is None and noise_multiplier is None:
        p.append("give target_epsilon (the budget; the accountant picks the noise) or noise_multiplier")
    if target_epsilon is not None and noise_multiplier is not None:
        p.append("give target_epsilon or noise_multiplier, not both")
    if target_epsilon is not None and not (
        isinstance(target_epsilon, (int, float)) and target_epsilon > 0 and math.isfinite(target_epsilon)
    ):
        p.append(
            f"target_epsilon must be a positive finite number, got {target_epsilon!r} "
            "(epsilon <= 0 would mean perfect privacy, which no training can give)"
        )
    if noise_multiplier is not None and not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        p.append(f"noise_multiplier must be > 0, got {noise_multiplier!r}")
    if delta is not None and not (0 < delta < 1):
        p.append(
            f"delta must be in (0, 1), got {delta!r}"
            + (" (delta >= 1 gives no guarantee at all)" if delta >= 1 else "")
        )
    if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        p.append(f"max_grad_norm must be > 0, got {max_grad_norm!r}")
    if not (isinstance(epochs, int) and epochs >= 1):
        p.append(f"epochs must be an integer >= 1, got {epochs!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        p.append(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not lr > 0:
        p.append(f"lr must be > 0, got {lr!r}")
    for name, value, allowed in (
        ("accountant", accountant, ACCOUNTANTS),
        ("trainable", trainable, TRAINABLE),
        ("clipping", clipping, CLIPPING),
    ):
        if value not in allowed:
            p.append(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    if max_physical_batch_size is not None and max_physical_batch_size < 1:
        p.append(f"max_physical_batch_size must be >= 1, got {max_physical_batch_size!r}")
    if n_layers < 1:
        p.append(f"n_layers must be >= 1, got {n_layers!r}")
    if n is not None and isinstance(batch_size, int):
        p += _data_size_problems(n, batch_size)
    return p


def _data_size_problems(n: int, batch_size: int) -> list[str]:
    """Poisson subsampling needs several batches per epoch to amplify privacy."""
    if n == 0:
        return ["the training set is empty"]
    if n < batch_size:
        return [
            f"the training set has {n} examples, fewer than batch_size {batch_size}: Poisson sampling "
            f"would sample every example in every step (sample rate >= 1) and give no privacy "
            f"amplification; use more data or a batch_size of at most {max(1, n // 4)}"
        ]
    if n < 2 * batch_size:
        return [
            f"the training set has {n} examples for batch_size {batch_size}: at least 2 batches per epoch "
            "are needed for subsampling to mean anything; lower batch_size"
        ]
    return []
