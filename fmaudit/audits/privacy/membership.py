"""`privacy.membership`: membership-inference attacks on classifiers and causal LMs.

Given a target and known members (trained on) and non-members (never seen), measures how well attacks
tell them apart: loss / confidence / entropy baselines, LiRA (online, offline; fixed or per-example
variance) and RMIA with reference models fine-tuned by the same loop as the target, and the causal-LM
scores (zlib ratio, Min-K% Prob, Min-K%++). Positive class = member, always.

Reference models start from the target's base (pre-fine-tune) weights and each trains on a random half of
the population (the target's whole fine-tune dataset), in complementary pairs, with recorded seeds, and
are cached by hash. They are cheap by default: only the last block(s) and the head train.

This module orchestrates; the algorithms live in fmaudit/privacy/membership/ (attack registry, signals,
reference models, statistics). The attacks an audit asks for say what they need (`Attack.needs`); the module
gathers each need once, in the order of `STAGES`, and `membership_report` turns the scores into the report.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from fmaudit.audits.base import AuditContext, AuditModule, AuditParams, Outcome
from fmaudit.audits.privacy.membership_stages import STAGES, MembershipRun
from fmaudit.privacy.membership.attacks import ATTACKS, REFERENCE_ATTACKS, AttackInputs, AttackName, AttackSettings

if TYPE_CHECKING:
    pass

_PER_ATTACK = (
    "auc",
    "tpr_at_1pct_fpr",
    "tpr_at_0.1pct_fpr",
    "tpr_at_0pct_fpr",
    "balanced_accuracy",
    "advantage",
    "ppv_at_1pct_fpr",
)


def _default_attacks() -> list[AttackName]:
    return ["loss", "rmia"]


DEFAULT_MAX_NONMEMBERS = 5000  # forward passes only; enough to resolve 0.1% FPR on either headline half


class MembershipAudit(AuditModule):
    name = "privacy.membership"
    category = "privacy"
    description = (
        "Membership inference: loss / confidence / entropy baselines, LiRA and RMIA with cheap reference "
        "models fine-tuned by the same loop, zlib / Min-K% / Min-K%++ for causal LMs; AUC with a "
        "bootstrap interval, TPR at 1%, 0.1% and 0% FPR, ROC curves, and a blind-baseline shift check."
    )
    requires = frozenset({"per_example_loss"})
    metric_names = (
        _PER_ATTACK
        + tuple(f"*.{m}" for m in _PER_ATTACK)
        + (
            "blind_baseline_auc",
            "num_members",
            "num_nonmembers",
            "reference_cost_ratio",
            "auc_null",
            "advantage_null",
            "tpr_at_1pct_fpr_null",
            "auc_p_value",
            "fpr_resolution",
            "reference_overlap_max_deviation",
        )
    )

    class Params(AuditParams):
        attacks: list[AttackName] = Field(
            default_factory=_default_attacks,
            min_length=1,
            description="Attacks to run. Classifiers: loss, confidence, entropy; causal LMs: loss, zlib, min_k, "
            "min_k_pp; both: calibrated_loss, quantile, lira_online, lira_offline, rmia, rmia_offline.",
        )
        reference_models: int = Field(
            default=2, ge=1, le=256, description="Reference models for LiRA / RMIA (trained in complementary pairs)."
        )
        reference_trainable: Literal["head", "last_n_layers", "all"] = Field(
            default="last_n_layers", description="What trains in a reference model (cheap by default)."
        )
        reference_n_layers: int = Field(default=1, ge=1, description="With last_n_layers: how many final blocks train.")
        reference_epochs: int | None = Field(default=None, ge=1, description="Default: the target's fine-tune epochs.")
        reference_lr: float | None = Field(default=None, gt=0, description="Default: the target's fine-tune lr.")
        reference_batch_size: int | None = Field(default=None, ge=1, description="Default: the target's batch size.")
        reference_seed: int = Field(
            default=0,
            ge=0,
            description="Seed of the reference models' halves and training "
            "(recorded; the same seed reuses cached models).",
        )
        fixed_variance: bool | None = Field(
            default=None, description="LiRA with one global variance; default: when fewer than 64 reference models."
        )
        rmia_gamma: float = Field(default=1.0, gt=0, description="RMIA's likelihood-ratio threshold gamma.")
        rmia_offline_a: float = Field(default=0.3, ge=0, le=1, description="RMIA offline approximation parameter a.")
        lira_shrinkage: bool = Field(
            default=True,
            description="LiRA: shrink each example's IN - OUT gap toward the "
            "global gap, never below 0 (stable with few models).",
        )
        quantile_folds: int = Field(
            default=5,
            ge=2,
            le=20,
            description="quantile: cross-fitting folds over the "
            "known non-members (each scored by a regression that never saw it).",
        )
        null_permutations: int = Field(
            default=200, ge=0, le=10_000, description="Label permutations for the headline's null reference (0: none)."
        )
        min_k: float = Field(default=0.2, gt=0, le=1, description="Fraction of lowest-probability tokens for Min-K%.")
        calibration_model: str = Field(
            default="base",
            description="calibrated_loss: 'base' (the target's pre-fine-tune weights) or another target's name.",
        )
        members: list[str] | None = Field(
            default=None, description="Member example ids (default: the target's fine-tune split)."
        )
        nonmembers: list[str] | None = Field(
            default=None, description="Non-member ids (default with members: every other example of the data)."
        )
        max_examples: int | None = Field(
            default=None,
            ge=2,
            description="Shorthand: at most this many members and as many non-members (a seeded sample); "
            "max_members / max_nonmembers, when given, override it.",
        )
        max_members: int | None = Field(
            default=None, ge=1, description="Score a seeded sample of at most this many members (default: all)."
        )
        max_nonmembers: int | None = Field(
            default=None,
            ge=1,
            description="Score a seeded sample of at most this many non-members (default: max_examples when "
            "given, else every non-member up to 5000). Non-members cost only forward passes, and 1 / their number is the lowest FPR the audit "
            "resolves: keep at least 1,000 to measure TPR at 0.1% FPR.",
        )
        batch_size: int = Field(default=32, ge=1)
        bootstrap: int = Field(default=1000, ge=0, le=100_000, description="Bootstrap rounds (0: no intervals).")
        confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
        per_example_scores: bool = Field(default=True, description="Scores by example id in the report's tables.")
        evidence: int = Field(
            default=10,
            ge=0,
            description="Most exposed members listed as evidence (ids; text only when the recipe sets store_examples).",
        )

        def member_cap(self) -> int | None:
            return self.max_members if self.max_members is not None else self.max_examples

        def nonmember_cap(self) -> int:
            if self.max_nonmembers is not None:
                return self.max_nonmembers
            return self.max_examples if self.max_examples is not None else DEFAULT_MAX_NONMEMBERS

    params: Params

    def check(self, target, data) -> list[str]:
        p = self.params
        caps = target.capabilities
        problems = []
        is_clf = "classifier" in caps
        kind = "classifier" if is_clf else "causal_lm"
        wrong = sorted(a for a in set(p.attacks) if kind not in ATTACKS[a].models)
        if wrong:
            problems.append(f"attack(s) {', '.join(wrong)} do not apply to a {target.task} target")
        if "causal_lm" not in caps and not is_clf:
            problems.append(f"privacy.membership supports classifiers and causal LMs, not {target.task}")
        if set(p.attacks) & REFERENCE_ATTACKS and "trainable" not in caps:
            problems.append(
                f"reference-model attacks ({', '.join(sorted(set(p.attacks) & REFERENCE_ATTACKS))}) "
                f"fine-tune reference models, but target {target.name!r} cannot be fine-tuned; use "
                "loss / confidence / entropy / zlib / min_k instead"
            )
        if p.members is None and p.nonmembers is not None:
            problems.append("nonmembers given without members; give members too (or neither, to use the split)")
        if p.members is None and getattr(target, "split", None) is None:
            problems.append(
                f"target {target.name!r} has no member / non-member split: fine-tune it in the recipe "
                "(targets.<name>.finetune) or give params members / nonmembers (example ids)"
            )
        if data is None or len(data) == 0:
            problems.append("no data to attack")
        elif is_clf and data.labels is None:
            problems.append(f"dataset {data.name!r} has no labels; classifier attacks need them")
        return problems

    def run(self, target, ctx: AuditContext) -> Outcome:
        from fmaudit.audits.privacy.membership_report import report_scores
        from fmaudit.privacy.membership.sets import audit_sets

        p = self.params
        out = Outcome()
        t0 = time.perf_counter()
        sets = audit_sets(
            members=p.members,
            nonmembers=p.nonmembers,
            data=ctx.data,
            split=ctx.split if ctx.split is not None else getattr(target, "split", None),
            target_name=target.name,
            max_members=p.member_cap(),
            max_nonmembers=p.nonmember_cap(),
            seed=ctx.seed,
        )
        if sets.shared_texts:
            out.finding(
                "low",
                f"{sets.shared_texts} text(s) appear among both members and non-members",
                "identical texts under different ids: such a 'non-member' was in effect trained on, "
                "which lowers the measured leakage",
            )
        attacks = list(dict.fromkeys(p.attacks))
        needs = set().union(*(ATTACKS[a].needs for a in attacks))
        run = MembershipRun(
            p=p,
            target=target,
            ctx=ctx,
            out=out,
            sets=sets,
            is_clf="classifier" in target.capabilities,
            inputs=AttackInputs(target={}, is_member=sets.is_member, seed=ctx.seed),
        )
        with ctx.progress_bar("membership: scoring the target", 1) as bar:
            run.inputs.target = run.signals(target, token_distribution="token_distribution" in needs)
            bar.advance()
        scores, timings = _score(run, attacks, self.settings(), t0)
        report_scores(
            out,
            p=p,
            attacks=attacks,
            scores=scores,
            is_member=sets.is_member,
            audit=sets.audit,
            seed=ctx.seed,
            store_examples=ctx.store_examples,
        )
        out.tables["sets"] = {
            **sets.source,
            "num_members": int(sets.is_member.sum()),
            "num_nonmembers": int((~sets.is_member).sum()),
            "population": len(sets.population),
            "population_dataset": sets.population.name,
        }
        out.tables["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        _costs(out, target, attacks, timings)
        return out

    def settings(self) -> AttackSettings:
        """The attacks' knobs; LiRA uses one global variance below 64 reference models unless params say."""
        p = self.params
        fixed = p.fixed_variance if p.fixed_variance is not None else p.reference_models < 64
        return AttackSettings(
            fixed_variance=fixed,
            lira_shrinkage=p.lira_shrinkage,
            rmia_gamma=p.rmia_gamma,
            rmia_offline_a=p.rmia_offline_a,
            quantile_folds=p.quantile_folds,
        )


