"""Membership-inference attack scores from model outputs (numpy only; no torch).

Every function returns one score per example, higher = more likely a member.

- Baselines: loss threshold (Yeom et al. 2018), max-confidence and prediction entropy (Salem et al. 2019).
- LiRA (Carlini et al. 2022): Gaussian likelihood ratio of the target's logit-scaled confidence under
  reference models that trained on the example (IN) or not (OUT); online (IN and OUT) and offline (OUT
  only, one-sided), with per-example or fixed (global) variance.
- RMIA (Zarifzadeh et al. 2024): likelihood ratio of Pr(x | target) / Pr(x) against population samples z.
- Causal LMs: sequence loss, zlib ratio (Carlini et al. 2021), Min-K% Prob (Shi et al. 2023) and
  Min-K%++ (Zhang et al. 2024).

Reference signals are arrays (R, n) with an IN mask (R, n): `in_mask[r, i]` is true when reference model r
trained on example i.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

_TINY = 1e-30


def _logsumexp(z: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(z, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return (m + np.log(np.sum(np.exp(z - m), axis=axis, keepdims=True))).squeeze(axis)


def classifier_signals(logits: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-example signals of a classifier: loss, log p(true label), logit-scaled confidence, max
    confidence and entropy."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    n = len(y)
    lse = _logsumexp(z)
    logp = z - lse[:, None]
    logp_true = logp[np.arange(n), y]
    others = z.copy()
    others[np.arange(n), y] = -np.inf
    # log(p / (1 - p)) computed from logits: stable even when p rounds to 1.0
    phi = z[np.arange(n), y] - _logsumexp(others)
    p = np.exp(logp)
    return {"loss": -logp_true, "logp_true": logp_true, "phi": phi, "confidence": p.max(axis=1),
            "entropy": -(p * logp).sum(axis=1)}


def logit_scale(logp: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) from log p (p <= 1)."""
    logp = np.minimum(np.asarray(logp, dtype=np.float64), -1e-12)
    return logp - np.log(-np.expm1(logp))


