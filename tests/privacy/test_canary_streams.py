"""Canary audit randomness (issue 13, item 1 applied to canaries) and the exposure fallback (issue 19)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fmaudit.data import Dataset
from fmaudit.privacy.canary import estimate_exposure, exposure, inclusion_vector, make_canaries

N_POOL, M, SEEDS = 300, 100, 1000


def _pool() -> Dataset:
    return Dataset(
        "pool",
        "pool",
        "text",
        [f"p{i}" for i in range(N_POOL)],
        np.arange(N_POOL) % 2,
        texts=[f"example {i}" for i in range(N_POOL)],
    )


def _choice_inclusion_z(draw) -> float:
    """z-score of the pooled correlation, over seeds, between which pool example became canary i and
    whether canary i is included. ~N(0, 1) when inclusion is independent of the canary choice."""
    src, inc = [], []
    for seed in range(SEEDS):
        s, i = draw(seed)
        src.append(s)
        inc.append(i)
    src, inc = np.asarray(src, float), np.asarray(inc, float)
    zs = (src - src.mean(0)) / src.std(0)
    zi = (inc - inc.mean(0)) / inc.std(0)
    per_canary = (zs * zi).mean(0) * math.sqrt(SEEDS)  # ~N(0, 1) each under independence
    return float(per_canary.sum() / math.sqrt(M))


def test_inclusion_is_independent_of_which_examples_became_canaries():
    pool = _pool()

    def draw(seed):
        canaries = make_canaries("flipped_label", m=M, seed=seed, pool=pool, target=None, num_labels=2)
        return [int(c.split(":p")[1]) for c in canaries.ids], inclusion_vector(M, seed)

    z = _choice_inclusion_z(draw)
    assert abs(z) < 4.0, z

    # The statistic has power: the old construction (one generator, default_rng(seed), for both the choice
    # and the inclusion) is flagged far beyond chance.
    def shared(seed):
        chosen = np.sort(np.random.default_rng(seed).choice(N_POOL, size=M, replace=False))
        return chosen, np.random.default_rng(seed).random(M) < 0.5

    assert abs(_choice_inclusion_z(shared)) > 6.0


def test_canary_streams_are_seeded_and_distinct():
    pool = _pool()
    a = make_canaries("flipped_label", m=M, seed=3, pool=pool, target=None, num_labels=2)
    b = make_canaries("flipped_label", m=M, seed=3, pool=pool, target=None, num_labels=2)
    assert a.ids == b.ids and np.array_equal(a.labels, b.labels)
    assert np.array_equal(inclusion_vector(M, 3), inclusion_vector(M, 3))
    assert not np.array_equal(inclusion_vector(M, 3), inclusion_vector(M, 4))
    # inclusion no longer reuses the bare seed's generator
    assert not np.array_equal(inclusion_vector(M, 3), np.random.default_rng(3).random(M) < 0.5)
    assert 0.35 < inclusion_vector(10_000, 0).mean() < 0.65


def test_exposure_falls_back_to_the_empirical_rank_when_the_fit_fails():
    from scipy.stats import skewnorm

    candidates = np.full(99, 2.0)  # tied losses: scipy's skew-normal fit fails on them
    with pytest.raises(Exception, match="outside the range allowed by the distribution"):
        skewnorm.fit(candidates)
    canaries = np.array([1.0, 2.0, 3.0])
    bits, estimator = estimate_exposure(
        canary_losses=canaries, candidate_losses=candidates, space_bits=6 * math.log2(10)
    )
    assert estimator == "empirical_rank"
    # below every candidate: rank fraction 1/(n+1) -> log2(100) bits; tied or above: rank fraction 1 -> 0 bits
    assert bits == pytest.approx([math.log2(100), 0.0, 0.0])
    assert np.array_equal(
        exposure(canary_losses=canaries, candidate_losses=candidates, space_bits=6 * math.log2(10)), bits
    )
    # never above log2 |R|
    bits, _ = estimate_exposure(canary_losses=np.array([0.0]), candidate_losses=np.full(2000, 1.0), space_bits=4.0)
    assert bits[0] == 4.0


def test_exposure_falls_back_when_the_fit_raises(monkeypatch):
    from scipy.stats import FitError, skewnorm

    def broken(*_a, **_k):
        raise FitError("Optimization converged to parameters that are outside the range allowed by the distribution.")

    monkeypatch.setattr(skewnorm, "fit", broken)
    rng = np.random.default_rng(0)
    candidates = rng.normal(3.0, 0.5, size=300)
    bits, estimator = estimate_exposure(
        canary_losses=np.array([0.0, 3.0]), candidate_losses=candidates, space_bits=20.0
    )
    assert estimator == "empirical_rank"
    below = (candidates <= 3.0).sum()
    assert bits == pytest.approx([math.log2(301), -math.log2((1 + below) / 301)])


def test_exposure_uses_the_skew_normal_fit_when_it_converges():
    rng = np.random.default_rng(0)
    candidates = rng.normal(3.0, 0.5, size=300)
    bits, estimator = estimate_exposure(
        canary_losses=np.array([0.0, 3.0]), candidate_losses=candidates, space_bits=20.0
    )
    assert estimator == "skewnorm"
    assert bits[0] > math.log2(301)  # extrapolates beyond the sample (6 sd below the mean)
    assert bits[1] == pytest.approx(1.0, abs=0.3)  # the median candidate: about half rank below


def test_canary_kinds_registry_covers_every_task_and_names_unknown_kinds():
    from fmaudit.privacy.canary import DEFAULT_KIND, KINDS, kinds_for
    from fmaudit.tasks import CAUSAL_LM, IMAGE_CLASSIFICATION, TASKS, TEXT_CLASSIFICATION

    assert set(DEFAULT_KIND) == set(TASKS) and all(DEFAULT_KIND[t] in kinds_for(t) for t in TASKS)
    assert kinds_for(TEXT_CLASSIFICATION) == {"flipped_label", "random_tokens"}
    assert kinds_for(CAUSAL_LM) == {"secret"} and kinds_for(IMAGE_CLASSIFICATION) == {"mislabel", "pattern"}
    assert set().union(*(kinds_for(t) for t in TASKS)) == set(KINDS)
    with pytest.raises(ValueError, match="unknown canary kind 'secrets'; did you mean 'secret'"):
        make_canaries("secrets", m=10, seed=0, pool=None, target=None, num_labels=None)
