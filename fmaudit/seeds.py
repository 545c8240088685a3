"""Domain-separated random streams: every random choice in fmaudit draws from its own named stream.

Why: numpy pads a seed list with zeros, so `default_rng([s, 0])` *is* `default_rng(s)`, and two parts of
the code that both start from the run's seed draw the same numbers. That once made reference model 0 train
on exactly the target's members. Here each stream has a fixed non-zero id and the entropy carries the
number of extra keys, so two different (stream, keys) pairs can never give the same generator:

    from fmaudit.seeds import Stream, rng, derive
    perm = rng(seed, Stream.SPLIT).permutation(n)
    halves = rng(seed, Stream.REFERENCE_HALVES, j)          # pair j of reference models
    torch.manual_seed(derive(seed, Stream.TRAIN_TORCH))     # an int for libraries that take one

Stream ids are part of the reproducibility contract (same recipe + seed -> same numbers): never renumber
one; add new streams at the end.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

__all__ = ["Stream", "derive", "rng", "seed_sequence"]


class Stream(IntEnum):
    DATA_LIMIT = 1  # seeded sample of a dataset cut down by `limit`
    SPLIT = 2  # member / non-member split of a fine-tune dataset
    HEAD_INIT = 3  # newly initialized classification heads / bundled image models
    TRAIN_TORCH = 4  # torch global generator during a fine-tune (dropout, init of new layers)
    TRAIN_SHUFFLE = 5  # data-loader order during a fine-tune
    REFERENCE_HALVES = 6  # which half of the population each reference model trains on
    REFERENCE_TRAIN = 7  # training seed of each reference model
    MEMBERSHIP_SAMPLE = 8  # membership: seeded sample of members / non-members (max_examples)
    BOOTSTRAP = 9  # bootstrap resampling for intervals
    SELECTION_SPLIT = 10  # membership: which half of the audit set picks the headline attack
    NULL_PERMUTATION = 11  # membership: permuted-label null reference
    CANARY_MAKE = 12  # canary audit: which examples / secrets become canaries
    CANARY_INCLUDE = 13  # canary audit: which canaries are included (Bernoulli 1/2 each)
    CANARY_EXPOSURE = 14  # canary audit: random candidate secrets for exposure ranks
    CANARY_MEMBERS = 15  # canary audit: seeded sample of the members (max_members)
    CANARY_TRAIN = 16  # canary audit: training seed of the canary run
    DP_NOISE = 17  # DP-SGD Gaussian noise
    DP_SAMPLER = 18  # DP-SGD Poisson sampling
    DP_TRAIN = 19  # DP fine-tune: torch generator (init, dropout)
    EXAMPLE_SAMPLE = 20  # modules: seeded sample of the examples a module works on
    BLIND_BASELINE = 21  # membership: blind (model-free) baseline's bootstrap
    CANARY_GUESS_SPLIT = 22  # canary audit: canaries used to choose the number of guesses
    ATTRIBUTION_ORDER = 23  # attribution: order in which examples are explained
    ATTRIBUTION_PERTURB = 24  # attribution: sensitivity / infidelity perturbations
    ATTRIBUTION_SHAP = 25  # attribution: GradientShap's baseline noise
    ATTRIBUTION_RANDOMIZE = 26  # attribution: re-initialized weights of the randomization check
    ATTRIBUTION_CURVES = 27  # attribution: random deletion / insertion orders
    QUANTILE_FOLDS = 28  # membership: cross-fitting folds of the quantile-regression attack
    GRADIENT_CANARY_COORDS = 29  # DP-SGD gradient canaries: which parameter coordinates carry them
    GRADIENT_CANARY_INCLUDE = 30  # DP-SGD gradient canaries: which are included (Bernoulli 1/2 each)
    GRADIENT_CANARY_SAMPLE = 31  # DP-SGD gradient canaries: Poisson sampling of included ones per step
    GRADIENT_CANARY_GUESS_SPLIT = 32  # DP-SGD gradient canaries: held out to choose the number of guesses


def seed_sequence(seed: int, stream: Stream, *keys: int) -> np.random.SeedSequence:
    """The SeedSequence of `stream` (with optional integer `keys`, e.g. a model index) under `seed`."""
    seed = int(seed)
    if seed < 0 or any(int(k) < 0 for k in keys):
        raise ValueError(f"seeds and stream keys must be non-negative integers (got {seed}, {keys})")
    # [stream id (non-zero), number of keys + 1, *keys, seed]: the length tag means that zero padding of a
    # shorter entropy list can never produce a longer one's entropy.
    return np.random.SeedSequence([int(Stream(stream)), len(keys) + 1, *(int(k) for k in keys), seed])


def rng(seed: int, stream: Stream, *keys: int) -> np.random.Generator:
    """A numpy Generator for `stream` under `seed`."""
    return np.random.default_rng(seed_sequence(seed, stream, *keys))


def derive(seed: int, stream: Stream, *keys: int) -> int:
    """An integer seed in [0, 2**63) for libraries that take one (torch.manual_seed, Opacus)."""
    return int(seed_sequence(seed, stream, *keys).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
