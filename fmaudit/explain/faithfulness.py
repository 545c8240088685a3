"""Per-example faithfulness checks over any feature space: Captum's `infidelity` and `sensitivity_max`, and the
completeness of integrated gradients.

- Infidelity (Yeh et al. 2019, normalized) in the features' presence space: the input is the all-ones presence
  vector, a perturbation drops a random subset of features (each with probability `drop`) to the baseline, and
  the attributions of the dropped features are compared with the change of the explained output.
- Max-sensitivity: the largest relative change of the attributions under uniform input noise, on what the
  space says can be perturbed (`FeatureSpace.noise_input`: pixels, or word embeddings).
- Completeness: the sum of integrated-gradients attributions vs F(x) - F(baseline) measured separately. The
  relative error is undefined where F(x) ~ F(baseline); those examples are listed apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fmaudit.explain.space import Attribution, Example, FeatureSpace
from fmaudit.seeds import Stream, derive


def infidelity(
    space: FeatureSpace,
    model: Any,
    ex: Example,
    a: Attribution,
    *,
    perturbations: int,
    drop: float,
    batch_size: int,
    seed: int,
) -> float:
    """Captum's normalized infidelity of `a` in the presence space of `ex`'s features (module docstring)."""
    import torch
    from captum.metrics import infidelity as captum_infidelity

    gen = torch.Generator(device="cpu").manual_seed(derive(seed, Stream.ATTRIBUTION_PERTURB, 3))
    n = ex.n_features
    ones = torch.ones(1, n, dtype=torch.float64)

    def perturb(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dropped = (torch.rand(inputs.shape, generator=gen, dtype=torch.float64) < drop).to(inputs.dtype)
        return dropped, inputs - dropped

    def forward(z: torch.Tensor) -> torch.Tensor:
        return space.explained_output(model, ex, (z > 0.5).cpu()).double().cpu()

    attributions = torch.as_tensor(a.features, dtype=torch.float64).view(1, n)
    val = captum_infidelity(
        forward,
        perturb,
        ones,
        attributions,
        n_perturb_samples=perturbations,
        max_examples_per_batch=min(batch_size, perturbations),
        normalize=True,
    )
    return float(val[0])


def sensitivity(
    space: FeatureSpace, method: str, model: Any, ex: Example, *, samples: int, radius: float, seed: int
) -> float:
    """Captum's sensitivity_max of `method` on `ex`: `samples` uniform perturbations of radius `radius` (scaled
    as the space says) of what the space perturbs."""
    import torch
    from captum.metrics import sensitivity_max

    noisy = space.noise_input(method, model, ex, radius, seed)
    gen = torch.Generator(device="cpu").manual_seed(derive(seed, Stream.ATTRIBUTION_PERTURB, noisy.stream))

    def perturb(inputs: torch.Tensor) -> torch.Tensor:
        noise = (torch.rand(inputs.shape, generator=gen) * 2 - 1) * noisy.radius
        return inputs + noise.to(inputs.device)

    def explain(inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        inputs = inputs[0] if isinstance(inputs, tuple) else inputs
        return (noisy.explain(inputs),)  # a tuple: Captum 0.9 iterates a bare tensor of explanations row by row

    return float(
        sensitivity_max(
            explain, noisy.inputs, perturb_func=perturb, n_perturb_samples=samples, max_examples_per_batch=1
        ).max()
    )


@dataclass
class Completeness:
    """Completeness of integrated gradients over the examples (module docstring)."""

    rows: list[dict[str, Any]] = field(default_factory=list)  # per example: sums, F values, gap, relative error
    gaps: list[float] = field(default_factory=list)  # |sum(attr) - (F(x) - F(baseline))|
    deltas: list[float] = field(default_factory=list)  # |convergence delta| (nan where the method has none)
    relative: list[float] = field(default_factory=list)  # gap / |F(x) - F(baseline)| where that is defined
    undefined: list[str] = field(default_factory=list)  # ids where |F(x) - F(baseline)| < min_difference

    @property
    def has_delta(self) -> bool:
        return bool(np.isfinite(self.deltas).any())

    @property
    def gap_matches_delta(self) -> bool | None:
        """Whether the measured gap is the reported convergence delta (None without deltas)."""
        if not self.has_delta:
            return None
        return all(
            abs(g - d) <= 1e-4 + 1e-3 * abs(r["f_x"] - r["f_baseline"])
            for g, d, r in zip(self.gaps, self.deltas, self.rows)
            if np.isfinite(d)
        )


def completeness(examples: Sequence[Example], attrs: Sequence[Attribution], *, min_difference: float) -> Completeness:
    """Sum of attributions vs F(x) - F(baseline) (`ex.meta["f_x"]`, `["f_b"]`, measured separately)."""
    c = Completeness()
    for ex, a in zip(examples, attrs):
        total = float(a.full.sum())
        diff = ex.meta["f_x"] - ex.meta["f_b"]
        gap = abs(total - diff)
        c.gaps.append(gap)
        c.deltas.append(abs(a.delta) if a.delta is not None else float("nan"))
        defined = abs(diff) >= max(min_difference, 1e-12)
        r = gap / abs(diff) if defined else None
        if r is not None:
            c.relative.append(r)
        else:
            c.undefined.append(ex.ex_id)
        c.rows.append(
            {
                "id": ex.ex_id,
                "sum_attributions": total,
                "f_x": ex.meta["f_x"],
                "f_baseline": ex.meta["f_b"],
                "gap": gap,
                "relative_error": r,
                "convergence_delta": a.delta,
            }
        )
    return c
