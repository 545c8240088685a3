"""Exposure of secret-sharer canaries (Carlini et al. 2019): how far up the ranking of all possible secrets the
trained model puts each inserted one, in bits."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fmaudit.data import Dataset
from fmaudit.privacy.canary.kinds import SECRET_PREFIX
from fmaudit.seeds import Stream
from fmaudit.seeds import rng as stream_rng


def estimate_exposure(
    *, canary_losses: np.ndarray, candidate_losses: np.ndarray, space_bits: float
) -> tuple[np.ndarray, str]:
    """Exposure = log2 |R| - log2 rank (Carlini et al. 2019), and the estimator that produced it.

    "skewnorm": the rank fraction P(candidate loss <= canary loss) is extrapolated from a skew-normal fitted
    to random candidates' losses (their Section 4.3), so ranks beyond the sample are estimated; capped at
    log2 |R| (rank 1).
    "empirical_rank": when the fit fails (scipy's FitError, e.g. "Optimization converged to parameters that
    are outside the range allowed by the distribution" on tied losses) or gives non-finite values, the rank
    fraction is the candidates' own: (1 + #{candidate loss <= canary loss}) / (1 + n), i.e. the estimated
    rank is |R| times that. No extrapolation: exposure is at most log2(n + 1) bits with n candidates."""
    canary_losses = np.asarray(canary_losses, dtype=np.float64)
    candidate_losses = np.asarray(candidate_losses, dtype=np.float64)
    floor = 2.0 ** (-space_bits)
    try:
        import warnings

        from scipy.stats import skewnorm

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # overflow inside the optimizer on odd data
            params = skewnorm.fit(candidate_losses)
            frac = skewnorm.cdf(canary_losses, *params)
        if not (np.all(np.isfinite(params)) and np.all(np.isfinite(frac))):
            raise ValueError(f"skew-normal fit gave non-finite values (params {params})")
        estimator = "skewnorm"
    except Exception as exc:  # scipy.stats.FitError is a RuntimeError; non-finite data raises ValueError
        if not isinstance(exc, (RuntimeError, ValueError)):
            raise
        below = (candidate_losses[None, :] <= canary_losses[:, None]).sum(axis=1)
        frac = (1.0 + below) / (1.0 + len(candidate_losses))
        estimator = "empirical_rank"
    bits = -np.log2(np.clip(frac, floor, 1.0))
    return np.minimum(bits, space_bits), estimator


def exposure(*, canary_losses: np.ndarray, candidate_losses: np.ndarray, space_bits: float) -> np.ndarray:
    """Exposure per canary (see `estimate_exposure`, which also says which estimator was used)."""
    return estimate_exposure(canary_losses=canary_losses, candidate_losses=candidate_losses, space_bits=space_bits)[0]


def exposure_comparison(exposures: np.ndarray, included: np.ndarray) -> dict[str, float | None]:
    """Do the inserted secrets rank higher than the excluded ones? The AUC of exposure for included vs excluded
    canaries (0.5: no difference; ties count half) and the one-sided Mann-Whitney p-value for "included
    exposures are larger" (scipy's exact test for small samples without ties, else the normal approximation).
    Inclusion is a fair coin per canary, so under "the model learned nothing about the secrets" the two groups
    are exchangeable and the test is valid. None for both when either group is empty."""
    from scipy.stats import mannwhitneyu

    exp = np.asarray(exposures, dtype=np.float64)
    inc = np.asarray(included, dtype=bool)
    if not inc.any() or inc.all():
        return {"auc": None, "p_value": None}
    res = mannwhitneyu(exp[inc], exp[~inc], alternative="greater")
    return {"auc": float(res.statistic) / (inc.sum() * (~inc).sum()), "p_value": float(res.pvalue)}


def secret_exposure(
    model: Any, canaries: Dataset, included: np.ndarray, *, seed: int, digits: int, n_candidates: int
) -> dict[str, Any]:
    """Exposure of each secret canary among `n_candidates` random secrets of the same form (CANARY_EXPOSURE
    stream), and its summary: mean and max over included canaries, mean over excluded ones, and whether the
    included ones rank higher (`exposure_comparison`)."""
    rng = stream_rng(seed, Stream.CANARY_EXPOSURE)
    taken = set(canaries.texts or [])
    cands: list[str] = []
    while len(cands) < n_candidates:
        t = f"{SECRET_PREFIX} " + " ".join(str(d) for d in rng.integers(0, 10, size=digits))
        if t not in taken:
            taken.add(t)
            cands.append(t)
    cand_data = Dataset("candidates", "candidates", "text", [f"cand:{i}" for i in range(len(cands))], texts=cands)
    cand_loss = model.per_example_loss(cand_data)
    can_loss = model.per_example_loss(canaries)
    bits = digits * math.log2(10)
    exp, estimator = estimate_exposure(canary_losses=can_loss, candidate_losses=cand_loss, space_bits=bits)
    return {
        "space_bits": bits,
        "candidates": n_candidates,
        "estimator": estimator,
        "max_resolvable_bits": bits if estimator == "skewnorm" else min(bits, math.log2(n_candidates + 1)),
        "mean_included": float(exp[included].mean()) if included.any() else None,
        "mean_excluded": float(exp[~included].mean()) if (~included).any() else None,
        "max_included": float(exp[included].max()) if included.any() else None,
        **{f"{k}_included_vs_excluded": v for k, v in exposure_comparison(exp, included).items()},
        "per_canary": exp.tolist(),
    }
