"""fmaudit.seeds: every random stream is its own; no two (stream, keys) pairs share a generator."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fmaudit.seeds import Stream, derive, rng, seed_sequence


def test_numpy_pads_seed_lists_with_zeros():
    """The trap these streams exist for: a trailing 0 in a seed list changes nothing."""
    assert np.array_equal(np.random.default_rng([7, 0]).permutation(50), np.random.default_rng(7).permutation(50))


def test_streams_never_coincide():
    draws = {}
    for seed, stream in itertools.product([0, 1, 2**31], list(Stream)):
        for keys in [(), (0,), (1,), (0, 0)]:
            state = tuple(seed_sequence(seed, stream, *keys).generate_state(4))
            assert state not in draws, (seed, stream, keys, draws.get(state))
            draws[state] = (seed, stream, keys)


def test_stream_with_key_zero_is_not_the_bare_seed():
    for s in (0, 3):
        assert not np.array_equal(
            rng(s, Stream.REFERENCE_HALVES, 0).permutation(100), np.random.default_rng(s).permutation(100)
        )
        assert not np.array_equal(
            rng(s, Stream.REFERENCE_HALVES, 0).permutation(100), rng(s, Stream.SPLIT).permutation(100)
        )


def test_reproducible_and_bounded():
    assert derive(5, Stream.DP_NOISE) == derive(5, Stream.DP_NOISE)
    assert 0 <= derive(5, Stream.DP_NOISE) < 2**63
    assert np.array_equal(rng(1, Stream.SPLIT).random(5), rng(1, Stream.SPLIT).random(5))
    with pytest.raises(ValueError):
        rng(-1, Stream.SPLIT)


def test_stream_ids_are_stable():
    """Stream ids are part of the reproducibility contract: renumbering one changes every recorded run."""
    assert Stream.DATA_LIMIT == 1 and Stream.SPLIT == 2 and Stream.REFERENCE_HALVES == 6
    assert len({int(s) for s in Stream}) == len(Stream)


def test_reference_halves_do_not_replay_the_member_split():
    """Defect: with reference_seed 0 and recipe seed 0, reference model 0 trained on exactly the target's
    members and model 1 on exactly its non-members."""
    from fmaudit.data import Dataset, member_split
    from fmaudit.privacy.membership.reference_models import paired_halves, reference_overlap

    n = 400
    data = Dataset("d", "d", "text", [f"x{i}" for i in range(n)], texts=[f"t{i}" for i in range(n)])
    for seed in range(5):
        split = member_split(data, member_fraction=0.5, seed=seed)
        is_member = np.zeros(n, bool)
        is_member[split.member_idx] = True
        masks = paired_halves(n, 4, seed=seed)
        ov = reference_overlap(masks, is_member)
        assert ov["correlated"] == [], (seed, ov)
        for m in ov["models"]:
            assert abs(m["member_overlap"] - 0.5) < 0.12 and abs(m["nonmember_overlap"] - 0.5) < 0.12
    # and the check itself fires on references that do know the answer
    leaky = np.stack([is_member, ~is_member])
    assert reference_overlap(leaky, is_member)["correlated"] == [0, 1]
