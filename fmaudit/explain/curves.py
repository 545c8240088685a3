"""Deletion and insertion curves (Petsiuk et al. 2018; AOPC as in Samek et al. 2017), over any feature space.

Features are removed (deletion) or inserted into the baseline (insertion) in decreasing attribution order, at
fractions 0, 1/steps, ..., 1, and the space's `curve_output` is read after each step. A deletion curve is
scored by its AOPC (mean over the curve of output(full) - output(removed)); an insertion curve by its mean.
The reference is the same curves for random orderings of the same features.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fmaudit.explain.space import Attribution, Example, FeatureSpace


def keep_masks(order: np.ndarray, n: int, steps: int, *, insertion: bool) -> np.ndarray:
    """(steps + 1, n) boolean masks of features kept from the input: deletion removes the first
    round(f * n) features of `order` for f = 0, 1/steps, ..., 1; insertion keeps only them."""
    masks = np.zeros((steps + 1, n), dtype=bool) if insertion else np.ones((steps + 1, n), dtype=bool)
    for j in range(steps + 1):
        k = int(round(j / steps * n))
        masks[j, order[:k]] = insertion
    return masks


def attribution_order(a: Attribution) -> np.ndarray:
    """Features by decreasing attribution (most positive, i.e. towards the explained output, first)."""
    return np.argsort(-a.features, kind="stable")


@dataclass(frozen=True)
class CurveKind:
    insertion: bool
    score: Callable[[np.ndarray], float]  # one curve -> its per-example score
    metric: str  # metric suffix of the score


CURVE_KINDS: dict[str, CurveKind] = {
    "deletion": CurveKind(False, lambda c: float(np.mean(c[0] - c)), "deletion_aopc"),
    "insertion": CurveKind(True, lambda c: float(np.mean(c)), "insertion_auc"),
}


@dataclass
class Scored:
    """Per-example scores and the mean curve over the examples."""

    scores: list[float]
    curve: np.ndarray


@dataclass
class RemovalCurves:
    """One kind of curve (deletion or insertion): the random reference and each method."""

    kind: str
    fractions: np.ndarray
    random: Scored
    methods: dict[str, Scored]


def _curve(space: FeatureSpace, model: Any, ex: Example, order: np.ndarray, steps: int, kind: str) -> np.ndarray:
    keep = keep_masks(order, ex.n_features, steps, insertion=CURVE_KINDS[kind].insertion)
    return space.curve_output(model, ex, keep).double().cpu().numpy()


def removal_curves(
    space: FeatureSpace,
    model: Any,
    examples: Sequence[Example],
    attrs: dict[str, list[Attribution]],
    *,
    kinds: Sequence[str],
    steps: int,
    orderings: int,
    rng: np.random.Generator,
) -> dict[str, RemovalCurves]:
    """Deletion and / or insertion curves (`kinds`) of the random reference (`orderings` random orders per
    example, shared by the kinds, drawn from `rng`) and of each method in `attrs`."""
    fractions = np.linspace(0, 1, steps + 1)
    random: dict[str, list[np.ndarray]] = {k: [] for k in kinds}
    for ex in examples:
        perms = [rng.permutation(ex.n_features) for _ in range(orderings)]
        for k in kinds:
            random[k].append(np.mean([_curve(space, model, ex, perm, steps, k) for perm in perms], 0))
    out = {}
    for k in kinds:
        score = CURVE_KINDS[k].score
        methods = {}
        for m, alist in attrs.items():
            curves = [_curve(space, model, ex, attribution_order(a), steps, k) for ex, a in zip(examples, alist)]
            methods[m] = Scored([score(c) for c in curves], np.mean(curves, 0))
        out[k] = RemovalCurves(k, fractions, Scored([score(c) for c in random[k]], np.mean(random[k], 0)), methods)
    return out
