"""Included vs excluded secret exposure: the AUC and the one-sided Mann-Whitney test behind the "Planted secrets
are exposed" finding. Cross-checked against scikit-learn's AUC; planted and null cases; the test's false-positive
rate at 5% under the null (inclusion is a fair coin, so the groups are exchangeable)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fmaudit.privacy.canary.exposure import exposure_comparison


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    exp = np.round(rng.normal(size=40), 1)  # rounded: ties across the groups
    inc = rng.random(40) < 0.5
    got = exposure_comparison(exp, inc)
    assert got["auc"] == pytest.approx(roc_auc_score(inc, exp), abs=1e-12)


def test_planted_exposure_is_found_and_reversed_is_not():
    rng = np.random.default_rng(1)
    inc = np.arange(24) % 2 == 0
    exp = rng.normal(size=24) + 3.0 * inc
    got = exposure_comparison(exp, inc)
    assert got["auc"] > 0.9 and got["p_value"] < 1e-3
    rev = exposure_comparison(-exp, inc)  # one-sided: excluded secrets ranking higher is no exposure
    assert rev["auc"] < 0.1 and rev["p_value"] > 0.99


def test_false_positive_rate_under_the_null_is_the_level():
    rng = np.random.default_rng(2)
    rejections = 0
    trials = 2000
    for _ in range(trials):
        inc = rng.random(24) < 0.5
        exp = rng.exponential(size=24)  # skewed, like exposures
        pv = exposure_comparison(exp, inc)["p_value"]
        rejections += pv is not None and pv < 0.05
    assert 0.03 <= rejections / trials <= 0.07


def test_one_empty_group_gives_no_answer():
    assert exposure_comparison(np.ones(5), np.ones(5, dtype=bool)) == {"auc": None, "p_value": None}
    assert exposure_comparison(np.ones(5), np.zeros(5, dtype=bool)) == {"auc": None, "p_value": None}
