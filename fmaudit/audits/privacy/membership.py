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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
from pydantic import Field

from fmaudit.audits.base import AuditContext, AuditModule, AuditParams, Outcome, base_target
from fmaudit.privacy.membership.attacks import ATTACKS, REFERENCE_ATTACKS, AttackInputs, AttackName, AttackSettings
from fmaudit.privacy.membership.reference_models import reference_overlap
from fmaudit.privacy.membership.sets import AuditSets

if TYPE_CHECKING:
    from fmaudit.training import TrainConfig

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
            description="Score a seeded sample of at most this many members and as many non-members.",
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
            max_examples=p.max_examples,
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
        run = _Run(
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


@dataclass
class _Run:
    """One run of the module: what the stages read and fill in."""

    p: MembershipAudit.Params
    target: Any
    ctx: AuditContext
    out: Outcome
    sets: AuditSets
    is_clf: bool
    inputs: AttackInputs
    feature_source: str = ""

    def signals(self, model: Any, *, token_distribution: bool = False) -> dict[str, np.ndarray]:
        """`model`'s per-example signals on the audit examples."""
        from fmaudit.privacy.membership.outputs import model_signals

        return model_signals(
            model,
            self.sets.audit,
            is_clf=self.is_clf,
            token_distribution=token_distribution,
            batch_size=self.p.batch_size,
            min_k=self.p.min_k,
        )


def _score(
    run: _Run, attacks: Sequence[str], settings: AttackSettings, t0: float
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


def _base_features(run: _Run) -> None:
    """quantile: membership-independent features of every audit example from the base model."""
    from fmaudit.privacy.membership.outputs import base_features

    run.inputs.base_features, run.feature_source = base_features(
        base_target(run.target, run.ctx),
        run.sets.audit,
        is_clf=run.is_clf,
        num_labels=run.target.num_labels,
        batch_size=run.p.batch_size,
    )


def _report_quantile(run: _Run, settings: AttackSettings, seconds: float) -> None:
    run.out.tables["quantile_regression"] = run.inputs.details["quantile"] | {
        "feature_source": run.feature_source,
        "seconds": round(seconds, 3),
    }


def _calibration(run: _Run) -> None:
    """calibrated_loss: the calibration model's signals ('base': the target's pre-fine-tune weights)."""
    name, target, ctx = run.p.calibration_model, run.target, run.ctx
    if name == "base":
        cal = base_target(target, ctx)
    else:
        try:
            if ctx.services is None:
                raise KeyError(name)
            cal = ctx.services.target(name)
        except KeyError:
            raise ValueError(f"calibration_model {name!r} is not a target of this run") from None
        if cal.task != target.task:
            raise ValueError(f"calibration_model {name!r} is a {cal.task} model; the target is {target.task}")
    run.inputs.calibration = run.signals(cal)
    run.out.tables["calibration_model"] = {"name": name, "weights_sha256": cal.weights_sha256()}


def _reference_config(run: _Run) -> TrainConfig:
    """The reference models' fine-tune settings: the target's recorded ones (a produced target, e.g. DP fine-tuned,
    mimics its source's, so both share the same cached reference models), overridden by params."""
    from fmaudit.training import TrainConfig

    p, target, services = run.p, run.target, run.ctx.services
    cfg = target.provenance.train if target.provenance is not None else None
    source = services.source_of(target) if services is not None else None
    if cfg is None and services is not None and source is not None and source != target.name:
        src = services.target(source)
        cfg = src.provenance.train if src.provenance is not None else None
    if cfg is None:
        run.out.finding(
            "low",
            "Reference models use default training settings",
            f"target {target.name!r} records no fine-tune settings; reference models train with "
            "epochs / lr / batch size from params or the defaults (1 epoch, lr 5e-5, batch 16)",
        )
    cfg = cfg or TrainConfig()
    return TrainConfig(
        epochs=p.reference_epochs or cfg.epochs,
        batch_size=p.reference_batch_size or cfg.batch_size,
        lr=p.reference_lr or cfg.lr,
        weight_decay=cfg.weight_decay,
        trainable=p.reference_trainable,
        n_layers=p.reference_n_layers,
    )


def _reference_models(run: _Run) -> None:
    """LiRA / RMIA: train (or load) the reference models through the run's executor and score the audit set."""
    from fmaudit.executor import LocalExecutor, local_only
    from fmaudit.privacy.membership.reference_models import ReferenceSignals, TrainReference, paired_halves
    from fmaudit.seeds import Stream, derive

    p, target, ctx, population = run.p, run.target, run.ctx, run.sets.population
    base = base_target(target, ctx)
    R = p.reference_models
    masks = paired_halves(len(population), R, p.reference_seed)
    seeds = [derive(p.reference_seed, Stream.REFERENCE_TRAIN, r) % (2**32) for r in range(R)]
    config = _reference_config(run)
    configs = [replace(config, seed=s) for s in seeds]
    # a remote executor pickles what the function captures: progress bars stay in this process
    train_one = TrainReference(
        base=base,
        population=population,
        audit=run.sets.audit,
        masks=masks,
        seeds=seeds,
        configs=configs,
        is_clf=run.is_clf,
        cache_dir=ctx.cache_dir,
        progress=local_only(ctx.progress),
        batch_size=p.batch_size,
        min_k=p.min_k,
        label=target.name,
    )
    results = (ctx.executor or LocalExecutor()).map(train_one, list(range(R)))
    errors = [r for r in results if "error" in r]
    if errors:
        raise RuntimeError(
            "reference model training failed: " + "; ".join(f"#{e['index']}: {e['error']}" for e in errors)
        )
    results.sort(key=lambda r: r["index"])
    in_mask = masks[:, run.sets.audit_idx]
    run.inputs.reference = ReferenceSignals(
        phi=np.stack([r["phi"] for r in results]), logp=np.stack([r["logp"] for r in results]), in_mask=in_mask
    )
    _report_reference_models(run, results, masks, base.weights_sha256(), config)


def _report_reference_models(
    run: _Run, results: list[dict[str, Any]], masks: np.ndarray, base_sha256: str, config: TrainConfig
) -> None:
    """Each reference model's record, their overlap with the target's split, and their cost."""
    p, out, target, population = run.p, run.out, run.target, run.sets.population
    R = p.reference_models
    target_train = target.provenance.train_seconds if target.provenance is not None else None
    overlap = reference_overlap(masks[:, run.sets.audit_idx], run.sets.is_member)
    rows = []
    for r in results:
        ratio = r["train_seconds"] / target_train if target_train else None
        rows.append(
            {k: v for k, v in r.items() if k not in ("phi", "logp")}
            | {"cost_ratio": ratio}
            | overlap["models"][r["index"]]
        )
    out.metric(
        "reference_overlap_max_deviation",
        overlap["max_deviation"],
        higher_is_better=False,
        unit="fraction",
        description="Largest |overlap - 0.5| over reference models, where overlap is the "
        "fraction of the target's members (or non-members) in a reference "
        "model's training half; near 0 = references independent of the "
        f"answer (chance level here about {overlap['chance_deviation']:.3f}).",
    )
    if overlap["correlated"]:
        out.finding(
            "high",
            "Reference models are correlated with the target's membership",
            f"reference model(s) {overlap['correlated']} trained on a half whose overlap with the target's "
            "members differs from 0.5 far beyond chance (|z| > 4.5): such references know the answer and "
            "LiRA / RMIA numbers are not valid; use another reference_seed",
            metric="reference_overlap_max_deviation",
        )
    out.tables["reference_models"] = {
        "count": R,
        "base_weights_sha256": base_sha256,
        "config": {
            k: getattr(config, k) for k in ("epochs", "batch_size", "lr", "weight_decay", "trainable", "n_layers")
        },
        "halves": "complementary pairs of random halves of the population",
        "reference_seed": p.reference_seed,
        "halves_stream": "fmaudit.seeds Stream.REFERENCE_HALVES, key = pair index",
        # which examples each reference model trained on: model 2j on these ids, model 2j+1 on the rest
        "pairs": [
            {
                "models": [2 * j, 2 * j + 1] if 2 * j + 1 < R else [2 * j],
                "in_ids_of_first": [population.ids[i] for i in np.nonzero(masks[2 * j])[0]],
            }
            for j in range((R + 1) // 2)
        ],
        "target_train_seconds": target_train,
        "models": rows,
    }
    ratios = [r["cost_ratio"] for r in rows if r["cost_ratio"] is not None]
    if ratios:
        out.metric(
            "reference_cost_ratio",
            float(np.median(ratios)),
            higher_is_better=False,
            unit="ratio",
            description="Median training time of one reference model / the target's fine-tune time "
            "(as recorded when each was trained).",
        )


def _report_reference_attacks(run: _Run, settings: AttackSettings, seconds: float) -> None:
    """The reference attacks' settings (and LiRA's IN / OUT statistics), and examples lacking an IN or OUT model."""
    assert run.inputs.reference is not None
    in_mask, R = run.inputs.reference.in_mask, run.p.reference_models
    info: dict[str, Any] = {"fixed_variance": settings.fixed_variance}
    if "lira" in run.inputs.details:
        info["lira"] = run.inputs.details["lira"]
    n_imp = int((in_mask.sum(0) == 0).sum() + (in_mask.sum(0) == R).sum())
    if n_imp:
        run.out.finding(
            "info",
            f"{n_imp} example(s) lack an IN or an OUT reference model",
            "with a single reference model each example is only IN or only OUT; the missing mean is "
            "the other one shifted by the global IN - OUT gap. Use an even reference_models >= 2.",
        )
    run.out.tables["reference_attack_settings"] = info | {
        "rmia_gamma": settings.rmia_gamma,
        "rmia_offline_a": settings.rmia_offline_a,
    }


class Stage(NamedTuple):
    """How the module gathers one need of the attacks: `prepare` fills `_Run.inputs` (and reports what it
    trained or loaded), then the attacks that need it score, then `report` adds what they found; the time of
    all three is recorded under `timing`."""

    timing: str
    prepare: Callable[[_Run], None]
    report: Callable[[_Run, AttackSettings, float], None] | None = None


# Needs gathered after the target's own signals, in this order ("token_distribution" comes with those signals).
STAGES: dict[str, Stage] = {
    "base_features": Stage("quantile_s", _base_features, _report_quantile),
    "calibration_model": Stage("calibration_s", _calibration),
    "reference_models": Stage("reference_models_s", _reference_models, _report_reference_attacks),
}
