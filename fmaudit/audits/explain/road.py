"""ROAD (Rong et al., "A Consistent and Efficient Evaluation Strategy for Attribution Methods", ICML 2022):
removal-based evaluation without out-of-distribution baselines.

Removed pixels are not set to a baseline (a black square is a feature the model can react to); they are
re-imputed from their neighbours by the paper's noisy linear imputation: each removed pixel equals the
weighted mean of its 8 neighbours (weight 1/6 on the 4 direct ones, 1/12 on the diagonals, neighbours
outside the image dropped), known pixels fixed, one sparse linear system per image and channel, plus
Gaussian noise (std `noise`) on the imputed pixels so the removal pattern itself carries little
information. Any removal short of the whole image is solvable: every connected group of removed pixels
touches a kept one.
"""

from __future__ import annotations

import numpy as np

_OFFSETS = ((-1, 0, 1 / 6), (1, 0, 1 / 6), (0, -1, 1 / 6), (0, 1, 1 / 6),
            (-1, -1, 1 / 12), (-1, 1, 1 / 12), (1, -1, 1 / 12), (1, 1, 1 / 12))


def noisy_linear_impute(image: np.ndarray, removed: np.ndarray, *, noise: float = 0.01,
                        rng: np.random.Generator | None = None) -> np.ndarray:
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
    a = sp.csr_matrix((np.concatenate(vals + [diag]),
                       (np.concatenate(rows + [np.arange(n)]), np.concatenate(cols + [np.arange(n)]))),
                      shape=(n, n))
    sol = np.asarray(spsolve(a.tocsc(), rhs)).reshape(n, c)
    if noise > 0:
        sol = sol + (rng if rng is not None else np.random.default_rng(0)).normal(0.0, noise, size=sol.shape)
    flat_out = out.reshape(c, h * w)
    flat_out[:, unk] = sol.T
    return out
