"""How privacy.membership gathers what its attacks need, one stage per need (base-model features for the
quantile attack, a calibration model, reference models), each run once per audit in the order of STAGES,
and what each stage adds to the report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from fmaudit.audits.base import AuditContext, Outcome, base_target
from fmaudit.privacy.membership.attacks import AttackInputs, AttackSettings
from fmaudit.privacy.membership.reference_models import reference_overlap
from fmaudit.privacy.membership.sets import AuditSets

if TYPE_CHECKING:
    from fmaudit.audits.privacy.membership import MembershipAudit
    from fmaudit.training import TrainConfig


@dataclass
class MembershipRun:
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


def _base_features(run: MembershipRun) -> None:
    """quantile: membership-independent features of every audit example from the base model."""
    from fmaudit.privacy.membership.outputs import base_features

    run.inputs.base_features, run.feature_source = base_features(
        base_target(run.target, run.ctx),
        run.sets.audit,
        is_clf=run.is_clf,
        num_labels=run.target.num_labels,
        batch_size=run.p.batch_size,
    )


def _report_quantile(run: MembershipRun, settings: AttackSettings, seconds: float) -> None:
    run.out.tables["quantile_regression"] = run.inputs.details["quantile"] | {
        "feature_source": run.feature_source,
        "seconds": round(seconds, 3),
    }


def _calibration(run: MembershipRun) -> None:
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


def _reference_config(run: MembershipRun) -> TrainConfig:
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


def _reference_models(run: MembershipRun) -> None:
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
    run: MembershipRun, results: list[dict[str, Any]], masks: np.ndarray, base_sha256: str, config: TrainConfig
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


def _report_reference_attacks(run: MembershipRun, settings: AttackSettings, seconds: float) -> None:
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
    """How the module gathers one need of the attacks: `prepare` fills `MembershipRun.inputs` (and reports what it
    trained or loaded), then the attacks that need it score, then `report` adds what they found; the time of
    all three is recorded under `timing`."""

    timing: str
    prepare: Callable[[MembershipRun], None]
    report: Callable[[MembershipRun, AttackSettings, float], None] | None = None


# Needs gathered after the target's own signals, in this order ("token_distribution" comes with those signals).
STAGES: dict[str, Stage] = {
    "base_features": Stage("quantile_s", _base_features, _report_quantile),
    "calibration_model": Stage("calibration_s", _calibration),
    "reference_models": Stage("reference_models_s", _reference_models, _report_reference_attacks),
}
