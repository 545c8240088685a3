"""What the canary run re-runs: the audited training procedure, with its recorded settings (a fine-tune config,
or a DP run's record), on the members plus the included canaries; and the delta rule for DP runs."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmaudit.data import Dataset, Split

# privacy.dp_finetune's defaults: used (and reported) only for keys an older report did not record.
DP_DEFAULTS: dict[str, Any] = {
    "lr": 5e-4,
    "weight_decay": 0.0,
    "n_layers": 2,
    "trainable": "all",
    "accountant": "prv",
    "clipping": "auto",
    "max_grad_norm": 1.0,
    "max_physical_batch_size": None,
}
LORA_DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": None}
DP_REQUIRED = ("epochs", "batch_size", "noise_multiplier", "delta")
TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 1,
    "batch_size": 16,
    "lr": 5e-5,
    "weight_decay": 0.0,
    "trainable": "all",
    "n_layers": 2,
}


def dp_rerun_settings(dp: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`dp_finetune` keyword arguments that re-run the DP procedure recorded in `dp` (a DP target's
    `provenance.dp`), and the keys it did not record (their privacy.dp_finetune defaults are used:
    then the canary run may not be the audited procedure, and the caller should say so)."""
    missing = [k for k in DP_REQUIRED if dp.get(k) is None]
    if missing:
        raise ValueError(f"the DP run's record lacks {', '.join(missing)}: cannot re-run it with canaries")
    kw: dict[str, Any] = {
        "epochs": int(dp["epochs"]),
        "batch_size": int(dp["batch_size"]),
        "noise_multiplier": float(dp["noise_multiplier"]),
        "delta": float(dp["delta"]),
    }
    defaulted: list[str] = []
    for key, default in DP_DEFAULTS.items():
        if key in dp and (dp[key] is not None or key == "max_physical_batch_size"):
            kw[key] = dp[key]
        else:
            kw[key] = default
            defaulted.append(key)
    kw["lr"], kw["weight_decay"] = float(kw["lr"]), float(kw["weight_decay"])
    kw["max_grad_norm"], kw["n_layers"] = float(kw["max_grad_norm"]), int(kw["n_layers"])
    if kw["max_physical_batch_size"] is not None:
        kw["max_physical_batch_size"] = int(kw["max_physical_batch_size"])
    if kw["trainable"] == "lora":
        lora = dp.get("lora")
        if not isinstance(lora, Mapping):
            lora = {}
            defaulted.append("lora")
        for key, default in LORA_DEFAULTS.items():
            val = lora.get(key, lora.get(f"lora_{key}", default))
            if key not in lora and f"lora_{key}" not in lora and "lora" not in defaulted:
                defaulted.append(f"lora.{key}")
            kw[f"lora_{key}"] = val
        kw["lora_r"], kw["lora_alpha"] = int(kw["lora_r"]), int(kw["lora_alpha"])
        kw["lora_dropout"] = float(kw["lora_dropout"])
        kw["lora_target_modules"] = list(kw["lora_target_modules"]) if kw["lora_target_modules"] else None
    return kw, defaulted


def check_delta(delta: float | None, dp: Mapping[str, Any] | None) -> str | None:
    """A problem message when `delta` is given for a DP run and differs from the run's own delta (the bound
    and the accountant's epsilon are then about different guarantees), else None."""
    if dp is None or delta is None or dp.get("delta") is None:
        return None
    run_delta = float(dp["delta"])
    if math.isclose(float(delta), run_delta, rel_tol=1e-9, abs_tol=0.0):
        return None
    side = "smaller than" if delta < run_delta else "larger than"
    return (
        f"delta={delta:g} is {side} the DP run's delta={run_delta:g}: the audit's lower bound and the "
        f"accountant's epsilon would then be about different (epsilon, delta) guarantees and cannot be "
        f"compared; use the DP run's delta (the default: leave delta unset)"
    )


@dataclass
class CanaryRun:
    """The trained canary model and what was run."""

    model: Any
    cache_hit: bool
    train_seconds: float
    delta: float  # the delta the bound is computed at
    accountant_epsilon: float | None = None  # DP runs: epsilon of this training run
    dp_params: dict[str, Any] | None = None
    rerun: dict[str, Any] = field(default_factory=dict)  # procedure, settings, defaults used (and DP's numbers)
    notes: list[str] = field(default_factory=list)


