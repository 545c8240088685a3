"""The quantile-regression membership attack (Bertran et al. 2023), Gaussian form (numpy / scikit-learn)."""

from __future__ import annotations

from typing import Any

import numpy as np


def quantile_regression_scores(
    target_signal: np.ndarray, features: np.ndarray, is_public: np.ndarray, *, folds: int = 5, seed: int = 0
) -> tuple[np.ndarray, dict[str, float]]:
    """Membership scores from a regression that predicts, for each example, the distribution of the
    target's signal on NON-members from features that do not depend on membership (the base model's
    representation of the example).

    Bertran et al. ("Scalable Membership Inference Attacks via Quantile Regression", NeurIPS 2023) replace
    the reference models of LiRA / RMIA by one model fitted on public non-member data: an example whose
    signal lies far above what is typical for non-members *like it* is a member. This is their Gaussian
    variant: a ridge regression (regularization by cross-validation) predicts the mean, a second one the
    log absolute residual (the spread), and the score is the standardized residual (s - mu(x)) / sigma(x).

    `is_public` marks the known non-members the regressions may learn from. They are scored out of fold
    (`folds`-fold cross-fitting, folds from their own random stream), every other example by the average of
    the fold models, so no score comes from a regression that saw that example."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from fmaudit.seeds import Stream, rng

    s = np.asarray(target_signal, dtype=np.float64)
    x = np.asarray(features, dtype=np.float64)
    pub = np.nonzero(np.asarray(is_public, dtype=bool))[0]
    if len(pub) < 2 * folds:
        raise ValueError(
            f"the quantile-regression attack needs at least {2 * folds} known non-members to learn from, got {len(pub)}"
        )
    from sklearn.decomposition import PCA

    alphas = np.logspace(-2, 5, 15)
    # few public examples, many features: a ridge on the leading principal components of the standardized
    # features (at most one component per 10 public examples) keeps the regression from extrapolating
    n_comp = int(max(1, min(x.shape[1], len(pub) // (10 * 2), 32)))

    def model():
        return make_pipeline(StandardScaler(), PCA(n_components=n_comp, random_state=0), RidgeCV(alphas=alphas))

    rank = np.empty(len(pub), dtype=np.int64)  # each known non-member's place in a seeded random order
    rank[rng(seed, Stream.QUANTILE_FOLDS).permutation(len(pub))] = np.arange(len(pub))
    fold_of = rank % folds
    half_of = (rank // folds) % 2  # a second random split, balanced inside every fold (any number of folds)
    mu = np.zeros(len(s))
    log_sd = np.zeros(len(s))
    others = np.ones(len(s), dtype=bool)
    others[pub] = False
    for k in range(folds):
        train, held = pub[fold_of != k], pub[fold_of == k]
        m_mu = model().fit(x[train], s[train])
        # the spread model learns from honest (out-of-sample) residuals: a second split inside the fold
        half = half_of[fold_of != k] == 0
        a, b = train[half], train[~half]
        res = np.r_[s[b] - model().fit(x[a], s[a]).predict(x[b]), s[a] - model().fit(x[b], s[b]).predict(x[a])]
        log_res = np.log(np.abs(res) + 1e-6)
        m_sd = model().fit(x[np.r_[b, a]], log_res)
        lo, hi = np.quantile(log_res, [0.05, 0.95])  # a spread outside what was seen is extrapolation

        def spread(rows: np.ndarray, m_sd: Any = m_sd, lo: float = lo, hi: float = hi) -> np.ndarray:
            return np.clip(m_sd.predict(x[rows]), lo, hi)

        mu[held] = m_mu.predict(x[held])
        log_sd[held] = spread(held)
        if others.any():
            mu[others] += m_mu.predict(x[others]) / folds
            log_sd[others] += spread(others) / folds
    # E|r| = sigma * sqrt(2 / pi) for a Gaussian residual; the constant does not change the ranking
    sd = np.exp(log_sd) * np.sqrt(np.pi / 2)
    score = (s - mu) / np.maximum(sd, 1e-12)
    pub_res = (s[pub] - mu[pub]) / sd[pub]
    r2 = 1.0 - float(np.var(s[pub] - mu[pub]) / max(np.var(s[pub]), 1e-12))
    return score, {
        "public_nonmembers": int(len(pub)),
        "folds": folds,
        "features": int(x.shape[1]),
        "principal_components": n_comp,
        "mean_r2_out_of_fold": r2,
        "public_z_sd": float(np.std(pub_res)),
    }
