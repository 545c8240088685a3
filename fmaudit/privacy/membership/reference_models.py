"""Reference models for LiRA / RMIA: each starts from the target's base weights and fine-tunes on a random
half of the population (the target's whole fine-tune dataset), in complementary pairs with recorded seeds,
cached by hash. Here: the halves, how far they overlap the target's own member split, and training and
scoring one reference model (a picklable callable, so remote executors can run it)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fmaudit.privacy.membership.outputs import model_signals


@dataclass(frozen=True)
class ReferenceSignals:
    """What the reference attacks read: each reference model's logit-scaled confidence (`phi`) and log-probability
    of the true label (`logp`) on the audit examples, shape (R, n), and `in_mask` (R, n): model r trained on i."""

    phi: np.ndarray
    logp: np.ndarray
    in_mask: np.ndarray


def paired_halves(n: int, num_models: int, seed: int) -> np.ndarray:
    """IN masks (num_models, n) for reference models trained on random halves, in complementary pairs:
    models 2j and 2j+1 split one random permutation, so with an even count every example is IN for exactly
    half of the models."""
    from fmaudit.seeds import Stream, rng

    masks = np.zeros((num_models, n), dtype=bool)
    for j in range((num_models + 1) // 2):
        # its own stream: default_rng([seed, 0]) *is* default_rng(seed), which once made pair 0 replay
        # the target's member split exactly
        perm = rng(seed, Stream.REFERENCE_HALVES, j).permutation(n)
        half = perm[: n // 2]
        masks[2 * j, half] = True
        if 2 * j + 1 < num_models:
            masks[2 * j + 1] = ~masks[2 * j]
    return masks


def reference_overlap(in_mask: np.ndarray, is_member: np.ndarray, z_limit: float = 4.5) -> dict[str, Any]:
    """For every reference model, the fraction of the target's members and of its non-members that are in
    that model's training half (about 0.5 each when the halves are independent of the target's split),
    and which models deviate beyond chance (|z| > z_limit under a fair coin per example)."""
    in_mask = np.asarray(in_mask, dtype=bool)
    y = np.asarray(is_member).astype(bool)
    models, bad, worst = [], [], 0.0
    for r in range(in_mask.shape[0]):
        mo, no = float(in_mask[r, y].mean()), float(in_mask[r, ~y].mean())
        z = max(abs(mo - 0.5) / np.sqrt(0.25 / y.sum()), abs(no - 0.5) / np.sqrt(0.25 / (~y).sum()))
        worst = max(worst, abs(mo - 0.5), abs(no - 0.5))
        if z > z_limit:
            bad.append(r)
        models.append({"member_overlap": round(mo, 4), "nonmember_overlap": round(no, 4)})
    chance = float(np.sqrt(0.25 / min(y.sum(), (~y).sum())))
    return {"models": models, "max_deviation": worst, "correlated": bad, "chance_deviation": chance}


class TrainReference:
    """One reference model: fine-tune a copy of the base on its half (or load it from the cache), then score
    the audit examples. A plain picklable callable, so a remote executor can run it on another machine
    that shares the cache folder. Returns an error value instead of raising (the caller reports them all)."""

    def __init__(
        self,
        *,
        base: Any,
        population: Any,
        audit: Any,
        masks: np.ndarray,
        seeds: Sequence[int],
        configs: Sequence[Any],
        is_clf: bool,
        cache_dir: Path,
        progress: Callable[..., Any] | None,
        batch_size: int,
        min_k: float,
        label: str,
    ):
        self.base, self.population, self.audit = base, population, audit
        self.masks, self.seeds, self.configs = masks, seeds, configs
        self.is_clf, self.cache_dir, self.progress = is_clf, cache_dir, progress
        self.batch_size, self.min_k, self.label = batch_size, min_k, label

    def __call__(self, r: int) -> dict[str, Any]:
        from fmaudit.data import Split
        from fmaudit.training import finetune_cached

        try:
            ref = self.base.copy(name=f"{self.label}-ref{r}")
            mask = self.masks[r]
            member_idx = np.nonzero(mask)[0]
            split = Split(self.population, member_idx, np.nonzero(~mask)[0], self.seeds[r], 0.5)
            t = time.perf_counter()
            label = f"reference model {r + 1}/{len(self.masks)}"
            stats, hit, key = finetune_cached(
                ref,
                split,
                self.configs[r],
                cache_dir=self.cache_dir,
                progress=self.progress,
                label=label,
                kind="reference",
            )
            load_s = time.perf_counter() - t
            t = time.perf_counter()
            s = model_signals(
                ref,
                self.audit,
                is_clf=self.is_clf,
                token_distribution=False,
                batch_size=self.batch_size,
                min_k=self.min_k,
            )
            infer_s = time.perf_counter() - t
            del ref
            return {
                "index": r,
                "phi": s["phi"],
                "logp": s["logp_true"],
                "seed": self.seeds[r],
                "cache_key": key,
                "cache_hit": hit,
                "train_seconds": stats.duration_s,
                "steps": stats.steps,
                "members": int(len(member_idx)),
                "wall_seconds": load_s,
                "score_seconds": infer_s,
            }
        except Exception as exc:  # isolated per the executor contract; raised by the caller with context
            return {"index": r, "error": f"{type(exc).__name__}: {exc}"}
