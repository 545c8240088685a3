"""Which examples privacy.membership scores: every non-member by default (up to a cap), members and
non-members capped separately, the max_examples shorthand unchanged, and the draws seeded."""

from __future__ import annotations

import numpy as np
import pytest

from fmaudit.audits.privacy.membership import DEFAULT_MAX_NONMEMBERS, MembershipAudit
from fmaudit.data import Dataset, Split
from fmaudit.privacy.membership.sets import audit_sets


def _split(n: int, n_members: int) -> Split:
    ids = [f"x{i}" for i in range(n)]
    data = Dataset("toy", "test", "text", ids, np.arange(n) % 2, texts=[f"text {i}" for i in range(n)])
    order = np.random.default_rng(3).permutation(n)
    return Split(data, np.sort(order[:n_members]), np.sort(order[n_members:]), 0, n_members / n)


def _sets(split: Split, **caps):
    kw = {"max_members": None, "max_nonmembers": None, **caps}
    return audit_sets(members=None, nonmembers=None, data=None, split=split, target_name="t", seed=5, **kw)


def test_every_nonmember_is_scored_by_default():
    p = MembershipAudit.Params()
    assert p.member_cap() is None and p.nonmember_cap() == DEFAULT_MAX_NONMEMBERS
    split = _split(1400, 350)
    s = _sets(split, max_members=p.member_cap(), max_nonmembers=p.nonmember_cap())
    assert int(s.is_member.sum()) == 350 and int((~s.is_member).sum()) == 1050
    assert set(s.audit_idx[~s.is_member]) == set(split.nonmember_idx)


def test_caps_apply_separately_and_the_shorthand_caps_both():
    p = MembershipAudit.Params(max_examples=100)
    assert (p.member_cap(), p.nonmember_cap()) == (100, 100)
    p = MembershipAudit.Params(max_examples=100, max_nonmembers=1000)
    assert (p.member_cap(), p.nonmember_cap()) == (100, 1000)
    p = MembershipAudit.Params(max_members=40)
    assert (p.member_cap(), p.nonmember_cap()) == (40, DEFAULT_MAX_NONMEMBERS)
    # the params as the report records them (every field, defaults included) resolve to the same caps
    again = MembershipAudit.Params(**MembershipAudit.Params(max_examples=100).model_dump())
    assert (again.member_cap(), again.nonmember_cap()) == (100, 100)

    split = _split(1400, 350)
    s = _sets(split, max_members=100, max_nonmembers=1000)
    mem, non = s.audit_idx[s.is_member], s.audit_idx[~s.is_member]
    assert len(mem) == 100 and len(non) == 1000
    assert set(mem) <= set(split.member_idx) and set(non) <= set(split.nonmember_idx)
    again = _sets(split, max_members=100, max_nonmembers=1000)
    assert np.array_equal(again.audit_idx, s.audit_idx)  # seeded
    other = audit_sets(
        members=None, nonmembers=None, data=None, split=split, target_name="t", seed=6, max_members=100,
        max_nonmembers=1000,
    )  # fmt: skip
    assert not np.array_equal(other.audit_idx, s.audit_idx)


@pytest.mark.parametrize("bad", [{"max_members": 0}, {"max_nonmembers": 0}, {"max_examples": 1}])
def test_caps_below_one_example_are_refused(bad):
    with pytest.raises(ValueError):
        MembershipAudit.Params(**bad)
