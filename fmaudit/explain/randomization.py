"""The cascading model-parameter randomization check (Adebayo et al. 2018) over any feature space.

On a COPY of the target, shared parameters are untied, the layer groups the forward pass runs are
re-initialized from the top down, one per step and cumulatively (`cascade.py`), and after each step every
method re-explains the examples; each explanation is compared with the trained model's (`similarity.py`):
Spearman on signed and on absolute feature scores, and for images SSIM of the absolute maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fmaudit.explain import cascade
from fmaudit.explain.image import ImageSpace
from fmaudit.explain.similarity import map_ssim, spearman
from fmaudit.explain.space import Attribution, Example, FeatureSpace
from fmaudit.seeds import Stream, derive


@dataclass
class CascadeResult:
    """What the cascade did and how similar each method's attributions stayed."""

    steps: list[cascade.LayerGroup]  # re-initialized in this order (top first)
    num_used: int  # layer groups the forward pass runs (the cascade may stop earlier: depth)
    unused: list[str]  # groups never run by the forward pass (skipped)
    untied: list[dict[str, str]]  # parameters untied in the copy
    keys: tuple[str, ...]  # similarity measures: spearman, spearman_abs (+ ssim for images)
    similarity: dict[str, dict[str, list[list[float]]]]  # method -> measure -> step -> per-example values
    num_examples: int

    @property
    def complete(self) -> bool:
        return len(self.steps) == self.num_used


def similarity_keys(space: FeatureSpace) -> tuple[str, ...]:
    return ("spearman", "spearman_abs") + (("ssim",) if isinstance(space, ImageSpace) else ())


def randomization_cascade(
    target: Any,
    space: FeatureSpace,
    examples: Sequence[Example],
    attrs: dict[str, list[Attribution]],
    *,
    depth: int | None,
    seed: int,
) -> CascadeResult:
    """Run the cascade (module docstring) on a copy of `target`, `depth` steps from the top (None: all);
    step k re-initializes under the seed stream ATTRIBUTION_RANDOMIZE, k. The target is never touched."""
    import torch

    keys = similarity_keys(space)
    rand_target = target.copy(name=f"{target.name}[randomized]")
    try:
        model = rand_target.model
        model.eval()
        untied = cascade.untie_parameters(model)
        groups = cascade.layer_groups(model)
        probe = examples[0]
        used, unused = cascade.forward_order(
            model, groups, lambda: space.explained_output(model, probe, np.ones((1, probe.n_features), dtype=bool))
        )
        steps = list(reversed(used))[: depth or None]
        if not steps:
            raise RuntimeError("the randomization check found no layer with parameters in the forward pass")
        hf = cascade.hf_model(model)
        sims: dict[str, dict[str, list[list[float]]]] = {m: {k: [] for k in keys} for m in attrs}
        for step, g in enumerate(steps):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive(seed, Stream.ATTRIBUTION_RANDOMIZE, step))
                cascade.reinitialize(g, hf)
            rand_target.weights_changed()
            for m, alist in attrs.items():
                vals: dict[str, list[float]] = {k: [] for k in keys}
                for ex, a in zip(examples, alist):
                    r = space.attribute(m, model, ex)
                    vals["spearman"].append(spearman(a.features, r.features))
                    vals["spearman_abs"].append(spearman(np.abs(a.features), np.abs(r.features)))
                    if "ssim" in vals:
                        vals["ssim"].append(map_ssim(a.full.sum(0), r.full.sum(0)))
                for k in keys:
                    sims[m][k].append(vals[k])
    finally:
        del rand_target
    return CascadeResult(steps, len(used), unused, untied, keys, sims, len(examples))