def sequence_signals(token_logprobs: Sequence[np.ndarray], texts: Sequence[str] | None, *, k: float = 0.2,
                     token_mu: Sequence[np.ndarray] | None = None,
                     token_sigma: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per-sequence scores of a causal LM from next-token log-probs (first token excluded).

    loss = mean token NLL; zlib = loss / zlib-compressed length in bytes; min_k = mean of the lowest k
    fraction of token log-probs; min_k_pp = the same over (log p - mu) / sigma, where mu and sigma are the
    mean and standard deviation of log p(z) under the model's own next-token distribution."""
    n = len(token_logprobs)
    loss = np.zeros(n)
    min_k = np.zeros(n)
    min_k_pp = np.full(n, np.nan)
    for i, lp in enumerate(token_logprobs):
        lp = np.asarray(lp, dtype=np.float64)
        if len(lp) == 0:
            raise ValueError("a sequence shorter than 2 tokens has no next-token log-probs to score")
        loss[i] = -lp.mean()
        m = max(1, int(np.ceil(k * len(lp))))
        min_k[i] = np.sort(lp)[:m].mean()
        if token_mu is not None and token_sigma is not None:
            zs = (lp - token_mu[i]) / np.maximum(token_sigma[i], 1e-8)
            min_k_pp[i] = np.sort(zs)[:m].mean()
    out = {"loss": loss, "logp_true": -loss, "phi": logit_scale(-loss), "min_k": min_k}
    if token_mu is not None:
        out["min_k_pp"] = min_k_pp
    if texts is not None:
        zl = np.array([max(len(zlib.compress(t.encode("utf-8"))), 1) for t in texts], dtype=np.float64)
        out["zlib"] = loss / zl
    return out


# ---------------------------------------------------------------------------------------------------
# Reference-model attacks


def _masked_mean(x: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cnt = mask.sum(axis=0)
    s = np.where(mask, x, 0.0).sum(axis=0)
    return np.divide(s, cnt, out=np.full(x.shape[1], np.nan), where=cnt > 0), cnt


def in_out_means(ref: np.ndarray, in_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Per-example mean of the IN and OUT reference signals.

    An example with no IN (or no OUT) reference model (possible with a single reference model) gets the
    other mean shifted by the global IN - OUT gap, measured over every (model, example) pair."""
    ref = np.asarray(ref, dtype=np.float64)
    in_mask = np.asarray(in_mask, dtype=bool)
    mu_in, n_in = _masked_mean(ref, in_mask)
    mu_out, n_out = _masked_mean(ref, ~in_mask)
    info = {"imputed_in": int((n_in == 0).sum()), "imputed_out": int((n_out == 0).sum())}
    if (n_in == 0).any() or (n_out == 0).any():
        if not in_mask.any() or in_mask.all():
            raise ValueError("reference models need both IN and OUT observations to calibrate")
        gap = ref[in_mask].mean() - ref[~in_mask].mean()
        info["global_in_out_gap"] = float(gap)
        mu_in = np.where(n_in == 0, mu_out + gap, mu_in)
        mu_out = np.where(n_out == 0, mu_in - gap, mu_out)
    return mu_in, mu_out, info


def shrink_in_out_gap(ref: np.ndarray, in_mask: np.ndarray, mu_in: np.ndarray, mu_out: np.ndarray
                      ) -> tuple[np.ndarray, dict[str, float]]:
    """Per-example IN - OUT gap shrunk toward the global gap, never below 0 (empirical Bayes).

    With few reference models the per-example gap mu_in - mu_out is mostly noise, and a gap whose sign
    flips turns LiRA-online's score upside down for that example; the LiRA paper's small-budget analysis
    is that the global (offline-like) gap is then the better estimate. Here
    gap_i = w_i * raw_i + (1 - w_i) * G, with G the global gap over every (model, example) pair,
    s_i^2 = s_w^2 (1/n_in_i + 1/n_out_i) the sampling variance of raw_i from the pooled within-example
    variance s_w^2 across reference models, tau^2 = max(0, var(raw) - mean(s^2)) the spread of the true
    gaps and w_i = tau^2 / (tau^2 + s_i^2); then clipped at 0 (training on an example does not make the
    model less confident on it, in expectation). With at most one IN and one OUT model per example there
    is no within-example variance to measure, and every gap is the global one (w = 0)."""
    n_in = in_mask.sum(0)
    n_out = (~in_mask).sum(0)
    global_gap = float(ref[in_mask].mean() - ref[~in_mask].mean())
    raw = mu_in - mu_out
    both = (n_in > 0) & (n_out > 0)
    ss = np.where(in_mask, (ref - mu_in) ** 2, 0.0).sum() + np.where(~in_mask, (ref - mu_out) ** 2, 0.0).sum()
    dof = float(np.maximum(n_in - 1, 0).sum() + np.maximum(n_out - 1, 0).sum())
    if dof > 0 and both.sum() > 1:
        s_w2 = float(ss / dof)
        samp = s_w2 * (1.0 / np.maximum(n_in, 1) + 1.0 / np.maximum(n_out, 1))
        tau2 = float(max(0.0, np.var(raw[both]) - np.mean(samp[both])))
        w = np.where(both, tau2 / (tau2 + samp + _TINY), 0.0)
    else:
        s_w2, tau2, w = float("nan"), 0.0, np.zeros(len(raw))
    gap = np.maximum(w * np.where(both, raw, global_gap) + (1 - w) * global_gap, 0.0)
    return gap, {"global_in_out_gap": global_gap, "gap_between_example_var": tau2, "within_example_var": s_w2,
                 "gap_shrinkage_weight_median": float(np.median(w)),
                 "raw_gaps_negative": int((raw[both] < 0).sum())}


def lira_scores(target: np.ndarray, ref: np.ndarray, in_mask: np.ndarray, *, fixed_variance: bool = True,
                shrink: bool = True) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """LiRA (online, offline) scores from logit-scaled confidences.

    online: log N(target; mu_in, sd_in) - log N(target; mu_out, sd_out)
    offline: (target - mu_out) / sd_out (one-sided test against OUT; monotone in -log P[OUT > target])
    fixed_variance: one global standard deviation, of all IN signals, for both Gaussians (as the LiRA
    reference code does for small reference budgets); with equal variances the online score is linear in
    the target's signal for each example. Else per-example standard deviations over models (needs many
    models; two different global widths would make the score non-monotone and can push AUC below 0.5).
    shrink: mu_in = mu_out + the per-example gap shrunk toward the global gap and clipped at 0
    (`shrink_in_out_gap`); without it, weak reference models make the online attack collapse."""
    from scipy.stats import norm

    ref = np.asarray(ref, dtype=np.float64)
    in_mask = np.asarray(in_mask, dtype=bool)
    t = np.asarray(target, dtype=np.float64)
    mu_in, mu_out, info = in_out_means(ref, in_mask)
    if fixed_variance:
        sd_in = np.full(len(t), np.std(ref[in_mask]) + _TINY)
        sd_out = sd_in
    else:
        def sd(mask: np.ndarray, mu: np.ndarray, fallback: float) -> np.ndarray:
            cnt = mask.sum(0)
            var = np.where(mask, (ref - mu) ** 2, 0.0).sum(0)
            return np.where(cnt >= 2, np.sqrt(np.divide(var, np.maximum(cnt - 1, 1))), fallback) + _TINY

        sd_in = sd(in_mask, mu_in, float(np.std(ref[in_mask])))
        sd_out = sd(~in_mask, mu_out, float(np.std(ref[~in_mask])))
    if shrink and in_mask.any() and (~in_mask).any():
        gap, ginfo = shrink_in_out_gap(ref, in_mask, mu_in, mu_out)
        mu_in = mu_out + gap
        info.update(ginfo)
    info["shrinkage"] = bool(shrink)
    online = norm.logpdf(t, mu_in, sd_in) - norm.logpdf(t, mu_out, sd_out)
    offline = (t - mu_out) / sd_out
    info.update({"sd_in": float(np.median(sd_in)), "sd_out": float(np.median(sd_out))})
    return online, offline, info


def rmia_scores(target_logp: np.ndarray, ref_logp: np.ndarray, in_mask: np.ndarray, *, offline: bool = False,
                a: float = 0.3, gamma: float = 1.0, population: np.ndarray | None = None) -> np.ndarray:
    """RMIA scores: the fraction of population samples z with LR(x, z) > gamma, where
    LR(x, z) = [Pr(x|target) / Pr(x)] / [Pr(z|target) / Pr(z)] and Pr(x) averages the reference models.

    online: Pr(x) = mean over all reference models (IN and OUT for x).
    offline: Pr(x) = ((1 + a) * mean over OUT models + (1 - a)) / 2 (the paper's linear approximation
    of the IN/OUT mixture from OUT models only).
    `population` indexes the examples used as z (default: all).
    Probabilities are given as log-probabilities: Pr(true label) for classifiers, exp(-mean token NLL)
    for causal LMs."""
    t = np.exp(np.asarray(target_logp, dtype=np.float64))
    refp = np.exp(np.asarray(ref_logp, dtype=np.float64))
    in_mask = np.asarray(in_mask, dtype=bool)
    if offline:
        _mu_in, p_out, _info = in_out_means(refp, in_mask)
        p_x = 0.5 * ((1.0 + a) * p_out + (1.0 - a))
    else:
        p_x = refp.mean(axis=0)
    ratio = t / np.maximum(p_x, _TINY)
    z = ratio if population is None else ratio[population]
    z_sorted = np.sort(z)
    # #{z : ratio_x / ratio_z > gamma} = #{z : ratio_z < ratio_x / gamma}
    frac = np.searchsorted(z_sorted, ratio / gamma, side="left") / len(z_sorted)
    # The fraction is a non-decreasing step function of ratio_x, so at gamma > 1 (or with few z) many
    # examples tie (gamma = 4 once left one distinct score on 400 examples). Break ties by ratio_x itself,
    # with a term below the fraction's step (1 / |z|): the ranking, and so AUC and TPR at any FPR, is
    # then that of ratio_x for every gamma, and the printed value is still the paper's fraction to
    # within 1 / (2 |z|).
    from scipy.stats import rankdata

    tie_break = rankdata(ratio) / (len(ratio) + 1) / (2.0 * len(z_sorted))
    return frac + tie_break


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


# ---------------------------------------------------------------------------------------------------
# Quantile-regression attack (Bertran et al. 2023), Gaussian form


def quantile_regression_scores(target_signal: np.ndarray, features: np.ndarray, is_public: np.ndarray, *,
                               folds: int = 5, seed: int = 0) -> tuple[np.ndarray, dict[str, float]]:
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
        raise ValueError(f"the quantile-regression attack needs at least {2 * folds} known non-members to learn "
                         f"from, got {len(pub)}")
    from sklearn.decomposition import PCA

    alphas = np.logspace(-2, 5, 15)
    # few public examples, many features: a ridge on the leading principal components of the standardized
    # features (at most one component per 10 public examples) keeps the regression from extrapolating
    n_comp = int(max(1, min(x.shape[1], len(pub) // (10 * 2), 32)))

    def model():
        return make_pipeline(StandardScaler(), PCA(n_components=n_comp, random_state=0), RidgeCV(alphas=alphas))

    fold_of = np.empty(len(pub), dtype=np.int64)
    fold_of[rng(seed, Stream.QUANTILE_FOLDS).permutation(len(pub))] = np.arange(len(pub)) % folds
    mu = np.zeros(len(s))
    log_sd = np.zeros(len(s))
    others = np.ones(len(s), dtype=bool)
    others[pub] = False
    for k in range(folds):
        train, held = pub[fold_of != k], pub[fold_of == k]
        m_mu = model().fit(x[train], s[train])
        # the spread model learns from honest (out-of-sample) residuals: a second split inside the fold
        half = fold_of[fold_of != k] % 2 == 0
        a, b = train[half], train[~half]
        res = np.r_[s[b] - model().fit(x[a], s[a]).predict(x[b]), s[a] - model().fit(x[b], s[b]).predict(x[a])]
        log_res = np.log(np.abs(res) + 1e-6)
        m_sd = model().fit(x[np.r_[b, a]], log_res)
        lo, hi = np.quantile(log_res, [0.05, 0.95])  # a spread outside what was seen is extrapolation

        def spread(rows: np.ndarray) -> np.ndarray:
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
    return score, {"public_nonmembers": int(len(pub)), "folds": folds, "features": int(x.shape[1]),
                   "principal_components": n_comp,
                   "mean_r2_out_of_fold": r2, "public_z_sd": float(np.std(pub_res))}