def _score(
    run: MembershipRun, attacks: Sequence[str], settings: AttackSettings, t0: float
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Every attack's scores: first those that read only the target's signals, then, need by need in the order
    of STAGES, the need gathered once and the attacks that read it. Returns (scores by attack, seconds by step)."""
    scores = {a: ATTACKS[a].score(run.inputs, settings) for a in attacks if not ATTACKS[a].needs & STAGES.keys()}
    timings = {"score_target_s": time.perf_counter() - t0}
    for need, stage in STAGES.items():
        wanted = [a for a in attacks if need in ATTACKS[a].needs]
        if wanted:
            t = time.perf_counter()
            stage.prepare(run)
            scores.update({a: ATTACKS[a].score(run.inputs, settings) for a in wanted})
            timings[stage.timing] = time.perf_counter() - t
            if stage.report is not None:
                stage.report(run, settings, timings[stage.timing])
    return {a: scores[a] for a in attacks}, timings  # in the order asked: the headline's ties go to the first


def _costs(out: Outcome, target, attacks: Sequence[str], timings: dict[str, float]) -> None:
    """What each attack cost the auditor, in CPU-seconds of this run and in fine-tunes of the target:
    scoring the target, plus what the attack needs (reference models: their recorded training time, also
    when they came from the cache; quantile: base features and regressions; calibration: scoring)."""
    refs = out.tables.get("reference_models", {}).get("models", [])
    ref_train = float(sum(r.get("train_seconds") or 0.0 for r in refs))
    ref_score = float(sum(r.get("score_seconds") or 0.0 for r in refs))
    target_train = target.provenance.train_seconds if target.provenance is not None else None
    for a in attacks:
        needs = ATTACKS[a].needs & STAGES.keys()
        extra = (
            ref_train + ref_score
            if "reference_models" in needs
            else sum(timings.get(STAGES[n].timing, 0.0) for n in needs)
        )
        cost = timings.get("score_target_s", 0.0) + extra
        row = out.tables["attacks"][a]
        row["cost_seconds"] = round(cost, 3)
        row["cost_target_finetunes"] = round(cost / target_train, 4) if target_train else None


# -- stages: what the attacks need beyond the target's own signals ------------------------------------------------
