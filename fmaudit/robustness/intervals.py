"""Clopper-Pearson (exact binomial) intervals for accuracies measured on n examples."""

from __future__ import annotations


def clopper_pearson(successes: int, n: int, level: float = 0.95) -> tuple[float, float] | None:
    """Exact two-sided interval for a binomial proportion (scipy's `binomtest(...).proportion_ci(method=
    'exact')`); None when n is 0. Conservative: coverage is at least `level` for every true proportion."""
    from scipy.stats import binomtest

    k, n = int(successes), int(n)
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"successes must be in [0, n] (got {k} of {n})")
    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def half_width(n: int, p: float = 0.5, level: float = 0.95) -> float:
    """Half the width of the Clopper-Pearson interval at observed proportion p on n examples."""
    lo, hi = clopper_pearson(round(p * n), n, level) or (0.0, 1.0)
    return (hi - lo) / 2
