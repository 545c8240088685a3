"""LiRA and RMIA scores from reference-model signals (numpy / scipy only; no torch).

- LiRA (Carlini et al. 2022): Gaussian likelihood ratio of the target's logit-scaled confidence under
  reference models that trained on the example (IN) or not (OUT); online (IN and OUT) and offline (OUT
  only, one-sided), with per-example or fixed (global) variance.
- RMIA (Zarifzadeh et al. 2024): likelihood ratio of Pr(x | target) / Pr(x) against population samples z.

Reference signals are arrays (R, n) with an IN mask (R, n): `in_mask[r, i]` is true when reference model r
trained on example i. Every score is higher = more likely a member.
"""

from __future__ import annotations

import numpy as np

_TINY = 1e-30


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
    info: dict[str, float] = {"imputed_in": int((n_in == 0).sum()), "imputed_out": int((n_out == 0).sum())}
    if (n_in == 0).any() or (n_out == 0).any():
        if not in_mask.any() or in_mask.all():
            raise ValueError("reference models need both IN and OUT observations to calibrate")
        gap = ref[in_mask].mean() - ref[~in_mask].mean()
        info["global_in_out_gap"] = float(gap)
        mu_in = np.where(n_in == 0, mu_out + gap, mu_in)
        mu_out = np.where(n_out == 0, mu_in - gap, mu_out)
    return mu_in, mu_out, info


def shrink_in_out_gap(
    ref: np.ndarray, in_mask: np.ndarray, mu_in: np.ndarray, mu_out: np.ndarray
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
    return gap, {
        "global_in_out_gap": global_gap,
        "gap_between_example_var": tau2,
        "within_example_var": s_w2,
        "gap_shrinkage_weight_median": float(np.median(w)),
        "raw_gaps_negative": int((raw[both] < 0).sum()),
    }


def lira_scores(
    target: np.ndarray, ref: np.ndarray, in_mask: np.ndarray, *, fixed_variance: bool = True, shrink: bool = True
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
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


def rmia_scores(
    target_logp: np.ndarray,
    ref_logp: np.ndarray,
    in_mask: np.ndarray,
    *,
    offline: bool = False,
    a: float = 0.3,
    gamma: float = 1.0,
    population: np.ndarray | None = None,
) -> np.ndarray:
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
