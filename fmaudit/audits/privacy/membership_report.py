"""What `privacy.membership` reports from the attack scores: per-attack metrics and ROC curves, the calibrated
headline with its null reference, the blind baseline, per-example scores and the most exposed members."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fmaudit.audits.base import Outcome
from fmaudit.privacy.membership.attacks import ATTACK_DESCRIPTIONS

if TYPE_CHECKING:
    from fmaudit.audits.privacy.membership import MembershipAudit
    from fmaudit.data import Dataset
    from fmaudit.privacy.membership.headline import Headline
    from fmaudit.privacy.membership.stats import AttackMetrics


def report_scores(
    out: Outcome,
    *,
    p: MembershipAudit.Params,
    attacks: Sequence[str],
    scores: dict[str, np.ndarray],
    is_member: np.ndarray,
    audit: Dataset,
    seed: int,
    store_examples: bool,
) -> None:
    """Add the metrics, curves, tables, findings and evidence of `scores` (attack -> score per audit example,
    in the order of `audit`) to `out`. Scores of +-inf are made finite first, keeping their order."""
    n_mem, n_non = int(is_member.sum()), int((~is_member).sum())
    results = _attack_metrics(out, p=p, attacks=attacks, scores=scores, is_member=is_member, seed=seed)
    heads = _headline(out, p=p, attacks=attacks, scores=scores, is_member=is_member, audit=audit, seed=seed)
    out.metric("num_members", n_mem, unit="examples", description="Members attacked.")
    out.metric("num_nonmembers", n_non, unit="examples", description="Non-members attacked.")
    out.tables["attacks"] = {
        a: {
            "auc": m.auc,
            "auc_ci": m.ci.get("auc"),
            "tpr": m.tpr,
            "advantage": m.advantage,
            "balanced_accuracy": m.balanced_accuracy,
            "ppv_at_1pct_fpr": m.ppv_at_1pct_fpr,
            "best_threshold": m.best_threshold,
            "description": ATTACK_DESCRIPTIONS[a],
        }
        for a, m in results.items()
    }
    out.tables["strongest_attack"] = {name: h.attack for name, h in heads.items()}

    _resolution_findings(out, heads=heads, num_nonmembers=n_non)
    _blind_baseline(out, p=p, is_member=is_member, audit=audit, seed=seed)
    _verdict(out, p=p, heads=heads)
    _examples(out, p=p, attacks=attacks, scores=scores, is_member=is_member, audit=audit, store_examples=store_examples)


def _attack_metrics(
    out: Outcome,
    *,
    p: MembershipAudit.Params,
    attacks: Sequence[str],
    scores: dict[str, np.ndarray],
    is_member: np.ndarray,
    seed: int,
) -> dict[str, AttackMetrics]:
    """Each attack's metrics (intervals simultaneous over the attacks) and ROC curve; `scores` become float64 and
    finite in place (the per-example table reports them so)."""
    from fmaudit.privacy.membership.stats import FPR_LEVELS, attack_metrics, curve_points

    n_mem, n_non = int(is_member.sum()), int((~is_member).sum())
    results = {}
    per_level = 1.0 - (1.0 - p.confidence) / max(1, len(attacks))
    for a in attacks:
        s = np.nan_to_num(np.asarray(scores[a], dtype=np.float64), nan=-np.inf)
        finite = np.isfinite(s)
        if not finite.all():  # +-inf from saturated outputs: keep their order, make them finite
            lo, hi = (s[finite].min(), s[finite].max()) if finite.any() else (0.0, 0.0)
            s = np.where(s == np.inf, hi + 1.0, np.where(s == -np.inf, lo - 1.0, s))
        scores[a] = s
        results[a] = attack_metrics(s, is_member, bootstrap=p.bootstrap, level=per_level, seed=seed)
    simult = (
        f" Intervals are simultaneous over the {len(attacks)} attacks (Bonferroni: each at {per_level:.2%})."
        if len(attacks) > 1
        else ""
    )
    for a, m in results.items():
        desc = ATTACK_DESCRIPTIONS[a]
        out.metric(
            f"{a}.auc",
            m.auc,
            higher_is_better=False,
            ci=m.ci.get("auc"),
            ci_level=per_level,
            unit="fraction",
            description=f"ROC AUC, members positive; {desc}.{simult}",
        )
        for suffix, lvl in FPR_LEVELS:
            out.metric(
                f"{a}.tpr_at_{suffix}_fpr",
                m.tpr[suffix],
                higher_is_better=False,
                ci=m.ci.get(f"tpr_at_{suffix}_fpr"),
                ci_level=per_level,
                unit="fraction",
                description=f"Members found at {lvl:.1%} false-positive rate; {a}",
            )
        out.metric(
            f"{a}.balanced_accuracy",
            m.balanced_accuracy,
            higher_is_better=False,
            unit="fraction",
            description=f"Best balanced accuracy over thresholds (in-sample, biased upward); {a}",
        )
        out.metric(
            f"{a}.advantage",
            m.advantage,
            higher_is_better=False,
            ci=m.ci.get("advantage"),
            ci_level=per_level,
            unit="fraction",
            description=f"Attacker advantage max(TPR - FPR) over thresholds (in-sample: above 0 even "
            f"on pure noise; compare with advantage_null); {a}",
        )
        out.metric(
            f"{a}.ppv_at_1pct_fpr",
            m.ppv_at_1pct_fpr,
            higher_is_better=False,
            unit="fraction",
            description=f"Precision of member guesses at 1% FPR with this audit set's member share "
            f"({n_mem}/{n_mem + n_non}); {a}",
        )
        fx, fy = curve_points(m.fpr, m.tpr_curve)
        out.curve(
            f"roc.{a}",
            fx,
            fy,
            x_label="false positive rate",
            y_label="true positive rate",
            log_x=True,
            log_y=True,
            description=f"ROC of {a} (members positive); plot log-log for the low-FPR regime",
        )
    return results


def _headline(
    out: Outcome,
    *,
    p: MembershipAudit.Params,
    attacks: Sequence[str],
    scores: dict[str, np.ndarray],
    is_member: np.ndarray,
    audit: Dataset,
    seed: int,
) -> dict[str, Headline]:
    """The headline metrics: the strongest attack, chosen on one half and measured on the other, with a null."""
    from fmaudit.privacy.membership.headline import calibrated_headlines

    level = p.confidence
    heads, sel = calibrated_headlines(
        scores, is_member, bootstrap=p.bootstrap, level=level, null_rounds=p.null_permutations, seed=seed
    )
    for name, h in heads.items():
        src = out.metrics[f"{h.attack}.{name}"]
        where = {
            "selection half": f"chosen as the strongest of {len(attacks)} attacks on a random half of the "
            f"audit set, measured on the other half ({h.num_members} members, "
            f"{h.num_nonmembers} non-members)",
            "same examples": f"the strongest of {len(attacks)} attacks on the same examples it is measured "
            "on (too few examples to split them): optimistic",
            "only attack": "the only attack, measured on the whole audit set",
        }[h.selected_on]
        out.metric(
            name,
            h.value,
            higher_is_better=False,
            ci=h.ci,
            ci_level=level if h.ci else None,
            unit=src.unit,
            description=f"Headline: {h.attack} ({where}). {src.description}",
        )
    for name in ("auc", "advantage", "tpr_at_1pct_fpr"):
        h = heads[name]
        if h.null_quantile is not None:
            out.metric(
                f"{name}_null",
                h.null_quantile,
                higher_is_better=False,
                unit="fraction",
                description=f"Null reference for the headline {name}: its {level:.0%} quantile over "
                f"{p.null_permutations} random permutations of the member labels (same "
                "scores, same examples). A headline at or below it is indistinguishable "
                "from chance.",
            )
    if heads["auc"].p_value is not None:
        out.metric(
            "auc_p_value",
            heads["auc"].p_value,
            higher_is_better=True,
            unit="probability",
            description="Permutation p-value of the headline AUC (one-sided): the chance of an AUC at "
            "least this high if membership carried no signal.",
        )
    out.metric(
        "fpr_resolution",
        1.0 / heads["auc"].num_nonmembers,
        higher_is_better=False,
        unit="fraction",
        description="Smallest non-zero false-positive rate the headline can resolve (1 / non-members it "
        "is measured on): TPR at any lower FPR is the TPR at 0% FPR.",
    )
    out.tables["headline"] = {
        "method": {
            "selection half": "attack chosen on a stratified random half of the audit set, metrics "
            "measured on the other half",
            "same examples": "attack chosen and measured on the same examples (too few to split): optimistic",
            "only attack": "single attack on the whole audit set",
        }[heads["auc"].selected_on],
        "selection_ids": [audit.ids[i] for i in np.nonzero(sel)[0]] if sel is not None else None,
        "null_permutations": p.null_permutations,
        "metrics": {
            name: {
                "attack": h.attack,
                "value": h.value,
                "ci": list(h.ci) if h.ci else None,
                "null_quantile": h.null_quantile,
                "p_value": h.p_value,
                "num_members": h.num_members,
                "num_nonmembers": h.num_nonmembers,
            }
            for name, h in heads.items()
        },
    }
    return heads


def _resolution_findings(out: Outcome, *, heads: dict[str, Headline], num_nonmembers: int) -> None:
    """FPR levels too low to measure with the non-members the headline is measured on."""
    from fmaudit.privacy.membership.stats import FPR_LEVELS, summarize_levels

    n_non = num_nonmembers
    n_head = heads["auc"].num_nonmembers
    for suffix, lvl, needed in summarize_levels(FPR_LEVELS, n_head):
        where = (
            f"the headline is measured on {n_head} of the {n_non} non-members (the other half chose the attack)"
            if n_head < n_non
            else f"{n_non} non-members"
        )
        out.finding(
            "low",
            f"Too few non-members to measure TPR at {lvl:.1%} FPR",
            f"{where}: the lowest non-zero FPR is {1 / n_head:.2%}, so tpr_at_{suffix}_fpr "
            f"equals the TPR at 0% FPR; at least {needed} non-members are needed "
            f"({2 * needed} with several attacks, since half of them choose the attack)",
            metric=f"tpr_at_{suffix}_fpr",
        )


def _blind_baseline(
    out: Outcome, *, p: MembershipAudit.Params, is_member: np.ndarray, audit: Dataset, seed: int
) -> None:
    """Is there a shift between members and non-members that a model-free attacker could exploit?"""
    from fmaudit.privacy.membership.blind import blind_baseline

    level = p.confidence
    if audit.texts is not None:
        lengths = np.array([len(t) for t in audit.texts], dtype=np.float64)
    else:
        lengths = None
    checks = blind_baseline(
        is_member, lengths=lengths, labels=audit.labels, bootstrap=min(p.bootstrap, 500), level=level, seed=seed
    )
    if checks:
        blind = max(max(c.auc, 1 - c.auc) for c in checks)
        out.metric(
            "blind_baseline_auc",
            blind,
            higher_is_better=False,
            unit="fraction",
            description="Best model-free attack (length or label alone), oriented so 0.5 = no shift.",
        )
        out.tables["blind_baseline"] = [
            {"feature": c.feature, "auc": c.auc, "ci": list(c.ci), "detail": c.detail, "flagged": c.flagged}
            for c in checks
        ]
        for c in checks:
            if c.flagged:
                out.finding(
                    "medium",
                    f"Members and non-members differ in {c.feature}",
                    f"{c.detail}; {c.feature} alone separates them with AUC {c.auc:.3f} "
                    f"[{c.ci[0]:.3f}, {c.ci[1]:.3f}]. A distribution shift inflates every attack's AUC "
                    "without any leak: compare against blind_baseline_auc",
                    metric="blind_baseline_auc",
                )


def _verdict(out: Outcome, *, p: MembershipAudit.Params, heads: dict[str, Headline]) -> None:
    """The headline finding: the strongest attack, or indistinguishable from chance by its null reference."""
    level = p.confidence
    head = out.metrics["auc"]
    h = heads["auc"]
    ci_txt = f" [{head.ci_low:.3f}, {head.ci_high:.3f}]" if head.ci_low is not None else ""
    detail = (
        f"TPR at 1% FPR {out.metrics['tpr_at_1pct_fpr'].value:.3f}, at 0.1% FPR "
        f"{out.metrics['tpr_at_0.1pct_fpr'].value:.3f}; measured on {h.num_members} members vs "
        f"{h.num_nonmembers} non-members"
    )
    chance = h.null_quantile is not None and (h.value <= h.null_quantile or (h.p_value or 0) > 1 - level)
    if chance:
        out.finding(
            "info",
            f"Indistinguishable from chance: strongest attack {h.attack} AUC {head.value:.3f}{ci_txt}",
            f"{detail}. The headline does not exceed its null reference (AUC {h.null_quantile:.3f} is "
            f"the {level:.0%} quantile of label-permuted AUCs; p = {h.p_value:.3f}). This is not proof of "
            f"safety: a stronger attack or more examples may still find a leak.",
            metric="auc",
        )
    else:
        ptxt = (
            f"; above its null reference {h.null_quantile:.3f} (p = {h.p_value:.3g})"
            if h.null_quantile is not None
            else ""
        )
        out.finding(
            "info", f"Strongest attack: {h.attack} with AUC {head.value:.3f}{ci_txt}", detail + ptxt, metric="auc"
        )


def _examples(
    out: Outcome,
    *,
    p: MembershipAudit.Params,
    attacks: Sequence[str],
    scores: dict[str, np.ndarray],
    is_member: np.ndarray,
    audit: Dataset,
    store_examples: bool,
) -> None:
    """Scores by example id, and the members most exposed by the attack strongest at 1% FPR as evidence."""
    ids = list(audit.ids)
    if p.per_example_scores:
        table: dict[str, Any] = {
            "ids": ids,
            "is_member": [bool(x) for x in is_member],
            "scores": {a: [float(v) for v in scores[a]] for a in attacks},
        }
        if store_examples and audit.texts is not None:
            table["texts"] = list(audit.texts)
        out.tables["per_example"] = table
    if p.evidence:
        a = out.tables["strongest_attack"].get("tpr_at_1pct_fpr") or attacks[0]
        s = np.asarray(scores[a])
        order = [i for i in np.argsort(-s, kind="stable") if is_member[i]][: p.evidence]
        nonmember_top = float(np.max(s[~is_member]))
        for rank, i in enumerate(order, 1):
            ev: dict[str, Any] = {
                "id": ids[i],
                "attack": a,
                "score": float(s[i]),
                "rank": rank,
                "above_every_nonmember": bool(s[i] > nonmember_top),
            }
            if store_examples and audit.texts is not None:
                ev["text"] = audit.texts[i]
            out.evidence.append(ev)