def train_canary_run(
    *,
    model: Any,
    train_set: Dataset,
    split: Split,
    train: Mapping[str, Any],
    dp: Mapping[str, Any] | None,
    delta: float | None,
    train_seed: int,
    cache_dir: Path,
    progress: Callable[[str, int], Any] | None,
) -> CanaryRun:
    """Train `model` (a copy of the base, changed in place or replaced) on `train_set` with the audited procedure:
    `dp`'s DP-SGD re-run when given (`dp_rerun_settings`), else the fine-tune config `train` (TRAIN_DEFAULTS for
    what it lacks). Cached by hash as kind 'canary'. Non-private runs bound at delta 1e-5 unless given."""
    run = (
        _dp_run(model, train_set, split, dp, train_seed, cache_dir, progress)
        if dp is not None
        else _finetune_run(model, split, train, delta, train_seed, cache_dir, progress)
    )
    defaulted = run.rerun["defaulted"]
    if defaulted:
        run.notes.append(
            f"not recorded by the audited run, so the defaults were used: {', '.join(defaulted)}; if "
            "the audited run set them differently, the canary run is not the audited procedure"
        )
    return run


def _finetune_run(
    model: Any,
    split: Split,
    train: Mapping[str, Any],
    delta: float | None,
    train_seed: int,
    cache_dir: Path,
    progress: Callable[[str, int], Any] | None,
) -> CanaryRun:
    from fmaudit.training import TrainConfig, finetune_cached

    defaulted = [k for k in TRAIN_DEFAULTS if train.get(k) is None]
    settings = {k: (train[k] if train.get(k) is not None else d) for k, d in TRAIN_DEFAULTS.items()}
    cfg = TrainConfig(
        epochs=int(settings["epochs"]),
        batch_size=int(settings["batch_size"]),
        lr=float(settings["lr"]),
        weight_decay=float(settings["weight_decay"]),
        trainable=str(settings["trainable"]),
        n_layers=int(settings["n_layers"]),
        seed=train_seed,
    )
    stats, hit, _ = finetune_cached(
        model, split, cfg, cache_dir=cache_dir, progress=progress, label="training with canaries", kind="canary"
    )
    return CanaryRun(
        model=model,
        cache_hit=hit,
        train_seconds=stats.duration_s,
        delta=1e-5 if delta is None else delta,
        rerun={
            "procedure": "fine-tune (non-private)",
            "settings": {k: getattr(cfg, k) for k in TRAIN_DEFAULTS},
            "defaulted": defaulted,
        },
    )


def _dp_run(
    model: Any,
    train_set: Dataset,
    split: Split,
    dp: Mapping[str, Any],
    train_seed: int,
    cache_dir: Path,
    progress: Callable[[str, int], Any] | None,
) -> CanaryRun:
    import warnings

    from fmaudit.privacy.dp import DPPrivacyWarning, dp_finetune

    kw, defaulted = dp_rerun_settings(dp)
    with warnings.catch_warnings():
        # delta >= 1/N is the audited run's own setting (its module reports it); the canary run repeats it.
        warnings.simplefilter("ignore", DPPrivacyWarning)
        res = dp_finetune(
            model=model,
            train_data=train_set,
            seed=train_seed,
            cache_dir=cache_dir,
            split=split,
            progress=progress,
            **kw,
        )
    rerun = {
        "procedure": "DP-SGD (privacy.dp_finetune)",
        "settings": kw,
        "defaulted": defaulted,
        "sample_rate": res.sample_rate,
        "steps": res.steps,
        "clipping_mode": res.clipping,
        "audited_epsilon": dp.get("epsilon"),
        "audited_steps": dp.get("steps"),
        "audited_sample_rate": dp.get("sample_rate"),
    }
    note = (
        f"the canary run used the audited run's noise multiplier {res.noise_multiplier:.4g} on "
        f"{len(train_set)} examples; its own accountant epsilon is {res.epsilon:.4g}"
    )
    return CanaryRun(
        model=res.target,
        cache_hit=res.cache_hit,
        train_seconds=res.train_seconds,
        delta=res.delta,
        accountant_epsilon=res.epsilon,
        dp_params=res.params(),
        rerun=rerun,
        notes=[note],
    )
