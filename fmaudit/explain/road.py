"""ROAD (Rong et al., "A Consistent and Efficient Evaluation Strategy for Attribution Methods", ICML 2022):
removal-based evaluation without out-of-distribution baselines, for image feature spaces (pixels or patches).

Removed pixels are not set to a baseline (a black square is a feature the model can react to); they are
re-imputed from their neighbours by the paper's noisy linear imputation: each removed pixel equals the
weighted mean of its 8 neighbours (weight 1/6 on the 4 direct ones, 1/12 on the diagonals, neighbours
outside the image dropped), known pixels fixed, one sparse linear system per image and channel, plus
Gaussian noise (std `noise`) on the imputed pixels so the removal pattern itself carries little
information. Any removal short of the whole image is solvable: every connected group of removed pixels
touches a kept one.

Features are removed most-attributed first (MoRF) and least-attributed first (LeRF) at fractions 0, 1/steps,
..., (steps - 1)/steps (never all of them); the curve is the explained class's probability; the reference is
random orderings of the same features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fmaudit.explain.curves import Scored, attribution_order, keep_masks
from fmaudit.explain.image import ImageSpace
from fmaudit.explain.space import Attribution, Example

_OFFSETS = (
    (-1, 0, 1 / 6),
    (1, 0, 1 / 6),
    (0, -1, 1 / 6),
    (0, 1, 1 / 6),
    (-1, -1, 1 / 12),
    (-1, 1, 1 / 12),
    (1, -1, 1 / 12),
    (1, 1, 1 / 12),
)


def noisy_linear_impute(
    image: np.ndarray, removed: np.ndarray, *, noise: float = 0.01, rng: np.random.Generator | None = None
) -> np.ndarray:
    """(C, H, W) image with the pixels where `removed` (H, W) is True re-imputed (see the module docstring)."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import spsolve

    img = np.asarray(image, dtype=np.float64)
    removed = np.asarray(removed, dtype=bool)
    c, h, w = img.shape
    unk = np.flatnonzero(removed.ravel())
    out = img.copy()
    if len(unk) == 0:
        return out
    if len(unk) == h * w:
        raise ValueError("ROAD cannot impute an image with every pixel removed")
    n = len(unk)
    index = -np.ones(h * w, dtype=np.int64)
    index[unk] = np.arange(n)
    r, col = np.divmod(unk, w)
    diag = np.zeros(n)
    rows, cols, vals = [], [], []
    rhs = np.zeros((n, c))
    for dr, dc, wt in _OFFSETS:
        rr, cc = r + dr, col + dc
        inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        diag[inside] += wt
        flat = np.where(inside, rr * w + cc, 0)
        nb_removed = inside & removed.ravel()[flat]
        i = np.flatnonzero(nb_removed)
        rows.append(i)
        cols.append(index[flat[i]])
        vals.append(np.full(len(i), -wt))
        k = np.flatnonzero(inside & ~nb_removed)
        rhs[k] += wt * img[:, rr[k], cc[k]].T
    a = sp.csr_matrix(
        (np.concatenate(vals + [diag]), (np.concatenate(rows + [np.arange(n)]), np.concatenate(cols + [np.arange(n)]))),
        shape=(n, n),
    )
    sol = np.asarray(spsolve(a.tocsc(), rhs)).reshape(n, c)
    if noise > 0:
        sol = sol + (rng if rng is not None else np.random.default_rng(0)).normal(0.0, noise, size=sol.shape)
    flat_out = out.reshape(c, h * w)
    flat_out[:, unk] = sol.T
    return out


@dataclass
class RoadCurves:
    """ROAD of the random reference and of each method, most- ("morf") and least-attributed ("lerf") first."""

    fractions: np.ndarray
    random: Scored
    methods: dict[str, dict[str, Scored]]


def _road_curve(
    space: ImageSpace, model: Any, ex: Example, order: np.ndarray, *, steps: int, noise: float, rng: np.random.Generator
) -> np.ndarray:
    import torch

    h, w = ex.x.shape[-2:]
    fmap = space.fmap(h, w).cpu().numpy()
    x = ex.x[0].detach().double().cpu().numpy()
    keep = keep_masks(order, ex.n_features, steps, insertion=False)[:-1]
    imgs = np.stack([noisy_linear_impute(x, ~k[fmap].reshape(h, w), noise=noise, rng=rng) for k in keep])
    xt = torch.as_tensor(imgs, dtype=ex.x.dtype, device=ex.x.device)
    return space.logits(model, ex, xt).softmax(-1)[:, ex.explained].double().cpu().numpy()


def road_curves(
    space: ImageSpace,
    model: Any,
    examples: Sequence[Example],
    attrs: dict[str, list[Attribution]],
    *,
    steps: int,
    orderings: int,
    noise: float,
    rng: np.random.Generator,
) -> RoadCurves:
    """ROAD curves (see the module docstring); random orders and imputation noise both come from `rng`."""
    rand = []
    for ex in examples:
        cs = [
            _road_curve(space, model, ex, rng.permutation(ex.n_features), steps=steps, noise=noise, rng=rng)
            for _ in range(orderings)
        ]
        rand.append(np.mean(cs, 0))
    methods: dict[str, dict[str, Scored]] = {}
    for m, alist in attrs.items():
        curves: dict[str, list[np.ndarray]] = {"morf": [], "lerf": []}
        for ex, a in zip(examples, alist):
            order = attribution_order(a)
            curves["morf"].append(_road_curve(space, model, ex, order, steps=steps, noise=noise, rng=rng))
            curves["lerf"].append(_road_curve(space, model, ex, order[::-1].copy(), steps=steps, noise=noise, rng=rng))
        methods[m] = {k: Scored([float(np.mean(c)) for c in cs], np.mean(cs, 0)) for k, cs in curves.items()}
    return RoadCurves(np.arange(steps) / steps, Scored([float(np.mean(c)) for c in rand], np.mean(rand, 0)), methods)
