"""The membership attacks as a registry: attack name -> how it scores the audit examples and what it needs.

Every scorer maps `AttackInputs` (what the module has gathered) and `AttackSettings` (the attack knobs) to one
score per example, higher = more likely a member. `needs` names what a scorer reads beyond the target's own
signals, so the module gathers only that:

- "token_distribution": Min-K%++'s statistics of the target's next-token distribution (causal LMs);
- "base_features": membership-independent features of each example from the base model (quantile);
- "calibration_model": another model's signals on the same examples (calibrated_loss);
- "reference_models": reference models trained on random halves of the population (LiRA, RMIA).

A scorer may leave what the report should say about it in `AttackInputs.details` (quantile: its regression;
LiRA: its IN / OUT statistics).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from fmaudit.privacy.membership.quantile import quantile_regression_scores
from fmaudit.privacy.membership.reference_attacks import lira_scores, rmia_scores
from fmaudit.privacy.membership.reference_models import ReferenceSignals

# The attack names params accept (the keys of ATTACKS, in the order the docs list them).
AttackName = Literal[
    "loss",
    "confidence",
    "entropy",
    "zlib",
    "min_k",
    "min_k_pp",
    "calibrated_loss",
    "lira_online",
    "lira_offline",
    "rmia",
    "rmia_offline",
    "quantile",
]

# Which targets an attack applies to, by capability (fmaudit.tasks.CAPABILITIES).
CLASSIFIERS = frozenset({"classifier"})
CAUSAL_LMS = frozenset({"causal_lm"})
BOTH = CLASSIFIERS | CAUSAL_LMS


@dataclass(frozen=True)
class AttackSettings:
    """The attacks' knobs (from the module's params)."""

    fixed_variance: bool = True
    lira_shrinkage: bool = True
    rmia_gamma: float = 1.0
    rmia_offline_a: float = 0.3
    quantile_folds: int = 5


@dataclass
class AttackInputs:
    """What the scorers read: the target's signals on the audit examples (`signals.classifier_signals` or
    `signals.sequence_signals`), who is a member, the run's seed, and what `Attack.needs` asked for."""

    target: dict[str, np.ndarray]
    is_member: np.ndarray
    seed: int
    base_features: np.ndarray | None = None
    calibration: dict[str, np.ndarray] | None = None
    reference: ReferenceSignals | None = None
    details: dict[str, dict[str, Any]] = field(default_factory=dict)


Scorer = Callable[[AttackInputs, AttackSettings], np.ndarray]


@dataclass(frozen=True)
class Attack:
    description: str
    score: Scorer
    models: frozenset[str] = BOTH  # the targets it applies to: CLASSIFIERS, CAUSAL_LMS or BOTH
    needs: frozenset[str] = frozenset()


def _quantile(x: AttackInputs, s: AttackSettings) -> np.ndarray:
    """The target's logit-scaled confidence standardized by the non-member mean and spread predicted from
    base-model features; the known non-members are the regression's public data (scored out of fold)."""
    assert x.base_features is not None
    score, info = quantile_regression_scores(
        x.target["phi"], x.base_features, ~x.is_member, folds=s.quantile_folds, seed=x.seed
    )
    x.details["quantile"] = info
    return score


def _lira(online: bool) -> Scorer:
    def score(x: AttackInputs, s: AttackSettings) -> np.ndarray:
        assert x.reference is not None
        on, off, info = lira_scores(
            x.target["phi"],
            x.reference.phi,
            x.reference.in_mask,
            fixed_variance=s.fixed_variance,
            shrink=s.lira_shrinkage,
        )
        x.details["lira"] = info
        return on if online else off

    return score


def _rmia(offline: bool) -> Scorer:
    def score(x: AttackInputs, s: AttackSettings) -> np.ndarray:
        assert x.reference is not None
        return rmia_scores(
            x.target["logp_true"],
            x.reference.logp,
            x.reference.in_mask,
            offline=offline,
            a=s.rmia_offline_a,
            gamma=s.rmia_gamma,
        )

    return score


def _calibrated_loss(x: AttackInputs, s: AttackSettings) -> np.ndarray:
    assert x.calibration is not None
    return x.calibration["loss"] - x.target["loss"]


REFERENCE = frozenset({"reference_models"})

ATTACKS: dict[str, Attack] = {
    "loss": Attack("loss threshold (Yeom et al. 2018): lower loss = member", lambda x, s: -x.target["loss"]),
    "confidence": Attack(
        "highest softmax probability (label-free)", lambda x, s: x.target["confidence"], models=CLASSIFIERS
    ),
    "entropy": Attack(
        "prediction entropy (label-free): lower = member", lambda x, s: -x.target["entropy"], models=CLASSIFIERS
    ),
    "zlib": Attack(
        "sequence loss divided by zlib-compressed length (Carlini et al. 2021)",
        lambda x, s: -x.target["zlib"],
        models=CAUSAL_LMS,
    ),
    "min_k": Attack(
        "mean of the lowest k% token log-probs (Min-K% Prob, Shi et al. 2023)",
        lambda x, s: x.target["min_k"],
        models=CAUSAL_LMS,
    ),
    "min_k_pp": Attack(
        "Min-K%++ (Zhang et al. 2024): lowest k% of token log-probs standardized by the "
        "model's own next-token distribution",
        lambda x, s: x.target["min_k_pp"],
        models=CAUSAL_LMS,
        needs=frozenset({"token_distribution"}),
    ),
    "calibrated_loss": Attack(
        "target loss minus a calibration model's loss (the base weights by default; "
        "difficulty calibration / reference-model attack)",
        _calibrated_loss,
        needs=frozenset({"calibration_model"}),
    ),
    "lira_online": Attack(
        "LiRA online (Carlini et al. 2022): Gaussian likelihood ratio, IN vs OUT reference models",
        _lira(online=True),
        needs=REFERENCE,
    ),
    "lira_offline": Attack(
        "LiRA offline: one-sided test against OUT reference models only", _lira(online=False), needs=REFERENCE
    ),
    "rmia": Attack(
        "RMIA (Zarifzadeh et al. 2024), Pr(x) from all reference models", _rmia(offline=False), needs=REFERENCE
    ),
    "rmia_offline": Attack(
        "RMIA offline: Pr(x) from OUT reference models with the linear approximation a",
        _rmia(offline=True),
        needs=REFERENCE,
    ),
    "quantile": Attack(
        "quantile regression (Bertran et al. 2023, Gaussian form): the target's logit-scaled "
        "confidence, standardized by the non-member mean and spread predicted from the base model's "
        "features (one regression instead of reference models)",
        _quantile,
        needs=frozenset({"base_features"}),
    ),
}

ATTACK_DESCRIPTIONS: dict[str, str] = {name: a.description for name, a in ATTACKS.items()}
REFERENCE_ATTACKS: frozenset[str] = frozenset(n for n, a in ATTACKS.items() if "reference_models" in a.needs)
