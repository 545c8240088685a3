"""The member and non-member examples a membership audit attacks: from given example ids or from the
target's fine-tune split, checked, and optionally a seeded sample of each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fmaudit.data import Dataset, Split
from fmaudit.seeds import Stream, rng


@dataclass(frozen=True)
class AuditSets:
    population: Dataset  # every example the indices point into (the target's whole fine-tune data)
    audit_idx: np.ndarray  # the attacked examples: members first, then non-members
    is_member: np.ndarray  # per attacked example
    source: dict[str, Any]  # where membership came from (the report's `sets` table)
    audit: Dataset  # population[audit_idx]
    shared_texts: int  # texts found among both members and non-members (under different ids)


def validate_ids(members: list[str], nonmembers: list[str] | None, known: list[str]) -> None:
    """Raise ValueError when a set is empty, names unknown or duplicate ids, or the two sets overlap."""
    if not members:
        raise ValueError("the member set is empty; membership inference needs at least one member")
    if nonmembers is not None and not nonmembers:
        raise ValueError("the non-member set is empty; membership inference needs at least one non-member")
    known_set = set(known)
    for label, ids in (("members", members), ("nonmembers", nonmembers or [])):
        missing = [x for x in ids if x not in known_set]
        if missing:
            raise ValueError(f"{label}: {len(missing)} id(s) not in the data, e.g. {missing[:3]}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{label}: duplicate ids")
    if nonmembers is not None:
        both = sorted(set(members) & set(nonmembers))
        if both:
            raise ValueError(
                f"members and non-members overlap in {len(both)} example(s), e.g. {both[:3]}; an example cannot be both"
            )


def audit_sets(
    *,
    members: list[str] | None,
    nonmembers: list[str] | None,
    data: Dataset | None,
    split: Split | None,
    target_name: str,
    max_members: int | None,
    max_nonmembers: int | None,
    seed: int,
) -> AuditSets:
    """Members and non-members: the ids given (non-members default to every other example of `data`), else
    `split` (which must be over `data` when data is given); then seeded samples of at most `max_members`
    members and `max_nonmembers` non-members (None: all; one MEMBERSHIP_SAMPLE generator, members drawn first)."""
    if members is not None:
        if data is None:
            raise ValueError("members were given but the audit has no data to find them in")
        mem_ids = list(members)
        non_ids = list(nonmembers) if nonmembers is not None else None
        validate_ids(mem_ids, non_ids, data.ids)
        pos = {x: i for i, x in enumerate(data.ids)}
        mem = np.array([pos[x] for x in mem_ids], dtype=np.int64)
        if non_ids is None:
            mask = np.ones(len(data), bool)
            mask[mem] = False
            non = np.nonzero(mask)[0]
        else:
            non = np.array([pos[x] for x in non_ids], dtype=np.int64)
        population = data
        source: dict[str, Any] = {"source": "params"}
    else:
        if split is None:
            raise ValueError(
                f"target {target_name!r} has no member / non-member split; fine-tune it in the recipe "
                "or give params members / nonmembers"
            )
        if data is not None and data.fingerprint != split.dataset.fingerprint:
            raise ValueError(
                f"the audit's data {data.name!r} is not the data target {target_name!r} was "
                f"fine-tuned on ({split.dataset.name!r}), so membership is unknown; drop `data:` "
                "or give params members / nonmembers"
            )
        population = split.dataset
        mem, non = np.asarray(split.member_idx), np.asarray(split.nonmember_idx)
        validate_ids([population.ids[i] for i in mem], [population.ids[i] for i in non], population.ids)
        source = {"source": "split", "split_seed": split.seed, "member_fraction": split.member_fraction}
    if len(mem) == 0 or len(non) == 0:
        raise ValueError(
            f"membership inference needs members and non-members; got {len(mem)} member(s) and {len(non)} non-member(s)"
        )
    g = rng(seed, Stream.MEMBERSHIP_SAMPLE)  # one generator for both draws: members, then non-members
    if max_members is not None and len(mem) > max_members:
        mem = np.sort(g.choice(mem, max_members, replace=False))
    if max_nonmembers is not None and len(non) > max_nonmembers:
        non = np.sort(g.choice(non, max_nonmembers, replace=False))
    audit_idx = np.r_[mem, non].astype(np.int64)
    is_member = np.r_[np.ones(len(mem), bool), np.zeros(len(non), bool)]
    shared = 0
    if population.texts is not None:
        shared = len(set(population.texts[i] for i in mem) & set(population.texts[i] for i in non))
    return AuditSets(
        population=population,
        audit_idx=audit_idx,
        is_member=is_member,
        source=source,
        audit=population.subset(audit_idx, name=f"{population.name}[audit]"),
        shared_texts=shared,
    )
